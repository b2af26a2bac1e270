//! The output-buffer policy: [`Sink`], the core's [`Outbox`] over the connections' buffers (the
//! bound, the reply credit, the slow-consumer close), and which drained buffers are kept.

use mio::Token;
use slab::Slab;

use super::conn::{Conn, Drained, Flushed};
use super::{Server, trim_heap};
use crate::chat::{Close, ConnId, Outbox, Payload};

/// The largest output buffer a busy connection keeps between turns.
const MAX_KEPT_OUT: usize = 64 * 1024;

/// The capacity a connection's output buffer starts with when something is queued.
const OUT_BUFFER_START: usize = 4096;

/// Whether a drained output buffer of `capacity` bytes is kept for the next turn: only by a
/// busy connection (drained on the previous turn too), and only if it is not oversized.
pub(crate) fn keep_buffer(busy: bool, capacity: usize) -> bool {
    busy && capacity <= MAX_KEPT_OUT
}

/// The `Outbox` the core writes into: appends to connection buffers and notes what to flush.
pub(crate) struct Sink<'a> {
    pub(crate) conns: &'a mut Slab<Conn>,
    pub(crate) dirty: &'a mut Vec<usize>,
    pub(crate) closing: &'a mut Vec<(usize, Close)>,
    pub(crate) max_pending: usize,
}

impl Outbox for Sink<'_> {
    fn send(&mut self, to: ConnId, payload: &Payload) {
        self.queue(to, payload, false);
    }

    fn reply(&mut self, to: ConnId, payload: &Payload) {
        self.queue(to, payload, true);
    }

    fn close(&mut self, to: ConnId, why: Close) {
        if let Some(c) = self.conns.get_mut(to) {
            c.queue_close();
        }
        self.closing.push((to, why));
    }
}

impl Sink<'_> {
    /// Appends a frame to a connection's output, or closes it as a slow consumer.
    ///
    /// The bound is `max_pending` bytes queued, but replies (answers to the connection's own
    /// command) do not count against it: their size is the server's choice, and a `list` of
    /// 10,000 names is 350 KB. So the connection may hold the bound plus its credit, the largest
    /// reply queued since its output last ran empty. A reply raises the credit to its own size
    /// first, so it is queued whenever what is queued before it is within the bound (room
    /// traffic and small replies behind it too); a client that asks for a second big reply
    /// before reading the first one, or does not read room traffic, is a slow consumer. Memory
    /// per connection stays at most the bound plus one reply.
    fn queue(&mut self, to: ConnId, payload: &Payload, reply: bool) {
        let Some(c) = self.conns.get_mut(to) else {
            return;
        };
        if !c.can_send() {
            return;
        }
        let pending = c.pending();
        let len = payload.bytes().len();
        if pending == 0 {
            c.reply_credit = 0;
        }
        let credit = if reply {
            c.reply_credit.max(len)
        } else {
            c.reply_credit
        };
        if pending + len > self.max_pending + credit {
            // Backpressure: this client cannot keep up. It gets nothing more but its close.
            self.closing.push((to, Close::SlowConsumer));
            c.queue_close();
            return;
        }
        c.reply_credit = credit;
        if c.out.capacity() == 0 {
            // Drained buffers are given back (idle connections hold none); a fresh one starts
            // big enough for a burst, so it does not grow step by step.
            c.out.reserve(OUT_BUFFER_START.max(payload.bytes().len()));
        }
        c.out.extend_from_slice(payload.bytes());
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(to);
        }
    }
}

impl Server {
    pub(super) fn mark_dirty(&mut self, id: usize) {
        if let Some(c) = self.conns.get_mut(id) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    pub(super) fn flush_dirty(&mut self) {
        while let Some(id) = self.dirty.pop() {
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            c.dirty = false;
            match c.flush(self.iteration) {
                Flushed::Failed => {
                    self.drop_conn(id);
                    continue;
                }
                Flushed::Done if c.close_started() => {
                    // Output written, close frame included: half-close, then read and discard
                    // until the client closes too (or the grace runs out).
                    c.shut_write();
                    match c.drain(self.read_limits.budget_bytes) {
                        Drained::Closed => {
                            self.drop_conn(id);
                            continue;
                        }
                        Drained::More => {
                            if !self.backlog.contains(&id) {
                                self.backlog.push(id);
                            }
                        }
                        Drained::Empty => {}
                    }
                }
                Flushed::Done if c.out.capacity() > 0 => self.kept_now.push(id),
                _ => {}
            }
            let wanted = c.wanted_interest();
            if wanted != c.interest {
                c.interest = wanted;
                let _ = self
                    .poll
                    .registry()
                    .reregister(&mut c.stream, Token(id), wanted);
            }
        }
        // A connection kept its buffer because it was busy; one that was not written on this
        // turn is busy no more and gives it back.
        let mut released = false;
        for id in std::mem::take(&mut self.kept) {
            if let Some(c) = self.conns.get_mut(id)
                && c.drained_on != self.iteration
                && c.pending() == 0
            {
                c.out = Vec::new();
                released = true;
            }
        }
        std::mem::swap(&mut self.kept, &mut self.kept_now);
        if released && self.kept.is_empty() {
            // The traffic stopped: hand the heap a burst left behind back to the system.
            trim_heap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::keep_buffer;

    #[test]
    fn only_busy_connections_keep_buffers_and_never_oversized_ones() {
        assert!(keep_buffer(true, 4096));
        assert!(keep_buffer(true, 64 * 1024));
        assert!(!keep_buffer(true, 64 * 1024 + 1));
        assert!(!keep_buffer(false, 4096));
        assert!(!keep_buffer(false, 0));
    }
}
