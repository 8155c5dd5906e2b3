//! COM1 (port 0x3f8, IRQ 4): a `vm-superio` 16550A whose output goes to a
//! file, stdout or nowhere, and whose last lines are kept so that a VM that
//! dies can say what the guest printed last.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// COM1's port base.
pub const COM1_BASE: u64 = 0x3f8;
/// Ports a 16550 decodes.
pub const COM1_LEN: u64 = 8;
/// Lines kept for error reports.
pub const TAIL_LINES: usize = 20;
/// Longest line kept; a guest that never sends a newline cannot grow us.
const MAX_LINE: usize = 512;

/// The last lines the guest printed.
#[derive(Debug, Default)]
pub struct ConsoleTail {
    lines: VecDeque<String>,
    current: Vec<u8>,
    bytes: u64,
}

impl ConsoleTail {
    fn push(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        for &b in data {
            match b {
                b'\n' => self.end_line(),
                b'\r' => {}
                _ if self.current.len() < MAX_LINE => self.current.push(b),
                _ => {}
            }
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.current).into_owned();
        self.current.clear();
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The kept lines, oldest first, with an unfinished last line.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lines.iter().cloned().collect();
        if !self.current.is_empty() {
            v.push(String::from_utf8_lossy(&self.current).into_owned());
        }
        v
    }

    /// Bytes the guest wrote in all.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Shared handle on a console's tail.
pub type SharedTail = Arc<Mutex<ConsoleTail>>;

/// The serial output: a sink plus the tail.
pub struct ConsoleWriter {
    sink: Option<Box<dyn Write + Send>>,
    tail: SharedTail,
}

impl ConsoleWriter {
    /// Output to `sink` (None discards it), keeping the tail in `tail`.
    pub fn new(sink: Option<Box<dyn Write + Send>>, tail: SharedTail) -> Self {
        ConsoleWriter { sink, tail }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Ok(mut t) = self.tail.lock() {
            t.push(buf);
        }
        if let Some(s) = self.sink.as_mut() {
            // A full disk or a closed stdout must not stop the guest.
            let _ = s.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(s) = self.sink.as_mut() {
            let _ = s.flush();
        }
        Ok(())
    }
}

/// Most bytes of console output a file takes: a guest that floods its
/// console must not fill the host's disk. The tail keeps following the
/// guest past it, so a dying guest still says what it printed last.
pub const FILE_LIMIT: u64 = 16 << 20;

/// A sink that takes `limit` bytes, then one line saying the rest is
/// dropped, then nothing.
pub struct Capped<W> {
    inner: W,
    left: u64,
    limit: u64,
    marked: bool,
}

impl<W: Write> Capped<W> {
    /// `inner`, cut after `limit` bytes.
    pub fn new(inner: W, limit: u64) -> Self {
        Capped {
            inner,
            left: limit,
            limit,
            marked: false,
        }
    }
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if n > 0 {
            self.inner.write_all(&buf[..n])?;
            self.left -= n as u64;
        }
        if n < buf.len() && !self.marked {
            self.marked = true;
            writeln!(
                self.inner,
                "\n[nutshell-vmm: the console passed {} bytes; the rest is dropped]",
                self.limit
            )?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Raises the serial IRQ through an irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt` (registered as an irqfd for [`crate::arch::layout::SERIAL_IRQ`]).
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The COM1 device on the port-I/O bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A 16550A raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleWriter) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger::new(irq), out),
        }
    }

    /// Feeds host input to the guest (bounded by the FIFO).
    pub fn enqueue_input(&mut self, data: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(data).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            // An irqfd write failure leaves the guest polling; not fatal.
            let _ = self.serial.write(off, *b);
        }
    }
}

/// Feeds a host input (the VMM's stdin, or any readable fd) into the
/// serial device's receive FIFO from the event loop. Bytes that find the
/// FIFO full are dropped, as on a real UART without flow control.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: std::fs::File,
    open: bool,
}

impl SerialInput {
    /// Reads from `input` (not closed by us if it is a dup of stdin).
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input: std::fs::File) -> Self {
        SerialInput {
            serial,
            input,
            open: true,
        }
    }

    /// Moves what is readable now into the FIFO. Returns false at EOF.
    pub fn pump(&mut self) -> bool {
        use std::io::Read;
        let mut buf = [0u8; 64];
        match self.input.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                if let Ok(mut s) = self.serial.lock() {
                    s.enqueue_input(&buf[..n]);
                }
                true
            }
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ),
        }
    }
}

impl event_manager::MutEventSubscriber for SerialInput {
    fn process(&mut self, events: event_manager::Events, ops: &mut event_manager::EventOps) {
        if self.open && !self.pump() {
            // EOF: stop watching, or a closed stdin would spin the loop.
            self.open = false;
            let _ = ops.remove(events);
        }
    }

    fn init(&mut self, ops: &mut event_manager::EventOps) {
        use vmm_sys_util::epoll::EventSet;
        if let Err(e) = ops.add(event_manager::Events::new(&self.input, EventSet::IN)) {
            tracing::warn!(
                ?e,
                "serial input cannot be watched; the console is output-only"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn host_input_reaches_the_receive_buffer() {
        let (r, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        r.set_nonblocking(true).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Mutex::new(SerialDevice::new(
            irq.try_clone().unwrap(),
            ConsoleWriter::new(None, SharedTail::default()),
        )));
        let mut input = SerialInput::new(
            dev.clone(),
            std::fs::File::from(std::os::fd::OwnedFd::from(r)),
        );
        assert!(input.pump(), "nothing to read is not EOF");
        w.write_all(b"ls\n").unwrap();
        assert!(input.pump());
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut b = [0u8];
            dev.lock().unwrap().read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"ls\n");
        drop(w);
        assert!(!input.pump(), "EOF");
    }

    #[test]
    fn keeps_bounded_tail_lines() {
        let mut t = ConsoleTail::default();
        for i in 0..(TAIL_LINES + 5) {
            t.push(format!("line {i}\r\n").as_bytes());
        }
        t.push(b"partial");
        let l = t.lines();
        assert_eq!(l.len(), TAIL_LINES + 1);
        assert_eq!(l[0], "line 5");
        assert_eq!(l.last().unwrap(), "partial");
        t.push(&vec![b'x'; 10_000]);
        assert_eq!(t.lines().last().unwrap().len(), MAX_LINE);
    }

    #[test]
    fn a_capped_sink_stops_after_its_limit_with_one_marker() {
        let mut c = Capped::new(Vec::new(), 10);
        for _ in 0..100 {
            assert_eq!(c.write(b"abcd").unwrap(), 4, "the guest is never blocked");
        }
        let text = String::from_utf8(c.inner).unwrap();
        assert_eq!(
            text,
            "abcdabcdab\n[nutshell-vmm: the console passed 10 bytes; the rest is dropped]\n"
        );
    }

    #[test]
    fn thr_writes_reach_the_sink_and_tail() {
        let tail = SharedTail::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            ConsoleWriter::new(None, tail.clone()),
        );
        // Enable the THR-empty interrupt (IER bit 1), then write "ok\n".
        dev.write(1, &[0x02]);
        for b in b"ok\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(tail.lock().unwrap().lines(), vec!["ok".to_string()]);
        assert!(irq.read().unwrap() >= 1, "interrupt raised");
        // LSR says the transmitter is empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
