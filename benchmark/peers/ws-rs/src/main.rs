//! Broadcast peer built on the `ws` crate (ws-rs, mio event loop), following the
//! crate's README/docs pattern of a `Handler` per connection that relays with
//! `Sender::broadcast` (as in its `html_chat` example), which reaches every open
//! connection, the sender included.
//!
//! Settings changed from ws-rs defaults (see README.md):
//! * `max_connections` (default 100 in ws-rs) -> $MAX_CONNECTIONS, default 10000;
//! * `queue_size` (default 5) -> $QUEUE_SIZE, default 5 (shared queue = product of both);
//! * `tcp_nodelay` (default false) -> true.

use std::env;

use ws::{Builder, Handler, Message, Request, Response, Result, Sender, Settings};

struct Client {
    out: Sender,
}

impl Handler for Client {
    fn on_request(&mut self, req: &Request) -> Result<Response> {
        let path = req.resource().split('?').next().unwrap_or("");
        let upgrading = req.header("upgrade").is_some();
        if path == "/health" && !upgrading {
            return Ok(Response::new(200, "OK", b"ok\n".to_vec()));
        }
        // Any other path performs the normal WebSocket handshake.
        Response::from_request(req)
    }

    fn on_message(&mut self, msg: Message) -> Result<()> {
        if let Err(err) = self.out.broadcast(msg) {
            // Queue full and the like: report it, keep the connection.
            eprintln!("broadcast failed: {err}");
        }
        Ok(())
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    match env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")),
        Err(_) => default,
    }
}

fn main() {
    let host = env::var("HOST").unwrap_or_else(|_| "127.0.0.1".to_string());
    let port = env::var("PORT").unwrap_or_else(|_| "9001".to_string());
    let bind = format!("{host}:{port}");

    let settings = Settings {
        max_connections: env_usize("MAX_CONNECTIONS", 10_000),
        queue_size: env_usize("QUEUE_SIZE", 5),
        tcp_nodelay: true,
        ..Settings::default()
    };

    let server = Builder::new()
        .with_settings(settings)
        .build(|out| Client { out })
        .expect("cannot build ws-rs server");
    eprintln!("ws-rs peer listening on {bind}");
    if let Err(err) = server.listen(bind.as_str()) {
        eprintln!("ws-rs server stopped: {err}");
        std::process::exit(1);
    }
}
