//! The WebSocket read path without a socket: tungstenite's context behind a reader that follows
//! frame headers as the bytes pass, spends a per-turn byte budget, caps the fragments of one
//! message and checks the output bound after every read call.
//!
//! tungstenite's `read` loops over frames until a whole message is there, so on its own a
//! stream of empty continuation frames keeps it inside one call for as long as bytes arrive,
//! and every ping it answers lands in the output unchecked. [`Wire::read`] bounds both: the
//! reader it hands tungstenite reports `WouldBlock` once the turn's budget is spent, and the
//! output is measured after each call. The transport reads every WebSocket through it; the
//! `connection` fuzz target drives it with arbitrary byte streams.

use std::io::{self, Read, Write};

use crate::config::Config;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error as WsError, Message};

/// The largest frame tungstenite queues by itself: a pong or a close with 125 bytes of payload.
pub const MAX_CONTROL_FRAME: usize = 2 + 125;

/// What bounds one connection's reading.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Bytes taken from the socket per loop turn.
    pub budget_bytes: usize,
    /// Frames one message may have (its first frame and its continuations).
    pub max_fragments: usize,
}

impl ReadLimits {
    /// The limits the settings name.
    pub fn from_config(cfg: &Config) -> ReadLimits {
        ReadLimits {
            budget_bytes: cfg.read_budget_bytes,
            max_fragments: cfg.max_fragments,
        }
    }
}

/// tungstenite's configuration for the server's connections: frames and messages bounded by
/// `max_frame_size`, a small read buffer, no write buffering (our output buffer does that).
pub fn websocket_config(cfg: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(cfg.read_buffer_size)
        .write_buffer_size(0)
        .max_message_size(Some(cfg.max_frame_size))
        .max_frame_size(Some(cfg.max_frame_size))
}

/// What one [`Wire::read`] call gave.
#[derive(Debug)]
pub enum Next {
    /// A whole message (pings and pongs too; tungstenite has queued the pong already).
    Message(Message),
    /// The socket has nothing more for now.
    Blocked,
    /// This turn's byte budget is spent and input may be left: read again next turn.
    Spent,
    /// The output passed the bound (a pong or close reply did it): close as a slow consumer.
    OverBound,
    /// The current message has more fragments than allowed: close with `1008`.
    TooManyFragments,
    /// A protocol, size, UTF-8 or socket error from tungstenite.
    Failed(WsError),
}

/// Follows frame boundaries in a client's byte stream: a header is 2 bytes, then 0, 2 or 8
/// bytes of extended length, then 4 bytes of mask; the payload is skipped.
#[derive(Debug, Default)]
struct FrameScan {
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: u64,
    /// Frames of the message in progress (0 between messages).
    fragments: usize,
}

impl FrameScan {
    /// Takes the next bytes of the stream; `false` once a message has more than `max` frames.
    fn feed(&mut self, mut bytes: &[u8], max: usize) -> bool {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() as u64) as usize;
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have < 2 {
                continue;
            }
            let (b0, b1) = (self.header[0], self.header[1]);
            let ext = match b1 & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
            if self.have < 2 + ext + mask {
                continue;
            }
            self.skip = match ext {
                0 => u64::from(b1 & 0x7f),
                2 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                _ => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or([0; 8])),
            };
            self.have = 0;
            let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
            match opcode {
                // A continuation; without a message in progress tungstenite refuses it.
                0 if self.fragments > 0 => self.fragments += 1,
                1 | 2 => self.fragments = 1,
                // Control frames sit between fragments without being part of the message.
                _ => continue,
            }
            if self.fragments > max {
                return false;
            }
            if fin {
                self.fragments = 0;
            }
        }
        true
    }
}

/// One connection's WebSocket state: tungstenite's context, the frame scan and the budget.
pub struct Wire {
    ctx: WebSocketContext,
    scan: FrameScan,
    limits: ReadLimits,
    /// Bytes still to take from the socket on this turn.
    budget: usize,
    /// Set once the fragment cap is passed; the connection reads nothing more.
    refused: bool,
}

/// The stream tungstenite sees: reads come from the source within the budget and pass the
/// scan; writes go to the output and never block.
struct Src<'a, R> {
    inner: &'a mut R,
    out: &'a mut Vec<u8>,
    scan: &'a mut FrameScan,
    max_fragments: usize,
    budget: &'a mut usize,
    spent: &'a mut bool,
    refused: &'a mut bool,
}

impl<R: Read> Read for Src<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if *self.refused {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many fragments",
            ));
        }
        if *self.budget == 0 {
            *self.spent = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let len = buf.len().min(*self.budget);
        let n = loop {
            match self.inner.read(&mut buf[..len]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        let n = n.min(len);
        *self.budget -= n;
        if !self.scan.feed(&buf[..n], self.max_fragments) {
            *self.refused = true;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many fragments",
            ));
        }
        Ok(n)
    }
}

impl<R> Write for Src<'_, R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A stream for writing only (pings, closes): reading from it finds nothing.
struct OutOnly<'a>(&'a mut Vec<u8>);

impl Read for OutOnly<'_> {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

impl Write for OutOnly<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Wire {
    /// A server-side connection whose client already sent `rest` behind its request head.
    pub fn new(rest: Vec<u8>, config: WebSocketConfig, limits: ReadLimits) -> Wire {
        let mut scan = FrameScan::default();
        let refused = !scan.feed(&rest, limits.max_fragments);
        Wire {
            ctx: WebSocketContext::from_partially_read(rest, Role::Server, Some(config)),
            scan,
            limits,
            budget: limits.budget_bytes,
            refused,
        }
    }

    /// Starts a loop turn: the byte budget is full again.
    pub fn start_turn(&mut self) {
        self.budget = self.limits.budget_bytes;
    }

    /// Bytes still to read on this turn.
    pub fn budget_left(&self) -> usize {
        self.budget
    }

    /// Whether data frames may still be sent (no close sent or received).
    pub fn can_write(&self) -> bool {
        self.ctx.can_write()
    }

    /// Reads the next message from `src`; whatever tungstenite answers by itself goes to `out`.
    /// `out[sent..]` is what is still queued; more than `max_pending` of it is [`Next::OverBound`].
    pub fn read<R: Read>(
        &mut self,
        src: &mut R,
        out: &mut Vec<u8>,
        sent: usize,
        max_pending: usize,
    ) -> Next {
        if self.refused {
            // Even frames already buffered (they came with the request head) stay unread. The
            // bound is checked first here too: output over it (the server's own ping, say) is
            // `OverBound` on every path, as the contract says.
            if out.len().saturating_sub(sent) > max_pending {
                return Next::OverBound;
            }
            return Next::TooManyFragments;
        }
        let mut spent = false;
        let r = self.ctx.read(&mut Src {
            inner: src,
            out: &mut *out,
            scan: &mut self.scan,
            max_fragments: self.limits.max_fragments,
            budget: &mut self.budget,
            spent: &mut spent,
            refused: &mut self.refused,
        });
        if out.len().saturating_sub(sent) > max_pending {
            return Next::OverBound;
        }
        match r {
            Ok(m) => Next::Message(m),
            Err(_) if self.refused => Next::TooManyFragments,
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                if spent {
                    Next::Spent
                } else {
                    Next::Blocked
                }
            }
            Err(e) => Next::Failed(e),
        }
    }

    /// Queues a ping.
    pub fn ping(&mut self, out: &mut Vec<u8>) {
        let mut io = OutOnly(out);
        let _ = self.ctx.write(&mut io, Message::Ping(Default::default()));
        let _ = self.ctx.flush(&mut io);
    }

    /// Moves frames tungstenite queued by itself (a close reply) into the output.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        let _ = self.ctx.flush(&mut OutOnly(out));
    }

    /// Queues a close frame (once; later calls queue nothing).
    pub fn close(&mut self, out: &mut Vec<u8>, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = self.ctx.close(&mut OutOnly(out), Some(frame));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![
            (u8::from(fin) << 7) | opcode,
            0x80 | payload.len() as u8,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    fn wire(budget_bytes: usize, max_fragments: usize) -> Wire {
        let limits = ReadLimits {
            budget_bytes,
            max_fragments,
        };
        Wire::new(Vec::new(), WebSocketConfig::default(), limits)
    }

    #[test]
    fn the_scan_counts_fragments_across_any_cut() {
        let mut stream = frame(false, 1, b"a");
        stream.extend(frame(true, 9, b"ping between fragments"));
        stream.extend(frame(false, 0, b"b"));
        stream.extend(frame(true, 0, b"c"));
        stream.extend(frame(true, 2, &[0; 100]));
        for cut in 0..stream.len() {
            let mut scan = FrameScan::default();
            assert!(scan.feed(&stream[..cut], 3));
            assert!(scan.feed(&stream[cut..], 3));
            assert_eq!(scan.fragments, 0);
            let mut scan = FrameScan::default();
            assert!(!(scan.feed(&stream[..cut], 2) && scan.feed(&stream[cut..], 2)));
        }
    }

    #[test]
    fn extended_lengths_are_skipped() {
        let mut stream = vec![0x02, 0x80 | 126, 0x01, 0x00, 0, 0, 0, 0];
        stream.extend([7u8; 256]);
        stream.extend([
            0x00,
            0x80 | 127,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            3,
            0,
            0,
            0,
            0,
            1,
            2,
            3,
        ]);
        stream.extend(frame(true, 0, b""));
        let mut scan = FrameScan::default();
        assert!(!scan.feed(&stream, 1), "a 256-byte fragment, then 2 more");
        let mut scan = FrameScan::default();
        assert!(scan.feed(&stream, 3));
    }

    #[test]
    fn a_turn_reads_no_more_than_its_budget() {
        let mut stream = frame(false, 1, b"x");
        for _ in 0..10_000 {
            stream.extend(frame(false, 0, b""));
        }
        let mut w = wire(600, usize::MAX);
        let mut src = io::Cursor::new(stream);
        let mut out = Vec::new();
        assert!(matches!(w.read(&mut src, &mut out, 0, 1024), Next::Spent));
        assert_eq!(src.position(), 600);
        w.start_turn();
        assert!(matches!(w.read(&mut src, &mut out, 0, 1024), Next::Spent));
        assert_eq!(src.position(), 1200);
    }

    #[test]
    fn too_many_fragments_are_refused_and_enough_pass() {
        let mut msg = frame(false, 1, b"a");
        msg.extend(frame(false, 0, b"b"));
        msg.extend(frame(true, 0, b"c"));
        let mut w = wire(1 << 20, 3);
        let (mut src, mut out) = (io::Cursor::new(msg.clone()), Vec::new());
        assert!(
            matches!(w.read(&mut src, &mut out, 0, 1024), Next::Message(Message::Text(t)) if t == "abc")
        );
        let mut w = wire(1 << 20, 2);
        let (mut src, mut out) = (io::Cursor::new(msg), Vec::new());
        assert!(matches!(
            w.read(&mut src, &mut out, 0, 1024),
            Next::TooManyFragments
        ));
        w.close(&mut out, 1008, "too many fragments");
        assert!(!w.can_write());
    }

    /// A wire allowing 2 fragments, handed a 3-fragment message with the request head.
    fn three_fragments_with_the_head() -> Wire {
        let mut msg = frame(false, 1, b"a");
        msg.extend(frame(false, 0, b"b"));
        msg.extend(frame(true, 0, b"c"));
        let limits = ReadLimits {
            budget_bytes: 1 << 20,
            max_fragments: 2,
        };
        Wire::new(msg, WebSocketConfig::default(), limits)
    }

    #[test]
    fn frames_that_came_with_the_head_are_held_to_the_cap() {
        let mut w = three_fragments_with_the_head();
        let (mut src, mut out) = (io::Cursor::new(Vec::new()), Vec::new());
        assert!(matches!(
            w.read(&mut src, &mut out, 0, 1024),
            Next::TooManyFragments
        ));
    }

    /// Found by the `connection` fuzz target: a refused message (too many fragments) and, on
    /// the same turn, a server ping that took the output past the bound; `read` said
    /// `TooManyFragments` with the output over the bound instead of `OverBound`.
    #[test]
    fn output_over_the_bound_is_reported_on_a_refused_connection_too() {
        let mut w = three_fragments_with_the_head();
        let (mut src, mut out) = (io::Cursor::new(Vec::new()), Vec::new());
        w.ping(&mut out);
        assert_eq!(out.len(), 2, "an empty ping is two bytes");
        assert!(matches!(w.read(&mut src, &mut out, 0, 1), Next::OverBound));
        assert!(matches!(
            w.read(&mut src, &mut out, 0, 1024),
            Next::TooManyFragments
        ));
    }

    #[test]
    fn pongs_past_the_bound_are_reported() {
        let mut pings = Vec::new();
        for _ in 0..100 {
            pings.extend(frame(true, 9, &[b'p'; 125]));
        }
        let mut w = wire(1 << 20, 8);
        let (mut src, mut out) = (io::Cursor::new(pings), Vec::new());
        let mut reads = 0;
        loop {
            match w.read(&mut src, &mut out, 0, 1000) {
                Next::Message(Message::Ping(_)) => reads += 1,
                Next::OverBound => break,
                other => panic!("{other:?}"),
            }
        }
        assert!(reads < 20, "{reads}");
        assert!(out.len() <= 1000 + MAX_CONTROL_FRAME);
    }
}
