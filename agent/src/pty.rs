//! Terminal helpers on the agent side. The pty itself is opened inside the
//! container (so `tty` names a path of the container's devpts); the agent
//! holds the master.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Sets the window size of the terminal behind `master` (TIOCSWINSZ); the
/// kernel sends SIGWINCH to the terminal's foreground process group.
pub fn resize(master: BorrowedFd<'_>, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct we own; `master` is open.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
