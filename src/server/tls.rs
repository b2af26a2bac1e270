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
