//! Plugin-provided text made safe to keep, log and show: capped with a visible truncation mark
//! and control characters escaped, so a plugin can neither flood the server's log and the API
//! nor forge log lines (`\n`) or drive a terminal (`ESC[2J`).

use std::borrow::Cow;

/// The most bytes kept of a reason a plugin gives (`reject`) or of a call's error text.
pub const MAX_REASON_BYTES: usize = 1024;

/// `s` with every control character (newlines, carriage returns, escapes, tabs…) written as a
/// Rust-style escape (`\n`, `\u{1b}`), so it stays on one line and inert in a terminal.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// At most `max` bytes of `s` (cut at a character boundary), then `… [N bytes cut]` naming what
/// was dropped; `s` itself if it fits.
pub fn bounded(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let cut = s.floor_char_boundary(max);
    Cow::Owned(cut_mark(&s[..cut], s.len() - cut))
}

fn cut_mark(kept: &str, dropped: usize) -> String {
    format!("{kept}… [{dropped} bytes cut]")
}

/// Plugin text as wasmq keeps and shows it: escaped ([`printable`]), then capped ([`bounded`]).
/// Only the first `max` + 4 bytes are escaped, the rest is cut anyway: escaping grows a control
/// character up to 8 bytes, and a plugin's reason or trap text is as long as its memory (a
/// 60 MiB reason of control characters made ~300 MiB). What lies past them is counted in the
/// mark as it was sent.
pub fn from_plugin(s: &str, max: usize) -> String {
    let (head, rest) = s.split_at(s.floor_char_boundary(max.saturating_add(4)));
    let escaped = printable(head);
    if rest.is_empty() {
        return bounded(&escaped, max).into_owned();
    }
    // `head` has more than `max` bytes (a character has at most 4), so it is cut too.
    let cut = escaped.floor_char_boundary(max);
    cut_mark(&escaped[..cut], escaped.len() - cut + rest.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_is_cut_visibly() {
        assert_eq!(printable("plain text é"), "plain text é");
        assert_eq!(
            printable("x\n2026-11-30 ERROR wasmq::forged: FORGED"),
            "x\\n2026-11-30 ERROR wasmq::forged: FORGED"
        );
        assert_eq!(printable("\u{1b}[2J\r\t"), "\\u{1b}[2J\\r\\t");
        assert_eq!(bounded("short", 10), "short");
        assert_eq!(bounded("abcdef", 3), "abc… [3 bytes cut]");
        // Never splits a character.
        assert_eq!(bounded("ééé", 3), "é… [4 bytes cut]");
        let huge = "r".repeat(3 << 20);
        let kept = from_plugin(&huge, MAX_REASON_BYTES);
        assert!(kept.len() < MAX_REASON_BYTES + 32, "{}", kept.len());
        assert!(kept.ends_with(&format!("[{} bytes cut]", (3 << 20) - MAX_REASON_BYTES)));
        assert!(!from_plugin("a\nb", 100).contains('\n'));
        // Control characters past what is kept are not escaped (nor counted as escaped).
        let controls = from_plugin(&"\u{1}".repeat(1 << 20), 100);
        assert!(controls.starts_with("\\u{1}") && !controls.chars().any(char::is_control));
        assert!(controls.len() < 100 + 32, "{}", controls.len());
        assert!(controls.ends_with(&format!("[{} bytes cut]", 104 * 5 - 100 + (1 << 20) - 104)));
    }
}
