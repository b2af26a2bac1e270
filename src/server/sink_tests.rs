//! The output bound as the [`Sink`] applies it: room traffic closes a client that does not read;
//! replies do not count against the bound, up to one reply. Real loopback sockets, never read.

use std::net::{Ipv4Addr, TcpListener as StdListener, TcpStream as StdStream};
use std::time::Instant;

use mio::net::TcpStream;
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;

use super::conn::{Conn, Phase};
use super::output::Sink;
use super::wire::{ReadLimits, Wire};
use crate::chat::{Close, Outbox, Payload};

const BOUND: usize = 1000;

/// A slab of `n` WebSocket connections over loopback sockets (the peers are kept so that the
/// sockets stay open).
fn conns(n: usize) -> (Slab<Conn>, Vec<StdStream>) {
    let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let mut slab = Slab::new();
    let mut peers = Vec::new();
    for _ in 0..n {
        peers.push(StdStream::connect(listener.local_addr().unwrap()).unwrap());
        let (stream, addr) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let now = Instant::now();
        let mut c = Conn::new(TcpStream::from_std(stream), addr.ip(), now);
        let limits = ReadLimits::from_config(&crate::config::Config::default());
        c.phase = Phase::Ws(Box::new(Wire::new(
            Vec::new(),
            WebSocketConfig::default(),
            limits,
        )));
        slab.insert(c);
    }
    (slab, peers)
}

/// A frame of `len` bytes in all, header included.
fn frame(len: usize) -> Payload {
    let p = Payload::new(&"x".repeat(len - 4));
    assert_eq!(p.bytes().len(), len);
    p
}

#[test]
fn replies_do_not_count_against_the_bound_room_traffic_does() {
    let (mut slab, _peers) = conns(4);
    let (mut dirty, mut closing) = (Vec::new(), Vec::new());
    let mut sink = Sink {
        conns: &mut slab,
        dirty: &mut dirty,
        closing: &mut closing,
        max_pending: BOUND,
    };
    // 0: room traffic alone is bounded as before.
    sink.send(0, &frame(600));
    sink.send(0, &frame(600));
    // 1: a reply three times the bound is queued, and so is the room traffic behind it up to
    // the bound; past that the client is slow.
    sink.reply(1, &frame(3000));
    sink.send(1, &frame(500));
    sink.reply(1, &frame(400));
    sink.send(1, &frame(200));
    // 2: asking for a second big reply without reading the first is slow.
    sink.reply(2, &frame(3000));
    sink.reply(2, &frame(3000));
    // 3: the credit ends when the output has been written.
    sink.reply(3, &frame(3000));
    let c = sink.conns.get_mut(3).unwrap();
    c.sent = c.out.len();
    sink.send(3, &frame(1200));
    let mut closed: Vec<_> = closing
        .iter()
        .map(|(id, why)| (*id, *why, why.code()))
        .collect();
    closed.sort_unstable_by_key(|c| c.0);
    let slow = Close::SlowConsumer;
    assert_eq!(
        closed,
        [
            (0, slow, 1008),
            (1, slow, 1008),
            (2, slow, 1008),
            (3, slow, 1008)
        ]
    );
    assert_eq!(slab[0].pending(), 600);
    assert_eq!(
        slab[1].pending(),
        3000 + 500 + 400,
        "the last 200 bytes did not fit"
    );
    assert_eq!(slab[2].pending(), 3000);
    assert_eq!(slab[3].pending(), 0);
}
