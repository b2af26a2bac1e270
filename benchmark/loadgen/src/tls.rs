//! `--tls-ca PATH`: every connection speaks TLS (`wss://`), verifying the server against the
//! certificate(s) in PATH, with rustls on ring driven from the same mio loop. The handshake
//! is part of the connection's setup, so it is never inside a measured step.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddrV4};
use std::sync::{Arc, OnceLock};

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();

/// Turns TLS on for every connection of this process, trusting the PEM certificates in `ca`.
pub fn init(ca: &str) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("--tls-ca {ca}: {e}"))? {
        let cert = cert.map_err(|e| format!("--tls-ca {ca}: {e}"))?;
        roots.add(cert).map_err(|e| format!("--tls-ca {ca}: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let _ = CONFIG.set(Arc::new(config));
    Ok(())
}

/// The TLS settings, when `--tls-ca` was given.
pub fn config() -> Option<&'static Arc<ClientConfig>> {
    CONFIG.get()
}

/// One client connection's TLS state over its socket.
pub struct TlsConn {
    pub tcp: TcpStream,
    conn: ClientConnection,
    eof: bool,
}

impl TlsConn {
    pub fn new(
        tcp: TcpStream,
        target: SocketAddrV4,
        config: &Arc<ClientConfig>,
    ) -> io::Result<TlsConn> {
        let name = ServerName::IpAddress(IpAddr::V4(*target.ip()).into());
        let conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
        Ok(TlsConn {
            tcp,
            conn,
            eof: false,
        })
    }

    /// Writes the records rustls holds; `WouldBlock` if the socket is full.
    fn push(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.eof {
                return Ok(0);
            }
            match self.conn.read_tls(&mut self.tcp) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            match self.push() {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }
}

impl Write for TlsConn {
    /// Takes plaintext only once the handshake is done and no records wait, so what the
    /// socket cannot take stays in the connection's own buffer.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push()?;
        if self.conn.is_handshaking() || buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.conn.writer().write(buf)?;
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
