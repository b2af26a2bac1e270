//! HTTP/1.1 request heads (parsed with `httparse`) and the responses the server writes.

use std::fmt::Write as _;

/// Most headers a request head may carry; more is answered with `431`.
const MAX_HEADERS: usize = 48;

/// The parts of a request head the server looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The text after `?`, when any.
    pub query: Option<String>,
    /// Header names lower-cased, values as text (non-UTF-8 values are dropped).
    pub headers: Vec<(String, String)>,
    /// Bytes the head took; what follows belongs to the protocol after it.
    pub len: usize,
}

impl Head {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the comma-separated header `name` lists `token` (case-insensitive).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The value of query parameter `key`, percent-decoded. `Err` when it is not valid UTF-8
    /// or badly escaped.
    pub fn query_param(&self, key: &str) -> Result<Option<String>, BadEscape> {
        let Some(q) = &self.query else {
            return Ok(None);
        };
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if percent_decode(k)? == key {
                return percent_decode(v).map(Some);
            }
        }
        Ok(None)
    }
}

impl Head {
    /// The token a request carries: `?token=`, else `Authorization: Bearer` (the scheme in any
    /// case). `Err` when the query's token is badly escaped.
    pub fn token(&self) -> Result<Option<String>, BadEscape> {
        if let Some(t) = self.query_param("token")? {
            return Ok(Some(t));
        }
        Ok(self.header("authorization").and_then(|a| {
            let (scheme, rest) = a.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_string())
        }))
    }
}

/// A query string or path segment with a bad `%` escape or bytes that are not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadEscape;

/// What parsing the bytes so far gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole head.
    Complete(Head),
    /// More bytes are needed.
    Partial,
    /// Not HTTP: answer `400`.
    Invalid,
    /// Too many headers: answer `431`.
    TooLarge,
}

/// Parses a request head from the bytes received so far.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Ok(httparse::Status::Complete(len)) => {
            let (Some(method), Some(target)) = (req.method, req.path) else {
                return Parsed::Invalid;
            };
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_string(), Some(q.to_string())),
                None => (target.to_string(), None),
            };
            let headers = req
                .headers
                .iter()
                .filter_map(|h| {
                    let value = std::str::from_utf8(h.value).ok()?;
                    Some((h.name.to_ascii_lowercase(), value.trim().to_string()))
                })
                .collect();
            Parsed::Complete(Head {
                method: method.to_string(),
                path,
                query,
                headers,
                len,
            })
        }
        Err(httparse::Error::TooManyHeaders) => Parsed::TooLarge,
        Err(_) => Parsed::Invalid,
    }
}

/// The length of the body that follows `head`: its `Content-Length` (0 without one). A
/// refusal to send at once: `411` for a chunked body, `400` for a length that is not a
/// number, `413` past `max` (before the body is read).
#[cfg(feature = "server-api")]
pub fn body_length(head: &Head, max: usize) -> Result<usize, Response> {
    if head.header("transfer-encoding").is_some() {
        return Err(Response::text(
            411,
            "send the body with a Content-Length, not chunked\n",
        ));
    }
    let Some(v) = head.header("content-length") else {
        return Ok(0);
    };
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    if lengths.iter().any(|l| *l != v) {
        return Err(Response::text(400, "conflicting Content-Length headers\n"));
    }
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Response::text(400, "malformed Content-Length\n"));
    }
    match v.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(Response::json(
            413,
            &serde_json::json!({
                "error": "too_large",
                "message": format!("the body is larger than {max} bytes (--max-api-body)"),
            }),
        )),
    }
}

/// Decodes `%XX` escapes and `+` (a space in query strings).
pub fn percent_decode(s: &str) -> Result<String, BadEscape> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(BadEscape)?;
                // Two hex digits exactly: `from_str_radix` alone would also take a sign (`%+a`).
                let digit = |b: u8| (b as char).to_digit(16).ok_or(BadEscape);
                out.push((digit(hex[0])? * 16 + digit(hex[1])?) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| BadEscape)
}

/// A response to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Extra headers, e.g. `Allow`.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        let body = body.into().into_bytes();
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body,
        }
    }

    /// An `application/json` response.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        let body = serde_json::to_vec(value).unwrap_or_default();
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    /// A response without a body (`204`).
    pub fn empty(status: u16) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `405` naming the methods the path allows.
    pub fn method_not_allowed(allow: &str) -> Self {
        let mut r = Response::text(405, "method not allowed\n");
        r.headers.push(("Allow", allow.to_string()));
        r
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The bytes on the wire. Every response closes the connection after it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = String::with_capacity(160);
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// The reason phrase of the statuses the server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Whether a browser `Origin` may open a WebSocket. `allowed` is the setting: a comma-separated
/// list of exact origins, `*` for any, or empty for "same host only" (the origin's host and port
/// must equal the `Host` header). Comparison ignores ASCII case and nothing else: no substring,
/// prefix or suffix matching.
pub fn origin_allowed(origin: &str, host: Option<&str>, allowed: &str) -> bool {
    let allowed = allowed.trim();
    if allowed == "*" {
        return true;
    }
    if !allowed.is_empty() {
        return allowed
            .split(',')
            .any(|a| a.trim().eq_ignore_ascii_case(origin));
    }
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    host.is_some_and(|h| !h.is_empty() && h.eq_ignore_ascii_case(rest))
}

/// Whether a request's `Host` is one the server answers to. `allowed` is the setting: empty
/// for any host; otherwise comma-separated host names, each with an optional `:port` (without
/// one it matches any port). Names compare ignoring ASCII case, whole, never by substring; a
/// missing or empty `Host` does not match a list. IPv6 literals are written `[::1]` or
/// `[::1]:8080`.
pub fn host_allowed(host: Option<&str>, allowed: &str) -> bool {
    let mut entries = allowed.split(',').map(str::trim).filter(|e| !e.is_empty());
    let Some(first) = entries.next() else {
        return true;
    };
    let Some((name, port)) = host.map(str::trim).and_then(split_host) else {
        return false;
    };
    std::iter::once(first).chain(entries).any(|entry| {
        split_host(entry)
            .is_some_and(|(n, p)| n.eq_ignore_ascii_case(name) && (p.is_none() || p == port))
    })
}

/// `host[:port]` into its name and port; `None` when empty or the port is not a number.
fn split_host(s: &str) -> Option<(&str, Option<&str>)> {
    let (name, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        match after {
            "" => (inside, None),
            p => (inside, Some(p.strip_prefix(':')?)),
        }
    } else {
        match s.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        }
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (!name.is_empty() && port_ok).then_some((name, port))
}

/// The `101` answer to a valid upgrade request with key `key`.
pub fn switching_protocols(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_head_and_keeps_the_rest() {
        let raw = b"GET /ws?name=al%20ice&x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\r\nrest";
        let Parsed::Complete(h) = parse(raw) else {
            panic!()
        };
        assert_eq!((h.method.as_str(), h.path.as_str()), ("GET", "/ws"));
        assert_eq!(h.len, raw.len() - 4);
        assert_eq!(h.header("upgrade"), Some("WebSocket"));
        assert!(h.header_has_token("connection", "upgrade"));
        assert_eq!(h.query_param("name"), Ok(Some("al ice".into())));
        assert_eq!(h.query_param("y"), Ok(None));
    }

    #[test]
    fn partial_garbage_and_too_many_headers() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial);
        assert_eq!(parse(b"\x16\x03\x01garbage\r\n\r\n"), Parsed::Invalid);
        let many: String = (0..60).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Parsed::TooLarge
        );
    }

    #[test]
    fn percent_decoding_refuses_bad_escapes() {
        assert_eq!(percent_decode("a%41+b"), Ok("aA b".into()));
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%ff").is_err(), "not UTF-8");
        assert!(percent_decode("%+a").is_err(), "a sign is not a hex digit");
        assert!(percent_decode("%-1").is_err());
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = Response::method_not_allowed("GET").to_bytes();
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Content-Length: 19\r\n"));
        assert!(text.contains("Allow: GET\r\n"));
        assert!(text.contains("Connection: close\r\n"));
    }

    #[test]
    fn origins_match_exactly() {
        assert!(origin_allowed(
            "http://chat.example:8080",
            Some("chat.example:8080"),
            ""
        ));
        assert!(origin_allowed(
            "https://Chat.Example",
            Some("chat.example"),
            ""
        ));
        assert!(!origin_allowed(
            "http://evil.example",
            Some("chat.example"),
            ""
        ));
        assert!(!origin_allowed(
            "http://chat.example.evil.io",
            Some("chat.example"),
            ""
        ));
        assert!(
            !origin_allowed("http://chat.example", Some("chat.example:8080"), ""),
            "port counts"
        );
        assert!(!origin_allowed("null", Some("chat.example"), ""));
        assert!(!origin_allowed("http://x", None, ""));
        let list = "https://a.example, https://b.example";
        assert!(origin_allowed("https://b.example", Some("z"), list));
        assert!(
            !origin_allowed("https://b.example.evil", Some("z"), list),
            "no prefix match"
        );
        assert!(
            !origin_allowed("https://example", Some("z"), list),
            "no suffix match"
        );
        assert!(
            !origin_allowed("http://a.example", Some("z"), list),
            "scheme counts"
        );
        assert!(origin_allowed("http://anything", None, "*"));
    }

    #[test]
    fn hosts_match_whole_names_and_ports() {
        let list = "chat.example, localhost:8080, [::1]";
        for ok in [
            "chat.example",
            "Chat.Example:1234",
            "localhost:8080",
            "[::1]",
            "[::1]:9",
        ] {
            assert!(host_allowed(Some(ok), list), "{ok}");
        }
        for bad in [
            "evil.example",
            "chat.example.evil.io",
            "evilchat.example",
            "localhost",
            "localhost:80",
            "localhost:8080x",
            "[::2]",
            "",
            "chat.example:",
        ] {
            assert!(!host_allowed(Some(bad), list), "{bad}");
        }
        assert!(!host_allowed(None, list));
        assert!(host_allowed(None, ""), "no list: any host");
        assert!(host_allowed(Some("anything"), " , "));
    }

    #[test]
    fn tokens_come_from_the_query_or_a_bearer_header() {
        let head = |raw: &str| match parse(raw.as_bytes()) {
            Parsed::Complete(h) => h,
            other => panic!("{other:?}"),
        };
        let h = head("GET /a?token=q%2Ex HTTP/1.1\r\nAuthorization: Bearer b\r\n\r\n");
        assert_eq!(h.token(), Ok(Some("q.x".into())), "the query wins");
        let h = head("GET /a HTTP/1.1\r\nAuthorization: bearer  b.c \r\n\r\n");
        assert_eq!(h.token(), Ok(Some("b.c".into())));
        let h = head("GET /a HTTP/1.1\r\nAuthorization: Basic Zm9v\r\n\r\n");
        assert_eq!(h.token(), Ok(None));
        let h = head("GET /a?token=%zz HTTP/1.1\r\n\r\n");
        assert!(h.token().is_err());
    }

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        let r = String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==")).unwrap();
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }
}
