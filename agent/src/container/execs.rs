//! The exec ids of one container. An id is taken from the moment
//! ExecProcess begins, so a second ExecProcess with it is refused, but it
//! names no process until the exec has started: calls against it in the
//! meantime fail instead of reaching some other process.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::error::{AgentError, Result};

/// What an exec id stands for.
enum Slot<P> {
    /// ExecProcess is setting it up; there is no process to act on yet.
    Starting,
    /// The exec's process.
    Running(P),
}

/// A container's execs by id; `P` is the process handle.
pub struct Execs<P> {
    slots: Mutex<HashMap<String, Slot<P>>>,
}

impl<P> Default for Execs<P> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<P: Clone> Execs<P> {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot<P>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `exec_id` for an exec being started; the id is freed again
    /// unless [`Reservation::fill`] is called (an error, or the caller's
    /// deadline dropping the request).
    pub fn reserve(&self, container: &str, exec_id: &str) -> Result<Reservation<'_, P>> {
        let mut slots = self.slots();
        if slots.contains_key(exec_id) {
            return Err(AgentError::AlreadyExists(format!(
                "container {container}: exec id {exec_id:?} already exists"
            )));
        }
        slots.insert(exec_id.to_string(), Slot::Starting);
        Ok(Reservation {
            execs: self,
            exec_id: exec_id.to_string(),
            filled: false,
        })
    }

    /// The process of a started exec. FAILED_PRECONDITION while it is still
    /// starting: the id exists (ExecProcess with it is refused) but there is
    /// nothing to signal, wait for or read yet, and the caller may retry.
    pub fn get(&self, container: &str, exec_id: &str) -> Result<P> {
        match self.slots().get(exec_id) {
            Some(Slot::Running(p)) => Ok(p.clone()),
            Some(Slot::Starting) => Err(AgentError::FailedPrecondition(format!(
                "container {container}: exec {exec_id:?} is still starting"
            ))),
            None => Err(AgentError::NotFound(format!(
                "container {container}: no process with exec id {exec_id:?}"
            ))),
        }
    }

    /// Every started exec's process.
    pub fn running(&self) -> Vec<P> {
        self.slots()
            .values()
            .filter_map(|s| match s {
                Slot::Running(p) => Some(p.clone()),
                Slot::Starting => None,
            })
            .collect()
    }

    /// Forgets a started exec.
    pub fn remove(&self, exec_id: &str) {
        let mut slots = self.slots();
        if matches!(slots.get(exec_id), Some(Slot::Running(_))) {
            slots.remove(exec_id);
        }
    }
}

/// An exec id taken by an ExecProcess in progress.
pub struct Reservation<'a, P> {
    execs: &'a Execs<P>,
    exec_id: String,
    filled: bool,
}

impl<P> Reservation<'_, P> {
    /// The exec started: its id now names `process`.
    pub fn fill(mut self, process: P) {
        self.execs
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(std::mem::take(&mut self.exec_id), Slot::Running(process));
        self.filled = true;
    }
}

impl<P> Drop for Reservation<'_, P> {
    fn drop(&mut self) {
        if self.filled {
            return;
        }
        let mut slots = self
            .execs
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if matches!(slots.get(&self.exec_id), Some(Slot::Starting)) {
            slots.remove(&self.exec_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttrpc::Code;

    fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
        r.expect_err("an error").code()
    }

    #[test]
    fn a_starting_exec_names_no_process() {
        let execs = Execs::<i32>::default();
        let slot = execs.reserve("c", "e1").unwrap();
        let e = execs.get("c", "e1").unwrap_err();
        assert_eq!(e.code(), Code::FAILED_PRECONDITION);
        assert!(e.to_string().contains("still starting"), "{e}");
        assert!(execs.running().is_empty());
        // Removing it is refused too: the slot stays until the exec ends.
        execs.remove("e1");
        assert_eq!(
            code(execs.reserve("c", "e1").map(|_| ())),
            Code::ALREADY_EXISTS
        );
        slot.fill(42);
        assert_eq!(execs.get("c", "e1").unwrap(), 42);
        assert_eq!(execs.running(), [42]);
    }

    #[test]
    fn an_id_is_taken_once() {
        let execs = Execs::<i32>::default();
        execs.reserve("c", "e1").unwrap().fill(1);
        let e = execs.reserve("c", "e1").map(|_| ()).unwrap_err();
        assert_eq!(e.code(), Code::ALREADY_EXISTS);
        assert_eq!(execs.get("c", "e1").unwrap(), 1);
    }

    #[test]
    fn an_exec_that_never_started_frees_its_id() {
        let execs = Execs::<i32>::default();
        drop(execs.reserve("c", "e1").unwrap());
        assert_eq!(code(execs.get("c", "e1")), Code::NOT_FOUND);
        execs.reserve("c", "e1").unwrap().fill(7);
        assert_eq!(execs.get("c", "e1").unwrap(), 7);
    }

    #[test]
    fn removed_execs_are_gone() {
        let execs = Execs::<i32>::default();
        execs.reserve("c", "e1").unwrap().fill(1);
        execs.reserve("c", "e2").unwrap().fill(2);
        execs.remove("e1");
        assert_eq!(code(execs.get("c", "e1")), Code::NOT_FOUND);
        assert_eq!(execs.running(), [2]);
    }
}
