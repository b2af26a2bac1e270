//! Every setting and limit of the server, with its flag, environment variable and default.
//!
//! The `settings!` table below is the single source: it declares the [`Config`] fields, their
//! defaults, the command-line flag, the environment variable and the line `--help` prints.
//! Precedence: flag, then environment variable, then default.

use std::fmt::Write as _;
use std::time::Duration;

use log::LevelFilter;

/// A value a setting can hold: parsed from text, shown back in `--help`.
pub trait SettingValue: Sized {
    /// Parses the text of a flag or environment variable.
    fn parse_setting(text: &str) -> Result<Self, String>;
    /// Renders the value for `--help`.
    fn show(&self) -> String;
}

macro_rules! int_setting {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            fn parse_setting(text: &str) -> Result<Self, String> {
                text.trim().parse().map_err(|e| format!("'{text}' is not a whole number ({e})"))
            }
            fn show(&self) -> String { self.to_string() }
        }
    )*};
}
int_setting!(u16, u32, u64, usize);

/// `true`/`false`, also `1`/`0`, `yes`/`no`, `on`/`off` (any case).
impl SettingValue for bool {
    fn parse_setting(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("'{text}' is not true or false")),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl SettingValue for String {
    fn parse_setting(text: &str) -> Result<Self, String> {
        Ok(text.to_string())
    }
    fn show(&self) -> String {
        self.clone()
    }
}

/// The longest any duration setting may be: one week. Longer values are mistakes, and would
/// overflow the clock arithmetic (`Instant + Duration`) that deadlines are made of.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest timeout, interval or grace period: one day ([`Config::validate`] checks it;
/// only the dedup window may reach [`MAX_DURATION`]).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The shortest ping interval or timeout: 10 ms.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Durations are written in seconds; fractions are allowed (`0.5`); at most [`MAX_DURATION`].
impl SettingValue for Duration {
    fn parse_setting(text: &str) -> Result<Self, String> {
        let secs: f64 = text
            .trim()
            .parse()
            .map_err(|_| format!("'{text}' is not a number of seconds"))?;
        let d = Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("'{text}' is not a valid duration"))?;
        if d > MAX_DURATION {
            return Err(format!(
                "'{text}' is more than {} seconds (one week), the most a duration may be",
                MAX_DURATION.as_secs()
            ));
        }
        Ok(d)
    }
    fn show(&self) -> String {
        format!("{}s", self.as_secs_f64())
    }
}

impl SettingValue for LevelFilter {
    fn parse_setting(text: &str) -> Result<Self, String> {
        text.trim().parse().map_err(|_| {
            format!("'{text}' is not a log level (off, error, warn, info, debug, trace)")
        })
    }
    fn show(&self) -> String {
        self.to_string().to_lowercase()
    }
}

macro_rules! settings {
    ($( $(#[doc = $doc:literal])+ $field:ident : $ty:ty = $default:expr, $flag:literal, $env:literal; )*) => {
        /// The server's settings. Build it with [`Config::from_args`] or start from `Default`.
        #[derive(Debug, Clone)]
        pub struct Config {
            $( $(#[doc = $doc])+ pub $field: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $field: $default, )* }
            }
        }

        impl Config {
            /// `(flag, env, help)` for every setting, in `--help` order.
            pub const TABLE: &'static [(&'static str, &'static str, &'static str)] = &[
                $( ($flag, $env, concat!($($doc),+)), )*
            ];

            fn set(&mut self, flag: &str, text: &str) -> Result<(), String> {
                match flag {
                    $( $flag => self.$field = <$ty as SettingValue>::parse_setting(text)
                        .map_err(|e| format!("--{}: {e}", $flag))?, )*
                    _ => return Err(format!("unknown option --{flag} (see --help)")),
                }
                Ok(())
            }

            fn show(&self, flag: &str) -> String {
                match flag {
                    $( $flag => SettingValue::show(&self.$field), )*
                    _ => String::new(),
                }
            }
        }
    };
}

settings! {
    /// Address to listen on.
    host: String = "0.0.0.0".into(), "host", "HOST";
    /// Port to listen on (0 picks a free one; the address is logged).
    port: u16 = 8080, "port", "PORT";
    /// SQLite history file; `:memory:` keeps history in memory only.
    db_path: String = "chatterbox.db".into(), "db-path", "DB_PATH";
    /// Log level: off, error, warn, info, debug or trace.
    log_level: LevelFilter = LevelFilter::Info, "log-level", "LOG_LEVEL";
    /// Messages sent in `history` when a member joins a room.
    max_history: usize = 50, "max-history", "MAX_HISTORY";
    /// Largest `limit` of one `history` page.
    history_page_cap: usize = 200, "history-page-cap", "HISTORY_PAGE_CAP";
    /// Most messages sent for a `join` with `since`.
    resume_cap: usize = 1000, "resume-cap", "RESUME_CAP";
    /// Messages per room the in-memory store keeps (older ones are dropped).
    memory_history_per_room: usize = 1000, "memory-history-per-room", "MEMORY_HISTORY_PER_ROOM";
    /// Rooms in the whole server.
    max_rooms: usize = 1000, "max-rooms", "MAX_ROOMS";
    /// Rooms one member may be in at once.
    max_rooms_per_member: usize = 32, "max-rooms-per-member", "MAX_ROOMS_PER_MEMBER";
    /// Largest WebSocket message or frame in bytes; larger closes with 1009.
    max_frame_size: usize = 8192, "max-frame-size", "MAX_FRAME_SIZE";
    /// Longest `message` text in characters.
    max_message_chars: usize = 1000, "max-message-chars", "MAX_MESSAGE_CHARS";
    /// Join/leave notices are sent while a room has at most this many members.
    notice_max_members: usize = 1000, "notice-max-members", "NOTICE_MAX_MEMBERS";
    /// Commands per second per connection (token bucket refill).
    rate_per_sec: u32 = 20, "rate-per-sec", "RATE_PER_SEC";
    /// Token bucket size (burst) per connection.
    rate_burst: u32 = 40, "rate-burst", "RATE_BURST";
    /// Rate-limited commands in a row after which the connection is closed with 1008.
    flood_close_after: u32 = 100, "flood-close-after", "FLOOD_CLOSE_AFTER";
    /// Connections the kernel queues before they are accepted (capped by
    /// `net.core.somaxconn`); too small a queue drops handshakes in a connect storm.
    listen_backlog: u32 = 1024, "listen-backlog", "LISTEN_BACKLOG";
    /// Open connections in all; more are refused with 503.
    max_connections: usize = 10_000, "max-connections", "MAX_CONNECTIONS";
    /// Open connections per client IP; more are refused with 429.
    max_connections_per_ip: usize = 256, "max-connections-per-ip", "MAX_CONNECTIONS_PER_IP";
    /// Largest HTTP request head in bytes; larger gets 431.
    max_head_bytes: usize = 8192, "max-head-bytes", "MAX_HEAD_BYTES";
    /// Seconds for a request head to arrive complete; then the connection is closed.
    head_timeout: Duration = Duration::from_secs(10), "head-timeout", "HEAD_TIMEOUT";
    /// Seconds between the server's pings.
    ping_interval: Duration = Duration::from_secs(30), "ping-interval", "PING_INTERVAL";
    /// Seconds without any frame from the client before it is closed.
    pong_timeout: Duration = Duration::from_secs(60), "pong-timeout", "PONG_TIMEOUT";
    /// Seconds without a command before the connection is closed (1000, "idle").
    idle_timeout: Duration = Duration::from_secs(300), "idle-timeout", "IDLE_TIMEOUT";
    /// Bytes of output queued per connection; beyond it the client is closed (1008, "slow consumer").
    max_pending_output: usize = 256 * 1024, "max-pending-output", "MAX_PENDING_OUTPUT";
    /// Seconds a `msg_id` is remembered for deduplication.
    dedup_window: Duration = Duration::from_secs(600), "dedup-window", "DEDUP_WINDOW";
    /// Bytes read per WebSocket read call, and the buffer each connection keeps for it (larger
    /// frames grow it while they arrive). Small, because it is resident for every connection.
    read_buffer_size: usize = 512, "read-buffer-size", "READ_BUFFER_SIZE";
    /// Browser origins allowed to open `/ws`, comma-separated, matched exactly; empty: an
    /// `Origin` must name the request's own `Host`; `*`: any. Requests without `Origin` pass.
    allowed_origins: String = String::new(), "allowed-origins", "ALLOWED_ORIGINS";
    /// HS256 secret; when set, `/ws` and the REST API need a JWT (`?token=` or
    /// `Authorization: Bearer`).
    /// Prefer the environment variable: flags show in the process list.
    jwt_secret: String = String::new(), "jwt-secret", "JWT_SECRET";
    /// Seconds a shutdown waits for clients to take their close frame before exiting.
    shutdown_grace: Duration = Duration::from_secs(2), "shutdown-grace", "SHUTDOWN_GRACE";
    // ----- chat core: reply and state bounds (issue 9) -----
    /// Bytes of JSON the messages of one history page may take (join, `history`, the REST
    /// page); older (or, for `since`, newer) messages wait for the next page, `more` is true.
    /// A page always holds one message. At most half of `--max-pending-output`; 0: 64 KiB, or
    /// half of `--max-pending-output` when that is smaller.
    max_page_bytes: usize = 0, "max-page-bytes", "MAX_PAGE_BYTES";
    /// `msg_id`s remembered for deduplication, in all rooms together (~400 bytes each); past
    /// it the oldest are forgotten first, so a retry of those may be delivered again.
    max_dedup_entries: usize = 100_000, "max-dedup-entries", "MAX_DEDUP_ENTRIES";
    // --- auth (issue 9): REST auth, JWT claim rules, Host allow-list ---
    /// With `--jwt-secret`: whether `/metrics` is served without a token (the REST API never is).
    metrics_public: bool = false, "metrics-public", "METRICS_PUBLIC";
    /// With `--jwt-secret`: refuse tokens without an `exp` claim (they would never expire).
    jwt_require_exp: bool = true, "jwt-require-exp", "JWT_REQUIRE_EXP";
    /// With `--jwt-secret`: the `aud` a token must name (a string, or one entry of an array);
    /// empty: `aud` is not checked.
    jwt_audience: String = String::new(), "jwt-audience", "JWT_AUDIENCE";
    /// With `--jwt-secret`: the `iss` a token must carry; empty: `iss` is not checked.
    jwt_issuer: String = String::new(), "jwt-issuer", "JWT_ISSUER";
    /// `Host` names the server answers to, comma-separated, each optionally with `:port`
    /// (without one, any port); other hosts get 421 on every path but `/health`. Closes DNS
    /// rebinding. Empty: any host.
    allowed_hosts: String = String::new(), "allowed-hosts", "ALLOWED_HOSTS";
    // --- history store under failure (issue 9) ---
    /// Broadcasts appended but not yet durable, server-wide; beyond it broadcasts get
    /// `unavailable` until the store catches up (a healthy disk never gets near it).
    max_unstored: usize = 10_000, "max-unstored", "MAX_UNSTORED";
    // transport: reading under hostile clients
    /// Bytes read from one connection per loop turn (frames and fragments included); the rest
    /// waits for the next turn, so one client cannot hold the loop. 512 to 67108864.
    read_budget_bytes: usize = 64 * 1024, "read-budget-bytes", "READ_BUDGET_BYTES";
    /// Frames one WebSocket message may have (its first frame and continuations); more closes
    /// with 1008 "too many fragments". At least 1.
    max_fragments: usize = 256, "max-fragments", "MAX_FRAGMENTS";
    // --- TLS (issue 13) and public-key tokens (issue 11); need the `tls` cargo feature ---
    /// PEM certificate chain; with `--tls-key` the port speaks TLS only (https, wss). Read
    /// again on SIGHUP.
    tls_cert: String = String::new(), "tls-cert", "TLS_CERT";
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `--tls-cert`; read again on SIGHUP.
    tls_key: String = String::new(), "tls-key", "TLS_KEY";
    /// PEM public key (SPKI `PUBLIC KEY`, RSA or EC P-256): `/ws` and the REST API then take
    /// RS256 / ES256 tokens signed with its private key (an identity provider's).
    jwt_public_key: String = String::new(), "jwt-public-key", "JWT_PUBLIC_KEY";
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Cli {
    /// Run the server with this configuration.
    Run(Box<Config>),
    /// Print this text (help or version) and exit 0.
    Print(String),
}

impl Config {
    /// The byte bound of a history page in force: `max_page_bytes`, or when that is 0, 64 KiB
    /// or half of `max_pending_output`, whichever is smaller (and at least 1).
    pub fn page_bytes(&self) -> usize {
        match self.max_page_bytes {
            0 => (64 * 1024).min(self.max_pending_output / 2).max(1),
            n => n,
        }
    }

    /// Builds the configuration from command-line arguments (without the program name) and an
    /// environment lookup. Flags are `--name value` or `--name=value`.
    pub fn from_args<I, E>(args: I, env: E) -> Result<Cli, String>
    where
        I: IntoIterator<Item = String>,
        E: Fn(&str) -> Option<String>,
    {
        let mut cfg = Config::default();
        for (flag, var, _) in Self::TABLE {
            if let Some(text) = env(var) {
                cfg.set(flag, &text).map_err(|e| format!("{var}: {e}"))?;
            }
        }
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" {
                return Ok(Cli::Print(Self::help()));
            }
            if arg == "--version" || arg == "-V" {
                return Ok(Cli::Print(format!(
                    "chatterbox {}\n",
                    env!("CARGO_PKG_VERSION")
                )));
            }
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument '{arg}' (see --help)"));
            };
            let (flag, value) = match flag.split_once('=') {
                Some((f, v)) => (f.to_string(), v.to_string()),
                None => {
                    let v = args
                        .next()
                        .ok_or_else(|| format!("--{flag} needs a value"))?;
                    (flag.to_string(), v)
                }
            };
            cfg.set(&flag, &value)?;
        }
        cfg.validate()?;
        Ok(Cli::Run(Box::new(cfg)))
    }

    /// Checks every setting's range; the error names the flag (and, for the newer checks, the
    /// variable). [`Config::from_args`] calls it; a `Config` built in code can call it too.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max-frame-size", self.max_frame_size),
            ("max-message-chars", self.max_message_chars),
            ("history-page-cap", self.history_page_cap),
            ("max-connections", self.max_connections),
            ("max-connections-per-ip", self.max_connections_per_ip),
            ("max-head-bytes", self.max_head_bytes),
            ("max-pending-output", self.max_pending_output),
            ("read-buffer-size", self.read_buffer_size),
            ("rate-burst", self.rate_burst as usize),
            ("max-unstored", self.max_unstored),
            // core: every member joins `general`, which is a room of its own.
            ("max-rooms", self.max_rooms),
            ("max-rooms-per-member", self.max_rooms_per_member),
            ("max-fragments", self.max_fragments),
        ];
        for (flag, v) in positive {
            if v == 0 {
                return Err(format!("--{flag} must be at least 1"));
            }
        }
        if !(512..=64 << 20).contains(&self.read_budget_bytes) {
            return Err("--read-budget-bytes must be between 512 and 67108864".into());
        }
        // Counts of messages held or sent at once: beyond this they are mistakes, and huge
        // values would overflow page arithmetic.
        const MAX_MESSAGES: usize = 1_000_000;
        for (flag, v) in [
            ("max-history", self.max_history),
            ("history-page-cap", self.history_page_cap),
            ("resume-cap", self.resume_cap),
            ("memory-history-per-room", self.memory_history_per_room),
            ("max-unstored", self.max_unstored),
        ] {
            if v > MAX_MESSAGES {
                return Err(format!("--{flag} must be at most {MAX_MESSAGES}"));
            }
        }
        // A page must fit twice into the output bound, so that a page and the room traffic
        // around it never close the member who asked for it.
        let half = self.max_pending_output / 2;
        if self.max_page_bytes > half {
            return Err(format!(
                "--max-page-bytes must be at most half of --max-pending-output ({half}), or 0"
            ));
        }
        const MAX_DEDUP: usize = 10_000_000;
        if self.max_dedup_entries == 0 || self.max_dedup_entries > MAX_DEDUP {
            return Err(format!("--max-dedup-entries must be from 1 to {MAX_DEDUP}"));
        }
        // Every deadline is `now + setting`: bounded settings keep that from overflowing.
        for (flag, v, max, what) in [
            ("head-timeout", self.head_timeout, MAX_TIMEOUT, "one day"),
            ("ping-interval", self.ping_interval, MAX_TIMEOUT, "one day"),
            ("pong-timeout", self.pong_timeout, MAX_TIMEOUT, "one day"),
            ("idle-timeout", self.idle_timeout, MAX_TIMEOUT, "one day"),
            (
                "shutdown-grace",
                self.shutdown_grace,
                MAX_TIMEOUT,
                "one day",
            ),
            ("dedup-window", self.dedup_window, MAX_DURATION, "one week"),
        ] {
            if v > max {
                return Err(format!(
                    "--{flag} ({}) must be at most {} seconds ({what})",
                    Self::env_of(flag),
                    max.as_secs()
                ));
            }
        }
        // A zero ping interval re-arms its timer at `now` for ever: the loop never leaves
        // `fire_timers` once a member is connected. Zero timeouts would close everything at once.
        for (flag, v) in [
            ("ping-interval", self.ping_interval),
            ("pong-timeout", self.pong_timeout),
            ("idle-timeout", self.idle_timeout),
            ("head-timeout", self.head_timeout),
        ] {
            if v < MIN_INTERVAL {
                return Err(format!(
                    "--{flag} ({}) must be at least {} seconds",
                    Self::env_of(flag),
                    MIN_INTERVAL.as_secs_f64()
                ));
            }
        }
        // An empty path would make SQLite open a private temporary database per connection:
        // acks for messages that are never kept.
        if self.db_path.trim().is_empty() {
            return Err(
                "--db-path (DB_PATH) must not be empty: name a file, or ':memory:' \
                        to keep history in memory only"
                    .into(),
            );
        }
        for entry in self.allowed_hosts.split(',').map(str::trim) {
            if entry.contains("://") || entry.contains('/') || entry.contains(char::is_whitespace) {
                return Err(format!(
                    "--allowed-hosts (ALLOWED_HOSTS): '{entry}' is not a host name with an \
                     optional :port (no scheme, no path)"
                ));
            }
        }
        self.validate_tls()?;
        if self.jwt_secret.is_empty() && self.jwt_public_key.is_empty() {
            for (flag, v) in [
                ("jwt-audience", &self.jwt_audience),
                ("jwt-issuer", &self.jwt_issuer),
            ] {
                if !v.is_empty() {
                    return Err(format!(
                        "--{flag} ({}) only has an effect with --jwt-secret (JWT_SECRET) or --jwt-public-key",
                        Self::env_of(flag)
                    ));
                }
            }
        }
        Ok(())
    }

    /// TLS and public-key settings: the certificate and key come together, and both need a
    /// build with the `tls` feature. (The files themselves are read when the server starts.)
    fn validate_tls(&self) -> Result<(), String> {
        match (self.tls_cert.is_empty(), self.tls_key.is_empty()) {
            (false, true) => {
                return Err("--tls-cert (TLS_CERT) needs --tls-key (TLS_KEY) too".into());
            }
            (true, false) => {
                return Err("--tls-key (TLS_KEY) needs --tls-cert (TLS_CERT) too".into());
            }
            _ => {}
        }
        if cfg!(not(feature = "tls")) {
            for (flag, v) in [
                ("tls-cert", &self.tls_cert),
                ("jwt-public-key", &self.jwt_public_key),
            ] {
                if !v.is_empty() {
                    return Err(format!(
                        "--{flag} ({}): this chatterbox is built without TLS; build it with \
                         `cargo build --release --features tls`",
                        Self::env_of(flag)
                    ));
                }
            }
        }
        Ok(())
    }

    /// The environment variable of `flag`.
    fn env_of(flag: &str) -> &'static str {
        Self::TABLE
            .iter()
            .find(|(f, _, _)| *f == flag)
            .map_or("", |(_, env, _)| env)
    }

    /// The `--help` text: every setting with its flag, variable and default.
    pub fn help() -> String {
        let defaults = Config::default();
        let mut s = String::from(
            "chatterbox — a WebSocket chat room server\n\nUsage: chatterbox [--setting value]...\n\n\
             Every setting is a flag and an environment variable (the flag wins).\n\n",
        );
        for (flag, var, doc) in Self::TABLE {
            let _ = writeln!(
                s,
                "  --{flag:<26} {var:<24} default: {}",
                defaults.show(flag)
            );
            let _ = writeln!(s, "      {doc}");
        }
        s.push_str("\n  -h, --help    print this text\n  -V, --version print the version\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn run(list: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match Config::from_args(args(list), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })? {
            Cli::Run(c) => Ok(*c),
            Cli::Print(_) => Err("printed".into()),
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = run(&[], &[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.db_path, "chatterbox.db");
        assert_eq!(c.max_frame_size, 8192);
        assert_eq!(c.max_history, 50);
        assert_eq!((c.history_page_cap, c.resume_cap), (200, 1000));
        assert_eq!((c.max_rooms, c.max_rooms_per_member), (1000, 32));
        assert_eq!((c.rate_per_sec, c.rate_burst), (20, 40));
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.log_level, LevelFilter::Info);
    }

    #[test]
    fn flag_beats_env_beats_default() {
        let c = run(&["--port", "9000"], &[("PORT", "7000"), ("MAX_ROOMS", "5")]).unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.max_rooms, 5);
        let c = run(&["--idle-timeout=0.25", "--log-level", "warn"], &[]).unwrap();
        assert_eq!(c.idle_timeout, Duration::from_millis(250));
        assert_eq!(c.log_level, LevelFilter::Warn);
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let e = run(&["--port", "x"], &[]).unwrap_err();
        assert!(e.contains("--port"), "{e}");
        assert!(
            run(&["--nope", "1"], &[])
                .unwrap_err()
                .contains("unknown option")
        );
        assert!(run(&["--port"], &[]).unwrap_err().contains("needs a value"));
        assert!(run(&["--max-frame-size", "0"], &[]).is_err());
        assert!(run(&["--max-unstored", "0"], &[]).is_err());
        assert!(run(&["--max-unstored", "1000001"], &[]).is_err());
        assert_eq!(run(&[], &[]).unwrap().max_unstored, 10_000);
        assert!(run(&["--resume-cap", "18446744073709551615"], &[]).is_err());
        assert!(run(&[], &[("PORT", "-1")]).unwrap_err().starts_with("PORT"));
    }

    #[test]
    fn page_bytes_and_dedup_entries_are_range_checked() {
        let c = run(&[], &[]).unwrap();
        assert_eq!((c.page_bytes(), c.max_dedup_entries), (65_536, 100_000));
        let small = run(&["--max-pending-output", "100000"], &[]).unwrap();
        assert_eq!(
            small.page_bytes(),
            50_000,
            "the default follows a small output bound"
        );
        let e = run(
            &[
                "--max-pending-output",
                "100000",
                "--max-page-bytes",
                "50001",
            ],
            &[],
        );
        assert!(e.unwrap_err().contains("--max-page-bytes"));
        let c = run(
            &[
                "--max-pending-output",
                "100000",
                "--max-page-bytes",
                "50000",
            ],
            &[],
        );
        assert_eq!(c.unwrap().page_bytes(), 50_000);
        assert_eq!(
            run(&["--max-page-bytes", "100"], &[]).unwrap().page_bytes(),
            100
        );
        assert!(run(&["--max-dedup-entries", "0"], &[]).is_err());
        assert!(run(&["--max-dedup-entries", "10000001"], &[]).is_err());
        assert!(run(&[], &[("MAX_DEDUP_ENTRIES", "5")]).is_ok());
    }

    #[test]
    fn durations_over_their_maximum_are_refused_naming_flag_and_variable() {
        // These used to be accepted and abort the server on first use ("overflow when adding
        // duration to instant").
        for flag in [
            "idle-timeout",
            "head-timeout",
            "dedup-window",
            "shutdown-grace",
            "ping-interval",
            "pong-timeout",
        ] {
            for huge in ["1e19", "18446744073709551615", "604801"] {
                let e = run(&[&format!("--{flag}"), huge], &[]).unwrap_err();
                assert!(e.contains(&format!("--{flag}")), "{flag} {huge}: {e}");
            }
            let var = Config::env_of(flag);
            let e = run(&[], &[(var, "1e19")]).unwrap_err();
            assert!(e.starts_with(var), "{e}");
        }
        let e = run(&["--idle-timeout", "86401"], &[]).unwrap_err();
        assert!(e.contains("--idle-timeout (IDLE_TIMEOUT)"), "{e}");
        assert!(run(&["--idle-timeout", "86400"], &[]).is_ok());
        assert!(run(&["--dedup-window", "604800"], &[]).is_ok());
        let e = run(&["--dedup-window", "604801"], &[]).unwrap_err();
        assert!(e.contains("--dedup-window"), "{e}");
    }

    #[test]
    fn zero_intervals_and_timeouts_are_refused() {
        // `--ping-interval 0` used to wedge the loop at the first member's upgrade.
        for flag in [
            "ping-interval",
            "pong-timeout",
            "idle-timeout",
            "head-timeout",
        ] {
            for tiny in ["0", "0.001"] {
                let e = run(&[&format!("--{flag}"), tiny], &[]).unwrap_err();
                assert!(e.contains(&format!("--{flag} (")), "{flag} {tiny}: {e}");
            }
            assert!(run(&[&format!("--{flag}"), "0.01"], &[]).is_ok(), "{flag}");
        }
        assert!(run(&["--shutdown-grace", "0", "--dedup-window", "0"], &[]).is_ok());
    }

    #[test]
    fn an_empty_db_path_is_refused() {
        for path in ["", "  ", "\t"] {
            let e = run(&["--db-path", path], &[]).unwrap_err();
            assert!(e.contains("--db-path (DB_PATH)"), "{e}");
            let e = run(&[], &[("DB_PATH", path)]).unwrap_err();
            assert!(e.contains("--db-path (DB_PATH)"), "{e}");
        }
        assert!(run(&["--db-path", ":memory:"], &[]).is_ok());
    }

    #[test]
    fn auth_settings_parse_and_are_checked() {
        let c = run(&[], &[]).unwrap();
        assert!(c.jwt_require_exp && !c.metrics_public);
        assert_eq!(
            (c.jwt_audience.as_str(), c.allowed_hosts.as_str()),
            ("", "")
        );
        let c = run(
            &["--metrics-public", "true", "--jwt-require-exp=off"],
            &[("JWT_SECRET", "k"), ("JWT_AUDIENCE", "chat")],
        )
        .unwrap();
        assert!(c.metrics_public && !c.jwt_require_exp);
        assert_eq!(c.jwt_audience, "chat");
        assert!(
            run(&["--metrics-public", "maybe"], &[])
                .unwrap_err()
                .contains("--metrics-public")
        );
        let e = run(&["--jwt-issuer", "x"], &[]).unwrap_err();
        assert!(e.contains("--jwt-secret"), "{e}");
        let e = run(&["--allowed-hosts", "http://chat.example"], &[]).unwrap_err();
        assert!(e.contains("--allowed-hosts"), "{e}");
        assert!(run(&["--allowed-hosts", "chat.example, [::1]:8080,x:1"], &[]).is_ok());
    }

    #[test]
    fn help_lists_every_setting_with_its_default() {
        let help = Config::help();
        for (flag, var, _) in Config::TABLE {
            assert!(help.contains(&format!("--{flag}")), "{flag}");
            assert!(help.contains(var), "{var}");
        }
        assert!(help.contains("default: 8080"));
    }
}
