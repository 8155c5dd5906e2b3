//! A check of the ttrpc framing between the agent's socket and the ttrpc
//! client.
//!
//! ttrpc 0.9's client trusts the stream more than a guest deserves. It
//! checks a message's announced length before allocating, but then reads and
//! discards a message over its 4 MiB limit in full (1 GiB announced, 1 GiB
//! read) and hands the call with that stream id an `INVALID_ARGUMENT` status
//! that looks like the agent's own refusal. It drops replies to stream ids it
//! never used without a word and keeps reading, so a peer that writes forever
//! is read forever. None of that grows memory, but it keeps a hostile guest's
//! stream alive and its errors unclear.
//!
//! So every header the agent sends is checked here before ttrpc sees it: only
//! a response (the protocol has no streaming calls) to a request in flight, at
//! most 4 MiB long, passes. The first message that breaks a rule ends the
//! connection, and the rule it broke is kept so that every call on that
//! connection can name it ([`super::AgentError::InvalidReply`]). A stream the
//! client accepts is therefore bounded: 4 MiB and a header per request sent.

use std::collections::HashSet;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ttrpc::proto::{
    MessageHeader, MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX, MESSAGE_TYPE_REQUEST,
    MESSAGE_TYPE_RESPONSE,
};

/// Why the agent's stream was refused, once it was.
pub(super) type Verdict = Arc<OnceLock<String>>;

/// Wraps the agent's stream; the ttrpc client reads and writes through it.
pub(super) struct FrameGuard<S> {
    inner: S,
    incoming: Framer,
    outgoing: Framer,
    /// Stream ids of requests sent and not answered yet. A call that timed
    /// out stays here: the agent may still answer it late.
    in_flight: HashSet<u32>,
    verdict: Verdict,
}

impl<S> FrameGuard<S> {
    pub(super) fn new(inner: S) -> (Self, Verdict) {
        let verdict = Verdict::default();
        let me = Self {
            inner,
            incoming: Framer::default(),
            outgoing: Framer::default(),
            in_flight: HashSet::new(),
            verdict: verdict.clone(),
        };
        (me, verdict)
    }
}

/// Follows a stream of ttrpc messages fed in pieces of any size.
#[derive(Default)]
struct Framer {
    header: [u8; MESSAGE_HEADER_LENGTH],
    header_len: usize,
    body_left: u32,
}

impl Framer {
    /// Passes `bytes`, calling `on_header` on each header completed; stops at
    /// the first header it refuses.
    fn feed<E>(
        &mut self,
        mut bytes: &[u8],
        mut on_header: impl FnMut(&MessageHeader) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = bytes.len().min(self.body_left as usize);
                self.body_left -= n as u32;
                bytes = &bytes[n..];
                continue;
            }
            let n = (MESSAGE_HEADER_LENGTH - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == MESSAGE_HEADER_LENGTH {
                self.header_len = 0;
                let header = MessageHeader::from(&self.header);
                on_header(&header)?;
                self.body_left = header.length;
            }
        }
        Ok(())
    }
}

/// The rules a message from the agent must keep.
fn check_incoming(in_flight: &mut HashSet<u32>, h: &MessageHeader) -> Result<(), String> {
    if h.length as usize > MESSAGE_LENGTH_MAX {
        return Err(format!(
            "the agent announced a {}-byte message on stream {}, over the {MESSAGE_LENGTH_MAX}-byte limit",
            h.length, h.stream_id
        ));
    }
    if h.type_ != MESSAGE_TYPE_RESPONSE {
        return Err(format!(
            "the agent sent a message of type {} on stream {}, where only responses (type {MESSAGE_TYPE_RESPONSE}) may come",
            h.type_, h.stream_id
        ));
    }
    if !in_flight.remove(&h.stream_id) {
        return Err(format!(
            "the agent answered stream {}, which no request in flight uses",
            h.stream_id
        ));
    }
    Ok(())
}

fn refused(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(why) = me.verdict.get() {
            return Poll::Ready(Err(refused(why)));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut me.inner).poll_read(cx, buf))?;
        let in_flight = &mut me.in_flight;
        let checked = me
            .incoming
            .feed(&buf.filled()[before..], |h| check_incoming(in_flight, h));
        if let Err(why) = checked {
            tracing::warn!(reason = %why, "refusing the agent's stream");
            let why = me
                .verdict
                .get_or_init(|| format!("{why}, so the connection was closed"));
            return Poll::Ready(Err(refused(why)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let n = ready!(Pin::new(&mut me.inner).poll_write(cx, buf))?;
        // ttrpc's split halves share one lock, so the id is recorded before
        // any read can see the answer.
        let in_flight = &mut me.in_flight;
        let Ok(()) = me.outgoing.feed(&buf[..n], |h| {
            if h.type_ == MESSAGE_TYPE_REQUEST {
                in_flight.insert(h.stream_id);
            }
            Ok::<_, Infallible>(())
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(length: u32, stream_id: u32, type_: u8) -> Vec<u8> {
        MessageHeader {
            length,
            stream_id,
            type_,
            flags: 0,
        }
        .into()
    }

    #[test]
    fn headers_are_found_across_pieces_of_any_size() {
        let mut stream = header(3, 1, MESSAGE_TYPE_RESPONSE);
        stream.extend_from_slice(b"abc");
        stream.extend(header(0, 3, MESSAGE_TYPE_RESPONSE));
        stream.extend(header(1, 5, MESSAGE_TYPE_RESPONSE));
        stream.push(b'z');
        for piece in [1, 2, 7, 10, 13, stream.len()] {
            let mut f = Framer::default();
            let mut seen = Vec::new();
            for chunk in stream.chunks(piece) {
                let Ok(()) = f.feed(chunk, |h| {
                    seen.push((h.stream_id, h.length));
                    Ok::<_, Infallible>(())
                });
            }
            assert_eq!(seen, [(1, 3), (3, 0), (5, 1)], "pieces of {piece}");
        }
    }

    #[test]
    fn only_a_bounded_response_to_a_request_in_flight_passes() {
        let mut in_flight = HashSet::from([1, 3]);
        let ok = MessageHeader::new_response(1, MESSAGE_LENGTH_MAX as u32);
        assert_eq!(check_incoming(&mut in_flight, &ok), Ok(()));
        // Answered once only.
        let e = check_incoming(&mut in_flight, &ok).unwrap_err();
        assert!(e.contains("stream 1, which no request"), "{e}");
        let big = MessageHeader::new_response(3, MESSAGE_LENGTH_MAX as u32 + 1);
        let e = check_incoming(&mut in_flight, &big).unwrap_err();
        assert!(e.contains("4194305-byte message"), "{e}");
        let data = MessageHeader::new_data(3, 1);
        let e = check_incoming(&mut in_flight, &data).unwrap_err();
        assert!(e.contains("type 3"), "{e}");
        assert!(in_flight.contains(&3), "a refused message took its stream");
    }
}
