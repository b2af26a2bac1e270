//! Reverse proxies the server trusts (`--trusted-proxies`), and what a request that came
//! through one says about its client: the address (`X-Forwarded-For`, else RFC 7239
//! `Forwarded: for=`) and the host it asked for (`X-Forwarded-Host`, else `Forwarded: host=`).
//! Pure functions over a parsed head: no sockets. Cargo feature `deploy` (on by default);
//! without it no proxy is trusted and a `--trusted-proxies` list is refused at start.
//!
//! The address is found by walking the hops from the right (the one nearest the server)
//! while they are trusted proxies: the first one that is not is the client. A hop that names
//! no address (`unknown`, an obfuscated `_id`, garbage) ends the walk, and the last address
//! known (the proxy that added it) stands for the client: what lies left of it cannot be
//! told apart from what a client wrote. From a peer that is not trusted the headers are
//! ignored.

use std::net::IpAddr;

#[cfg(feature = "deploy")]
mod trusted;
#[cfg(feature = "deploy")]
pub use trusted::{Cidr, TrustedProxies, client};

/// Who a request is from, as far as the server can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client's address: the peer's, or the one a trusted proxy names.
    pub addr: IpAddr,
    /// The host the client asked for, when a trusted proxy forwarded it; `None`: the
    /// request's own `Host` stands.
    pub forwarded_host: Option<String>,
}

#[cfg(not(feature = "deploy"))]
mod absent {
    use std::fmt;
    use std::net::IpAddr;

    use super::Client;
    use crate::config::SettingValue;
    use crate::server::http::Head;

    /// Without the `deploy` feature: no proxy is trusted, and a list is refused at start.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct TrustedProxies(());

    impl TrustedProxies {
        /// Always: this build trusts no proxy.
        pub fn is_empty(&self) -> bool {
            true
        }
        /// Never.
        pub fn contains(&self, _: IpAddr) -> bool {
            false
        }
    }

    impl SettingValue for TrustedProxies {
        fn parse_setting(text: &str) -> Result<Self, String> {
            if text.trim().is_empty() {
                Ok(TrustedProxies(()))
            } else {
                Err("this build has no reverse-proxy support (cargo feature `deploy`)".into())
            }
        }
        fn show(&self) -> String {
            String::new()
        }
    }

    impl fmt::Display for TrustedProxies {
        fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
            Ok(())
        }
    }

    /// The peer, always: no forwarding header is read.
    pub fn client(peer: IpAddr, _: &Head, _: &TrustedProxies) -> Client {
        Client {
            addr: peer.to_canonical(),
            forwarded_host: None,
        }
    }
}
#[cfg(not(feature = "deploy"))]
pub use absent::{TrustedProxies, client};
