//! The `deploy` feature: CIDR lists, and the client address and host read from forwarding
//! headers (see the parent module for the rules).

use std::fmt;
use std::net::IpAddr;

use super::Client;
use crate::config::SettingValue;
use crate::server::http::Head;

/// One network: an address and how many leading bits of it count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `fd00::/8` or a bare address (all its bits count). Host bits past
    /// the prefix are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, bits) = match text.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (text, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| {
            format!("'{text}' is not an IP address or network (like 10.0.0.0/8 or fd00::/8)")
        })?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.parse::<u8>() {
                Ok(n) if n <= max && b.bytes().all(|c| c.is_ascii_digit()) => n,
                _ => {
                    return Err(format!(
                        "'{text}': the prefix length must be a whole number from 0 to {max}"
                    ));
                }
            },
        };
        Ok(Cidr {
            net: mask(net, bits),
            bits,
        })
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.net.is_ipv4() && mask(ip, self.bits) == self.net
    }
}

fn mask(ip: IpAddr, bits: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & m).into())
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & m).into())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.bits)
    }
}

/// The `--trusted-proxies` setting: networks whose peers may name the client. Empty (the
/// default): nobody may, and the forwarding headers are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// Entries separated by commas, spaces, tabs or newlines; empty entries are skipped.
impl SettingValue for TrustedProxies {
    fn parse_setting(text: &str) -> Result<Self, String> {
        let mut list = Vec::new();
        for entry in text
            .split([',', ' ', '\t', '\n', '\r'])
            .filter(|e| !e.is_empty())
        {
            list.push(Cidr::parse(entry)?);
        }
        Ok(TrustedProxies(list))
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// What request `head` from socket peer `peer` says about its client, under `trusted`.
pub fn client(peer: IpAddr, head: &Head, trusted: &TrustedProxies) -> Client {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return Client {
            addr: peer,
            forwarded_host: None,
        };
    }
    let lines = |name: &'static str| {
        head.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let (hops, forwarded_host) = forwarded(lines("forwarded"));
    let addr = if lines("x-forwarded-for").next().is_some() {
        let hops = lines("x-forwarded-for").rev().flat_map(|v| v.rsplit(','));
        walk(peer, hops.map(node), trusted)
    } else {
        walk(peer, hops.into_iter().rev(), trusted)
    };
    let forwarded_host = lines("x-forwarded-host")
        .next_back()
        .and_then(|v| v.rsplit(',').next())
        .or(forwarded_host)
        .map(str::trim)
        .filter(|h| {
            !h.is_empty() && !h.contains(|c: char| c.is_whitespace() || c.is_control() || c == '\\')
        })
        .map(str::to_string);
    Client {
        addr,
        forwarded_host,
    }
}

/// The client among `hops`, nearest first: the first that is not a trusted proxy; where a hop
/// names no address, the last address before it.
fn walk(
    peer: IpAddr,
    hops: impl Iterator<Item = Option<IpAddr>>,
    trusted: &TrustedProxies,
) -> IpAddr {
    let mut addr = peer;
    for hop in hops {
        let Some(ip) = hop else { break };
        addr = ip;
        if !trusted.contains(ip) {
            break;
        }
    }
    addr
}

/// A hop of `X-Forwarded-For` or a `for=` value: an address, with or without a port (IPv6 in
/// brackets when it has one). `unknown`, obfuscated names and garbage are `None`.
fn node(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let host = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        inside
    } else if text.bytes().filter(|&b| b == b':').count() == 1 {
        // `a.b.c.d:port`; more colons are an IPv6 address without brackets.
        text.split_once(':')?.0
    } else {
        text
    };
    host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// The `for=` hops of `Forwarded` lines in order, one per element that has one, and the last
/// `host=`. A malformed line ends the list with a hop that names nobody (and no more hosts are
/// taken). Values are tokens or quoted strings; a quoted value is taken as it stands between
/// its quotes (an escape makes it no address and no host, neither ever needs one).
fn forwarded<'a>(lines: impl Iterator<Item = &'a str>) -> (Vec<Option<IpAddr>>, Option<&'a str>) {
    let mut hops = Vec::new();
    let mut host = None;
    for line in lines {
        let mut rest = line;
        let mut hop = None;
        loop {
            let Some((key, value, after)) = pair(rest) else {
                hops.push(None);
                return (hops, host);
            };
            if key.eq_ignore_ascii_case("for") {
                hop = Some(node(value));
            } else if key.eq_ignore_ascii_case("host") {
                host = Some(value);
            }
            rest = after.trim_start();
            match rest.bytes().next() {
                Some(b';') => rest = &rest[1..],
                Some(b',') | None => {
                    hops.extend(hop.take());
                    if rest.is_empty() {
                        break;
                    }
                    rest = &rest[1..];
                }
                Some(_) => {
                    hops.push(None);
                    return (hops, host);
                }
            }
        }
    }
    (hops, host)
}

/// `key=value` at the start of `s` (blanks before it skipped): key, value, and what follows.
fn pair(s: &str) -> Option<(&str, &str, &str)> {
    let s = s.trim_start();
    let eq = s.find(['=', ';', ','])?;
    let key = s[..eq].trim();
    if !s[eq..].starts_with('=') || key.is_empty() {
        return None;
    }
    let v = &s[eq + 1..];
    if let Some(q) = v.strip_prefix('"') {
        let bytes = q.as_bytes();
        let mut i = 0;
        while *bytes.get(i)? != b'"' {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        Some((key, &q[..i], &q[i + 1..]))
    } else {
        let end = v.find([';', ',']).unwrap_or(v.len());
        Some((key, v[..end].trim(), &v[end..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::http::{self, Parsed};

    fn proxies(text: &str) -> TrustedProxies {
        TrustedProxies::parse_setting(text).expect("valid list")
    }

    fn head(extra: &[(&str, &str)]) -> Head {
        let mut req = String::from("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n");
        for (n, v) in extra {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        match http::parse(req.as_bytes()) {
            Parsed::Complete(h) => h,
            other => panic!("{other:?}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The client address of a request from `peer` with headers `extra`, trusting `list`.
    fn addr(list: &str, peer: &str, extra: &[(&str, &str)]) -> IpAddr {
        client(ip(peer), &head(extra), &proxies(list)).addr
    }

    #[test]
    fn networks_parse_and_match() {
        let p = proxies("10.0.0.0/8, 192.168.1.7 fd00::/8,::1");
        assert_eq!(p.to_string(), "10.0.0.0/8,192.168.1.7/32,fd00::/8,::1/128");
        for yes in [
            "10.0.0.1",
            "10.255.255.255",
            "192.168.1.7",
            "fd12::1",
            "::1",
        ] {
            assert!(p.contains(ip(yes)), "{yes}");
        }
        for no in ["11.0.0.1", "192.168.1.8", "fe80::1", "::2", "9.255.255.255"] {
            assert!(!p.contains(ip(no)), "{no}");
        }
        // An IPv4-mapped peer (a dual-stack listener) is its IPv4 address.
        assert!(p.contains(ip("::ffff:10.1.2.3")));
        // Host bits are cleared; /0 is everything of its family.
        assert_eq!(proxies("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert!(proxies("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(!proxies("0.0.0.0/0").contains(ip("::1")));
        assert!(proxies("::/0").contains(ip("2001:db8::1")));
        assert!(proxies("").is_empty() && proxies(" , ").is_empty());
    }

    #[test]
    fn bad_networks_are_refused_naming_the_entry() {
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "10.0.0",
            "localhost",
            "http://10.0.0.1",
            "10.0.0.1:80",
            "[::1]",
            "1.2.3.4\u{7}",
        ] {
            let e = TrustedProxies::parse_setting(&format!("127.0.0.1,{bad}")).unwrap_err();
            assert!(e.contains(bad.split('/').next().unwrap()), "{bad}: {e}");
        }
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let spoof = [
            ("X-Forwarded-For", "1.2.3.4"),
            ("Forwarded", "for=5.6.7.8;host=evil.example"),
            ("X-Forwarded-Host", "evil.example"),
        ];
        let c = client(ip("203.0.113.9"), &head(&spoof), &proxies("10.0.0.0/8"));
        assert_eq!(c.addr, ip("203.0.113.9"));
        assert_eq!(c.forwarded_host, None);
        // No list at all: nobody is trusted, loopback included.
        let c = client(ip("127.0.0.1"), &head(&spoof), &TrustedProxies::default());
        assert_eq!((c.addr, c.forwarded_host), (ip("127.0.0.1"), None));
    }

    #[test]
    fn x_forwarded_for_gives_the_right_most_untrusted_hop() {
        let t = "127.0.0.1, 10.0.0.0/8";
        assert_eq!(
            addr(t, "127.0.0.1", &[("X-Forwarded-For", "198.51.100.7")]),
            ip("198.51.100.7")
        );
        // What the client wrote is left of what the proxies added.
        let h = [("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.0.0.3")];
        assert_eq!(addr(t, "127.0.0.1", &h), ip("198.51.100.7"));
        // Several header lines are one list, in order.
        let h = [
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-For", "198.51.100.7,10.0.0.3"),
        ];
        assert_eq!(addr(t, "127.0.0.1", &h), ip("198.51.100.7"));
        // Ports and IPv6, with or without brackets.
        let h = [("X-Forwarded-For", "[2001:db8::5]:4711")];
        assert_eq!(addr(t, "127.0.0.1", &h), ip("2001:db8::5"));
        let h = [("X-Forwarded-For", "2001:db8::5")];
        assert_eq!(addr(t, "127.0.0.1", &h), ip("2001:db8::5"));
        let h = [("X-Forwarded-For", "198.51.100.7:5000")];
        assert_eq!(addr(t, "127.0.0.1", &h), ip("198.51.100.7"));
        // Every hop trusted: the furthest one.
        let h = [("X-Forwarded-For", "10.0.0.9, 10.0.0.3")];
        assert_eq!(addr(t, "127.0.0.1", &h), ip("10.0.0.9"));
        // No header, or an empty one: the proxy itself is the client.
        assert_eq!(addr(t, "127.0.0.1", &[]), ip("127.0.0.1"));
        assert_eq!(
            addr(t, "127.0.0.1", &[("X-Forwarded-For", "")]),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn a_hop_without_an_address_ends_the_walk() {
        let t = "127.0.0.1, 10.0.0.0/8";
        for bad in [
            "unknown",
            "_hidden",
            "garbage",
            "999.1.1.1",
            "[::1",
            "[::1]x",
            "1.2.3.4:",
        ] {
            let h = [("X-Forwarded-For", format!("6.6.6.6, {bad}, 10.0.0.3"))];
            let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
            // `1.2.3.4:` has an address before its empty port: taken as 1.2.3.4.
            let want = if bad == "1.2.3.4:" {
                "1.2.3.4"
            } else {
                "10.0.0.3"
            };
            assert_eq!(addr(t, "127.0.0.1", &h), ip(want), "{bad}");
        }
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        let t = "127.0.0.1";
        let f = |v: &str| addr(t, "127.0.0.1", &[("Forwarded", v)]);
        assert_eq!(
            f("for=192.0.2.60;proto=http;by=203.0.113.43"),
            ip("192.0.2.60")
        );
        assert_eq!(
            f(r#"for="[2001:db8:cafe::17]:4711""#),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(f(r#"For="192.0.2.43:47011""#), ip("192.0.2.43"));
        assert_eq!(f("for=6.6.6.6, for=192.0.2.60"), ip("192.0.2.60"));
        assert_eq!(f("for=6.6.6.6, for=127.0.0.1"), ip("6.6.6.6"));
        // Obfuscated or unknown: the proxy stands for the client.
        assert_eq!(f("for=_hidden"), ip("127.0.0.1"));
        assert_eq!(f("for=unknown"), ip("127.0.0.1"));
        assert_eq!(f("for=6.6.6.6, for=_x"), ip("127.0.0.1"));
        // An element without `for` is not a hop.
        assert_eq!(f("for=192.0.2.60, proto=https"), ip("192.0.2.60"));
        // Malformed: an unclosed quote swallowing the proxy's element, a missing `=`.
        assert_eq!(f(r#"for="6.6.6.6, for=192.0.2.60"#), ip("127.0.0.1"));
        assert_eq!(f("for=192.0.2.60, garbage"), ip("127.0.0.1"));
        assert_eq!(f("=1.2.3.4"), ip("127.0.0.1"));
        assert_eq!(f(r#"for="1.2.3.4"x"#), ip("127.0.0.1"));
        // Escapes inside quotes; commas inside quotes do not split.
        assert_eq!(f(r#"for="1.2.3.4", by="a,b\"c""#), ip("1.2.3.4"));
        // X-Forwarded-For wins when both are there (most proxies set only that one).
        let h = [
            ("Forwarded", "for=6.6.6.6"),
            ("X-Forwarded-For", "192.0.2.60"),
        ];
        assert_eq!(addr(t, "127.0.0.1", &h), ip("192.0.2.60"));
    }

    #[test]
    fn hostile_headers_stay_bounded_and_never_panic() {
        let t = "127.0.0.1, 10.0.0.0/8";
        // Many addresses: only the right end counts.
        let many: String = (0..1500)
            .map(|i| format!("10.0.{}.{},", i / 250, i % 250))
            .collect();
        let h = [("X-Forwarded-For", format!("6.6.6.6,{many}10.0.0.1"))];
        let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert_eq!(addr(t, "127.0.0.1", &h), ip("6.6.6.6"));
        // Garbage of every kind.
        for junk in [
            ",,,,",
            "\"",
            "[",
            "]",
            ":::::",
            "[]:",
            "for=",
            ";;;",
            "\\",
            "é,ü",
            "[::1]:99999999999",
        ] {
            let _ = addr(t, "127.0.0.1", &[("X-Forwarded-For", junk)]);
            let _ = addr(t, "127.0.0.1", &[("Forwarded", junk)]);
            let _ = client(
                ip("127.0.0.1"),
                &head(&[("X-Forwarded-Host", junk)]),
                &proxies(t),
            );
        }
        let long = "for=".to_string() + &"\"".repeat(7000);
        assert_eq!(
            addr(t, "127.0.0.1", &[("Forwarded", &long)]),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn the_forwarded_host_comes_from_a_trusted_proxy() {
        let t = proxies("127.0.0.1");
        let host =
            |extra: &[(&str, &str)]| client(ip("127.0.0.1"), &head(extra), &t).forwarded_host;
        assert_eq!(
            host(&[("X-Forwarded-Host", "chat.example:8443")]).as_deref(),
            Some("chat.example:8443")
        );
        assert_eq!(
            host(&[("X-Forwarded-Host", "a.example, chat.example")]).as_deref(),
            Some("chat.example")
        );
        assert_eq!(
            host(&[("Forwarded", r#"for=1.2.3.4;host="chat.example""#)]).as_deref(),
            Some("chat.example")
        );
        assert_eq!(
            host(&[
                ("Forwarded", "host=a.example"),
                ("X-Forwarded-Host", "chat.example")
            ])
            .as_deref(),
            Some("chat.example")
        );
        assert_eq!(host(&[]), None);
        assert_eq!(host(&[("X-Forwarded-Host", "")]), None);
        assert_eq!(host(&[("X-Forwarded-Host", "a b")]), None);
    }
}
