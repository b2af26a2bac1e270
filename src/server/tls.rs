//! TLS on the listening port (cargo feature `tls`): the certificate and key from PEM files
//! ([`load`], again on `SIGHUP`), and [`TlsStream`], a rustls `ServerConnection` over a
//! non-blocking socket, driven from the loop like rustls' `tlsserver-mio` example: records in
//! with `read_tls` + `process_new_packets`, plaintext out of `reader()`, plaintext into
//! `writer()`, records out with `write_tls`. No thread, no async runtime; rustls on `ring`.

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

/// Plaintext taken into rustls per `write` call; rustls cuts it into records of 16 KiB.
const WRITE_CHUNK: usize = 64 * 1024;

/// The first byte of every TLS handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;

/// What a plain-HTTP client gets on the TLS port, unencrypted, before the close.
const PLAIN_HTTP_REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Length: 54\r\nConnection: close\r\n\r\n\
this port speaks TLS only: use https:// and wss://\r\n\r\n";

/// Reads the certificate chain and private key (PEM) and builds the server's TLS settings.
/// The error names the file and what is wrong with it.
pub fn load(cert_path: &str, key_path: &str) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read the TLS certificate {cert_path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "cannot read the TLS certificate {cert_path}: no CERTIFICATE block in it"
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("cannot read the TLS key {key_path}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the TLS key {key_path} does not fit {cert_path}: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One TLS connection: rustls' state, its socket, and the records the socket did not take.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: ServerConnection,
    /// TLS records made and not yet written; `out[sent..]` is what is left.
    out: Vec<u8>,
    sent: usize,
    /// The peer closed its side (TCP end of stream).
    eof: bool,
    /// Whether the first byte was checked (a plain-HTTP request is told so in plain text).
    checked_first: bool,
    /// Why the peer was refused, until the transport takes it.
    refusal: Option<String>,
}

impl TlsStream {
    pub(crate) fn new(tcp: TcpStream, config: &Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
        Ok(TlsStream {
            tcp,
            conn,
            out: Vec::new(),
            sent: 0,
            eof: false,
            checked_first: false,
            refusal: None,
        })
    }

    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub(crate) fn tcp_mut(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    pub(crate) fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    pub(crate) fn take_refusal(&mut self) -> Option<String> {
        self.refusal.take()
    }

    /// Queues a `close_notify` and writes what the socket takes (the rest is lost with the
    /// close; the peer sees the end of the stream either way).
    pub(crate) fn close_notify(&mut self) {
        self.conn.send_close_notify();
        let _ = self.push();
    }

    /// Moves every record rustls holds into our buffer, where the bound counts it.
    fn spill(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.out)?;
        }
        Ok(())
    }

    /// Writes the records waiting (ours first, then rustls'), `WouldBlock` if some remain.
    fn push(&mut self) -> io::Result<()> {
        while self.sent < self.out.len() {
            match self.tcp.write(&self.out[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() == io::ErrorKind::WouldBlock {
                        self.spill()?;
                    }
                    return Err(e);
                }
            }
        }
        // Written out: an idle connection holds no buffer.
        self.out = Vec::new();
        self.sent = 0;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() == io::ErrorKind::WouldBlock {
                        self.spill()?;
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// A client that sends plain HTTP (a letter where a TLS record starts) is told so in
    /// plain text, its request is read away (so closing sends no reset) and it is refused.
    fn refuse_plain_http(&mut self) -> io::Result<()> {
        let mut first = [0u8; 1];
        match self.tcp.peek(&mut first) {
            Ok(0) => {
                self.eof = true;
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        self.checked_first = true;
        if first[0] == HANDSHAKE_RECORD || !first[0].is_ascii_alphabetic() {
            return Ok(());
        }
        let mut scratch = [0u8; 4096];
        for _ in 0..4 {
            if !matches!(self.tcp.read(&mut scratch), Ok(n) if n > 0) {
                break;
            }
        }
        let _ = self.tcp.write(PLAIN_HTTP_REFUSAL);
        self.refusal = Some("plain HTTP request on the TLS port".into());
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "plain HTTP request on the TLS port",
        ))
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.conn.reader().read(buf) {
                // `Ok(0)`: the peer's `close_notify`, the end of the stream.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The socket ended without `close_notify`: an end all the same (HTTP and
                // WebSocket frame their own data, so nothing truncated is taken for whole).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.eof {
                return Ok(0);
            }
            if !self.checked_first {
                self.refuse_plain_http()?;
                continue;
            }
            match self.conn.read_tls(&mut self.tcp) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // rustls has queued an alert saying why: send it if the socket takes it.
                let _ = self.push();
                self.refusal = Some(format!("TLS error: {e}"));
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Handshake messages and key updates rustls answers by itself.
            match self.push() {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push()?;
        if self.conn.is_handshaking() || buf.is_empty() {
            // Plaintext waits in the connection's output until the handshake is done.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self
            .conn
            .writer()
            .write(&buf[..buf.len().min(WRITE_CHUNK)])?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.push() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

    use super::{TlsStream, WRITE_CHUNK, load};

    /// A server `TlsStream` with its handshake done, and the client's end (which never reads
    /// unless the test says so).
    fn pair() -> (
        TlsStream,
        StreamOwned<ClientConnection, std::net::TcpStream>,
    ) {
        let dir = std::env::temp_dir().join(format!("chatterbox-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let server_cfg = load(cert.to_str().unwrap(), key.to_str().unwrap()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let client_cfg =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client_tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_tcp, _) = listener.accept().unwrap();
        server_tcp.set_nonblocking(true).unwrap();
        let mut server =
            TlsStream::new(mio::net::TcpStream::from_std(server_tcp), &server_cfg).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(Arc::new(client_cfg), name).unwrap();
        let client = std::thread::spawn(move || {
            client_tcp
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut c = StreamOwned::new(conn, client_tcp);
            while c.conn.is_handshaking() {
                c.conn.complete_io(&mut c.sock).unwrap();
            }
            c
        });
        // The server side is driven by reads, as the loop does on readiness.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        while server.conn.is_handshaking() {
            assert!(Instant::now() < deadline, "no handshake");
            match server.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                other => panic!("{other:?}"),
            }
        }
        while server.pending() > 0 || server.conn.wants_write() {
            let _ = server.flush();
        }
        (server, client.join().unwrap())
    }

    #[test]
    fn plaintext_waits_while_records_wait_and_the_records_are_counted() {
        let (mut server, mut client) = pair();
        let chunk = vec![b'x'; WRITE_CHUNK];
        let mut taken = 0usize;
        // The client does not read: the socket fills, and the records it did not take move to
        // the stream's own buffer.
        loop {
            match server.write(&chunk) {
                Ok(n) => taken += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(taken < 256 << 20, "the socket never filled");
        }
        let pending = server.pending();
        assert!(pending > 0, "records that did not go out are counted");
        // One chunk's records at most (plus their framing): plaintext was taken only while
        // nothing waited.
        assert!(pending <= WRITE_CHUNK + WRITE_CHUNK / 16, "{pending}");
        for _ in 0..10 {
            assert_eq!(
                server.write(&chunk).unwrap_err().kind(),
                std::io::ErrorKind::WouldBlock
            );
        }
        assert_eq!(server.pending(), pending, "nothing more was taken");
        // The client reads everything: the records go out and the count falls to zero.
        let reader = std::thread::spawn(move || {
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            while got < taken {
                got += client.read(&mut buf).unwrap();
            }
            got
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.pending() > 0 {
            assert!(Instant::now() < deadline, "records never drained");
            let _ = server.flush();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(reader.join().unwrap(), taken);
    }

    #[test]
    fn a_letter_first_is_a_plain_http_request_and_is_told_so() {
        let dir = std::env::temp_dir().join(format!("chatterbox-tls-unit2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let cfg = load(cert.to_str().unwrap(), key.to_str().unwrap()).unwrap();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp, _) = listener.accept().unwrap();
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        tcp.set_nonblocking(true).unwrap();
        // The request is there before the server reads (loopback delivers it at once; wait
        // for it, since a read that finds nothing is just `WouldBlock`).
        let deadline = Instant::now() + Duration::from_secs(10);
        while tcp.peek(&mut [0u8; 1]).is_err() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut s = TlsStream::new(mio::net::TcpStream::from_std(tcp), &cfg).unwrap();
        let e = s.read(&mut [0u8; 64]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(
            s.take_refusal().as_deref(),
            Some("plain HTTP request on the TLS port")
        );
        assert_eq!(s.take_refusal(), None, "taken once");
        drop(s);
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = String::new();
        let _ = peer.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        let len: usize = answer
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), len, "Content-Length matches the body");
    }
}
