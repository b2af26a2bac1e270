//! One WebSocket connection's read path, `server::wire::Wire`, driven turn by turn like the
//! event loop drives it: a client byte stream (frames built from ops — pings, pongs, text and
//! binary fragments, continuation floods, closes, unmasked or raw bytes) arrives in arbitrary
//! pieces, the client reads arbitrary amounts of the output or none, the server pings. Besides
//! "never panics" it checks:
//!
//! - a turn never takes more bytes from the socket than its budget; `Spent` only with the budget
//!   at zero, `Blocked` only with every arrived byte taken;
//! - one read call adds at most one control frame to the output, and a call that does not
//!   report `OverBound` leaves the output within the bound: the output never passes the bound
//!   by more than one frame (plus the server's own 2-byte pings);
//! - for a stream of well-formed frames, the frame scan stays in step with tungstenite: every
//!   delivered data message is the next one of the stream, none has more frames than the cap,
//!   and `TooManyFragments` comes only when a message of the stream has more.
#![no_main]

use std::io::{self, Read};

use arbitrary::Arbitrary;
use chatterbox::config::Config;
use chatterbox::server::wire::{MAX_CONTROL_FRAME, Next, ReadLimits, Wire, websocket_config};
use libfuzzer_sys::fuzz_target;
use tungstenite::Message;

/// Messages read per connection and turn, as in the server.
const MESSAGES_PER_TURN: usize = 64;

#[derive(Arbitrary, Debug)]
enum Op {
    Ping(u8),
    Pong(u8),
    /// Data frame: text (else binary), fin, payload length.
    Data(bool, bool, u16),
    Continue(bool, u16),
    /// This many empty, non-final continuation frames.
    Flood(u8),
    Close(u16, u8),
    /// A frame sent without a mask (a protocol error for a client).
    Unmasked(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Turn {
    /// Bytes of the stream that arrive before this turn.
    arrive: u16,
    /// Most bytes the socket hands over per read call.
    chunk: u16,
    /// Output bytes the client takes before this turn.
    drain: u16,
    /// Whether the ping timer fires on this turn.
    ping: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    budget: u16,
    max_fragments: u8,
    max_pending: u16,
    /// Bytes of the stream that came with the request head.
    rest: u8,
    /// Encode lengths of 126+ bytes with 8 bytes instead of 2.
    long_lengths: bool,
    ops: Vec<Op>,
    turns: Vec<Turn>,
}

/// A data message of a well-formed stream: its kind and frame count.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Expected {
    text: bool,
    len: usize,
    frames: usize,
}

struct Stream {
    bytes: Vec<u8>,
    /// The data messages, in order, when every frame is well formed; `None` otherwise.
    messages: Option<Vec<Expected>>,
    /// The largest frame count of any message, finished or not.
    most_frames: usize,
}

fn encode(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], masked: bool, long: bool) {
    out.push((u8::from(fin) << 7) | opcode);
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if !long && n <= 0xffff => {
            out.push(m | 126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend(key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
}

fn build(ops: &[Op], long: bool) -> Stream {
    let mut bytes = Vec::new();
    let mut messages = Some(Vec::new());
    // The message in progress: (text, len, frames).
    let mut open: Option<(bool, usize, usize)> = None;
    let mut most_frames = 0;
    let mut well_formed = true;
    for op in ops.iter().take(2000) {
        match op {
            Op::Ping(n) | Op::Pong(n) => {
                let code = if matches!(op, Op::Ping(_)) { 9 } else { 10 };
                let n = usize::from(*n) % 126;
                encode(&mut bytes, true, code, &vec![b'p'; n], true, long);
            }
            Op::Data(text, fin, len) => {
                let len = usize::from(*len) % 600;
                encode(
                    &mut bytes,
                    *fin,
                    if *text { 1 } else { 2 },
                    &vec![b'd'; len],
                    true,
                    long,
                );
                if open.is_some() {
                    well_formed = false;
                }
                open = Some((*text, len, 1));
            }
            Op::Continue(fin, len) => {
                let len = usize::from(*len) % 600;
                encode(&mut bytes, *fin, 0, &vec![b'c'; len], true, long);
                match &mut open {
                    Some((_, l, f)) => {
                        *l += len;
                        *f += 1;
                        most_frames = most_frames.max(*f);
                    }
                    None => well_formed = false,
                }
                if *fin && let (Some((text, len, frames)), Some(m)) = (open.take(), &mut messages) {
                    m.push(Expected { text, len, frames });
                }
            }
            Op::Flood(k) => {
                for _ in 0..*k {
                    encode(&mut bytes, false, 0, &[], true, long);
                    match &mut open {
                        Some((_, _, f)) => {
                            *f += 1;
                            most_frames = most_frames.max(*f);
                        }
                        None => well_formed = false,
                    }
                }
            }
            Op::Close(code, reason) => {
                let mut p = code.to_be_bytes().to_vec();
                p.extend(vec![b'r'; usize::from(*reason) % 124]);
                encode(&mut bytes, true, 8, &p, true, long);
                // What follows a close is never read; the messages so far stand.
                well_formed = false;
            }
            Op::Unmasked(n) => {
                encode(
                    &mut bytes,
                    true,
                    1,
                    &vec![b'u'; usize::from(*n) % 126],
                    false,
                    long,
                );
                well_formed = false;
            }
            Op::Raw(raw) => {
                bytes.extend(raw.iter().take(256));
                well_formed = false;
            }
        }
        if open.is_some() {
            most_frames = most_frames.max(1);
        }
        if let Op::Data(_, true, _) = op
            && let (Some((text, len, frames)), Some(m)) = (open.take(), &mut messages)
        {
            m.push(Expected { text, len, frames });
        }
        if !well_formed {
            // Past a malformed frame the model says nothing; the invariants still hold.
            messages = None;
        }
    }
    Stream {
        bytes,
        messages,
        most_frames,
    }
}

/// The socket: the stream's bytes, of which `arrived` have arrived, handed over in chunks.
struct Socket<'a> {
    bytes: &'a [u8],
    pos: usize,
    arrived: usize,
    chunk: usize,
}

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.arrived {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.chunk).min(self.arrived - self.pos);
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fuzz_target!(|input: Input| {
    let cfg = Config {
        read_budget_bytes: 1 + usize::from(input.budget) % 4096,
        max_fragments: 1 + usize::from(input.max_fragments) % 16,
        max_pending_output: 1 + usize::from(input.max_pending) % 8192,
        ..Config::default()
    };
    let limits = ReadLimits::from_config(&cfg);
    let max_pending = cfg.max_pending_output;
    let stream = build(&input.ops, input.long_lengths);
    let rest = usize::from(input.rest).min(stream.bytes.len());
    let mut wire = Wire::new(
        stream.bytes[..rest].to_vec(),
        websocket_config(&cfg),
        limits,
    );
    let mut socket = Socket {
        bytes: &stream.bytes[rest..],
        pos: 0,
        arrived: 0,
        chunk: 1,
    };
    let mut out: Vec<u8> = Vec::new();
    let mut sent = 0usize;
    let mut delivered = 0usize;
    let mut done = false;
    let last = input.turns.len().min(200);
    for (i, turn) in input.turns.iter().take(200).enumerate() {
        if done {
            break;
        }
        socket.arrived = if i + 1 == last {
            socket.bytes.len()
        } else {
            (socket.arrived + usize::from(turn.arrive)).min(socket.bytes.len())
        };
        socket.chunk = 1 + usize::from(turn.chunk) % 2048;
        sent = (sent + usize::from(turn.drain)).min(out.len());
        if turn.ping && wire.can_write() {
            wire.ping(&mut out);
        }
        wire.start_turn();
        let start = socket.pos;
        for _ in 0..MESSAGES_PER_TURN {
            let before = out.len() - sent;
            let next = wire.read(&mut socket, &mut out, sent, max_pending);
            let pending = out.len() - sent;
            assert!(
                socket.pos - start <= limits.budget_bytes,
                "a turn took {} bytes, the budget is {}",
                socket.pos - start,
                limits.budget_bytes
            );
            assert_eq!(
                wire.budget_left(),
                limits.budget_bytes - (socket.pos - start)
            );
            assert!(
                pending <= before + MAX_CONTROL_FRAME,
                "one read call queued {} bytes",
                pending - before
            );
            if !matches!(next, Next::OverBound) {
                assert!(
                    pending <= max_pending,
                    "{pending} bytes queued, bound {max_pending}, not reported"
                );
            }
            match next {
                Next::Message(Message::Text(t)) => {
                    check_delivery(&stream, &mut delivered, true, t.len(), limits);
                }
                Next::Message(Message::Binary(b)) => {
                    check_delivery(&stream, &mut delivered, false, b.len(), limits);
                }
                Next::Message(Message::Close(_)) => {
                    wire.flush(&mut out);
                    done = true;
                    break;
                }
                Next::Message(_) => {}
                Next::Blocked => {
                    assert_eq!(socket.pos, socket.arrived, "Blocked with input left");
                    break;
                }
                Next::Spent => {
                    assert_eq!(wire.budget_left(), 0, "Spent with budget left");
                    break;
                }
                Next::OverBound | Next::TooManyFragments => {
                    if matches!(next, Next::TooManyFragments) {
                        assert!(
                            stream.most_frames > limits.max_fragments || stream.messages.is_none(),
                            "refused, yet no message has more than {} frames",
                            limits.max_fragments
                        );
                    }
                    let before = out.len();
                    wire.close(&mut out, 1008, "closing");
                    assert!(out.len() - before <= MAX_CONTROL_FRAME + MAX_CONTROL_FRAME);
                    done = true;
                    break;
                }
                Next::Failed(_) => {
                    if wire.can_write() {
                        wire.close(&mut out, 1002, "protocol error");
                    }
                    done = true;
                    break;
                }
            }
        }
    }
});

/// A data message came out: with a well-formed stream it is the next expected one.
fn check_delivery(
    stream: &Stream,
    delivered: &mut usize,
    text: bool,
    len: usize,
    limits: ReadLimits,
) {
    if let Some(m) = &stream.messages {
        let e = m
            .get(*delivered)
            .unwrap_or_else(|| panic!("message {} was never sent", *delivered));
        assert_eq!(
            (e.text, e.len),
            (text, len),
            "message {} differs",
            *delivered
        );
        assert!(
            e.frames <= limits.max_fragments,
            "a message of {} frames passed the cap of {}",
            e.frames,
            limits.max_fragments
        );
    }
    *delivered += 1;
}
