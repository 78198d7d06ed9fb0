//! Host facts read from `/proc`: CPU model and flags, memory, CPU load.

/// The host CPU's model name and feature flags (from `/proc/cpuinfo`).
pub fn cpu_info() -> (Option<String>, Vec<String>) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    parse_cpuinfo(&text)
}

fn parse_cpuinfo(text: &str) -> (Option<String>, Vec<String>) {
    let mut model = None;
    let mut flags = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "model name" if model.is_none() => model = Some(value.trim().to_string()),
            "flags" if flags.is_empty() => {
                flags = value.split_whitespace().map(str::to_string).collect()
            }
            _ => {}
        }
        if model.is_some() && !flags.is_empty() {
            break;
        }
    }
    (model, flags)
}

/// `(MemTotal, MemAvailable)` in bytes (from `/proc/meminfo`).
pub fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Aggregate CPU time counters `(busy, total)` in jiffies, from `/proc/stat`.
pub fn cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 4 {
        return None;
    }
    let total: u64 = values.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// CPU utilisation in percent between two `cpu_times` readings.
pub fn cpu_percent(before: (u64, u64), after: (u64, u64)) -> u32 {
    let busy = after.0.saturating_sub(before.0);
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        return 0;
    }
    u32::try_from((busy * 100 + total / 2) / total)
        .unwrap_or(100)
        .min(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_gives_the_model_and_flags() {
        let (model, flags) = parse_cpuinfo(
            "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2\n\nprocessor\t: 1\n",
        );
        assert_eq!(model.as_deref(), Some("AMD EPYC"));
        assert_eq!(flags, ["fpu", "sse2", "avx2"]);
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        assert_eq!(
            parse_meminfo("MemTotal:  2048 kB\nMemFree: 10 kB\nMemAvailable:   1024 kB\n"),
            (2 << 20, 1 << 20)
        );
    }

    #[test]
    fn cpu_percent_counts_busy_over_total() {
        let before = parse_stat("cpu  100 0 100 800 0 0 0 0 0 0\n").unwrap();
        let after = parse_stat("cpu  150 0 150 900 0 0 0 0 0 0\n").unwrap();
        assert_eq!(before, (200, 1000));
        assert_eq!(cpu_percent(before, after), 50);
        assert_eq!(cpu_percent(after, after), 0);
    }
}
