//! One connection: its socket, its phase (HTTP head, WebSocket), its [`Life`] (open, close
//! queued, closing, write side shut) with the transitions between them, its timers and its
//! bounded output.
//!
//! Output is one `Vec<u8>` per connection. Every frame queued during a loop iteration is
//! appended to it (tungstenite's own control frames too, through [`Wire`]) and the transport
//! writes it out once per iteration: many frames, one `write`. Its length is what backpressure
//! bounds.

use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::time::Instant;

use mio::Interest;

use super::output;
use super::stream::Stream;
use super::timers::{Timer, TimerTable};
use super::wire::{Next, Wire};
use crate::chat::Close;

/// What a connection speaks.
pub(crate) enum Phase {
    /// Reading the request head (until [`Timer::Head`]).
    Http { head: Vec<u8> },
    /// Speaking WebSocket.
    Ws(Box<Wire>),
}

/// How far a connection is on its way out; it only moves forward (tungstenite's
/// `WebSocketState` is the model). Methods of [`Conn`] make the moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Life {
    /// Serving: frames may be queued.
    Open,
    /// A close is decided and waits on the loop's list ([`Conn::queue_close`]); nothing more
    /// is queued.
    CloseQueued,
    /// The last output (close frame, close reply or HTTP response) is queued: the connection
    /// goes once it is written and the peer closes, or when [`Timer::CloseGrace`] runs out.
    Closing,
    /// Everything is written and our side is shut down ([`Conn::shut_write`]); input is read
    /// and discarded until the peer closes.
    WriteShut,
}

/// One connection in the slab.
pub(crate) struct Conn {
    pub(crate) stream: Stream,
    /// The client's address: the peer's, or, from a trusted proxy, the one its head names
    /// (set once the head is read). Per-address caps and logs use it.
    pub(crate) ip: IpAddr,
    /// The socket's own peer address (a trusted proxy's, when the client came through one).
    pub(crate) peer: IpAddr,
    /// Whether `ip` counts in the per-address table: from accept on, except for a trusted
    /// proxy's sockets, which count against the forwarded address once the head is read.
    pub(crate) ip_counted: bool,
    /// Whether the request is a `HEAD`: its response goes without a body.
    pub(crate) head_only: bool,
    pub(crate) phase: Phase,
    /// Bytes queued for the socket; `out[sent..]` is what remains to write.
    pub(crate) out: Vec<u8>,
    pub(crate) sent: usize,
    /// The loop turn on which the output was last drained.
    pub(crate) drained_on: u64,
    /// The interest registered with the poll, to re-register only on change.
    pub(crate) interest: Interest,
    /// Whether the connection is already in the loop's dirty list.
    pub(crate) dirty: bool,
    /// How far it is on its way out.
    pub(crate) life: Life,
    /// Whether the chat core knows this connection as a member.
    pub(crate) member: bool,
    /// Whether the connection counts against the member cap (it does against its address
    /// from accept on).
    pub(crate) counted: bool,
    /// Its deadlines: head, ping, pong and idle timeouts, token expiry, close grace.
    pub(crate) timers: TimerTable,
    /// The deadline this connection has in the loop's timer heap, if any.
    pub(crate) timer_at: Option<Instant>,
    /// The largest reply queued since the output last ran empty: the output may hold this much
    /// beyond the bound, because replies do not count against it (see the transport's `Sink`).
    pub(crate) reply_credit: usize,
    /// The loop turn whose read budget the connection is spending.
    pub(crate) read_turn: u64,
    /// A REST page this HTTP connection waits for (the engine's token); its head is not read
    /// again meanwhile.
    pub(crate) page_pending: Option<u64>,
}

/// What discarding input gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drained {
    /// The peer has closed, or the socket failed.
    Closed,
    /// Nothing more to read for now.
    Empty,
    /// The limit was reached with input possibly left.
    More,
}

/// What writing the output gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything is written.
    Done,
    /// The socket is full; wait for writable.
    Blocked,
    /// The socket is gone.
    Failed,
}

impl Conn {
    pub(crate) fn new(stream: impl Into<Stream>, ip: IpAddr, head_deadline: Instant) -> Self {
        let mut timers = TimerTable::default();
        timers.set(Timer::Head, head_deadline);
        Conn {
            stream: stream.into(),
            ip,
            peer: ip,
            ip_counted: true,
            head_only: false,
            phase: Phase::Http { head: Vec::new() },
            out: Vec::new(),
            sent: 0,
            drained_on: 0,
            interest: Interest::READABLE,
            dirty: false,
            life: Life::Open,
            member: false,
            counted: false,
            timers,
            timer_at: None,
            reply_credit: 0,
            read_turn: 0,
            page_pending: None,
        }
    }

    /// Bytes queued and not yet written (over TLS: the records made and not yet written too).
    pub(crate) fn pending(&self) -> usize {
        self.out.len() - self.sent + self.stream.tls_pending()
    }

    /// Whether WebSocket data frames may still be queued.
    pub(crate) fn can_send(&self) -> bool {
        self.life == Life::Open && matches!(&self.phase, Phase::Ws(ctx) if ctx.can_write())
    }

    /// Whether its last output is queued (or written): [`Life::Closing`] or later.
    pub(crate) fn close_started(&self) -> bool {
        matches!(self.life, Life::Closing | Life::WriteShut)
    }

    /// Open → close queued: the loop will write the close; until then nothing more is queued.
    pub(crate) fn queue_close(&mut self) {
        if self.life == Life::Open {
            self.life = Life::CloseQueued;
        }
    }

    /// → closing: the output queued so far is the last; it has until `by` to be written (an
    /// earlier deadline already running stays). The other timers no longer matter.
    pub(crate) fn finish_by(&mut self, by: Instant) {
        let by = self.timers.get(Timer::CloseGrace).map_or(by, |t| t.min(by));
        self.timers.stop_all();
        self.timers.set(Timer::CloseGrace, by);
        if !self.close_started() {
            self.life = Life::Closing;
        }
    }

    /// Queues the close frame for `why` (WebSocket) and moves to closing.
    pub(crate) fn close_with(&mut self, why: Close, by: Instant) {
        if let Phase::Ws(wire) = &mut self.phase {
            wire.close(&mut self.out, why.code(), why.reason());
        }
        self.finish_by(by);
    }

    /// Closing → write side shut, once the output is written. Dropping a socket with unread
    /// input would send a reset that can destroy what we wrote, so the read side stays.
    pub(crate) fn shut_write(&mut self) {
        if self.life != Life::WriteShut {
            self.life = Life::WriteShut;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Reads the next WebSocket message, if the connection speaks WebSocket, within the byte
    /// budget of loop turn `iteration` and the output bound `max_pending`.
    pub(crate) fn read_message(&mut self, iteration: u64, max_pending: usize) -> Next {
        match &mut self.phase {
            Phase::Ws(wire) => {
                if self.read_turn != iteration {
                    self.read_turn = iteration;
                    wire.start_turn();
                }
                // Replies may hold the output past the bound by their credit (see the `Sink`);
                // what tungstenite adds on top of that counts like anything else.
                let bound = max_pending.saturating_add(self.reply_credit);
                wire.read(&mut self.stream, &mut self.out, self.sent, bound)
            }
            Phase::Http { .. } => Next::Failed(tungstenite::Error::AlreadyClosed),
        }
    }

    /// Queues a ping.
    pub(crate) fn ping(&mut self) {
        if let Phase::Ws(wire) = &mut self.phase {
            wire.ping(&mut self.out);
        }
    }

    /// Moves frames tungstenite queued by itself (a close reply) into the output.
    pub(crate) fn flush_protocol(&mut self) {
        if let Phase::Ws(wire) = &mut self.phase {
            wire.flush(&mut self.out);
        }
    }

    /// Reads and discards at most `limit` bytes of input.
    pub(crate) fn drain(&mut self, limit: usize) -> Drained {
        let mut scratch = [0u8; 4096];
        let mut left = limit;
        while left > 0 {
            let len = scratch.len().min(left);
            match self.stream.read(&mut scratch[..len]) {
                Ok(0) => return Drained::Closed,
                Ok(n) => left -= n.min(left),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Drained::Closed,
            }
        }
        Drained::More
    }

    /// Writes as much output as the socket takes.
    /// `iteration` numbers the loop's turns: a buffer drained on two turns in a row belongs to a
    /// busy connection and is kept; otherwise it is given back.
    pub(crate) fn flush(&mut self, iteration: u64) -> Flushed {
        while self.sent < self.out.len() {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(0) => return Flushed::Failed,
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Flushed::Failed,
            }
        }
        // TLS records the socket did not take yet (a no-op on a plain socket).
        match self.stream.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Blocked,
            Err(_) => return Flushed::Failed,
        }
        // Written out. A busy connection (drained on the previous turn too) keeps its buffer:
        // handing it back every turn makes the allocator trim and fault the heap in again, which
        // cost 18% of the server's time at 4M deliveries/s. Anything else gives the memory back,
        // so an idle connection holds no output buffer at all.
        let busy = self.drained_on + 1 == iteration;
        if output::keep_buffer(busy, self.out.capacity()) {
            self.out.clear();
        } else {
            self.out = Vec::new();
        }
        self.drained_on = iteration;
        self.sent = 0;
        Flushed::Done
    }

    /// The interest the connection needs now: writable only while output waits.
    pub(crate) fn wanted_interest(&self) -> Interest {
        if self.pending() > 0 {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::{Ipv4Addr, TcpListener as StdListener, TcpStream as StdStream};
    use std::time::{Duration, Instant};

    use mio::net::TcpStream;
    use tungstenite::protocol::WebSocketConfig;

    use super::{Conn, Flushed, Life, Phase};
    use crate::chat::Close;
    use crate::server::timers::Timer;
    use crate::server::wire::{ReadLimits, Wire};

    /// A connection over loopback, speaking WebSocket if `ws`, and its peer.
    fn conn(ws: bool, head_deadline: Instant) -> (Conn, StdStream) {
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let peer = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, addr) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let mut c = Conn::new(TcpStream::from_std(stream), addr.ip(), head_deadline);
        if ws {
            let limits = ReadLimits::from_config(&crate::config::Config::default());
            c.phase = Phase::Ws(Box::new(Wire::new(
                Vec::new(),
                WebSocketConfig::default(),
                limits,
            )));
        }
        (c, peer)
    }

    #[test]
    fn a_new_connection_is_open_with_only_its_head_deadline() {
        let at = Instant::now() + Duration::from_secs(10);
        let (c, _peer) = conn(false, at);
        assert_eq!(c.life, Life::Open);
        assert_eq!(c.timers.next_timeout(), Some(at));
        assert_eq!(c.timers.expired(at), Some(Timer::Head));
        // Not speaking WebSocket yet: nothing may be queued to it as a frame.
        assert!(!c.can_send());
    }

    #[test]
    fn a_queued_close_stops_sending_and_closing_only_moves_forward() {
        let now = Instant::now();
        let (mut c, _peer) = conn(true, now);
        c.timers.stop(Timer::Head);
        assert!(c.can_send());
        c.queue_close();
        assert_eq!(c.life, Life::CloseQueued);
        assert!(!c.can_send() && !c.close_started());
        c.close_with(Close::Idle, now + Duration::from_secs(2));
        assert_eq!(c.life, Life::Closing);
        assert!(c.close_started());
        // Queueing again once closing changes nothing.
        c.queue_close();
        assert_eq!(c.life, Life::Closing);
    }

    #[test]
    fn closing_keeps_the_earlier_grace_and_drops_every_other_timer() {
        let now = Instant::now();
        let (mut c, _peer) = conn(true, now + Duration::from_secs(1));
        c.timers.set(Timer::Ping, now + Duration::from_secs(1));
        c.timers.set(Timer::Idle, now + Duration::from_secs(1));
        c.finish_by(now + Duration::from_secs(5));
        assert_eq!(c.timers.next_timeout(), Some(now + Duration::from_secs(5)));
        c.finish_by(now + Duration::from_secs(9));
        assert_eq!(
            c.timers.get(Timer::CloseGrace),
            Some(now + Duration::from_secs(5))
        );
        c.finish_by(now + Duration::from_secs(3));
        assert_eq!(
            c.timers.get(Timer::CloseGrace),
            Some(now + Duration::from_secs(3))
        );
        let later = now + Duration::from_secs(4);
        assert_eq!(c.timers.expired(later), Some(Timer::CloseGrace));
        assert_eq!(c.timers.get(Timer::Ping), None);
    }

    #[test]
    fn close_with_writes_the_close_code_and_reason_then_the_write_side_shuts() {
        let now = Instant::now();
        let (mut c, mut peer) = conn(true, now);
        c.close_with(Close::SlowConsumer, now + Duration::from_secs(2));
        // An unmasked close frame: FIN + opcode 8, length, code, reason.
        let reason = Close::SlowConsumer.reason().as_bytes();
        let mut frame = vec![0x88, (2 + reason.len()) as u8, 0x03, 0xF0];
        frame.extend_from_slice(reason);
        assert_eq!(&c.out[c.sent..], &frame[..]);
        assert_eq!(c.flush(1), Flushed::Done);
        c.shut_write();
        assert_eq!(c.life, Life::WriteShut);
        // The peer reads the frame, then the end of the stream.
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, frame);
    }

    #[test]
    fn an_http_connection_closes_without_a_frame() {
        let now = Instant::now();
        let (mut c, _peer) = conn(false, now);
        c.close_with(Close::Shutdown, now + Duration::from_secs(2));
        assert_eq!(c.pending(), 0);
        assert_eq!(c.life, Life::Closing);
    }
}
