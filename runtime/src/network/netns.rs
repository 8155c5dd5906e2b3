//! Work inside another network namespace: a thread of our own enters it
//! (`setns` changes only the calling thread), runs a current-thread tokio
//! runtime there with a netlink connection opened inside, and ends. Sockets
//! and taps opened on that thread belong to that namespace for good.

use std::fs::File;
use std::future::Future;
use std::path::Path;

use nix::sched::{setns, CloneFlags};
use rtnetlink::Handle;

use super::NetworkError;

/// Runs `f` with a netlink handle inside the network namespace at `path`.
pub(crate) async fn in_netns<F, Fut, T>(path: &Path, f: F) -> Result<T, NetworkError>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
    T: Send + 'static,
{
    in_netns_fd(open_netns(path)?, f).await
}

/// The network namespace at `path`, opened.
pub fn open_netns(path: &Path) -> Result<File, NetworkError> {
    File::open(path).map_err(|source| NetworkError::Netns {
        path: path.to_path_buf(),
        source,
    })
}

/// A new, empty network namespace that lives as long as the returned fd
/// (and whatever is made inside it): no path names it.
pub(crate) fn new_netns() -> Result<File, NetworkError> {
    std::thread::Builder::new()
        .name("nutshell-netns".into())
        .spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetworkError::io("make a network namespace")(e.into()))?;
            File::open("/proc/thread-self/ns/net")
                .map_err(NetworkError::io("open the new network namespace"))
        })
        .map_err(NetworkError::io(
            "start a thread for a new network namespace",
        ))?
        .join()
        .map_err(|_| NetworkError::Io {
            what: "make a network namespace".into(),
            source: std::io::Error::other("its thread panicked"),
        })?
}

/// Runs `f` with a netlink handle inside the network namespace `ns`.
pub(crate) async fn in_netns_fd<F, Fut, T>(ns: File, f: F) -> Result<T, NetworkError>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("nutshell-netns".into())
        .spawn(move || {
            let _ = tx.send(run_in(ns, f));
        })
        .map_err(NetworkError::io(
            "start a thread for the pod's network namespace",
        ))?;
    rx.await.map_err(|_| NetworkError::Io {
        what: "finish work in the pod's network namespace".into(),
        source: std::io::Error::other("its thread panicked"),
    })?
}

fn run_in<F, Fut, T>(ns: File, f: F) -> Result<T, NetworkError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    setns(&ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| NetworkError::io("enter the pod's network namespace")(e.into()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NetworkError::io("start a runtime for netlink"))?;
    rt.block_on(async move {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(NetworkError::io("open a netlink socket"))?;
        let conn = tokio::spawn(conn);
        let r = f(handle).await;
        conn.abort();
        r
    })
}
