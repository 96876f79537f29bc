//! Percentiles and the Markdown table the benchmarks print.

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
}
