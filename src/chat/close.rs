//! [`Close`]: every reason the server ends a WebSocket connection, the one place that maps a
//! reason to its close code and text.

/// Why the server closes a connection. The core asks for some ([`Close::RateLimited`]) through
/// [`super::Outbox::close`]; the transport decides the rest. [`Close::code`] and
/// [`Close::reason`] are what the client reads in the close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Close {
    /// The output buffer passed its bound: the client does not read fast enough.
    SlowConsumer,
    /// No command within the idle timeout.
    Idle,
    /// No frame at all (not even a pong) within the pong timeout.
    PongTimeout,
    /// Kept flooding after being told to slow down.
    RateLimited,
    /// The session's token expired.
    TokenExpired,
    /// The server is shutting down.
    Shutdown,
    /// A message arrived in more fragments than allowed.
    TooManyFragments,
    /// A message or frame over the size limit.
    MessageTooBig,
    /// A text message that is not UTF-8.
    InvalidUtf8,
    /// A frame that breaks RFC 6455.
    Protocol,
    /// Cluster mode: another node claimed the member's name at the same moment (or while
    /// Redis was away); the later claim loses (4009).
    NameTaken,
    /// Disconnected by the server API or an admin's `kick` (4000), with their reason.
    #[cfg(feature = "server-api")]
    Kicked(Reason),
}

/// A close reason chosen at run time, kept inline (a close frame's reason is at most 123
/// bytes) so that [`Close`] stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason {
    len: u8,
    bytes: [u8; Reason::MAX],
}

impl Reason {
    /// The most bytes a close frame's reason may take.
    pub const MAX: usize = 123;

    /// `text` as a reason; `None` when it is longer than [`Reason::MAX`] bytes or holds a
    /// control character.
    pub fn new(text: &str) -> Option<Reason> {
        if text.len() > Reason::MAX || text.chars().any(char::is_control) {
            return None;
        }
        let mut bytes = [0; Reason::MAX];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Some(Reason {
            len: text.len() as u8,
            bytes,
        })
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Built from a `&str` cut at its end: always UTF-8.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }
}

impl std::fmt::Debug for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl Close {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [Close; 11] = [
        Close::SlowConsumer,
        Close::Idle,
        Close::PongTimeout,
        Close::RateLimited,
        Close::TokenExpired,
        Close::Shutdown,
        Close::TooManyFragments,
        Close::MessageTooBig,
        Close::InvalidUtf8,
        Close::Protocol,
        Close::NameTaken,
    ];

    /// How many reasons `/metrics` counts: those of [`Close::ALL`], and `kicked` with the
    /// server API.
    pub const COUNTED: usize = Close::ALL.len() + cfg!(feature = "server-api") as usize;

    /// This reason's place among the counted ones: its index in [`Close::ALL`], `kicked` last.
    pub fn index(self) -> usize {
        match self {
            #[cfg(feature = "server-api")]
            Close::Kicked(_) => Close::ALL.len(),
            c => Close::ALL.iter().position(|a| *a == c).unwrap_or(0),
        }
    }

    /// The reason as a metric label and log field (`chatterbox_closed_total{reason=..}`).
    pub fn label(self) -> &'static str {
        match self {
            #[cfg(feature = "server-api")]
            Close::Kicked(_) => "kicked",
            Close::SlowConsumer => "slow_consumer",
            Close::Idle => "idle",
            Close::PongTimeout => "pong_timeout",
            Close::RateLimited => "rate_limited",
            Close::TokenExpired => "token_expired",
            Close::Shutdown => "shutdown",
            Close::TooManyFragments => "too_many_fragments",
            Close::MessageTooBig => "message_too_big",
            Close::InvalidUtf8 => "invalid_utf8",
            Close::Protocol => "protocol_error",
            Close::NameTaken => "name_taken",
        }
    }

    /// Whether the close is the client's doing (it misbehaved: logged at `warn`) rather than
    /// time passing (idle, no pong, token expiry: `info`).
    pub fn is_misbehaviour(self) -> bool {
        !matches!(
            self,
            Close::Idle | Close::PongTimeout | Close::TokenExpired | Close::Shutdown
        ) && !self.is_kick()
    }

    /// A disconnect by the server API or an admin: a decision, logged at `info` (the API call
    /// that made it is logged too).
    fn is_kick(self) -> bool {
        #[cfg(feature = "server-api")]
        if let Close::Kicked(_) = self {
            return true;
        }
        false
    }

    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Close::Idle | Close::PongTimeout => 1000,
            Close::Shutdown => 1001,
            Close::Protocol => 1002,
            Close::InvalidUtf8 => 1007,
            Close::SlowConsumer | Close::RateLimited | Close::TokenExpired => 1008,
            Close::TooManyFragments => 1008,
            Close::MessageTooBig => 1009,
            Close::NameTaken => 4009,
            #[cfg(feature = "server-api")]
            Close::Kicked(_) => 4000,
        }
    }

    /// The reason text sent with the code.
    pub fn reason(&self) -> &str {
        match self {
            #[cfg(feature = "server-api")]
            Close::Kicked(r) => r.as_str(),
            Close::SlowConsumer => "slow consumer",
            Close::Idle => "idle",
            Close::PongTimeout => "timeout",
            Close::RateLimited => "rate limit exceeded",
            Close::TokenExpired => "token expired",
            Close::Shutdown => "server shutting down",
            Close::TooManyFragments => "too many fragments",
            Close::MessageTooBig => "message too big",
            Close::InvalidUtf8 => "invalid UTF-8",
            Close::Protocol => "protocol error",
            Close::NameTaken => "name taken",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Close;

    #[test]
    fn codes_and_reasons_are_the_documented_ones() {
        let all = [
            (Close::SlowConsumer, 1008, "slow consumer"),
            (Close::Idle, 1000, "idle"),
            (Close::PongTimeout, 1000, "timeout"),
            (Close::RateLimited, 1008, "rate limit exceeded"),
            (Close::TokenExpired, 1008, "token expired"),
            (Close::Shutdown, 1001, "server shutting down"),
            (Close::TooManyFragments, 1008, "too many fragments"),
            (Close::MessageTooBig, 1009, "message too big"),
            (Close::InvalidUtf8, 1007, "invalid UTF-8"),
            (Close::Protocol, 1002, "protocol error"),
            (Close::NameTaken, 4009, "name taken"),
        ];
        assert_eq!(Close::ALL.map(|c| c.code()), all.map(|(c, _, _)| c.code()));
        let labels: std::collections::HashSet<_> = Close::ALL.iter().map(|c| c.label()).collect();
        assert_eq!(labels.len(), Close::ALL.len(), "labels are distinct");
        for (i, (close, code, reason)) in all.into_iter().enumerate() {
            assert_eq!(close.index(), i, "{close:?}");
            assert!(Close::ALL.contains(&close));
            let label_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
            assert!(close.label().bytes().all(label_ok), "{close:?}");
            assert_eq!((close.code(), close.reason()), (code, reason), "{close:?}");
            // A close frame's reason must fit its 123 bytes.
            assert!(close.reason().len() <= 123);
        }
        #[cfg(feature = "server-api")]
        {
            let kicked = Close::Kicked(super::Reason::new("spam ✋").unwrap());
            assert_eq!((kicked.code(), kicked.reason()), (4000, "spam ✋"));
            assert_eq!(
                (kicked.label(), kicked.index()),
                ("kicked", Close::ALL.len())
            );
            assert!(!kicked.is_misbehaviour());
        }
        assert!(super::Reason::new(&"x".repeat(123)).is_some());
        assert!(super::Reason::new(&"x".repeat(124)).is_none());
        assert!(super::Reason::new("a\nb").is_none());
        assert!(super::Reason::new("\u{7f}").is_none());
    }
}
