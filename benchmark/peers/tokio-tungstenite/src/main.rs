//! Broadcast peer built on tokio-tungstenite, shaped like the crate's own
//! `examples/server.rs` chat server: a shared map of peers, each holding the
//! sending half of an unbounded channel that a per-connection task drains into
//! its WebSocket sink.
//!
//! Differences from that example, all deliberate for the benchmark:
//! * the sender also receives its own message (everyone gets every frame);
//! * only text/binary frames are relayed (control frames are handled by tungstenite);
//! * no per-message logging; TCP_NODELAY is set on every accepted socket;
//! * a failed handshake or accept error is logged instead of panicking.

use std::{
    collections::HashMap,
    env,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_channel::mpsc::{unbounded, UnboundedSender};
use futures_util::{future, pin_mut, StreamExt, TryStreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

type Outbox = UnboundedSender<Message>;
type Room = Arc<Mutex<HashMap<SocketAddr, Outbox>>>;

async fn serve_client(room: Room, tcp: TcpStream, addr: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let ws = match tokio_tungstenite::accept_async(tcp).await {
        Ok(ws) => ws,
        Err(err) => {
            eprintln!("handshake with {addr} failed: {err}");
            return;
        }
    };

    let (outbox, inbox) = unbounded();
    room.lock().unwrap().insert(addr, outbox);

    let (sink, stream) = ws.split();

    // Every data frame from this client goes to every outbox, its own included.
    let relay = stream.try_for_each(|msg| {
        if msg.is_text() || msg.is_binary() {
            for outbox in room.lock().unwrap().values() {
                // A closed outbox belongs to a peer that is leaving; skip it.
                let _ = outbox.unbounded_send(msg.clone());
            }
        }
        future::ok(())
    });

    // Drain this client's outbox into its socket.
    let deliver = inbox.map(Ok).forward(sink);

    pin_mut!(relay, deliver);
    future::select(relay, deliver).await;

    room.lock().unwrap().remove(&addr);
}

#[tokio::main]
async fn main() {
    let host = env::var("HOST").unwrap_or_else(|_| "127.0.0.1".to_string());
    let port = env::var("PORT").unwrap_or_else(|_| "9001".to_string());
    let bind = format!("{host}:{port}");

    let listener = TcpListener::bind(&bind)
        .await
        .unwrap_or_else(|err| panic!("cannot bind {bind}: {err}"));
    eprintln!("tokio-tungstenite peer listening on {}", listener.local_addr().unwrap());

    let room = Room::default();
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                tokio::spawn(serve_client(room.clone(), tcp, addr));
            }
            Err(err) => {
                // e.g. out of file descriptors: back off briefly and keep serving.
                eprintln!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
