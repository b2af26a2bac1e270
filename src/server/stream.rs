//! The byte stream under a connection: a plain TCP socket, or (cargo feature `tls`) TLS over
//! it, driven sans-IO by rustls ([`super::tls`]). Everything above reads and writes plaintext
//! through `Read`/`Write` and never knows which; the plain path is one `match` arm, no box, no
//! dynamic call.
//!
//! What the TLS side adds to the rules of the transport:
//! - `read` returns `WouldBlock` only once rustls holds no plaintext and the socket has nothing
//!   more, so the edge-triggered poll never loses input; the read budget counts plaintext.
//! - `write` takes plaintext only while no TLS records wait for the socket, so what cannot be
//!   written stays in the connection's output (counted by the output bound), and the records
//!   rustls made but the socket did not take are moved into a buffer of our own whose length
//!   is [`Stream::tls_pending`]: the bound counts them too.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// A connection's socket, as the transport reads and writes it.
pub(crate) enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    #[cfg(feature = "tls")]
    Tls(Box<super::tls::TlsStream>),
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Stream {
        Stream::Plain(tcp)
    }
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            #[cfg(feature = "tls")]
            Stream::Tls(t) => t.tcp(),
        }
    }

    fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(s) => s,
            #[cfg(feature = "tls")]
            Stream::Tls(t) => t.tcp_mut(),
        }
    }

    /// Bytes of TLS records made and not yet written to the socket (0 on a plain socket).
    #[inline]
    pub(crate) fn tls_pending(&self) -> usize {
        match self {
            Stream::Plain(_) => 0,
            #[cfg(feature = "tls")]
            Stream::Tls(t) => t.pending(),
        }
    }

    /// Why the TLS layer refused the peer (a plain-HTTP request, a bad handshake, garbage
    /// records), once: the caller logs and counts it.
    pub(crate) fn take_refusal(&mut self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            #[cfg(feature = "tls")]
            Stream::Tls(t) => t.take_refusal(),
        }
    }

    /// Shuts the socket down (after a TLS `close_notify`, written as far as it goes).
    pub(crate) fn shutdown(&mut self, how: Shutdown) -> io::Result<()> {
        #[cfg(feature = "tls")]
        if let Stream::Tls(t) = self {
            t.close_notify();
        }
        self.tcp().shutdown(how)
    }
}

impl Read for Stream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(t) => t.write(buf),
        }
    }

    /// Writes TLS records still waiting; `WouldBlock` while some remain. A no-op when plain.
    #[inline]
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            #[cfg(feature = "tls")]
            Stream::Tls(t) => t.flush(),
        }
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.tcp_mut().register(r, t, i)
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.tcp_mut().reregister(r, t, i)
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        self.tcp_mut().deregister(r)
    }
}
