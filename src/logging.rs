//! Logging: the logger itself (text or JSON lines on stderr, each with a UTC date) and log
//! hygiene, the escaping every client-chosen value gets in a log line.
//!
//! A message such as `"hi\n21:00:00 [WARN] fake"` or one with ANSI escapes would otherwise show
//! up in the log as separate, forged lines, or repaint an operator's terminal. Every value a
//! client chose (message, name, room, reason, header) goes through [`log_safe`] in every log
//! macro at every level. The logger escapes the structured fields (`log`'s key-values) the
//! same way, and in JSON it escapes whatever else remains, so that every line is one valid
//! JSON object whatever went into it.
//!
//! The interface is the `log` macros; [`init`] (called by `main` only) installs [`Logger`].
//! A text line is `2026-12-02T01:05:34.123Z [INFO] msg`; a JSON line is
//! `{"ts":"2026-12-02T01:05:34.123Z","level":"info","msg":"...", ...fields}`.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Wraps `text` so that its `Display` writes control characters escaped: `\n`, `\r`, `\t`, and
/// `\u{1b}`-style escapes for the rest of C0, DEL, C1, the Unicode line and paragraph
/// separators and the bidirectional controls (which can make a line read differently from
/// what it holds). Everything else, backslashes included, is written as it is, so ordinary
/// text logs unchanged and without allocating.
pub fn log_safe(text: &str) -> LogSafe<'_> {
    LogSafe(text)
}

/// The [`Display`](fmt::Display) of [`log_safe`].
#[derive(Debug, Clone, Copy)]
pub struct LogSafe<'a>(&'a str);

fn needs_escape(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{2028}' | '\u{2029}'
        | '\u{061c}' | '\u{200e}' | '\u{200f}'
        | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let mut start = 0;
        for (i, c) in s.char_indices() {
            if !needs_escape(c) {
                continue;
            }
            f.write_str(&s[start..i])?;
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                _ => write!(f, "\\u{{{:x}}}", c as u32)?,
            }
            start = i + c.len_utf8();
        }
        f.write_str(&s[start..])
    }
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-02T01:05:34.123Z [INFO] msg`: for people and `grep`.
    Text,
    /// One JSON object per line: `ts`, `level`, `msg` and the line's fields.
    Json,
}

impl LogFormat {
    /// The setting's text: `text` or `json`.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The logger `main` installs: every record at or above the level, as one line on stderr,
/// written with a single `write` so that lines from the store's threads never interleave.
#[derive(Debug)]
pub struct Logger {
    level: LevelFilter,
    format: LogFormat,
}

/// The installed logger, also for [`log_fields`].
static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs [`Logger`] as the `log` crate's logger (once; later calls change nothing).
pub fn init(level: LevelFilter, format: LogFormat) {
    let logger = LOGGER.get_or_init(|| Logger { level, format });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.level);
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            self.write(record.level(), *record.args(), &[]);
        }
    }

    fn flush(&self) {}
}

impl Logger {
    fn write(&self, level: Level, msg: fmt::Arguments<'_>, fields: &[(&str, Field<'_>)]) {
        let line = format_line(self.format, SystemTime::now(), level, msg, fields);
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// A field of a log line: a member of the JSON object; text lines leave it out (their message
/// says it in words). Strings are escaped as [`log_safe`] escapes.
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    /// A JSON string.
    Str(&'a str),
    /// A JSON number.
    Num(u64),
}

/// Logs `msg` at `level` with `fields`, through the installed [`Logger`] (nothing when none
/// is, as in tests that run the server in-process). The `log` macros cannot carry fields
/// without `log`'s `kv` machinery, which costs more bytes than this.
pub fn log_fields(level: Level, msg: fmt::Arguments<'_>, fields: &[(&str, Field<'_>)]) {
    if let Some(logger) = LOGGER.get() {
        if level <= logger.level {
            logger.write(level, msg, fields);
        }
    }
}

/// One log line, newline included: `msg` logged at `level` at `now`, with `fields` (JSON only).
pub fn format_line(
    format: LogFormat,
    now: SystemTime,
    level: Level,
    msg: fmt::Arguments<'_>,
    fields: &[(&str, Field<'_>)],
) -> String {
    let mut line = String::with_capacity(128);
    let ts = rfc3339(now);
    match format {
        LogFormat::Text => {
            let _ = writeln!(line, "{ts} [{level}] {msg}");
        }
        LogFormat::Json => {
            let _ = write!(line, "{{\"ts\":\"{ts}\",\"level\":\"");
            line.push_str(&level.as_str().to_ascii_lowercase());
            line.push_str("\",\"msg\":");
            json_string(&mut line, &msg.to_string());
            for (key, value) in fields {
                line.push(',');
                json_string(&mut line, key);
                line.push(':');
                match value {
                    Field::Str(s) => json_string(&mut line, &log_safe(s).to_string()),
                    Field::Num(n) => {
                        let _ = write!(line, "{n}");
                    }
                }
            }
            line.push_str("}\n");
        }
    }
    line
}

/// Appends `text` as a JSON string: quotes, backslashes and every control character escaped,
/// so the line stays one valid JSON object whatever the text holds.
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `time` as RFC 3339 in UTC with milliseconds: `2026-12-02T01:05:34.123Z`. Times before 1970
/// (a clock gone very wrong) are written as the epoch.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// `n` with a comma between thousands (`4,312`), as summaries print counts.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        let cases = [
            ("Hello world!", "Hello world!"),
            ("hi\n21:00:00 [WARN] fake", "hi\\n21:00:00 [WARN] fake"),
            ("a\r\tb", "a\\r\\tb"),
            ("\u{1b}[31mred\u{1b}[0m", "\\u{1b}[31mred\\u{1b}[0m"),
            ("\0\u{7f}\u{85}\u{9b}", "\\u{0}\\u{7f}\\u{85}\\u{9b}"),
            ("x\u{2028}y\u{2029}", "x\\u{2028}y\\u{2029}"),
            ("\u{202e}txt.exe", "\\u{202e}txt.exe"),
            ("\u{2066}\u{2069}", "\\u{2066}\\u{2069}"),
            ("émoji 📤 ok\\n", "émoji 📤 ok\\n"),
            ("", ""),
        ];
        for (raw, logged) in cases {
            assert_eq!(log_safe(raw).to_string(), logged, "{raw:?}");
        }
    }

    #[test]
    fn no_escaped_value_holds_a_control_character() {
        let every: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let out = log_safe(&every).to_string();
        assert!(!out.chars().any(needs_escape));
        assert!(!out.contains('\n') && !out.contains('\u{1b}'));
    }
    fn line(format: LogFormat, msg: fmt::Arguments<'_>, fields: &[(&str, Field<'_>)]) -> String {
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1_796_174_734_123);
        format_line(format, at, Level::Warn, msg, fields)
    }

    #[test]
    fn dates_are_rfc3339_utc_with_milliseconds() {
        let at = |ms: u64| rfc3339(UNIX_EPOCH + std::time::Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_796_174_734_123), "2026-12-02T01:25:34.123Z");
        assert_eq!(at(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - std::time::Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn text_lines_carry_the_date_the_level_and_the_message() {
        let l = line(LogFormat::Text, format_args!("🔌 Member a connected"), &[]);
        assert_eq!(l, "2026-12-02T01:25:34.123Z [WARN] 🔌 Member a connected\n");
    }

    #[test]
    fn json_lines_are_one_valid_object_with_the_fields_whatever_the_input() {
        let hostile = "a\"b\\c\n{\"x\":1}\u{1b}[31m\u{0}\u{2028}\u{202e}é📤";
        let l = line(
            LogFormat::Json,
            format_args!("📤 Broadcast from {}: {}", log_safe(hostile), hostile),
            &[
                ("addr", Field::Str("10.0.0.7")),
                ("name", Field::Str(hostile)),
            ],
        );
        assert!(l.ends_with("}\n") && l.matches('\n').count() == 1, "{l}");
        let v: serde_json::Value = serde_json::from_str(&l).expect("valid JSON");
        assert_eq!(v["ts"], "2026-12-02T01:25:34.123Z");
        assert_eq!(v["level"], "warn");
        assert_eq!(v["addr"], "10.0.0.7");
        // Fields are escaped as log_safe escapes; the message as its caller wrote it.
        assert_eq!(v["name"], log_safe(hostile).to_string());
        let msg = v["msg"].as_str().unwrap();
        assert!(msg.starts_with(&format!("📤 Broadcast from {}: ", log_safe(hostile))));
        assert!(msg.ends_with(hostile), "{msg:?}");
        // No raw control character reaches the output.
        assert!(!l[..l.len() - 1].chars().any(needs_escape), "{l:?}");
    }

    #[test]
    fn numbers_stay_json_numbers_and_text_lines_leave_fields_out() {
        let fields = [("status", Field::Num(429)), ("addr", Field::Str("::1"))];
        let l = line(LogFormat::Json, format_args!("m"), &fields);
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(
            (v["status"].as_u64(), v["addr"].as_str()),
            (Some(429), Some("::1"))
        );
        let l = line(LogFormat::Text, format_args!("m"), &fields);
        assert_eq!(l, "2026-12-02T01:25:34.123Z [WARN] m\n");
    }

    #[test]
    fn thousands_are_separated_by_commas() {
        for (n, s) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (4312, "4,312"),
            (1_234_567, "1,234,567"),
        ] {
            assert_eq!(thousands(n), s);
        }
    }
}
