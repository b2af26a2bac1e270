//! Every close the server decides, each as a [`Close`] (which knows its code and reason):
//! `close_later` queues one (the core, backpressure, a timer, the read path) and
//! `process_closing` writes what is queued at the end of the turn; `protocol_error` maps a
//! read error to its `Close` and closes at once; `begin_shutdown` closes everyone with
//! [`Close::Shutdown`]. Each is logged at debug with its reason, except the shutdown's (one
//! `info` line).

use std::time::Instant;

use log::{debug, info};
use tungstenite::Error as WsError;
use tungstenite::error::ProtocolError;

use super::conn::Phase;
use super::{CLOSE_GRACE, Server};
use crate::chat::Close;

impl Server {
    /// Ends a connection after a read error, with the close code the error calls for.
    pub(super) fn protocol_error(&mut self, id: usize, e: WsError, now: Instant) {
        let why = match &e {
            // The client went away (FIN or reset) without a close frame: an ordinary end,
            // not a protocol error to answer, log as a warning or count.
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                debug!("connection {id} ended without a close frame");
                self.drop_conn(id);
                return;
            }
            WsError::Capacity(_) => Close::MessageTooBig,
            WsError::Utf8(_) => Close::InvalidUtf8,
            WsError::Protocol(_) => Close::Protocol,
            // Closed, reset, or any other I/O failure: nothing can be sent.
            _ => {
                debug!("connection {id} ended: {e}");
                self.drop_conn(id);
                return;
            }
        };
        debug!("closing connection {id}: {} ({e})", why.reason());
        if let Some(c) = self.conns.get(id) {
            self.report.closed(now, c.ip, why);
        }
        self.end_member(id);
        if let Some(c) = self.conns.get_mut(id) {
            // tungstenite may already be past the point of sending a close; then just drop.
            if matches!(&c.phase, Phase::Ws(ctx) if ctx.can_write()) {
                c.close_with(why, now + CLOSE_GRACE);
                self.schedule(id);
                self.mark_dirty(id);
            } else {
                self.drop_conn(id);
            }
        }
    }

    /// Removes the connection's member from the chat (once), telling its rooms.
    pub(super) fn end_member(&mut self, id: usize) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if !std::mem::take(&mut c.member) {
            return;
        }
        self.core(|chat, sink| chat.disconnect(id, sink));
    }

    /// Decides to close a connection for `why`; `process_closing` writes the close this turn.
    /// Nothing more is queued to it meanwhile.
    pub(super) fn close_later(&mut self, id: usize, why: Close) {
        if let Some(c) = self.conns.get_mut(id) {
            c.queue_close();
            self.closing.push((id, why));
        }
    }

    /// Closes what the core, backpressure, a timer or the read path asked to close: the one
    /// place a queued [`Close`] becomes a close frame. Closing one member may make the core
    /// write to (and overflow) others, so this runs until nothing is left.
    pub(super) fn process_closing(&mut self, now: Instant) {
        while let Some((id, why)) = self.closing.pop() {
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            if c.close_started() {
                continue;
            }
            if why == Close::SlowConsumer {
                self.chat.count_slow_consumer();
            }
            debug!("closing connection {id}: {}", why.reason());
            self.report.closed(now, c.ip, why);
            c.close_with(why, now + CLOSE_GRACE);
            self.schedule(id);
            self.mark_dirty(id);
            self.end_member(id);
        }
    }

    /// Starts the shutdown: no more accepts, every member gets [`Close::Shutdown`] and the
    /// grace to take it, heads still being read are dropped.
    pub(super) fn begin_shutdown(&mut self, now: Instant) {
        if self.shutdown_at.is_some() {
            return;
        }
        info!("shutting down: closing {} connections", self.conns.len());
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let grace = self.chat.config().shutdown_grace;
        self.shutdown_at = Some(now + grace);
        let ids: Vec<usize> = self.conns.iter().map(|(id, _)| id).collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(id) else {
                continue;
            };
            if c.close_started() {
                continue;
            }
            if let Phase::Http { .. } = c.phase {
                self.drop_conn(id);
                continue;
            }
            self.report.closed(now, c.ip, Close::Shutdown);
            c.close_with(Close::Shutdown, now + grace);
            self.schedule(id);
            self.mark_dirty(id);
            // Its rooms hear nothing: every member is closing, and closing ones get no frames.
            self.end_member(id);
        }
    }
}
