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
}

impl Close {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [Close; 10] = [
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
    ];

    /// The reason as a metric label and log field (`chatterbox_closed_total{reason=..}`).
    pub fn label(self) -> &'static str {
        match self {
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
        }
    }

    /// Whether the close is the client's doing (it misbehaved: logged at `warn`) rather than
    /// time passing (idle, no pong, token expiry: `info`).
    pub fn is_misbehaviour(self) -> bool {
        !matches!(
            self,
            Close::Idle | Close::PongTimeout | Close::TokenExpired | Close::Shutdown
        )
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
        }
    }

    /// The reason text sent with the code.
    pub fn reason(self) -> &'static str {
        match self {
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
        ];
        assert_eq!(Close::ALL.map(|c| c.code()), all.map(|(c, _, _)| c.code()));
        let labels: std::collections::HashSet<_> = Close::ALL.iter().map(|c| c.label()).collect();
        assert_eq!(labels.len(), Close::ALL.len(), "labels are distinct");
        for (close, code, reason) in all {
            assert!(Close::ALL.contains(&close));
            let label_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
            assert!(close.label().bytes().all(label_ok), "{close:?}");
            assert_eq!((close.code(), close.reason()), (code, reason), "{close:?}");
            // A close frame's reason must fit its 123 bytes.
            assert!(close.reason().len() <= 123);
        }
    }
}
