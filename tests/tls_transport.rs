//! TLS on the port (feature `tls`): HTTP, the page and WebSocket over TLS with a certificate
//! made in the test, hostile input (plain HTTP, garbage records, a handshake that never ends,
//! a client that never reads), and `SIGHUP` reloading the certificate without dropping anyone.
#![cfg(feature = "tls")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use chatterbox::config::Config;
use chatterbox::server::Server;
use common::Running;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

const WAIT: Duration = Duration::from_secs(10);

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM into `dir`.
struct Cert {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn make_cert(dir: &Path, tag: &str) -> Cert {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.join(format!("{tag}.crt"));
    let key = dir.join(format!("{tag}.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    Cert {
        cert,
        key,
        der: ck.cert.der().clone(),
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chatterbox-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn client_config(trusted: &[&CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in trusted {
        roots.add((*c).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A verified TLS connection to `addr` (the handshake done).
fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = StreamOwned::new(ClientConnection::new(config.clone(), name).unwrap(), tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .expect("the handshake completes");
    }
    tls
}

/// Sends one HTTP request over TLS and reads the answer up to the server's close.
fn https(addr: SocketAddr, config: &Arc<ClientConfig>, request: &str) -> String {
    let mut tls = tls_connect(addr, config);
    tls.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn https_json(addr: SocketAddr, config: &Arc<ClientConfig>, path: &str) -> Value {
    let r = https(
        addr,
        config,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    );
    serde_json::from_str(r.split_once("\r\n\r\n").expect("a body").1).expect("JSON")
}

/// A WebSocket member over TLS, its welcome read.
fn wss(addr: SocketAddr, config: &Arc<ClientConfig>, name: &str) -> WebSocket<Tls> {
    let tls = tls_connect(addr, config);
    let url = format!("wss://localhost:{}/ws?name={name}", addr.port());
    let (mut ws, _) = tungstenite::client(url, tls).expect("upgrade over TLS");
    until(&mut ws, |e| e["event"] == "history");
    ws
}

fn until(ws: &mut WebSocket<Tls>, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        match ws.read().expect("a frame within the timeout") {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if pred(&v) {
                    return v;
                }
            }
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

fn send(ws: &mut WebSocket<Tls>, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

fn tls_server(cert: &Cert, cfg: Config) -> Running {
    Running::start(Config {
        db_path: ":memory:".into(),
        tls_cert: cert.cert.to_string_lossy().into_owned(),
        tls_key: cert.key.to_string_lossy().into_owned(),
        ..cfg
    })
}

/// Reads until the server closes the connection; `true` if it did within the timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn the_api_the_page_and_websocket_speak_tls() {
    let dir = tempdir("basic");
    let cert = make_cert(&dir, "a");
    let s = tls_server(&cert, Config::default());
    let cc = client_config(&[&cert.der]);

    let health = https(
        s.addr,
        &cc,
        "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("ok"), "{health}");
    let page = https(s.addr, &cc, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("<html"),
        "{page:.200}"
    );

    let mut alice = wss(s.addr, &cc, "alice");
    let mut bob = wss(s.addr, &cc, "bob");
    // A message larger than one TLS record (16 KiB) travels whole.
    let pad = "z".repeat(7000);
    send(
        &mut alice,
        json!({"command":"broadcast","message":"over tls","data":{"pad":pad}}),
    );
    let got = until(&mut bob, |e| {
        e["event"] == "broadcast" && e["member"] == "alice"
    });
    assert_eq!(got["message"], "over tls");
    assert_eq!(got["data"]["pad"].as_str().unwrap().len(), 7000);
    assert_eq!(
        https_json(s.addr, &cc, "/api/members"),
        json!(["alice", "bob"])
    );
    alice.close(None).unwrap();
    until(&mut bob, |e| e["left"] == "alice");
    s.stop();
}

#[test]
fn a_plain_http_request_to_the_tls_port_is_told_and_closed() {
    let dir = tempdir("plain");
    let cert = make_cert(&dir, "a");
    let s = tls_server(&cert, Config::default());
    let cc = client_config(&[&cert.der]);

    let mut plain = TcpStream::connect(s.addr).unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    plain.set_read_timeout(Some(WAIT)).unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("TLS only"), "{answer}");

    // The upgrade in plain text is refused the same way, and the server serves TLS as before.
    let mut plain = TcpStream::connect(s.addr).unwrap();
    plain
        .write_all(common::upgrade_request("/ws?name=x", "").as_bytes())
        .unwrap();
    assert!(closed_by_server(&mut plain));
    let stats = https_json(s.addr, &cc, "/api/stats");
    assert_eq!(stats["tls_refused"], 2, "{stats}");
    assert_eq!(stats["members"], 0, "{stats}");
    let metrics = https(s.addr, &cc, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        metrics.contains("chatterbox_tls_refused_total 2"),
        "{metrics}"
    );
    s.stop();
}

#[test]
fn garbage_records_close_the_connection_before_and_after_the_handshake() {
    let dir = tempdir("garbage");
    let cert = make_cert(&dir, "a");
    let s = tls_server(&cert, Config::default());
    let cc = client_config(&[&cert.der]);

    // A handshake record header followed by nonsense.
    let mut raw = TcpStream::connect(s.addr).unwrap();
    let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    junk.extend([0xAB; 64]);
    raw.write_all(&junk).unwrap();
    assert!(closed_by_server(&mut raw), "a bad ClientHello closes");

    // Bytes that are no record at all (neither TLS nor a letter).
    let mut raw = TcpStream::connect(s.addr).unwrap();
    raw.write_all(&[0u8, 1, 2, 3, 0xff, 0xfe]).unwrap();
    assert!(closed_by_server(&mut raw));

    // A member whose TLS stream turns to garbage after the handshake is closed, and leaves.
    let mut watcher = wss(s.addr, &cc, "watcher");
    let mut victim = wss(s.addr, &cc, "victim");
    victim
        .get_mut()
        .sock
        .write_all(&[0x17, 0x03, 0x03, 0x00, 0x20, 1, 2, 3, 4, 5, 6, 7, 8])
        .unwrap();
    victim.get_mut().sock.write_all(&[9u8; 32]).unwrap();
    until(&mut watcher, |e| e["left"] == "victim");
    assert!(closed_by_server(&mut victim.get_mut().sock));
    let stats = https_json(s.addr, &cc, "/api/stats");
    assert_eq!(stats["members"], 1, "{stats}");
    assert!(stats["tls_refused"].as_u64().unwrap() >= 3, "{stats}");
    s.stop();
}

#[test]
fn a_handshake_that_never_finishes_is_bounded_by_the_head_timeout() {
    let dir = tempdir("slowhs");
    let cert = make_cert(&dir, "a");
    let s = tls_server(
        &cert,
        Config {
            head_timeout: Duration::from_millis(300),
            ..Config::default()
        },
    );
    // Nothing at all, then half a record header: both are cut off by the head timeout.
    let mut silent = TcpStream::connect(s.addr).unwrap();
    let mut half = TcpStream::connect(s.addr).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02]).unwrap();
    assert!(closed_by_server(&mut silent));
    assert!(closed_by_server(&mut half));
    s.stop();
}

#[test]
fn a_member_that_never_reads_is_a_slow_consumer_over_tls_too() {
    let dir = tempdir("slow");
    let cert = make_cert(&dir, "a");
    let s = tls_server(
        &cert,
        Config {
            rate_per_sec: 100_000,
            rate_burst: 100_000,
            max_pending_output: 64 * 1024,
            ..Config::default()
        },
    );
    let cc = client_config(&[&cert.der]);
    // Handshake and upgrade, then never a read again.
    let mut stalled = tls_connect(s.addr, &cc);
    stalled
        .write_all(common::upgrade_request("/ws?name=stalled", "").as_bytes())
        .unwrap();
    stalled.flush().unwrap();
    let mut sender = wss(s.addr, &cc, "sender");
    let pad = "y".repeat(6000);
    let mut closed = false;
    for i in 0..20_000u32 {
        send(
            &mut sender,
            json!({"command":"broadcast","message":"m","echo":false,"data":{"i":i,"pad":pad}}),
        );
        if i % 100 == 99 && https_json(s.addr, &cc, "/api/stats")["slow_consumers_closed"] == 1 {
            closed = true;
            break;
        }
    }
    assert!(closed, "the stalled member was never closed");
    assert_eq!(https_json(s.addr, &cc, "/api/members"), json!(["sender"]));
    s.stop();
}

#[test]
fn tls_settings_are_checked_at_start_with_the_path_and_the_error() {
    let dir = tempdir("settings");
    let cert = make_cert(&dir, "a");
    let other = make_cert(&dir, "b");
    let cfg = |c: &Path, k: &Path| Config {
        host: "127.0.0.1".into(),
        port: 0,
        db_path: ":memory:".into(),
        tls_cert: c.to_string_lossy().into_owned(),
        tls_key: k.to_string_lossy().into_owned(),
        ..Config::default()
    };
    let err = |c: Config| match Server::bind(c) {
        Ok(_) => panic!("bound with bad TLS settings"),
        Err(e) => e.to_string(),
    };
    let missing = dir.join("missing.crt");
    let e = err(cfg(&missing, &cert.key));
    assert!(e.contains(&*missing.to_string_lossy()), "{e}");
    // A key file given as the certificate: no CERTIFICATE in it.
    let e = err(cfg(&cert.key, &cert.key));
    assert!(
        e.contains("certificate") && e.contains(&*cert.key.to_string_lossy()),
        "{e}"
    );
    let e = err(cfg(&cert.cert, &cert.cert));
    assert!(
        e.contains("key") && e.contains(&*cert.cert.to_string_lossy()),
        "{e}"
    );
    // A key that belongs to another certificate.
    let e = err(cfg(&cert.cert, &other.key));
    assert!(e.contains("does not fit"), "{e}");

    let args =
        |a: &[&str]| Config::from_args(a.iter().map(|s| s.to_string()), |_| None).map(|_| ());
    let e = args(&["--tls-cert", "x.pem"]).unwrap_err();
    assert!(e.contains("--tls-key") && e.contains("TLS_KEY"), "{e}");
    let e = args(&["--tls-key", "x.pem"]).unwrap_err();
    assert!(e.contains("--tls-cert"), "{e}");
    args(&["--tls-cert", "x.pem", "--tls-key", "y.pem"]).unwrap();
}

/// The binary with TLS on, its log lines sent to a channel.
fn spawn_tls_binary(cert: &Cert) -> (std::process::Child, SocketAddr, mpsc::Receiver<String>) {
    common::spawn_binary_logged(&[
        "--tls-cert".as_ref(),
        cert.cert.as_os_str(),
        "--tls-key".as_ref(),
        cert.key.as_os_str(),
    ])
}

use common::wait_log;

fn served_cert(addr: SocketAddr, config: &Arc<ClientConfig>) -> CertificateDer<'static> {
    let tls = tls_connect(addr, config);
    tls.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

fn signal(child: &std::process::Child, sig: libc::c_int) {
    // SAFETY: `kill` only reads its arguments; the child is ours and not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

fn sighup(child: &std::process::Child) {
    signal(child, libc::SIGHUP);
}

#[test]
fn sighup_reloads_the_certificate_keeps_connections_and_survives_a_bad_file() {
    let dir = tempdir("reload");
    let a = make_cert(&dir, "a");
    let b = make_cert(&dir, "b");
    let live = Cert {
        cert: dir.join("live.crt"),
        key: dir.join("live.key"),
        der: a.der.clone(),
    };
    std::fs::copy(&a.cert, &live.cert).unwrap();
    std::fs::copy(&a.key, &live.key).unwrap();
    let (mut child, addr, log) = spawn_tls_binary(&live);
    let both = client_config(&[&a.der, &b.der]);
    assert_eq!(served_cert(addr, &both), a.der);
    let mut old = wss(addr, &both, "old");

    // A renewal: new files in place, then SIGHUP.
    std::fs::copy(&b.cert, &live.cert).unwrap();
    std::fs::copy(&b.key, &live.key).unwrap();
    sighup(&child);
    wait_log(&log, "TLS certificate reloaded");
    assert_eq!(
        served_cert(addr, &both),
        b.der,
        "new connections get the new one"
    );
    send(&mut old, json!({"command":"ping","request_id":"p1"}));
    assert_eq!(
        until(&mut old, |e| e["request_id"] == "p1")["event"],
        "pong"
    );

    // A broken renewal: logged with its path, and the certificate in use stays.
    std::fs::write(&live.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    sighup(&child);
    let line = wait_log(&log, "TLS reload failed");
    assert!(line.contains(&*live.cert.to_string_lossy()), "{line}");
    assert!(line.contains("ERROR") || line.contains("error"), "{line}");
    assert_eq!(served_cert(addr, &both), b.der);
    let mut newer = wss(addr, &both, "newer");
    send(
        &mut newer,
        json!({"command":"broadcast","message":"still here"}),
    );
    assert_eq!(
        until(&mut old, |e| e["member"] == "newer")["message"],
        "still here"
    );
    // The cert and key from different pairs: refused too, and the old pair stays.
    std::fs::copy(&a.cert, &live.cert).unwrap();
    sighup(&child);
    let line = wait_log(&log, "TLS reload failed");
    assert!(line.contains("does not fit"), "{line}");
    assert_eq!(served_cert(addr, &both), b.der);

    signal(&child, libc::SIGTERM);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_refusal_decided_at_accept_waits_for_the_handshake_and_arrives_encrypted() {
    let dir = tempdir("refuse");
    let cert = make_cert(&dir, "a");
    let s = tls_server(
        &cert,
        Config {
            max_connections_per_ip: 1,
            ..Config::default()
        },
    );
    let cc = client_config(&[&cert.der]);
    // The first socket holds the address's one place; the next is answered 429 at accept,
    // before its handshake has even begun: the answer goes out once it is done.
    let _first = tls_connect(s.addr, &cc);
    let r = https(
        s.addr,
        &cc,
        "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    s.stop();
}
