//! The bit of the i8042 keyboard controller a microVM needs: the CPU reset
//! line. Linux with `reboot=k` resets through it, which is how a nutshell
//! guest stops; the VMM then ends the VM.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// First port of the controller (data port 0x60); the bus range covers
/// 0x60..=0x64.
pub const I8042_BASE: u64 = 0x60;
/// Length of the port range.
pub const I8042_LEN: u64 = 5;
const OFF_COMMAND: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// i8042 controller that only implements the reset command.
pub struct I8042 {
    exit: Arc<ExitSignal>,
}

impl I8042 {
    /// A controller that reports a reset to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No keyboard: the data port reads 0 and the status port says
        // "output buffer empty, input buffer empty".
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == OFF_COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request(ExitReason::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm_and_others_do_not() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(OFF_COMMAND, &[0xaa]);
        dev.write(0, &[CMD_RESET_CPU]);
        assert!(!exit.is_stopping());
        dev.write(OFF_COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }
}
