//! Judging a host's load series, and estimating what a VM contributes.
//!
//! A series is a step function: each sample's value holds until the next
//! sample. "Over 80% for 2 minutes" means the series covers the whole window
//! `[now - 2m, now]` (a sample at or before its start) and every value in it
//! is over 80%. A series that does not reach back that far proves nothing,
//! so a host that just started reporting is never judged overloaded.

use std::cmp::Ordering;
use std::time::Duration;

use super::snapshot::{HostInfo, LoadSample};
use crate::core::time::Timestamp;

/// The samples that describe `[now - window, now]`: the last sample at or
/// before the window's start and every later one up to `now`. `None` when the
/// series does not reach back to the window's start.
fn window(load: &[LoadSample], window: Duration, now: Timestamp) -> Option<&[LoadSample]> {
    let start = now.minus(window);
    let end = load.partition_point(|s| s.at <= now);
    let first = load[..end].iter().rposition(|s| s.at <= start)?;
    Some(&load[first..end])
}

/// Whether CPU load stayed over `threshold` % for the whole `duration`.
pub fn cpu_over(host: &HostInfo, threshold: u32, duration: Duration, now: Timestamp) -> bool {
    window(&host.load, duration, now)
        .is_some_and(|w| w.iter().all(|s| s.cpu_percent > f64::from(threshold)))
}

/// Whether CPU load stayed under `threshold` % for the whole `duration`.
pub fn cpu_under(host: &HostInfo, threshold: u32, duration: Duration, now: Timestamp) -> bool {
    window(&host.load, duration, now)
        .is_some_and(|w| w.iter().all(|s| s.cpu_percent < f64::from(threshold)))
}

/// Whether free memory stayed under `bytes` for the whole `duration`.
pub fn memory_short(host: &HostInfo, bytes: u64, duration: Duration, now: Timestamp) -> bool {
    window(&host.load, duration, now).is_some_and(|w| w.iter().all(|s| s.free_memory < bytes))
}

/// Whether free memory stayed over `bytes` for the whole `duration`.
pub fn memory_plenty(host: &HostInfo, bytes: u64, duration: Duration, now: Timestamp) -> bool {
    window(&host.load, duration, now).is_some_and(|w| w.iter().all(|s| s.free_memory > bytes))
}

/// The host's CPU load now: the latest sample at or before `now` (0 with
/// no samples). Deliberately not a mean over the window: right after a
/// migration the mean still carries the VM that left, and a projection built
/// on it would let the next placement overshoot.
pub fn cpu_now(host: &HostInfo, now: Timestamp) -> f64 {
    let end = host.load.partition_point(|s| s.at <= now);
    host.load[..end].last().map_or(0.0, |s| s.cpu_percent)
}

/// The share (percentage points of `host`) that one VM of `vm_cpus` vCPUs
/// contributes, assuming the host's load is spread over its VMs in
/// proportion to their vCPUs. Without VMs on the host (an unplaced VM), the
/// VM is assumed to keep its vCPUs fully busy.
pub fn vm_share(host_load: f64, host_cpus: u32, vcpus_on_host: u32, vm_cpus: u32) -> f64 {
    if vcpus_on_host == 0 {
        return 100.0 * f64::from(vm_cpus) / f64::from(host_cpus.max(1));
    }
    host_load * f64::from(vm_cpus) / f64::from(vcpus_on_host)
}

/// Translate a share of a host of `from_cpus` CPUs into percentage points of
/// a host of `to_cpus` CPUs.
pub fn rescale(share: f64, from_cpus: u32, to_cpus: u32) -> f64 {
    share * f64::from(from_cpus.max(1)) / f64::from(to_cpus.max(1))
}

/// Compare two agent/hypervisor versions: dotted numbers (a leading `v`
/// and any `-suffix`/`+build` ignored) compared number by number; versions
/// that are not numeric compare as text.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn parse(v: &str) -> Option<Vec<u64>> {
        let core = v.trim().trim_start_matches('v');
        let core = core.split(['-', '+']).next().unwrap_or(core);
        core.split('.').map(|p| p.parse::<u64>().ok()).collect()
    }
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => {
            let len = x.len().max(y.len());
            let pad = |v: &Vec<u64>, i: usize| v.get(i).copied().unwrap_or(0);
            (0..len)
                .map(|i| pad(&x, i).cmp(&pad(&y, i)))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        }
        _ => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::scheduler::testkit::host;

    fn series(points: &[(i64, f64)]) -> Vec<LoadSample> {
        points
            .iter()
            .map(|(t, c)| LoadSample {
                at: Timestamp::from_secs(*t),
                cpu_percent: *c,
                free_memory: 0,
            })
            .collect()
    }

    #[test]
    fn overload_needs_every_sample_of_the_whole_window_over_the_threshold() {
        let d = Duration::from_secs(120);
        let now = Timestamp::from_secs(200);
        let table: &[(&[(i64, f64)], bool)] = &[
            (&[(60, 90.0), (120, 95.0), (180, 85.0)], true),
            (&[(60, 90.0), (120, 79.0), (180, 85.0)], false),
            // The sample at 70 holds from 70: the window starts at 80.
            (&[(70, 90.0), (130, 95.0)], true),
            // The series starts inside the window: not enough evidence.
            (&[(100, 99.0), (150, 99.0)], false),
            // A sample before the window's last pre-start sample does not count.
            (&[(10, 10.0), (80, 90.0), (190, 90.0)], true),
            // Samples after `now` are ignored.
            (&[(60, 90.0), (210, 10.0)], true),
            (&[], false),
        ];
        for (points, want) in table {
            let mut h = host("h");
            h.load = series(points);
            assert_eq!(cpu_over(&h, 80, d, now), *want, "{points:?}");
        }
    }

    #[test]
    fn underload_mirrors_overload() {
        let mut h = host("h");
        h.load = series(&[(0, 5.0), (100, 10.0)]);
        assert!(cpu_under(
            &h,
            20,
            Duration::from_secs(120),
            Timestamp::from_secs(150)
        ));
        h.load = series(&[(0, 5.0), (100, 30.0)]);
        assert!(!cpu_under(
            &h,
            20,
            Duration::from_secs(120),
            Timestamp::from_secs(150)
        ));
    }

    #[test]
    fn current_load_is_the_latest_sample_not_after_now() {
        let mut h = host("h");
        h.load = series(&[(0, 90.0), (100, 40.0), (150, 60.0)]);
        assert_eq!(cpu_now(&h, Timestamp::from_secs(120)), 40.0);
        assert_eq!(cpu_now(&h, Timestamp::from_secs(1000)), 60.0);
        h.load.clear();
        assert_eq!(cpu_now(&h, Timestamp::from_secs(1000)), 0.0);
    }

    #[test]
    fn a_vm_share_is_proportional_to_its_vcpus_and_rescales_by_host_size() {
        assert_eq!(vm_share(60.0, 8, 12, 4), 20.0);
        assert_eq!(vm_share(0.0, 8, 0, 2), 25.0);
        assert_eq!(rescale(20.0, 8, 16), 10.0);
    }

    #[test]
    fn versions_compare_numerically() {
        use Ordering::*;
        let table = [
            ("1.10.0", "1.9.9", Greater),
            ("v1.2", "1.2.0", Equal),
            ("1.2.0-rc1", "1.2.0", Equal),
            ("2", "10", Less),
            ("abc", "abd", Less),
        ];
        for (a, b, want) in table {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
        }
    }
}

#[cfg(test)]
mod flat_copy_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::core::scheduler::Snapshot;
    use crate::core::scheduler::testkit::host;

    proptest! {
        #[test]
        fn the_flat_copy_judges_a_series_exactly_like_the_series_itself(
            points in prop::collection::vec((0i64..30, 0.0f64..100.0), 0..20),
            threshold in 0u32..100,
            window in 0u64..300,
            now in 0i64..400,
        ) {
            let mut t = 0;
            let mut h = host("h");
            h.load = points.iter().map(|(dt, cpu)| {
                t += dt * 10;
                LoadSample { at: Timestamp::from_secs(t), cpu_percent: *cpu, free_memory: 0 }
            }).collect();
            let s = Snapshot::new(vec![host("other"), h.clone()], vec![], vec![]);
            let (d, now) = (Duration::from_secs(window), Timestamp::from_secs(now));
            prop_assert_eq!(s.cpu_over(1, threshold, d, now), cpu_over(&h, threshold, d, now));
            prop_assert_eq!(s.cpu_under(1, threshold, d, now), cpu_under(&h, threshold, d, now));
        }
    }
}
