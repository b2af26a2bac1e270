//! Log hygiene: client-chosen text is escaped before it reaches a log line.
//!
//! A message such as `"hi\n21:00:00 [WARN] fake"` or one with ANSI escapes would otherwise show
//! up in the log as separate, forged lines, or repaint an operator's terminal. Every value a
//! client chose (message, name, room, reason, header) goes through [`log_safe`] in every log
//! macro at every level.

use std::fmt;

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
}
