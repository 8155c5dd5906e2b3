//! The terminal of `--console-socket`, as runc hands it over: a pty is made
//! on the host, its master goes to the caller over the Unix socket
//! (`SCM_RIGHTS`, the pty's name as the payload), and its slave becomes the
//! stand-in's stdio and controlling terminal. The guest process has a pty
//! of its own in the guest; the stand-in relays between the two and passes
//! window-size changes (its SIGWINCH) on.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

/// A new pty: (master, slave, the slave's path).
pub fn open_pty() -> io::Result<(OwnedFd, OwnedFd, String)> {
    let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    let name = nix::unistd::ttyname(&pty.slave)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Ok((pty.master, pty.slave, name))
}

/// Sends `master` to whoever listens on `socket`, as runc does.
pub fn send_master(socket: &Path, master: &OwnedFd, name: &str) -> io::Result<()> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot connect to the console socket {}: {e}",
                socket.display()
            ),
        )
    })?;
    let fds = [master.as_raw_fd()];
    let payload = [IoSlice::new(name.as_bytes())];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &payload,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    Ok(())
}

/// Makes `tty` (the stand-in's stdin, a pty slave) its controlling
/// terminal, so that its window-size changes reach the stand-in, and puts
/// it in raw mode: the guest's pty does the line discipline, once.
pub fn take_terminal(tty: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument and changes no memory; the
    // fd is valid for the call (borrowed).
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSCTTY, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut t = tcgetattr(tty).map_err(io::Error::from)?;
    cfmakeraw(&mut t);
    tcsetattr(tty, SetArg::TCSANOW, &t).map_err(io::Error::from)
}

/// The terminal's size as (rows, columns); `None` when it is not a
/// terminal or has no size yet.
pub fn window_size(tty: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass, which
    // lives across the call.
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_master_reaches_the_console_socket_and_carries_its_size() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("console.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let (master, slave, name) = open_pty().unwrap();
        assert!(name.starts_with("/dev/pts/"), "{name}");
        send_master(&sock, &master, &name).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let mut got = None;
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = c {
                got = fds.first().copied();
            }
        }
        let received = got.expect("an fd came");
        let ws = libc::winsize {
            ws_row: 33,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the struct passed.
        assert_eq!(unsafe { libc::ioctl(received, libc::TIOCSWINSZ, &ws) }, 0);
        use std::os::fd::AsFd;
        assert_eq!(window_size(slave.as_fd()), Some((33, 101)));
        // SAFETY: the fd came from SCM_RIGHTS and is ours to close.
        unsafe { libc::close(received) };
    }
}
