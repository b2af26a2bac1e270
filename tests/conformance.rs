//! WebSocket conformance (RFC 6455): the real server on `127.0.0.1:0`, spoken to in raw frames
//! over a plain `TcpStream`.
//!
//! The cases follow the families of the Autobahn TestSuite (1 text/binary framing, 2 pings and
//! pongs, 3 reserved bits, 4 reserved opcodes, 5 fragmentation, 6 UTF-8, 7 the close handshake,
//! 9 limits, scaled to our 8 KiB frame limit), written for chatterbox: a text frame is a JSON
//! command, so "echo" here means the command is answered. The client side is our own: a small
//! frame encoder that masks (or, to test the server, does not) and a decoder that checks what the
//! server sends is unmasked and has no reserved bits.
//!
//! Every case that ends the connection asserts the close code the server sends and that it then
//! closes TCP, reading until EOF with a 2 s read deadline (a bound for a hung server, not a speed
//! measurement).

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use chatterbox::config::Config;
use common::Running;
use serde_json::Value;

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// How long the server has to send its close frame and then close TCP.
const DEADLINE: Duration = Duration::from_secs(2);

/// The server's frame and message limit (the default setting, 8 KiB).
fn max_size() -> usize {
    Config::default().max_frame_size
}

// ----- frames -----

/// A frame as the server sent it.
#[derive(Debug, Clone, PartialEq)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// A frame header: FIN, the three reserved bits (`rsv` 0..=7, RSV1 the highest), the opcode, the
/// payload length in the shortest form (or the form `wide` forces) and the mask.
fn header(fin: bool, rsv: u8, opcode: u8, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0x0F)];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
    out
}

/// A whole frame; with a mask the payload is masked as a client must.
fn encode(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = header(fin, rsv, opcode, payload.len() as u64, mask);
    match mask {
        Some(m) => out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4])),
        None => out.extend_from_slice(payload),
    }
    out
}

/// Takes one complete frame off the front of `buf`, if it holds one. Panics on what a server
/// must never send: a masked frame or reserved bits.
fn decode(buf: &mut Vec<u8>) -> Option<Frame> {
    if buf.len() < 2 {
        return None;
    }
    let (b0, b1) = (buf[0], buf[1]);
    assert_eq!(b0 & 0x70, 0, "server frame with reserved bits: {b0:#04x}");
    assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
    let (len, at) = match b1 & 0x7F {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10),
        126 | 127 => return None,
        n => (u64::from(n), 2),
    };
    let end = at + usize::try_from(len).expect("a sane length");
    if buf.len() < end {
        return None;
    }
    let frame = Frame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        payload: buf[at..end].to_vec(),
    };
    buf.drain(..end);
    Some(frame)
}

/// What reading from the server gave.
#[derive(Debug)]
enum Next {
    Frame(Frame),
    /// EOF or reset: the server closed TCP.
    Gone,
    /// Nothing before the deadline.
    Timeout,
}

/// The server's close frame.
#[derive(Debug)]
struct Closed {
    code: Option<u16>,
    /// Frames the server sent before its close, in order.
    before: Vec<Frame>,
}

// ----- the raw client -----

struct Peer {
    sock: TcpStream,
    inbuf: Vec<u8>,
    seed: u32,
}

impl Peer {
    /// Upgrades with the RFC 6455 sample key and reads the welcome up to `history`.
    fn open(s: &Running) -> Peer {
        let sock = TcpStream::connect(s.addr).unwrap();
        sock.set_nodelay(true).unwrap();
        let mut p = Peer {
            sock,
            inbuf: Vec::new(),
            seed: 0x9E37_79B9,
        };
        p.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        let deadline = Instant::now() + DEADLINE;
        let head_end = loop {
            if let Some(i) = p.inbuf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(p.fill(deadline), "no complete upgrade response");
        };
        let head = String::from_utf8(p.inbuf.drain(..head_end).collect()).unwrap();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        // RFC 6455 §1.3: this key's accept value.
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{head}"
        );
        assert_eq!(p.event()["event"], "me");
        loop {
            if p.event()["event"] == "history" {
                return p;
            }
        }
    }

    /// A fresh mask per frame, never all zero.
    fn mask(&mut self) -> [u8; 4] {
        self.seed = self
            .seed
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        (self.seed | 0x0101_0101).to_be_bytes()
    }

    fn write(&mut self, bytes: &[u8]) {
        self.sock
            .write_all(bytes)
            .expect("the server takes the bytes");
    }

    /// Writes, not minding a server that already closed (after a protocol error).
    fn write_lenient(&mut self, bytes: &[u8]) {
        let _ = self.sock.write_all(bytes);
    }

    /// One masked frame, encoded.
    fn frame(&mut self, fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let m = self.mask();
        encode(fin, rsv, opcode, payload, Some(m))
    }

    /// Sends one masked frame.
    fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let f = self.frame(fin, 0, opcode, payload);
        self.write(&f);
    }

    /// Sends one masked, unfragmented text frame.
    fn text(&mut self, payload: &[u8]) {
        self.send(true, TEXT, payload);
    }

    /// Sends a close frame with this code and reason.
    fn close(&mut self, code: u16, reason: &[u8]) {
        let f = self.frame(true, 0, CLOSE, &close_payload(code, reason));
        self.write(&f);
    }

    /// Reads more bytes; `false` on EOF, reset or deadline.
    fn fill(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        self.sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 16 * 1024];
        match self.sock.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.inbuf.extend_from_slice(&buf[..n]);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(_) => false,
        }
    }

    /// The next frame from the server, or how the stream ended.
    fn next(&mut self, deadline: Instant) -> Next {
        loop {
            if let Some(f) = decode(&mut self.inbuf) {
                return Next::Frame(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Timeout;
            }
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut buf = [0u8; 16 * 1024];
            match self.sock.read(&mut buf) {
                Ok(0) => return self.gone(),
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Next::Timeout;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return self.gone();
                }
                Err(e) => panic!("reading from the server: {e}"),
            }
        }
    }

    fn gone(&self) -> Next {
        assert!(
            self.inbuf.is_empty(),
            "the server closed TCP in the middle of a frame: {:?}",
            self.inbuf
        );
        Next::Gone
    }

    /// The next frame; panics when the connection ends or nothing comes within 2 s.
    fn frame_in_time(&mut self) -> Frame {
        match self.next(Instant::now() + DEADLINE) {
            Next::Frame(f) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next event (a JSON text frame), skipping the server's keep-alive pings.
    fn event(&mut self) -> Value {
        loop {
            let f = self.frame_in_time();
            match f.opcode {
                PING => continue,
                TEXT => {
                    assert!(f.fin, "events are unfragmented");
                    let text = std::str::from_utf8(&f.payload).expect("UTF-8 event");
                    return serde_json::from_str(text).expect("a JSON event");
                }
                _ => panic!(
                    "expected an event, got {f:?} (close code {:?})",
                    close_code(&f)
                ),
            }
        }
    }

    /// Reads up to the server's close frame (within 2 s), keeping what came before it.
    fn expect_close(&mut self) -> Closed {
        let deadline = Instant::now() + DEADLINE;
        let mut before = Vec::new();
        loop {
            match self.next(deadline) {
                Next::Frame(f) if f.opcode == CLOSE => {
                    assert!(f.fin, "a close frame is never fragmented");
                    return Closed {
                        code: close_code(&f),
                        before,
                    };
                }
                Next::Frame(f) => before.push(f),
                Next::Gone => panic!("TCP closed without a close frame; before it: {before:?}"),
                Next::Timeout => panic!("no close frame within {DEADLINE:?}; before: {before:?}"),
            }
        }
    }

    /// After the close frames: the server sends nothing more and closes TCP within 2 s.
    fn expect_end(&mut self) {
        match self.next(Instant::now() + DEADLINE) {
            Next::Gone => {}
            Next::Frame(f) => panic!("a frame after the close: {f:?}"),
            Next::Timeout => panic!("the server did not close TCP within {DEADLINE:?}"),
        }
    }

    /// The whole ending of a connection the server fails: its close code, then TCP closed.
    fn expect_failed(&mut self) -> Closed {
        let closed = self.expect_close();
        self.expect_end();
        closed
    }

    /// Sends a `ping` command with this request id and checks the `pong` event answers it.
    fn round_trip(&mut self, id: &str) {
        self.text(&command(id, 0));
        expect_pong_event(&self.event(), id);
    }
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// The code of a close frame, checking the server's own payload is well formed: empty, or a
/// code and a UTF-8 reason, at most 125 bytes.
fn close_code(f: &Frame) -> Option<u16> {
    if f.opcode != CLOSE {
        return None;
    }
    match f.payload.len() {
        0 => None,
        1 => panic!("the server sent a 1-byte close payload"),
        n => {
            assert!(n <= 125, "close payload over 125 bytes");
            assert!(
                std::str::from_utf8(&f.payload[2..]).is_ok(),
                "close reason not UTF-8: {:x?}",
                f.payload
            );
            Some(u16::from_be_bytes([f.payload[0], f.payload[1]]))
        }
    }
}

/// A `ping` command carrying `id`, padded with JSON whitespace to `len` bytes (when longer).
fn command(id: &str, len: usize) -> Vec<u8> {
    let mut c = format!(r#"{{"command":"ping","request_id":"{id}"}}"#).into_bytes();
    assert!(
        c.len() <= len || len == 0,
        "{len} bytes cannot hold the command"
    );
    c.resize(c.len().max(len), b' ');
    c
}

/// A `ping` command whose `request_id` holds these raw bytes (maybe not UTF-8).
fn command_with_raw_id(id: &[u8]) -> Vec<u8> {
    let mut c = br#"{"command":"ping","request_id":""#.to_vec();
    c.extend_from_slice(id);
    c.extend_from_slice(br#""}"#);
    c
}

fn expect_pong_event(e: &Value, id: &str) {
    assert_eq!(e["event"], "pong", "{e}");
    assert_eq!(e["request_id"], id, "{e}");
}

fn expect_error(e: &Value, code: &str) {
    assert_eq!(e["event"], "error", "{e}");
    assert_eq!(e["code"], code, "{e}");
}

/// Opens a connection, writes these bytes, and expects the server to fail the connection with
/// `code`; returns what it sent before its close.
fn fails_with(s: &Running, bytes: &[u8], code: u16, case: &str) -> Vec<Frame> {
    let mut p = Peer::open(s);
    p.write_lenient(bytes);
    let c = p.expect_failed();
    assert_eq!(c.code, Some(code), "{case}: close {c:?}");
    c.before
}

/// Frames for one connection: each `(fin, rsv, opcode, payload)` masked by `p`.
fn frames(p: &mut Peer, list: &[(bool, u8, u8, &[u8])]) -> Vec<u8> {
    list.iter()
        .flat_map(|&(fin, rsv, op, payload)| p.frame(fin, rsv, op, payload))
        .collect()
}

// ----- family 1: text and binary frames of every length form -----

#[test]
fn f1_text_frames_of_each_length_form_are_commands() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let max = max_size();
    // 7-bit, 16-bit boundaries, and the 8 KiB limit (16-bit form).
    for len in [44, 125, 126, 127, 128, 1000, 4096, max - 1, max] {
        let id = format!("len{len}");
        let payload = command(&id, len);
        assert_eq!(payload.len(), len);
        p.text(&payload);
        expect_pong_event(&p.event(), &id);
    }
    // An empty text frame is a frame like any other, and not JSON.
    p.text(b"");
    expect_error(&p.event(), "bad_json");
    p.round_trip("still-open");
}

#[test]
fn f1_binary_frames_get_bad_json_and_the_connection_lives() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    for len in [0, 1, 125, 126, 127, 65 * 100, max_size()] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        p.send(true, BINARY, &payload);
        expect_error(&p.event(), "bad_json");
    }
    // Even a binary frame holding a valid command: commands are text.
    p.send(true, BINARY, &command("bin", 0));
    expect_error(&p.event(), "bad_json");
    p.round_trip("after-binary");
}

// ----- family 2: pings and pongs -----

#[test]
fn f2_pings_get_pongs_with_the_exact_payload() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let all_bytes: Vec<u8> = (0..125u8)
        .map(|b| b.wrapping_mul(2).wrapping_add(0x81))
        .collect();
    let payloads: [&[u8]; 5] = [b"", b"hello", &[0xFE; 125], &all_bytes, &[0xFF, 0x00, 0xED]];
    for payload in payloads {
        p.send(true, PING, payload);
        let f = p.frame_in_time();
        assert_eq!(
            f,
            Frame {
                fin: true,
                opcode: PONG,
                payload: payload.to_vec()
            }
        );
    }
    p.round_trip("after-pings");
}

#[test]
fn f2_a_ping_written_byte_by_byte_is_answered() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let payload = [b'*'; 125];
    let bytes = p.frame(true, 0, PING, &payload);
    for b in &bytes {
        p.write(std::slice::from_ref(b));
        thread::sleep(Duration::from_micros(100));
    }
    let f = p.frame_in_time();
    assert_eq!((f.opcode, f.payload), (PONG, payload.to_vec()));
}

#[test]
fn f2_ten_pings_in_one_write_get_ten_pongs_in_order() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let mut bytes = Vec::new();
    for i in 0..10 {
        bytes.extend(p.frame(true, 0, PING, format!("ping {i}").as_bytes()));
    }
    p.write(&bytes);
    for i in 0..10 {
        let f = p.frame_in_time();
        assert_eq!(
            (f.opcode, f.payload),
            (PONG, format!("ping {i}").into_bytes())
        );
    }
}

#[test]
fn f2_a_ping_over_125_bytes_closes_1002() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let bytes = p.frame(true, 0, PING, &[b'x'; 126]);
    drop(p);
    let before = fails_with(&s, &bytes, 1002, "ping of 126 bytes");
    assert!(before.is_empty(), "no pong for it: {before:?}");
}

#[test]
fn f2_unsolicited_pongs_are_ignored() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    p.send(true, PONG, b"");
    p.send(true, PONG, &[b'u'; 125]);
    // The first thing back is the answer to the command: the pongs got no reply.
    p.round_trip("after-pongs");
    // A pong, then a ping: only the ping is answered.
    p.send(true, PONG, b"unsolicited");
    p.send(true, PING, b"solicited");
    let f = p.frame_in_time();
    assert_eq!((f.opcode, f.payload), (PONG, b"solicited".to_vec()));
}

// ----- family 3: reserved bits -----

#[test]
fn f3_reserved_bits_close_1002() {
    let s = Running::memory();
    // RSV values 1..=7 on text, binary, ping and close frames; a valid command before the bad
    // frame is answered, a ping after it is not.
    let cases: [(u8, u8, &[u8]); 7] = [
        (4, TEXT, b"{\"command\":\"ping\"}"),
        (2, TEXT, b"{\"command\":\"ping\"}"),
        (6, TEXT, b""),
        (1, BINARY, b"\x00\xff"),
        (5, BINARY, b""),
        (3, PING, b"rsv"),
        (7, CLOSE, b"\x03\xe8"),
    ];
    for (rsv, op, payload) in cases {
        let mut p = Peer::open(&s);
        let bytes = frames(
            &mut p,
            &[
                (true, 0, TEXT, &command("before", 0)),
                (true, rsv, op, payload),
                (true, 0, PING, b"after"),
            ],
        );
        p.write_lenient(&bytes);
        expect_pong_event(&p.event(), "before");
        let c = p.expect_failed();
        assert_eq!(c.code, Some(1002), "rsv {rsv} on opcode {op}: {c:?}");
        assert!(c.before.is_empty(), "rsv {rsv} on opcode {op}: {c:?}");
    }
}

// ----- family 4: reserved opcodes -----

#[test]
fn f4_reserved_opcodes_close_1002() {
    let s = Running::memory();
    for op in (3..=7).chain(0xB..=0xF) {
        for payload in [&b""[..], b"reserved opcode payload"] {
            let mut p = Peer::open(&s);
            let bytes = frames(
                &mut p,
                &[
                    (true, 0, TEXT, &command("before", 0)),
                    (true, 0, op, payload),
                    (true, 0, PING, b"after"),
                ],
            );
            p.write_lenient(&bytes);
            expect_pong_event(&p.event(), "before");
            let c = p.expect_failed();
            assert_eq!(c.code, Some(1002), "opcode {op:#x}: {c:?}");
            assert!(c.before.is_empty(), "opcode {op:#x}: {c:?}");
        }
    }
}

// ----- family 5: fragmentation -----

/// `message` as text fragments cut at `cuts` (byte offsets).
fn fragmented(p: &mut Peer, message: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(message.len());
    let mut bytes = Vec::new();
    for (i, w) in bounds.windows(2).enumerate() {
        let op = if i == 0 { TEXT } else { CONTINUATION };
        let fin = i == bounds.len() - 2;
        bytes.extend(p.frame(fin, 0, op, &message[w[0]..w[1]]));
    }
    bytes
}

/// Sends `message` as text fragments cut at `cuts`, all in one write.
fn send_fragmented(p: &mut Peer, message: &[u8], cuts: &[usize]) {
    let bytes = fragmented(p, message, cuts);
    p.write(&bytes);
}

#[test]
fn f5_a_fragmented_text_message_is_one_command() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let msg = command("fragmented", 0);
    let n = msg.len();
    let every_byte: Vec<usize> = (1..n).collect();
    let splits: [&[usize]; 6] = [
        &[10],       // two fragments
        &[1, 2, 3],  // tiny first fragments
        &every_byte, // one byte per fragment
        &[0, 0, 5],  // empty first fragments
        &[7, 7, 7],  // empty middle fragments
        &[n - 1, n], // empty last fragment
    ];
    for cuts in splits {
        send_fragmented(&mut p, &msg, cuts);
        expect_pong_event(&p.event(), "fragmented");
    }
    // A text frame with FIN=0 and a lone empty final continuation.
    let bytes = frames(
        &mut p,
        &[(false, 0, TEXT, &msg), (true, 0, CONTINUATION, b"")],
    );
    p.write(&bytes);
    expect_pong_event(&p.event(), "fragmented");
}

#[test]
fn f5_a_fragmented_binary_message_is_one_bad_json() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let bytes = frames(
        &mut p,
        &[
            (false, 0, BINARY, b"\x01\x02"),
            (false, 0, CONTINUATION, b"\x03"),
            (true, 0, CONTINUATION, b"\x04"),
        ],
    );
    p.write(&bytes);
    expect_error(&p.event(), "bad_json");
    p.round_trip("one-error-only");
}

#[test]
fn f5_control_frames_between_fragments_are_handled_at_once() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let msg = command("interleaved", 0);
    // A ping between two fragments, all in one write: the pong comes first.
    let bytes = frames(
        &mut p,
        &[
            (false, 0, TEXT, &msg[..9]),
            (true, 0, PING, b"between"),
            (true, 0, CONTINUATION, &msg[9..]),
        ],
    );
    p.write(&bytes);
    let f = p.frame_in_time();
    assert_eq!((f.opcode, f.payload), (PONG, b"between".to_vec()));
    expect_pong_event(&p.event(), "interleaved");

    // The pong comes while the message is still open, and pongs between fragments are ignored.
    let start = p.frame(false, 0, TEXT, &msg[..5]);
    p.write(&start);
    for i in 0..3 {
        let payload = format!("mid {i}");
        p.send(true, PONG, b"unsolicited");
        p.send(true, PING, payload.as_bytes());
        let f = p.frame_in_time();
        assert_eq!((f.opcode, f.payload), (PONG, payload.into_bytes()));
        let cont = p.frame(false, 0, CONTINUATION, &msg[5 + i..6 + i]);
        p.write(&cont);
    }
    p.send(true, CONTINUATION, &msg[8..]);
    expect_pong_event(&p.event(), "interleaved");
}

#[test]
fn f5_a_continuation_without_a_start_closes_1002() {
    let s = Running::memory();
    let msg = command("x", 0);
    let mut p = Peer::open(&s);
    // Final continuation out of nowhere; then one with FIN=0; then one after a finished message.
    let cases = [
        frames(&mut p, &[(true, 0, CONTINUATION, &msg)]),
        frames(&mut p, &[(false, 0, CONTINUATION, &msg[..4])]),
        frames(
            &mut p,
            &[(true, 0, TEXT, &msg), (true, 0, CONTINUATION, b"")],
        ),
    ];
    drop(p);
    for (i, bytes) in cases.iter().enumerate() {
        let before = fails_with(&s, bytes, 1002, &format!("case {i}"));
        // The finished message of the last case is answered first.
        let answers = before.iter().filter(|f| f.opcode == TEXT).count();
        assert_eq!(answers, usize::from(i == 2), "case {i}: {before:?}");
    }
}

#[test]
fn f5_a_new_data_frame_inside_a_fragmented_message_closes_1002() {
    let s = Running::memory();
    let msg = command("nested", 0);
    let mut p = Peer::open(&s);
    let cases = [
        frames(
            &mut p,
            &[(false, 0, TEXT, &msg[..5]), (true, 0, TEXT, &msg)],
        ),
        frames(
            &mut p,
            &[(false, 0, TEXT, &msg[..5]), (false, 0, TEXT, &msg[5..])],
        ),
        frames(
            &mut p,
            &[(false, 0, TEXT, &msg[..5]), (true, 0, BINARY, b"b")],
        ),
        frames(&mut p, &[(false, 0, BINARY, b"b"), (true, 0, TEXT, &msg)]),
    ];
    drop(p);
    for (i, bytes) in cases.iter().enumerate() {
        let before = fails_with(&s, bytes, 1002, &format!("case {i}"));
        assert!(before.is_empty(), "case {i}: {before:?}");
    }
}

#[test]
fn f5_fragmented_control_frames_close_1002() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let cases = [
        frames(
            &mut p,
            &[(false, 0, PING, b"frag"), (true, 0, CONTINUATION, b"ment")],
        ),
        frames(
            &mut p,
            &[(false, 0, PONG, b"frag"), (true, 0, CONTINUATION, b"ment")],
        ),
        frames(&mut p, &[(false, 0, CLOSE, b"\x03\xe8")]),
    ];
    drop(p);
    for (i, bytes) in cases.iter().enumerate() {
        let before = fails_with(&s, bytes, 1002, &format!("case {i}"));
        assert!(before.is_empty(), "case {i}: no pong: {before:?}");
    }
}

// ----- family 6: UTF-8 -----

/// Byte sequences that are not UTF-8 anywhere in a text message.
const INVALID_UTF8: [&[u8]; 10] = [
    b"\x80",                 // a lone continuation byte
    b"\xC0\xAF",             // overlong '/'
    b"\xE0\x80\xAF",         // overlong, three bytes
    b"\xED\xA0\x80",         // a UTF-16 surrogate (U+D800)
    b"\xED\xBF\xBF",         // a UTF-16 surrogate (U+DFFF)
    b"\xF4\x90\x80\x80",     // above U+10FFFF
    b"\xF8\x88\x80\x80\x80", // five-byte form
    b"\xFE",                 // never in UTF-8
    b"\xFF",                 // never in UTF-8
    b"\xCE\xBA\xE2x",        // 'κ', then a lead byte without its continuations
];

#[test]
fn f6_invalid_utf8_in_a_text_frame_closes_1007() {
    let s = Running::memory();
    for bad in INVALID_UTF8 {
        let mut p = Peer::open(&s);
        let bytes = p.frame(true, 0, TEXT, &command_with_raw_id(bad));
        drop(p);
        let before = fails_with(&s, &bytes, 1007, &format!("{bad:x?}"));
        assert!(before.is_empty(), "{bad:x?}: {before:?}");
    }
}

#[test]
fn f6_invalid_utf8_across_fragments_closes_1007() {
    let s = Running::memory();
    let msg = command_with_raw_id(b"\xCE\xBA\xED\xA0\x80end");
    let at = msg.iter().position(|&b| b == 0xED).unwrap();
    let tail = command_with_raw_id(b"ok\xE2\x82");
    let mut p = Peer::open(&s);
    let cases = [
        // The surrogate's lead byte ends the first fragment, its continuation starts the next.
        frames(
            &mut p,
            &[
                (false, 0, TEXT, &msg[..at + 1]),
                (true, 0, CONTINUATION, &msg[at + 1..]),
            ],
        ),
        // The invalid sequence is whole inside a middle fragment.
        frames(
            &mut p,
            &[
                (false, 0, TEXT, &msg[..at - 2]),
                (false, 0, CONTINUATION, &msg[at - 2..at + 4]),
                (true, 0, CONTINUATION, &msg[at + 4..]),
            ],
        ),
        // '€' cut short at the end of a fragment; the next one goes on with a quote.
        frames(
            &mut p,
            &[
                (false, 0, TEXT, &tail[..tail.len() - 2]),
                (true, 0, CONTINUATION, &tail[tail.len() - 2..]),
            ],
        ),
        // The message ends inside a code point: every fragment was fine until the last.
        frames(
            &mut p,
            &[
                (false, 0, TEXT, b"{\"command\":\"ping\"}"),
                (true, 0, CONTINUATION, b"\xE2\x82"),
            ],
        ),
    ];
    drop(p);
    for (i, bytes) in cases.iter().enumerate() {
        let before = fails_with(&s, bytes, 1007, &format!("case {i}"));
        assert!(before.is_empty(), "case {i}: {before:?}");
    }
}

#[test]
fn f6_invalid_utf8_fails_fast_before_the_message_ends() {
    let s = Running::memory();
    // Only the first fragment (FIN=0) is sent: the server must not wait for the rest.
    for first in [
        &b"{\"x\":\"\xFF"[..],
        b"{\"x\":\"\xF4\x90",
        b"{\"x\":\"\xED\xA0",
    ] {
        let mut p = Peer::open(&s);
        p.send(false, TEXT, first);
        let c = p.expect_failed();
        assert_eq!(c.code, Some(1007), "{first:x?}: {c:?}");
    }
}

#[test]
fn f6_valid_multibyte_utf8_split_anywhere_is_assembled() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    // Two-, three- and four-byte code points, and the edges of the ranges.
    let id = "κ€𝄞\u{7f}\u{80}\u{7ff}\u{800}\u{fffd}\u{ffff}\u{10000}\u{10ffff}";
    p.round_trip(id);
    let msg = command(id, 0);
    let start = msg.len() - id.len() - 2;
    // Cut inside every code point of 'κ€𝄞', one message per cut.
    for cut in start + 1..start + 9 {
        send_fragmented(&mut p, &msg, &[cut]);
        expect_pong_event(&p.event(), id);
    }
    // One byte per fragment.
    let every: Vec<usize> = (1..msg.len()).collect();
    send_fragmented(&mut p, &msg, &every);
    expect_pong_event(&p.event(), id);
}

// ----- family 7: the close handshake -----

#[test]
fn f7_a_client_close_is_answered_and_tcp_closed() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    p.close(1000, b"bye");
    let c = p.expect_close();
    assert_eq!(c.code, Some(1000), "{c:?}");
    assert!(c.before.is_empty(), "{c:?}");
    p.expect_end();
}

#[test]
fn f7_a_close_without_payload_is_answered() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    p.send(true, CLOSE, b"");
    let c = p.expect_close();
    assert!(matches!(c.code, None | Some(1000)), "{c:?}");
    p.expect_end();
}

#[test]
fn f7_valid_close_codes_are_echoed() {
    let s = Running::memory();
    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
    ] {
        let mut p = Peer::open(&s);
        p.close(code, b"");
        let c = p.expect_close();
        assert_eq!(c.code, Some(code), "{c:?}");
        p.expect_end();
    }
}

#[test]
fn f7_close_reasons_up_to_123_bytes_are_fine() {
    let s = Running::memory();
    for reason in [&b"a reason"[..], &[b'r'; 123], "κόσμε".as_bytes()] {
        let mut p = Peer::open(&s);
        p.close(1000, reason);
        let c = p.expect_close();
        assert_eq!(c.code, Some(1000), "{c:?}");
        p.expect_end();
    }
}

#[test]
fn f7_invalid_close_codes_close_1002() {
    let s = Running::memory();
    for code in [
        0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        let mut p = Peer::open(&s);
        p.close(code, b"");
        let c = p.expect_failed();
        assert_eq!(c.code, Some(1002), "close code {code}: {c:?}");
    }
}

#[test]
fn f7_malformed_close_payloads_close_1002() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let mut reason_126 = vec![0x03, 0xE8];
    reason_126.resize(126, b'*');
    let cases = [
        p.frame(true, 0, CLOSE, b"\x03"),     // one byte: half a code
        p.frame(true, 0, CLOSE, &reason_126), // control payload over 125
    ];
    drop(p);
    for (i, bytes) in cases.iter().enumerate() {
        fails_with(&s, bytes, 1002, &format!("case {i}"));
    }
}

#[test]
fn f7_a_close_reason_that_is_not_utf8_is_refused() {
    let s = Running::memory();
    for reason in [&b"\xCE\xBA\xED\xA0\x80"[..], b"\xFF", b"ok\xE2\x82"] {
        let mut p = Peer::open(&s);
        p.close(1000, reason);
        let c = p.expect_failed();
        assert!(matches!(c.code, Some(1002 | 1007)), "{reason:x?}: {c:?}");
    }
}

#[test]
fn f7_frames_after_a_close_are_ignored() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let close = close_payload(1000, b"");
    let bytes = frames(
        &mut p,
        &[
            (true, 0, CLOSE, &close),
            (true, 0, TEXT, &command("late", 0)),
            (true, 0, PING, b"late"),
            (true, 0, CLOSE, &close),
        ],
    );
    p.write_lenient(&bytes);
    let c = p.expect_close();
    assert_eq!(c.code, Some(1000), "{c:?}");
    assert!(c.before.is_empty(), "{c:?}");
    p.expect_end();
}

#[test]
fn f7_a_close_between_fragments_ends_the_connection() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let msg = command("never", 0);
    let close = close_payload(1000, b"");
    let bytes = frames(
        &mut p,
        &[
            (false, 0, TEXT, &msg[..6]),
            (true, 0, CLOSE, &close),
            (true, 0, CONTINUATION, &msg[6..]),
        ],
    );
    p.write_lenient(&bytes);
    let c = p.expect_close();
    assert_eq!(c.code, Some(1000), "{c:?}");
    assert!(c.before.is_empty(), "the message is never completed: {c:?}");
    p.expect_end();
}

#[test]
fn f7_server_shutdown_closes_1001_and_the_client_answers() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    s.stopper.stop();
    let c = p.expect_close();
    assert_eq!(c.code, Some(1001), "{c:?}");
    let answer = p.frame(true, 0, CLOSE, &close_payload(1001, b""));
    p.write_lenient(&answer);
    p.expect_end();
    s.stop();
}

#[test]
fn f7_a_too_big_frame_closes_1009_and_the_client_answers() {
    let s = Running::memory();
    let mut p = Peer::open(&s);
    let big = command("big", max_size() + 1);
    let bytes = p.frame(true, 0, TEXT, &big);
    p.write_lenient(&bytes);
    let c = p.expect_close();
    assert_eq!(c.code, Some(1009), "{c:?}");
    assert!(c.before.is_empty(), "{c:?}");
    let answer = p.frame(true, 0, CLOSE, &close_payload(1009, b""));
    p.write_lenient(&answer);
    p.expect_end();
}

// ----- family 9 (scaled to the 8 KiB limit) -----

#[test]
fn f9_a_header_announcing_2_pow_63_bytes_closes_at_once() {
    let s = Running::memory();
    for (op, len) in [
        (TEXT, (1u64 << 63) - 1),
        (BINARY, (1u64 << 63) - 1),
        (TEXT, u64::MAX),
        (TEXT, 1u64 << 32),
    ] {
        let mut p = Peer::open(&s);
        // The header alone, and a few payload bytes: nothing to wait for, nothing to allocate.
        let mut bytes = header(true, 0, op, len, Some([1, 2, 3, 4]));
        bytes.extend_from_slice(b"abcd");
        p.write_lenient(&bytes);
        let c = p.expect_failed();
        assert!(
            matches!(c.code, Some(1009 | 1002)),
            "op {op} length {len}: {c:?}"
        );
    }
}

#[test]
fn f9_a_message_of_exactly_the_limit_is_accepted_one_byte_more_closes_1009() {
    let s = Running::memory();
    let max = max_size();
    let mut p = Peer::open(&s);
    p.text(&command("max", max));
    expect_pong_event(&p.event(), "max");
    p.send(true, BINARY, &vec![7u8; max]);
    expect_error(&p.event(), "bad_json");
    // Sizes over the limit, in the 16-bit and 64-bit length forms.
    for (op, len) in [
        (TEXT, max + 1),
        (BINARY, max + 1),
        (TEXT, 65535),
        (TEXT, 65536),
    ] {
        let mut p = Peer::open(&s);
        let bytes = p.frame(true, 0, op, &command("over", len));
        p.write_lenient(&bytes);
        let c = p.expect_failed();
        assert_eq!(c.code, Some(1009), "op {op}, {len} bytes: {c:?}");
        assert!(c.before.is_empty(), "{c:?}");
    }
}

#[test]
fn f9_many_small_fragments_count_against_the_limit() {
    let s = Running::memory();
    let max = max_size();
    let mut p = Peer::open(&s);
    // Exactly the limit in 64-byte fragments: accepted.
    let msg = command("many", max);
    let cuts: Vec<usize> = (64..max).step_by(64).collect();
    send_fragmented(&mut p, &msg, &cuts);
    expect_pong_event(&p.event(), "many");
    // Over the limit in 100-byte fragments, no single frame near it: 1009, and no answer.
    let msg = command("too-many", max + 808);
    let cuts: Vec<usize> = (100..msg.len()).step_by(100).collect();
    let mut p = Peer::open(&s);
    let bytes = fragmented(&mut p, &msg, &cuts);
    p.write_lenient(&bytes);
    let c = p.expect_failed();
    assert_eq!(c.code, Some(1009), "{c:?}");
    assert!(c.before.is_empty(), "{c:?}");
}

// ----- masking -----

#[test]
fn unmasked_client_frames_close_1002() {
    let s = Running::memory();
    let cases = [
        encode(true, 0, TEXT, &command("unmasked", 0), None),
        encode(true, 0, PING, b"unmasked", None),
        encode(true, 0, CLOSE, &close_payload(1000, b""), None),
    ];
    for (i, bytes) in cases.iter().enumerate() {
        let before = fails_with(&s, bytes, 1002, &format!("case {i}"));
        assert!(before.is_empty(), "case {i}: {before:?}");
    }
}
