//! A throwaway server to develop and self-test the generator without chatterbox.
//!
//! `mockserver raw PORT`: every text frame is relayed to every connected client (the peer
//! protocol). `mockserver chat PORT`: a tiny imitation of chatterbox's protocol: `me` and
//! `history` on connect, `join`, `broadcast` to a room as a JSON `broadcast` event.
//! Single-threaded mio, one encoded frame appended to each recipient's buffer.
//! Not a reference for anything: just enough protocol to exercise loadgen.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);

struct Client {
    sock: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    open: bool,
    dead: bool,
    name: String,
    rooms: Vec<String>,
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x81);
    let n = payload.len();
    if n < 126 {
        f.push(n as u8);
    } else if n < 65536 {
        f.push(126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(payload);
    f
}

fn flush(c: &mut Client) {
    while !c.out.is_empty() {
        match c.sock.write(&c.out) {
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => {
                c.dead = true;
                break;
            }
        }
    }
}

fn accept_key(_key: &str) -> &'static str {
    // loadgen does not check Sec-WebSocket-Accept; a fixed value keeps this mock tiny.
    "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let chat = args.get(1).map(String::as_str) == Some("chat");
    let port: u16 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(9001);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut listener = TcpListener::bind(addr)?;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut clients: HashMap<usize, Client> = HashMap::new();
    let mut next = 0usize;
    let mut seq: HashMap<String, u64> = HashMap::new();
    eprintln!(
        "mockserver ({}) listening on {addr}",
        if chat { "chat" } else { "raw" }
    );
    loop {
        poll.poll(&mut events, None)?;
        let mut touched = Vec::new();
        for ev in events.iter() {
            if ev.token() == LISTENER {
                while let Ok((mut sock, _)) = listener.accept() {
                    let _ = sock.set_nodelay(true);
                    next += 1;
                    poll.registry().register(
                        &mut sock,
                        Token(next),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    clients.insert(
                        next,
                        Client {
                            sock,
                            inbuf: Vec::new(),
                            out: Vec::new(),
                            open: false,
                            dead: false,
                            name: format!("member{next}"),
                            rooms: vec!["general".into()],
                        },
                    );
                }
                continue;
            }
            let id = ev.token().0;
            let mut msgs: Vec<Vec<u8>> = Vec::new();
            if let Some(c) = clients.get_mut(&id) {
                let mut buf = [0u8; 65536];
                loop {
                    match c.sock.read(&mut buf) {
                        Ok(0) => {
                            c.dead = true;
                            break;
                        }
                        Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            c.dead = true;
                            break;
                        }
                    }
                }
                if !c.open
                    && let Some(end) = c.inbuf.windows(4).position(|w| w == b"\r\n\r\n")
                {
                    let head = String::from_utf8_lossy(&c.inbuf[..end]).into_owned();
                    c.inbuf.drain(..end + 4);
                    if let Some(q) = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.split_once("?name="))
                    {
                        c.name = q.1.to_string();
                    }
                    let resp = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                        accept_key("")
                    );
                    c.out.extend_from_slice(resp.as_bytes());
                    c.open = true;
                    if chat {
                        let me = format!(r#"{{"event":"me","member":"{}","id":"x"}}"#, c.name);
                        c.out.extend_from_slice(&frame(me.as_bytes()));
                        let h =
                            r#"{"event":"history","room":"general","messages":[],"more":false}"#;
                        c.out.extend_from_slice(&frame(h.as_bytes()));
                    }
                }
                // client frames (masked)
                let mut pos = 0;
                loop {
                    let d = &c.inbuf[pos..];
                    if d.len() < 2 {
                        break;
                    }
                    let op = d[0] & 0x0f;
                    let (mut h, len) = match d[1] & 0x7f {
                        126 => {
                            if d.len() < 4 {
                                break;
                            }
                            (4, u16::from_be_bytes([d[2], d[3]]) as usize)
                        }
                        127 => {
                            if d.len() < 10 {
                                break;
                            }
                            (
                                10,
                                u64::from_be_bytes(d[2..10].try_into().unwrap()) as usize,
                            )
                        }
                        n => (2, n as usize),
                    };
                    let masked = d[1] & 0x80 != 0;
                    let mut key = [0u8; 4];
                    if masked {
                        if d.len() < h + 4 {
                            break;
                        }
                        key.copy_from_slice(&d[h..h + 4]);
                        h += 4;
                    }
                    if d.len() < h + len {
                        break;
                    }
                    let payload: Vec<u8> = d[h..h + len]
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ key[i & 3])
                        .collect();
                    pos += h + len;
                    match op {
                        1 => msgs.push(payload),
                        8 => {
                            c.dead = true;
                        }
                        9 => {
                            let mut f = frame(&payload);
                            f[0] = 0x8A;
                            c.out.extend_from_slice(&f);
                        }
                        _ => {}
                    }
                }
                c.inbuf.drain(..pos);
                touched.push(id);
            }
            for m in msgs {
                if !chat {
                    let f = frame(&m);
                    for c in clients.values_mut() {
                        if c.open {
                            c.out.extend_from_slice(&f);
                            touched.push(0);
                        }
                    }
                    continue;
                }
                let v: serde_json::Value = match serde_json::from_slice(&m) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                let room = v["room"].as_str().unwrap_or("general").to_string();
                match v["command"].as_str() {
                    Some("join") => {
                        let c = clients.get_mut(&id).unwrap();
                        if !c.rooms.contains(&room) {
                            c.rooms.push(room.clone());
                        }
                        let h = format!(
                            r#"{{"event":"history","room":"{room}","messages":[],"more":false}}"#
                        );
                        c.out.extend_from_slice(&frame(h.as_bytes()));
                    }
                    Some("broadcast") => {
                        let name = clients[&id].name.clone();
                        let s = seq.entry(room.clone()).or_default();
                        *s += 1;
                        let ev = serde_json::json!({"event":"broadcast","room":room,"member":name,"message":v["message"],"id":*s,"ts":0});
                        let f = frame(ev.to_string().as_bytes());
                        for c in clients.values_mut() {
                            if c.rooms.contains(&room) {
                                c.out.extend_from_slice(&f);
                            }
                        }
                        touched.push(0);
                    }
                    _ => {}
                }
            }
        }
        let mut dead = Vec::new();
        for (&id, c) in clients.iter_mut() {
            if !c.out.is_empty() {
                flush(c);
            }
            if c.dead {
                dead.push(id);
            }
        }
        for id in dead {
            if let Some(mut c) = clients.remove(&id) {
                let _ = poll.registry().deregister(&mut c.sock);
            }
        }
    }
}
