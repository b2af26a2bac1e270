//! One connection: its socket, its phase (HTTP head, WebSocket, closing) and its bounded output.
//!
//! Output is one `Vec<u8>` per connection. Every frame queued during a loop iteration is
//! appended to it (tungstenite's own control frames too, through [`Io`]) and the transport
//! writes it out once per iteration: many frames, one `write`. Its length is what backpressure
//! bounds.

use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::time::Instant;

use mio::Interest;
use mio::net::TcpStream;
use tungstenite::Message;
use tungstenite::protocol::WebSocketContext;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

/// The largest output buffer a busy connection keeps between turns.
const MAX_KEPT_OUT: usize = 64 * 1024;

/// Where a connection is in its life.
pub(crate) enum Phase {
    /// Reading the request head until this deadline.
    Http { head: Vec<u8>, deadline: Instant },
    /// Speaking WebSocket.
    Ws(Box<WebSocketContext>),
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
    /// Whether the connection counts against the WebSocket caps.
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
}

/// A stream view for tungstenite: reads come from the socket, writes go to our output buffer
/// and never block.
pub(crate) struct Io<'a> {
    pub(crate) stream: &'a mut TcpStream,
    pub(crate) out: &'a mut Vec<u8>,
}

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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

    /// Reads the next WebSocket message, if the connection speaks WebSocket.
    pub(crate) fn read_message(&mut self) -> tungstenite::Result<Message> {
        match &mut self.phase {
            Phase::Ws(ctx) => ctx.read(&mut Io {
                stream: &mut self.stream,
                out: &mut self.out,
            }),
            Phase::Http { .. } => Err(tungstenite::Error::AlreadyClosed),
        }
    }

    /// Queues a ping.
    pub(crate) fn ping(&mut self) {
        if let Phase::Ws(ctx) = &mut self.phase {
            let mut io = Io {
                stream: &mut self.stream,
                out: &mut self.out,
            };
            let _ = ctx.write(&mut io, Message::Ping(Default::default()));
            let _ = ctx.flush(&mut io);
        }
    }

    /// Moves frames tungstenite queued by itself (a close reply) into the output.
    pub(crate) fn flush_protocol(&mut self) {
        if let Phase::Ws(ctx) = &mut self.phase {
            let _ = ctx.flush(&mut Io {
                stream: &mut self.stream,
                out: &mut self.out,
            });
        }
    }

    /// Reads and discards input; `true` once the peer has closed (or the socket failed).
    pub(crate) fn drain(&mut self) -> bool {
        let mut scratch = [0u8; 4096];
        loop {
            match self.stream.read(&mut scratch) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }

    /// Queues a close frame (WebSocket) and marks the connection closing; it is dropped when
    /// its output is written or at `close_by`.
    pub(crate) fn start_close(&mut self, code: u16, reason: &str, close_by: Instant) {
        if let Phase::Ws(ctx) = &mut self.phase {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            let _ = ctx.close(
                &mut Io {
                    stream: &mut self.stream,
                    out: &mut self.out,
                },
                Some(frame),
            );
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
