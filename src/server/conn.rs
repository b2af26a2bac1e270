//! One connection: its socket, its phase (HTTP head, WebSocket, closing) and its bounded output.
//!
//! Output is one `Vec<u8>` per connection. Every frame queued during a loop iteration is
//! appended to it (tungstenite's own control frames too, through [`Wire`]) and the transport
//! writes it out once per iteration: many frames, one `write`. Its length is what backpressure
//! bounds.

use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::time::Instant;

use mio::Interest;
use mio::net::TcpStream;

use super::wire::{Next, Wire};

/// The largest output buffer a busy connection keeps between turns.
const MAX_KEPT_OUT: usize = 64 * 1024;

/// Where a connection is in its life.
pub(crate) enum Phase {
    /// Reading the request head until this deadline.
    Http { head: Vec<u8>, deadline: Instant },
    /// Speaking WebSocket.
    Ws(Box<Wire>),
}

/// One connection in the slab.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) ip: IpAddr,
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
    /// Set once the connection is on its way out: close when the output is written, or at
    /// `close_by`, whichever comes first. Nothing more is queued.
    pub(crate) closing: bool,
    pub(crate) close_by: Option<Instant>,
    /// Our side is shut down; the socket is only read (and discarded) until the peer closes.
    pub(crate) write_closed: bool,
    /// Whether the chat core knows this connection as a member.
    pub(crate) member: bool,
    /// Whether the connection counts against the member cap (it does against its address
    /// from accept on).
    pub(crate) counted: bool,
    pub(crate) last_frame: Instant,
    pub(crate) last_command: Instant,
    pub(crate) next_ping: Instant,
    /// When the member's token expires (authentication on).
    pub(crate) expires_at: Option<Instant>,
    /// The deadline this connection has in the timer heap, if any.
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
    pub(crate) fn new(stream: TcpStream, ip: IpAddr, now: Instant, head_deadline: Instant) -> Self {
        Conn {
            stream,
            ip,
            phase: Phase::Http {
                head: Vec::new(),
                deadline: head_deadline,
            },
            out: Vec::new(),
            sent: 0,
            drained_on: 0,
            interest: Interest::READABLE,
            dirty: false,
            closing: false,
            close_by: None,
            write_closed: false,
            member: false,
            counted: false,
            last_frame: now,
            last_command: now,
            next_ping: now,
            expires_at: None,
            timer_at: None,
            reply_credit: 0,
            read_turn: 0,
            page_pending: None,
        }
    }

    /// Bytes queued and not yet written.
    pub(crate) fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Whether WebSocket data frames may still be queued.
    pub(crate) fn can_send(&self) -> bool {
        !self.closing && matches!(&self.phase, Phase::Ws(ctx) if ctx.can_write())
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

    /// Queues a close frame (WebSocket) and marks the connection closing; it is dropped when
    /// its output is written or at `close_by`.
    pub(crate) fn start_close(&mut self, code: u16, reason: &str, close_by: Instant) {
        if let Phase::Ws(wire) = &mut self.phase {
            wire.close(&mut self.out, code, reason);
        }
        self.closing = true;
        self.close_by = Some(self.close_by.map_or(close_by, |t| t.min(close_by)));
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
        // Written out. A busy connection (drained on the previous turn too) keeps its buffer:
        // handing it back every turn makes the allocator trim and fault the heap in again, which
        // cost 18% of the server's time at 4M deliveries/s. Anything else gives the memory back,
        // so an idle connection holds no output buffer at all.
        let busy = self.drained_on + 1 == iteration;
        if busy && self.out.capacity() <= MAX_KEPT_OUT {
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
