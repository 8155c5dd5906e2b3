//! Reading the guest's console log. The guest writes it, so it is hostile
//! text: only a bounded tail is read, and control characters (terminal escape
//! sequences) are neutralised before a line reaches a log or an error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of the end of the log is read to find the last lines.
const TAIL_BYTES: u64 = 64 * 1024;
/// Longest line kept, in characters; longer ones are cut.
const MAX_LINE_CHARS: usize = 400;

/// The last `n` lines of the file at `path`, sanitised with
/// [`sanitize_line`]. A missing or unreadable file gives no lines.
pub(crate) fn last_lines(path: &Path, n: usize) -> Vec<String> {
    if n == 0 {
        return Vec::new();
    }
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.take(TAIL_BYTES).read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    tail_of(&buf, start > 0, n)
}

/// The last `n` non-empty lines of `buf`; when `cut` the first line may be a
/// fragment and is dropped.
fn tail_of(buf: &[u8], cut: bool, n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(buf);
    let mut lines: Vec<&str> = text.split(['\n', '\r']).collect();
    if cut && !lines.is_empty() {
        lines.remove(0);
    }
    let lines: Vec<String> = lines
        .into_iter()
        .map(sanitize_line)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let skip = lines.len().saturating_sub(n);
    lines.into_iter().skip(skip).collect()
}

/// Makes one line of guest- or backend-written text safe to print: control
/// characters become `\xNN` (so escape sequences cannot drive a terminal),
/// and the line is cut at a bounded length.
pub fn sanitize_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len().min(MAX_LINE_CHARS));
    for (i, c) in line.chars().enumerate() {
        if i == MAX_LINE_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() && c != '\t' {
            out.push_str(&format!("\\x{:02x}", u32::from(c) & 0xff));
        } else {
            out.push(c);
        }
    }
    out
}

/// Formats console lines for an error message.
pub(crate) fn format_tail(lines: &[String]) -> String {
    if lines.is_empty() {
        return "the console log is empty".to_string();
    }
    let mut s = String::from("last console lines:");
    for l in lines {
        s.push_str("\n  | ");
        s.push_str(l);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let buf = b"one\ntwo\r\nthree\n\nfour\n";
        assert_eq!(tail_of(buf, false, 2), vec!["three", "four"]);
        assert_eq!(tail_of(buf, false, 10).len(), 4);
        assert_eq!(tail_of(buf, true, 10), vec!["two", "three", "four"]);
    }

    #[test]
    fn escape_sequences_are_neutralised() {
        assert_eq!(sanitize_line("a\x1b[2Jb"), "a\\x1b[2Jb");
        let long = "x".repeat(10_000);
        assert_eq!(sanitize_line(&long).chars().count(), MAX_LINE_CHARS + 1);
    }

    #[test]
    fn last_lines_reads_only_the_end_of_a_big_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut content = "noise\n".repeat(100_000);
        content.push_str("Kernel panic - not syncing: test\n");
        std::fs::write(&p, content).unwrap();
        let lines = last_lines(&p, 2);
        assert_eq!(lines, vec!["noise", "Kernel panic - not syncing: test"]);
        assert!(last_lines(&dir.path().join("missing"), 3).is_empty());
    }
}
