//! Percentiles, the Markdown table the benchmarks print, and how a part
//! that failed is told.

use std::time::Duration;

/// The `p`-th percentile (0..=100) by nearest rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// A Markdown table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}

/// One client's p50 latency on each side, the first the bare server, and
/// what each proxy adds to it.
pub fn added_latency_table(sides: &[&str], p50s: &[Duration]) -> String {
    let us = |d: Duration| format!("{} µs", d.as_micros());
    let bare = p50s.first().copied().unwrap_or_default();
    let mut header: Vec<String> = sides.iter().map(|s| s.to_string()).collect();
    header.push(format!("added: {}", sides[1..].join(" / ")));
    let mut row: Vec<String> = p50s.iter().map(|d| us(*d)).collect();
    row.push(
        p50s[1..]
            .iter()
            .map(|d| us(d.saturating_sub(bare)))
            .collect::<Vec<_>>()
            .join(" / "),
    );
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&header, &[row])
}

/// Why a part was not measured, as the report says it: the first line as
/// a sentence, and any log it carries in a block, without terminal colours.
pub fn not_measured(why: &str) -> String {
    let plain = without_colours(why);
    match plain.split_once('\n') {
        Some((first, log)) if !log.trim().is_empty() => {
            format!(
                "\nNot measured: {first}\n\n```text\n{}\n```\n",
                log.trim_end()
            )
        }
        _ => format!("\nNot measured: {}\n", plain.trim_end()),
    }
}

/// `s` without ANSI escape sequences (`ESC [ ... letter`).
fn without_colours(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&s[..1], 99.0), Duration::from_millis(1));
    }

    #[test]
    fn a_failure_with_a_log_reads_as_a_sentence_and_a_plain_block() {
        let why = "rouse-control exited before it was ready; its log ends with:\n\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m started\n";
        assert_eq!(
            not_measured(why),
            "\nNot measured: rouse-control exited before it was ready; its log ends with:\n\n```text\n2026  INFO started\n```\n"
        );
        assert_eq!(not_measured("not run"), "\nNot measured: not run\n");
    }
}
