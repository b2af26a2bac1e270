//! Every setting and limit of the server, with its flag, environment variable and default.
//!
//! The `settings!` table below is the single source: it declares the [`Config`] fields, their
//! defaults, the command-line flag, the environment variable and the line `--help` prints.
//! Precedence: flag, then environment variable, then the settings file (`--config`), then
//! default. The settings file holds `NAME=value` lines under the environment variables' names
//! ([`parse_settings_file`]).

use std::fmt::Write as _;
use std::time::Duration;

use log::LevelFilter;

use crate::logging::{LogFormat, log_safe};

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
                let t = text.trim();
                t.parse().map_err(|_| {
                    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
                    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                        format!("'{text}' is out of range ({} to {})", <$t>::MIN, <$t>::MAX)
                    } else {
                        format!("'{text}' is not a whole number")
                    }
                })
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

impl SettingValue for LogFormat {
    fn parse_setting(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("'{text}' is not a log format (text or json)")),
        }
    }
    fn show(&self) -> String {
        self.name().to_string()
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

            /// Sets the setting of `flag` from `text`; the error says what is wrong with the
            /// text (its caller says where it came from).
            fn set(&mut self, flag: &str, text: &str) -> Result<(), String> {
                match flag {
                    $( $flag => self.$field = <$ty as SettingValue>::parse_setting(text)?, )*
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
    /// SQLite history file; `:memory:` keeps history in memory only. Under systemd
    /// (`STATE_DIRECTORY` set by `StateDirectory=`) the default is `$STATE_DIRECTORY/chatterbox.db`.
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
    /// Largest WebSocket message or frame in bytes; larger closes with 1009. 512 to 64 MiB.
    max_frame_size: usize = 8192, "max-frame-size", "MAX_FRAME_SIZE";
    /// Longest `message` text in characters.
    max_message_chars: usize = 1000, "max-message-chars", "MAX_MESSAGE_CHARS";
    /// Join/leave notices are sent while a room has at most this many members.
    notice_max_members: usize = 1000, "notice-max-members", "NOTICE_MAX_MEMBERS";
    /// Commands per second per connection (token bucket refill); 0: no refill, each
    /// connection has `--rate-burst` commands in all.
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
    /// Seconds without any frame from the client before it is closed; longer than
    /// `--ping-interval`.
    pong_timeout: Duration = Duration::from_secs(60), "pong-timeout", "PONG_TIMEOUT";
    /// Seconds without a command before the connection is closed (1000, "idle"); 0: never.
    /// The browser page sends a `ping` command every 60 s while it is open.
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
    // --- operator: logs and the settings file (issue 13) ---
    /// Log lines as `text` (a UTC date, the level, the message) or `json` (one object per
    /// line: `ts`, `level`, `msg` and the line's fields).
    log_format: LogFormat = LogFormat::Text, "log-format", "LOG_FORMAT";
    /// Whether the broadcast log line carries the message text; false logs only who sent it.
    log_messages: bool = true, "log-messages", "LOG_MESSAGES";
    /// A settings file: `NAME=value` lines under the environment variables' names (`#`
    /// comments, blank lines, optional quotes). Flags and environment variables win over it.
    config: String = String::new(), "config", "CONFIG";
    /// Seconds over which repeated refusal and close lines from one address for one reason
    /// are summed up in one line; the first is always written. 0.01 to 3600.
    log_summary_window: Duration = Duration::from_secs(10), "log-summary-window", "LOG_SUMMARY_WINDOW";
    // --- edge (issue 13): SQLite history retention ---
    /// SQLite only: seconds after which a stored message is deleted (0: kept for ever). At
    /// most 3153600000 (100 years).
    history_max_age: u64 = 0, "history-max-age", "HISTORY_MAX_AGE";
    /// SQLite only: messages kept per room, the oldest deleted first (0: all). At most
    /// 100000000. The memory store keeps `--memory-history-per-room`.
    history_max_per_room: u64 = 0, "history-max-per-room", "HISTORY_MAX_PER_ROOM";
    // --- reverse proxy (issue 13) ---
    /// Reverse proxies trusted to name the client, comma-separated IPv4/IPv6 addresses or
    /// networks (`10.0.0.0/8`, `::1`): from these peers the client address is taken from
    /// `X-Forwarded-For` (else `Forwarded: for=`), the right-most hop not itself trusted, and
    /// the origin check uses `X-Forwarded-Host` (else `Forwarded: host=`). Empty: the headers
    /// are ignored. See docs/DEPLOY.md.
    trusted_proxies: crate::proxy::TrustedProxies = crate::proxy::TrustedProxies::default(), "trusted-proxies", "TRUSTED_PROXIES";
    // --- server API and permissions (issue 11) ---
    /// Key of the server API (`X-API-Key`): posting, deleting, disconnecting, rooms. Empty:
    /// the server API is off (404). At least 16 characters, no spaces. Also opens the REST
    /// reads and `/metrics` when JWT is on. Prefer the environment variable.
    api_key: String = String::new(), "api-key", "API_KEY";
    /// Largest body of a server API request in bytes; larger gets 413. 256 to 1048576.
    max_api_body: usize = 8192, "max-api-body", "MAX_API_BODY";
    /// Rooms where only the server API and admins post, comma-separated patterns (`news`,
    /// `announce-*`, `*`); other broadcasts get `forbidden`. Empty: none.
    read_only_rooms: String = String::new(), "read-only-rooms", "READ_ONLY_ROOMS";
    // --- TLS (issue 13) and public-key tokens (issue 11); need the `tls` cargo feature ---
    /// PEM certificate chain; with `--tls-key` the port speaks TLS only (https, wss). Read
    /// again on SIGHUP.
    tls_cert: String = String::new(), "tls-cert", "TLS_CERT";
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `--tls-cert`; read again on SIGHUP.
    tls_key: String = String::new(), "tls-key", "TLS_KEY";
    /// PEM public key (SPKI `PUBLIC KEY`, RSA or EC P-256): `/ws` and the REST API then take
    /// RS256 / ES256 tokens signed with its private key (an identity provider's).
    jwt_public_key: String = String::new(), "jwt-public-key", "JWT_PUBLIC_KEY";
    // --- cluster (issue 12); needs the `cluster` cargo feature ---
    /// Redis that several chatterbox processes share rooms through: `redis://host:port[/db]`
    /// or `unix:///path/redis.sock`. Empty: standalone. Set: cluster mode, Redis holds the
    /// history (so `--db-path` must stay at its default). See README, "Cluster".
    redis: String = String::new(), "redis", "REDIS_URL";
    /// Cluster mode: messages per room Redis keeps; older ones are trimmed. 1 to 1000000.
    cluster_history_per_room: usize = 1000, "cluster-history-per-room", "CLUSTER_HISTORY_PER_ROOM";
    /// Cluster mode: seconds a node may be silent before it counts as dead and its members
    /// leave every room. 1 to 3600.
    node_timeout: Duration = Duration::from_secs(5), "node-timeout", "NODE_TIMEOUT";
    /// Cluster mode: seconds one Redis call may take before the command gets `unavailable`
    /// (and the connection is made again). 0.05 to 60.
    redis_timeout: Duration = Duration::from_secs(1), "redis-timeout", "REDIS_TIMEOUT";
    /// `SO_REUSEPORT` on the listener: several processes on one machine share one port and
    /// the kernel spreads connections over them.
    reuse_port: bool = false, "reuse-port", "REUSE_PORT";
    /// Worker processes: more than 1 starts that many single-threaded workers on one port
    /// (`--reuse-port`) and supervises them (restarts one that dies, forwards SIGTERM and
    /// SIGINT). More than 1 needs `--redis`. 1 to 256.
    workers: usize = 1, "workers", "WORKERS";
}

/// The file name of the default database inside systemd's state directory.
pub const STATE_DB_FILE: &str = "chatterbox.db";

/// The default database path when run as a service: the first directory of
/// `STATE_DIRECTORY` (systemd sets it for `StateDirectory=`; several are `:`-separated) joined
/// with [`STATE_DB_FILE`]; `None` when the variable is unset or empty.
pub fn state_db_path(state_directory: Option<&str>) -> Option<String> {
    let dir = state_directory?.split(':').next()?.trim_end_matches('/');
    if dir.trim().is_empty() {
        return None;
    }
    Some(format!("{dir}/{STATE_DB_FILE}"))
}

/// Checks the shape of a `--redis` URL: `redis://host[:port][/db]` or `unix:///path`.
pub fn redis_url_ok(url: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "--redis (REDIS_URL) '{}' {why}: write redis://host:port[/db] or unix:///path/redis.sock",
            log_safe(url)
        ))
    };
    if let Some(path) = url.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return bad("needs an absolute socket path");
        }
        return Ok(());
    }
    let Some(rest) = url.strip_prefix("redis://") else {
        return bad("is not a Redis URL");
    };
    let (hostport, db) = rest.split_once('/').unwrap_or((rest, ""));
    let hostport = hostport.rsplit('@').next().unwrap_or(hostport);
    if hostport.is_empty() {
        return bad("has no host");
    }
    if let Some((_, port)) = hostport.rsplit_once(':') {
        if !hostport.ends_with(']') && port.parse::<u16>().is_err() {
            return bad("has a bad port");
        }
    }
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return bad("has a bad database number");
    }
    Ok(())
}

/// A Redis URL without the password it may carry (`redis://user:secret@host` →
/// `redis://user:***@host`), for the log.
#[cfg(feature = "cluster")]
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(all(test, feature = "cluster"))]
mod redis_url_tests {
    #[test]
    fn a_redis_password_never_reaches_the_log() {
        assert_eq!(
            super::without_password("redis://:hunter2@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            super::without_password("redis://app:s3cr@t@r:6379"),
            "redis://app:***@r:6379"
        );
        assert_eq!(super::without_password("redis://r:6379"), "redis://r:6379");
        assert_eq!(
            super::without_password("unix:///run/r.sock"),
            "unix:///run/r.sock"
        );
    }
}

/// Most seconds `--history-max-age` may be: 100 years.
pub const MAX_HISTORY_AGE_SECS: u64 = 100 * 365 * 24 * 3600;
/// Most messages `--history-max-per-room` may keep.
pub const MAX_HISTORY_PER_ROOM: u64 = 100_000_000;

/// What the command line asked for.
#[derive(Debug)]
pub enum Cli {
    /// Run the server with this configuration.
    Run(Box<Config>),
    /// Print this text (help or version) and exit 0.
    Print(String),
}

/// The largest settings file read: 1 MiB (a few dozen lines are typical).
pub const MAX_SETTINGS_FILE: u64 = 1 << 20;

/// One line of a settings file: its number (from 1), the name and the value.
pub type SettingLine<'a> = (usize, &'a str, String);

/// The `NAME=value` lines of a settings file, each with its line number (from 1): `#` starts a
/// comment (a whole line, or after whitespace in an unquoted value), blank lines are skipped,
/// spaces around the name and the value are dropped, and a value may be quoted in `"` or `'`
/// (kept as it is inside, `#` included). A line without `=`, an empty or malformed name or an
/// unclosed quote is an error with its line number. Names are not checked here.
pub fn parse_settings_file(text: &str) -> Result<Vec<SettingLine<'_>>, (usize, String)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err((n, "expected NAME=value".into()));
        };
        let name = name.trim();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err((
                n,
                format!(
                    "'{}' is not a setting name (NAME=value, NAME as in --help)",
                    log_safe(name)
                ),
            ));
        }
        let value = value.trim();
        let value = match value.chars().next() {
            Some(q @ ('"' | '\'')) => {
                let inner = &value[1..];
                let Some(end) = inner.find(q) else {
                    return Err((n, format!("{name}: the quote {q} is not closed")));
                };
                let rest = inner[end + 1..].trim_start();
                if !(rest.is_empty() || rest.starts_with('#')) {
                    return Err((n, format!("{name}: text after the closing quote")));
                }
                inner[..end].to_string()
            }
            _ => {
                let end = value
                    .char_indices()
                    .find(|&(i, c)| c == '#' && value[..i].ends_with(|p: char| p.is_whitespace()))
                    .map_or(value.len(), |(i, _)| i);
                value[..end].trim_end().to_string()
            }
        };
        out.push((n, name, value));
    }
    Ok(out)
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
    /// environment lookup. Flags are `--name value` or `--name=value`. Precedence: flag, then
    /// environment variable, then the settings file (`--config`, else `CONFIG`), then default.
    pub fn from_args<I, E>(args: I, env: E) -> Result<Cli, String>
    where
        I: IntoIterator<Item = String>,
        E: Fn(&str) -> Option<String>,
    {
        let mut flags = Vec::new();
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
                return Err(format!(
                    "unexpected argument '{}' (see --help)",
                    log_safe(&arg)
                ));
            };
            let (flag, value) = match flag.split_once('=') {
                Some((f, v)) => (f.to_string(), v.to_string()),
                None => {
                    if Self::env_of(flag).is_empty() {
                        return Err(format!("unknown option --{} (see --help)", log_safe(flag)));
                    }
                    let v = args.next().ok_or_else(|| {
                        format!("--{flag} ({}) needs a value", Self::env_of(flag))
                    })?;
                    (flag.to_string(), v)
                }
            };
            if Self::env_of(&flag).is_empty() {
                return Err(format!("unknown option --{} (see --help)", log_safe(&flag)));
            }
            flags.push((flag, value));
        }
        let mut cfg = Config::default();
        // As a service the data belongs in the state directory, never in the working
        // directory of whoever started it; the file, DB_PATH and --db-path still win.
        if let Some(path) = state_db_path(env("STATE_DIRECTORY").as_deref()) {
            cfg.db_path = path;
        }
        let file = match flags.iter().rev().find(|(f, _)| f == "config") {
            Some((_, path)) => Some(path.clone()),
            None => env("CONFIG"),
        };
        if let Some(path) = file.filter(|p| !p.trim().is_empty()) {
            cfg.read_settings_file(&path)?;
        }
        for (flag, var, _) in Self::TABLE {
            if let Some(text) = env(var) {
                cfg.set(flag, &text).map_err(|e| {
                    format!("{var} (--{flag}), from the environment: {}", log_safe(&e))
                })?;
            }
        }
        for (flag, value) in &flags {
            cfg.set(flag, value)
                .map_err(|e| format!("--{flag} ({}): {}", Self::env_of(flag), log_safe(&e)))?;
        }
        cfg.validate()?;
        Ok(Cli::Run(Box::new(cfg)))
    }

    /// Applies the settings file at `path` ([`parse_settings_file`]); errors name the file and
    /// the line.
    fn read_settings_file(&mut self, path: &str) -> Result<(), String> {
        use std::io::Read as _;
        let shown = log_safe(path);
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_SETTINGS_FILE + 1).read_to_string(&mut text))
            .map_err(|e| format!("--config (CONFIG): cannot read '{shown}': {e}"))?;
        if text.len() as u64 > MAX_SETTINGS_FILE {
            return Err(format!(
                "--config (CONFIG): '{shown}' is larger than {MAX_SETTINGS_FILE} bytes"
            ));
        }
        for (line, name, value) in
            parse_settings_file(&text).map_err(|(line, e)| format!("{shown}:{line}: {e}"))?
        {
            let Some((flag, _, _)) = Self::TABLE.iter().find(|(_, var, _)| *var == name) else {
                return Err(format!(
                    "{shown}:{line}: unknown setting '{}' (the names are those of the \
                     environment variables in --help)",
                    log_safe(name)
                ));
            };
            if *flag == "config" {
                return Err(format!(
                    "{shown}:{line}: CONFIG cannot be set in a settings file"
                ));
            }
            self.set(flag, &value)
                .map_err(|e| format!("{shown}:{line}: {name} (--{flag}): {}", log_safe(&e)))?;
        }
        Ok(())
    }

    /// Checks every setting's range; the error names the flag and the variable.
    /// [`Config::from_args`] calls it; a `Config` built in code can call it too.
    pub fn validate(&self) -> Result<(), String> {
        let named = |flag: &str| format!("--{flag} ({})", Self::env_of(flag));
        // Sizes and counts: (flag, value, least, most). The least is what the server needs to
        // work at all; the most is where a value can only be a mistake (or would overflow).
        const MIB: usize = 1 << 20;
        if self.history_max_age > MAX_HISTORY_AGE_SECS {
            return Err(format!(
                "--history-max-age (HISTORY_MAX_AGE) must be at most {MAX_HISTORY_AGE_SECS} \
                 seconds (100 years), or 0 to keep messages for ever"
            ));
        }
        if self.db_path == ":memory:" {
            for (flag, v) in [
                ("history-max-age", self.history_max_age),
                ("history-max-per-room", self.history_max_per_room),
            ] {
                if v != 0 {
                    return Err(format!(
                        "--{flag} ({}) applies to the SQLite store only; with --db-path \
                         :memory: use --memory-history-per-room",
                        Self::env_of(flag)
                    ));
                }
            }
        }
        if self.history_max_per_room > MAX_HISTORY_PER_ROOM {
            return Err(format!(
                "--history-max-per-room (HISTORY_MAX_PER_ROOM) must be at most \
                 {MAX_HISTORY_PER_ROOM}, or 0 to keep every message"
            ));
        }
        const MAX_MESSAGES: usize = 1_000_000;
        let ranges = [
            // A frame must hold an ordinary command with its ids (`request_id`, `msg_id`).
            ("max-frame-size", self.max_frame_size, 512, 64 * MIB),
            ("max-message-chars", self.max_message_chars, 1, MAX_MESSAGES),
            ("max-history", self.max_history, 0, MAX_MESSAGES),
            ("history-page-cap", self.history_page_cap, 1, MAX_MESSAGES),
            ("resume-cap", self.resume_cap, 0, MAX_MESSAGES),
            (
                "memory-history-per-room",
                self.memory_history_per_room,
                1,
                MAX_MESSAGES,
            ),
            ("max-unstored", self.max_unstored, 1, MAX_MESSAGES),
            // core: every member joins `general`, which is a room of its own.
            ("max-rooms", self.max_rooms, 1, 10_000_000),
            (
                "max-rooms-per-member",
                self.max_rooms_per_member,
                1,
                100_000,
            ),
            ("notice-max-members", self.notice_max_members, 0, usize::MAX),
            ("max-connections", self.max_connections, 1, 10_000_000),
            (
                "max-connections-per-ip",
                self.max_connections_per_ip,
                1,
                10_000_000,
            ),
            // A browser's request head is some hundreds of bytes, with cookies a few KiB.
            ("max-head-bytes", self.max_head_bytes, 1024, MIB),
            // The output bound holds at least one ordinary event.
            (
                "max-pending-output",
                self.max_pending_output,
                1024,
                1024 * MIB,
            ),
            ("read-buffer-size", self.read_buffer_size, 1, 64 * MIB),
            ("read-budget-bytes", self.read_budget_bytes, 512, 64 * MIB),
            ("max-fragments", self.max_fragments, 1, 1 << 20),
            ("max-dedup-entries", self.max_dedup_entries, 1, 10_000_000),
            ("rate-burst", self.rate_burst as usize, 1, 1_000_000),
            ("rate-per-sec", self.rate_per_sec as usize, 0, 1_000_000),
            ("listen-backlog", self.listen_backlog as usize, 1, 65_535),
        ];
        for (flag, v, least, most) in ranges {
            if v < least || v > most {
                return Err(if most == usize::MAX {
                    format!("{} must be at least {least}", named(flag))
                } else {
                    format!("{} must be from {least} to {most}", named(flag))
                });
            }
        }
        // A page must fit twice into the output bound, so that a page and the room traffic
        // around it never close the member who asked for it.
        let half = self.max_pending_output / 2;
        if self.max_page_bytes > half {
            return Err(format!(
                "{} must be at most half of --max-pending-output ({half}), or 0",
                named("max-page-bytes")
            ));
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
                    "{} must be at most {} seconds ({what})",
                    named(flag),
                    max.as_secs()
                ));
            }
        }
        if !(MIN_INTERVAL..=Duration::from_secs(3600)).contains(&self.log_summary_window) {
            return Err(format!(
                "{} must be from 0.01 to 3600 seconds",
                named("log-summary-window")
            ));
        }
        // A zero ping interval re-arms its timer at `now` for ever: the loop never leaves
        // `fire_timers` once a member is connected. Zero timeouts would close everything at
        // once. (A zero idle timeout means no idle timeout: the timer is never armed.)
        for (flag, v) in [
            ("ping-interval", self.ping_interval),
            ("pong-timeout", self.pong_timeout),
            ("head-timeout", self.head_timeout),
        ] {
            if v < MIN_INTERVAL {
                return Err(format!(
                    "{} must be at least {} seconds",
                    named(flag),
                    MIN_INTERVAL.as_secs_f64()
                ));
            }
        }
        if !self.idle_timeout.is_zero() && self.idle_timeout < MIN_INTERVAL {
            return Err(format!(
                "{} must be 0 (no idle timeout) or at least {} seconds",
                named("idle-timeout"),
                MIN_INTERVAL.as_secs_f64()
            ));
        }
        // A client that answers every ping must never hit the pong timeout: the next ping
        // has to reach it before the timeout runs out.
        if self.pong_timeout <= self.ping_interval {
            return Err(format!(
                "{} ({}s) must be longer than {} ({}s): a client that answers every ping \
                 would be closed before the next ping reaches it",
                named("pong-timeout"),
                self.pong_timeout.as_secs_f64(),
                named("ping-interval"),
                self.ping_interval.as_secs_f64()
            ));
        }
        self.validate_cluster()?;
        // An empty path would make SQLite open a private temporary database per connection:
        // acks for messages that are never kept.
        if self.db_path.trim().is_empty() {
            return Err(
                "--db-path (DB_PATH) must not be empty: name a file, or ':memory:' \
                        to keep history in memory only"
                    .into(),
            );
        }
        if self.host.trim().is_empty() {
            return Err(
                "--host (HOST) must not be empty: an address such as 0.0.0.0 or ::, or a \
                 host name"
                    .into(),
            );
        }
        for entry in self.allowed_hosts.split(',').map(str::trim) {
            if entry.contains("://") || entry.contains('/') || entry.contains(char::is_whitespace) {
                return Err(format!(
                    "--allowed-hosts (ALLOWED_HOSTS): '{}' is not a host name with an \
                     optional :port (no scheme, no path)",
                    log_safe(entry)
                ));
            }
        }
        #[cfg(not(feature = "server-api"))]
        if !self.api_key.is_empty() || !self.read_only_rooms.is_empty() {
            return Err(
                "--api-key (API_KEY) and --read-only-rooms (READ_ONLY_ROOMS) need a \
                        build with the server API (cargo feature server-api)"
                    .into(),
            );
        }
        #[cfg(feature = "server-api")]
        if !(256..=1 << 20).contains(&self.max_api_body) {
            return Err("--max-api-body (MAX_API_BODY) must be between 256 and 1048576".into());
        }
        #[cfg(feature = "server-api")]
        if !self.api_key.is_empty()
            && (self.api_key.chars().count() < 16
                || self
                    .api_key
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || !c.is_ascii()))
        {
            return Err(
                "--api-key (API_KEY) must be at least 16 printable ASCII characters without \
                 spaces (or empty: the server API is off)"
                    .into(),
            );
        }
        #[cfg(feature = "server-api")]
        if let Err(e) = crate::auth::Patterns::parse_list(&self.read_only_rooms) {
            return Err(format!("--read-only-rooms (READ_ONLY_ROOMS): {e}"));
        }
        self.validate_tls()?;
        if self.jwt_secret.is_empty() && self.jwt_public_key.is_empty() {
            for (flag, v) in [
                ("jwt-audience", &self.jwt_audience),
                ("jwt-issuer", &self.jwt_issuer),
            ] {
                if !v.is_empty() {
                    return Err(format!(
                        "{} only has an effect with --jwt-secret (JWT_SECRET) or --jwt-public-key",
                        named(flag)
                    ));
                }
            }
        }
        Ok(())
    }

    /// TLS and public-key settings: the certificate and key come together, and both need a
    /// build with the `tls` feature. (The files themselves are read when the server starts.)
    /// The cluster settings (issue 12): `--redis` and what goes with it.
    fn validate_cluster(&self) -> Result<(), String> {
        if !(1..=256).contains(&self.workers) {
            return Err("--workers (WORKERS) must be from 1 to 256".into());
        }
        if !(1..=1_000_000).contains(&self.cluster_history_per_room) {
            return Err(
                "--cluster-history-per-room (CLUSTER_HISTORY_PER_ROOM) must be from 1 to 1000000"
                    .into(),
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.node_timeout) {
            return Err("--node-timeout (NODE_TIMEOUT) must be from 1 to 3600 seconds".into());
        }
        if !(Duration::from_millis(50)..=Duration::from_secs(60)).contains(&self.redis_timeout) {
            return Err("--redis-timeout (REDIS_TIMEOUT) must be from 0.05 to 60 seconds".into());
        }
        if self.redis.is_empty() {
            if self.workers > 1 {
                return Err(
                    "--workers (WORKERS) above 1 needs --redis (REDIS_URL): separate processes \
                     share rooms only through Redis"
                        .into(),
                );
            }
            return Ok(());
        }
        if cfg!(not(feature = "cluster")) {
            return Err("--redis (REDIS_URL) needs a build with cluster support: \
                 `cargo build --release --features cluster`"
                .into());
        }
        crate::config::redis_url_ok(&self.redis)?;
        // The default, or the service default (`STATE_DIRECTORY`): never asked for.
        let service_db = state_db_path(std::env::var("STATE_DIRECTORY").ok().as_deref());
        if self.db_path != Config::default().db_path
            && service_db.as_deref() != Some(self.db_path.as_str())
        {
            return Err(format!(
                "--redis (REDIS_URL) and --db-path (DB_PATH) '{}' do not go together: in \
                 cluster mode Redis holds the history",
                log_safe(&self.db_path)
            ));
        }
        Ok(())
    }

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
             Every setting is a flag and an environment variable; a settings file (--config)\n\
             holds NAME=value lines under the variables' names. A flag wins over a variable,\n\
             a variable over the file, the file over the default.\n\n",
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
        for flag in ["ping-interval", "pong-timeout", "head-timeout"] {
            for tiny in ["0", "0.001"] {
                let e = run(&[&format!("--{flag}"), tiny], &[]).unwrap_err();
                assert!(e.contains(&format!("--{flag} (")), "{flag} {tiny}: {e}");
            }
        }
        assert!(run(&["--head-timeout", "0.01"], &[]).is_ok());
        assert!(run(&["--ping-interval", "0.01", "--pong-timeout", "0.02"], &[]).is_ok());
        // An idle timeout of 0 is off; a tiny one is a mistake.
        assert!(
            run(&["--idle-timeout", "0"], &[])
                .unwrap()
                .idle_timeout
                .is_zero()
        );
        let e = run(&["--idle-timeout", "0.001"], &[]).unwrap_err();
        assert!(e.contains("--idle-timeout (IDLE_TIMEOUT) must be 0"), "{e}");
        assert!(run(&["--idle-timeout", "0.01"], &[]).is_ok());
        assert!(run(&["--shutdown-grace", "0", "--dedup-window", "0"], &[]).is_ok());
    }

    #[cfg(feature = "server-api")]
    #[test]
    fn server_api_settings_are_checked() {
        assert!(run(&[], &[]).unwrap().api_key.is_empty(), "off by default");
        for bad in [
            "short",
            "sixteen chars ok",
            "0123456789abcdef\u{7f}",
            "0123456789abcdéf",
        ] {
            let e = run(&["--api-key", bad], &[]).unwrap_err();
            assert!(e.contains("--api-key (API_KEY)"), "{bad}: {e}");
        }
        assert!(run(&[], &[("API_KEY", "0123456789abcdef")]).is_ok());
        assert_eq!(run(&[], &[]).unwrap().max_api_body, 8192);
        for bad in ["0", "255", "1048577"] {
            assert!(run(&["--max-api-body", bad], &[]).is_err(), "{bad}");
        }
        assert!(run(&["--read-only-rooms", "news, announce-*"], &[]).is_ok());
        for bad in ["a b", "*x", "ok,bad room", "x\u{1}"] {
            let e = run(&["--read-only-rooms", bad], &[]).unwrap_err();
            assert!(
                e.contains("--read-only-rooms (READ_ONLY_ROOMS)"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_pong_timeout_must_outlast_the_ping_interval() {
        // Otherwise a client that answers every ping is closed before its next ping.
        let e = run(&["--ping-interval", "60", "--pong-timeout", "30"], &[]).unwrap_err();
        assert!(e.contains("--pong-timeout (PONG_TIMEOUT)"), "{e}");
        assert!(e.contains("--ping-interval (PING_INTERVAL)"), "{e}");
        assert!(
            run(&["--pong-timeout", "30"], &[]).is_err(),
            "the default ping is 30 s"
        );
        assert!(run(&["--ping-interval", "29.9", "--pong-timeout", "30"], &[]).is_ok());
    }

    #[test]
    fn numbers_out_of_range_say_so_and_unknown_flags_say_unknown() {
        let e = run(&["--port", "99999"], &[]).unwrap_err();
        assert_eq!(e, "--port (PORT): '99999' is out of range (0 to 65535)");
        let e = run(&["--max-rooms", "-1"], &[]).unwrap_err();
        assert!(e.contains("is out of range"), "{e}");
        let e = run(&["--port", "80x"], &[]).unwrap_err();
        assert_eq!(e, "--port (PORT): '80x' is not a whole number");
        let e = run(&[], &[("PORT", "70000")]).unwrap_err();
        assert!(e.starts_with("PORT (--port), from the environment: '70000' is out of range"));
        // Last on the line, or before another flag, or with `=`: unknown, not "needs a value".
        for line in [&["--nope"][..], &["--nope", "--port", "1"], &["--nope=3"]] {
            let e = run(line, &[]).unwrap_err();
            assert_eq!(e, "unknown option --nope (see --help)", "{line:?}");
        }
        let e = run(&["--port"], &[]).unwrap_err();
        assert_eq!(e, "--port (PORT) needs a value");
        let e = run(&["--\u{1b}[2J"], &[]).unwrap_err();
        assert!(!e.contains('\u{1b}'), "{e:?}");
        // A value that is not one reaches the terminal escaped, from a flag or a variable.
        let e = run(&["--port", "\u{1b}[2J"], &[]).unwrap_err();
        assert_eq!(e, r"--port (PORT): '\u{1b}[2J' is not a whole number");
        let e = run(&[], &[("LOG_LEVEL", "x\ny")]).unwrap_err();
        assert!(
            e.ends_with(r"'x\ny' is not a log level (off, error, warn, info, debug, trace)"),
            "{e}"
        );
    }

    #[test]
    fn every_size_and_count_has_a_range_named_with_flag_and_variable() {
        for (flag, bad, good) in [
            ("max-frame-size", "10", "512"),
            ("max-frame-size", "67108865", "67108864"),
            ("max-head-bytes", "100", "1024"),
            ("max-pending-output", "10", "1024"),
            ("memory-history-per-room", "0", "1"),
            ("listen-backlog", "0", "1"),
            ("listen-backlog", "65536", "65535"),
            ("max-connections", "0", "1"),
            ("rate-burst", "0", "1"),
            ("max-fragments", "0", "1"),
        ] {
            let e = run(&[&format!("--{flag}"), bad], &[]).unwrap_err();
            let named = format!("--{flag} ({})", Config::env_of(flag));
            assert!(
                e.starts_with(&named) && e.contains("must be from"),
                "{flag} {bad}: {e}"
            );
            assert!(
                run(&[&format!("--{flag}"), good], &[]).is_ok(),
                "{flag} {good}"
            );
        }
        // 0 is documented as meaningful for these.
        let c = run(&["--rate-per-sec", "0", "--notice-max-members", "0"], &[]).unwrap();
        assert_eq!((c.rate_per_sec, c.notice_max_members), (0, 0));
        assert!(
            run(&["--host", " "], &[])
                .unwrap_err()
                .contains("--host (HOST)")
        );
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
    fn under_systemd_the_default_database_is_in_the_state_directory() {
        let c = run(&[], &[("STATE_DIRECTORY", "/var/lib/chatterbox")]).unwrap();
        assert_eq!(c.db_path, "/var/lib/chatterbox/chatterbox.db");
        // Several StateDirectory= entries: the first; a trailing slash is not doubled.
        let c = run(&[], &[("STATE_DIRECTORY", "/var/lib/cb/:/var/lib/other")]).unwrap();
        assert_eq!(c.db_path, "/var/lib/cb/chatterbox.db");
        // An explicit path wins, from the environment and from the command line.
        let env = [
            ("STATE_DIRECTORY", "/var/lib/cb"),
            ("DB_PATH", "/data/h.db"),
        ];
        assert_eq!(run(&[], &env).unwrap().db_path, "/data/h.db");
        let c = run(&["--db-path", ":memory:"], &env).unwrap();
        assert_eq!(c.db_path, ":memory:");
        // Unset or empty: the working directory, as before.
        assert_eq!(run(&[], &[]).unwrap().db_path, "chatterbox.db");
        assert_eq!(
            run(&[], &[("STATE_DIRECTORY", "")]).unwrap().db_path,
            "chatterbox.db"
        );
        assert_eq!(state_db_path(Some(":/x")), None);
    }

    #[test]
    fn retention_settings_default_to_keep_all_and_are_range_checked() {
        let c = run(&[], &[]).unwrap();
        assert_eq!((c.history_max_age, c.history_max_per_room), (0, 0));
        let c = run(
            &["--history-max-age", "86400"],
            &[("HISTORY_MAX_PER_ROOM", "500")],
        )
        .unwrap();
        assert_eq!((c.history_max_age, c.history_max_per_room), (86_400, 500));
        let e = run(&["--history-max-age", "3153600001"], &[]).unwrap_err();
        assert!(e.contains("--history-max-age (HISTORY_MAX_AGE)"), "{e}");
        let e = run(&[], &[("HISTORY_MAX_PER_ROOM", "100000001")]).unwrap_err();
        assert!(
            e.contains("--history-max-per-room (HISTORY_MAX_PER_ROOM)"),
            "{e}"
        );
        for bad in ["-1", "1.5", "ten"] {
            let e = run(&["--history-max-age", bad], &[]).unwrap_err();
            assert!(e.contains("--history-max-age"), "{e}");
        }
        // Without SQLite they would do nothing: said at start, like --jwt-audience alone.
        let e = run(&["--db-path", ":memory:", "--history-max-age", "60"], &[]).unwrap_err();
        assert!(
            e.contains("--history-max-age (HISTORY_MAX_AGE) applies to the SQLite"),
            "{e}"
        );
        let e = run(
            &[],
            &[("DB_PATH", ":memory:"), ("HISTORY_MAX_PER_ROOM", "9")],
        )
        .unwrap_err();
        assert!(e.contains("--memory-history-per-room"), "{e}");
        assert!(run(&["--db-path", ":memory:", "--history-max-age", "0"], &[]).is_ok());
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
    #[test]
    fn settings_file_lines_comments_and_quotes() {
        let text = "# chatterbox\n\n  PORT = 9000  \nHOST=\"::1\" # v6\nALLOWED_ORIGINS='https://a#b'\n\
                    DB_PATH=/var/lib/x.db # where\nJWT_ISSUER=a#b\nEMPTY=\n";
        let got = parse_settings_file(text).unwrap();
        let pairs: Vec<(usize, &str, &str)> =
            got.iter().map(|(n, k, v)| (*n, *k, v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                (3, "PORT", "9000"),
                (4, "HOST", "::1"),
                (5, "ALLOWED_ORIGINS", "https://a#b"),
                (6, "DB_PATH", "/var/lib/x.db"),
                (7, "JWT_ISSUER", "a#b"),
                (8, "EMPTY", ""),
            ]
        );
        for (bad, line, says) in [
            ("PORT=1\njust words\n", 2, "expected NAME=value"),
            ("=1", 1, "not a setting name"),
            ("port=1", 1, "not a setting name"),
            ("HOST=\"::1", 1, "not closed"),
            ("HOST=\"a\" b", 1, "after the closing quote"),
        ] {
            let (n, e) = parse_settings_file(bad).unwrap_err();
            assert_eq!(n, line, "{bad:?}");
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    /// A settings file with `text`, removed when dropped.
    struct TempFile(std::path::PathBuf);
    impl TempFile {
        fn new(text: &[u8]) -> TempFile {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "chatterbox-config-{}-{}.conf",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let f = TempFile::new(b"PORT=7000\nMAX_ROOMS=5\nMAX_HISTORY=7\nLOG_FORMAT=json\n");
        let path = f.path();
        let c = run(
            &["--config", path, "--port", "9000"],
            &[("PORT", "8000"), ("MAX_ROOMS", "6")],
        )
        .unwrap();
        assert_eq!((c.port, c.max_rooms, c.max_history), (9000, 6, 7));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.max_rooms_per_member, 32,
            "the default where nobody sets it"
        );
        // CONFIG names the file too; the flag wins over it.
        let c = run(&[], &[("CONFIG", path), ("MAX_ROOMS", "6")]).unwrap();
        assert_eq!((c.port, c.max_rooms), (7000, 6));
        let other = TempFile::new(b"PORT=7001\n");
        let c = run(
            &[&format!("--config={}", other.path())],
            &[("CONFIG", path)],
        )
        .unwrap();
        assert_eq!((c.port, c.max_rooms), (7001, 1000));
        // Empty: no file.
        assert_eq!(run(&[], &[("CONFIG", "")]).unwrap().port, 8080);
    }

    #[test]
    fn settings_file_errors_name_the_file_and_line() {
        let f = TempFile::new(b"# ok\nPORT=7000\nMAX_ROOMZ=5\n");
        let e = run(&["--config", f.path()], &[]).unwrap_err();
        assert_eq!(
            e,
            format!(
                "{}:3: unknown setting 'MAX_ROOMZ' (the names are those of the environment \
                 variables in --help)",
                f.path()
            )
        );
        let f = TempFile::new(b"PORT=99999\n");
        let e = run(&["--config", f.path()], &[]).unwrap_err();
        assert_eq!(
            e,
            format!(
                "{}:1: PORT (--port): '99999' is out of range (0 to 65535)",
                f.path()
            )
        );
        let f = TempFile::new(b"\n\nmax_rooms 5\n");
        let e = run(&["--config", f.path()], &[]).unwrap_err();
        assert!(e.starts_with(&format!("{}:3: ", f.path())), "{e}");
        let f = TempFile::new(b"CONFIG=/etc/other\n");
        assert!(
            run(&["--config", f.path()], &[])
                .unwrap_err()
                .contains(":1: CONFIG cannot")
        );
        // Range checks apply to what the file set, naming flag and variable.
        let f = TempFile::new(b"MAX_FRAME_SIZE=10\n");
        let e = run(&["--config", f.path()], &[]).unwrap_err();
        assert!(
            e.starts_with("--max-frame-size (MAX_FRAME_SIZE) must be"),
            "{e}"
        );
        // Missing, a directory, not UTF-8, too big.
        let e = run(&["--config", "/nonexistent/chatterbox.conf"], &[]).unwrap_err();
        assert!(e.starts_with("--config (CONFIG): cannot read '/nonexistent/chatterbox.conf'"));
        let dir = std::env::temp_dir();
        assert!(
            run(&["--config", dir.to_str().unwrap()], &[])
                .unwrap_err()
                .contains("cannot read")
        );
        let f = TempFile::new(b"PORT=\xff\xfe\n");
        assert!(
            run(&["--config", f.path()], &[])
                .unwrap_err()
                .contains("cannot read")
        );
        let big = vec![b'#'; MAX_SETTINGS_FILE as usize + 10];
        let f = TempFile::new(&big);
        assert!(
            run(&["--config", f.path()], &[])
                .unwrap_err()
                .contains("larger than")
        );
        // Hostile text in a name does not reach the terminal raw.
        let f = TempFile::new(b"\x1b[2J=1\n");
        assert!(
            !run(&["--config", f.path()], &[])
                .unwrap_err()
                .contains('\u{1b}')
        );
    }

    #[test]
    fn log_settings_parse() {
        let c = run(&[], &[]).unwrap();
        assert_eq!((c.log_format, c.log_messages), (LogFormat::Text, true));
        let c = run(&["--log-format", "JSON", "--log-messages", "false"], &[]).unwrap();
        assert_eq!((c.log_format, c.log_messages), (LogFormat::Json, false));
        assert_eq!(c.log_summary_window, Duration::from_secs(10));
        for bad in ["0", "3601"] {
            let e = run(&["--log-summary-window", bad], &[]).unwrap_err();
            assert!(
                e.starts_with("--log-summary-window (LOG_SUMMARY_WINDOW)"),
                "{e}"
            );
        }
        let e = run(&["--log-format", "xml"], &[]).unwrap_err();
        assert!(
            e.starts_with("--log-format (LOG_FORMAT): 'xml' is not a log format"),
            "{e}"
        );
    }
}
