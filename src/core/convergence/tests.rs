use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::core::policy::EffectivePolicy;
use crate::core::time::GIB;

const T0: Timestamp = Timestamp::from_secs(10_000);

fn cfg(mode: ConvergenceMode) -> ConvergenceConfig {
    ConvergenceConfig {
        mode,
        ..EffectivePolicy::default().convergence
    }
}

fn ctx(post_copy: bool) -> Context {
    Context {
        started: T0,
        post_copy_available: post_copy,
    }
}

fn at(secs: u64) -> Timestamp {
    T0.plus(Duration::from_secs(secs))
}

/// A tuning where the initial downtime limit is already set.
fn set() -> Tuning {
    Tuning {
        downtime_limit: Some(Duration::from_millis(300)),
        last_change: Some(T0),
        ..Default::default()
    }
}

/// A guest of `total` bytes, a link of `bw` bytes/s and a guest dirtying
/// `dirty` bytes/s, sampled once a second for `secs` seconds: each
/// iteration re-sends what was dirtied during the previous one.
fn synthetic(total: u64, bw: u64, dirty: u64, secs: u64) -> Vec<ProgressSample> {
    let mut out = Vec::new();
    let (mut transferred, mut remaining, mut iteration) = (0u64, total, 1u64);
    let mut dirtied_this_round = 0u64;
    for t in 1..=secs {
        let sent = bw.min(remaining);
        transferred += sent;
        remaining -= sent;
        dirtied_this_round = (dirtied_this_round + dirty).min(total);
        if remaining == 0 {
            iteration += 1;
            remaining = dirtied_this_round.max(MIB);
            dirtied_this_round = 0;
        }
        out.push(ProgressSample {
            at: at(t),
            iteration,
            total,
            transferred,
            remaining,
            dirty_rate: dirty,
            throughput: bw,
            expected_downtime: Some(Duration::from_millis(remaining * 1000 / bw.max(1))),
            cpu_throttle_percent: 0,
        });
    }
    out
}

/// Recorded-like: QEMU units (`mbps` megabits/s, dirty pages/s of 4 KiB),
/// one sample a second, from a 1 GiB idle guest over a ~880 Mbit/s path.
const IDLE_GUEST: &[(u64, u64, u64, u64, u64, f64)] = &[
    // (t s, dirty-sync-count, transferred, remaining, dirty-pages-rate, mbps)
    (1, 1, 110_100_480, 963_641_344, 0, 880.8),
    (2, 1, 220_200_960, 853_540_864, 0, 880.8),
    (3, 1, 330_301_440, 743_440_384, 0, 880.8),
    (4, 1, 440_401_920, 633_339_904, 0, 880.8),
    (5, 1, 550_502_400, 523_239_424, 0, 880.8),
    (6, 1, 660_602_880, 413_138_944, 0, 880.8),
    (7, 1, 770_703_360, 303_038_464, 120, 880.8),
    (8, 1, 880_803_840, 192_937_984, 118, 879.9),
    (9, 2, 990_904_320, 2_457_600, 121, 881.2),
];

fn from_qemu(rows: &[(u64, u64, u64, u64, u64, f64)]) -> Vec<ProgressSample> {
    rows.iter()
        .map(|(t, it, tr, rem, pages, mbps)| ProgressSample {
            at: at(*t),
            iteration: *it,
            total: GIB,
            transferred: *tr,
            remaining: *rem,
            dirty_rate: pages * 4096,
            throughput: (mbps * 1e6 / 8.0) as u64,
            expected_downtime: None,
            cpu_throttle_percent: 0,
        })
        .collect()
}

#[test]
fn the_first_decision_sets_the_downtime_limit_except_in_legacy() {
    for (mode, want) in [
        (
            ConvergenceMode::MinimalDowntime,
            Action::SetDowntimeLimit(Duration::from_millis(300)),
        ),
        (
            ConvergenceMode::PostCopy,
            Action::SetDowntimeLimit(Duration::from_millis(300)),
        ),
        (
            ConvergenceMode::SuspendWorkloadIfNeeded,
            Action::SetDowntimeLimit(Duration::from_millis(300)),
        ),
        (ConvergenceMode::Legacy, Action::Continue),
    ] {
        let d = decide(&[], &Tuning::default(), &cfg(mode), &ctx(true), T0);
        assert_eq!(d.action, want, "{mode:?}");
        assert!(!d.assessment.converging && !d.assessment.next_step.is_empty());
    }
}

#[test]
fn an_idle_guest_converges_and_is_left_alone() {
    let samples = from_qemu(IDLE_GUEST);
    for mode in [
        ConvergenceMode::MinimalDowntime,
        ConvergenceMode::PostCopy,
        ConvergenceMode::SuspendWorkloadIfNeeded,
    ] {
        for n in 1..=samples.len() {
            let d = decide(
                &samples[..n],
                &set(),
                &cfg(mode),
                &ctx(true),
                samples[n - 1].at,
            );
            assert_eq!(
                d.action,
                Action::Continue,
                "{mode:?} after {n} samples: {d:?}"
            );
            assert!(d.assessment.converging, "{}", d.assessment.explanation);
        }
    }
    let d = decide(
        &samples,
        &set(),
        &cfg(ConvergenceMode::MinimalDowntime),
        &ctx(true),
        at(9),
    );
    let eta = d.assessment.eta.unwrap();
    assert!(eta < Duration::from_secs(1), "{eta:?}");
    assert!(
        d.assessment.explanation.starts_with("converging"),
        "{}",
        d.assessment.explanation
    );
}

#[test]
fn a_guest_dirtying_faster_than_the_link_is_aborted_under_minimal_downtime() {
    let c = ConvergenceConfig {
        progress_timeout: Duration::from_secs(20),
        ..cfg(ConvergenceMode::MinimalDowntime)
    };
    let samples = synthetic(512 * MIB, 32 * MIB, 64 * MIB, 60);
    let mut first_abort = None;
    for n in 1..=samples.len() {
        let d = decide(&samples[..n], &set(), &c, &ctx(true), samples[n - 1].at);
        match d.action {
            Action::Continue => {}
            Action::Abort { reason, .. } => {
                assert_eq!(reason, FailureReason::NotConverging);
                first_abort.get_or_insert(n);
            }
            other => panic!("MinimalDowntime never escalates: {other:?}"),
        }
        if n > 20 {
            assert!(!d.assessment.converging, "{}", d.assessment.explanation);
        }
    }
    // The first round (16 s) is progress; 20 s without a new low follow.
    let n = first_abort.expect("it must give up");
    assert!((36..=40).contains(&n), "aborted after {n} s");
}

#[test]
fn post_copy_mode_switches_when_pre_copy_stalls_or_fails_without_userfaultfd() {
    let c = cfg(ConvergenceMode::PostCopy);
    let samples = synthetic(256 * MIB, 32 * MIB, 64 * MIB, 60);
    let first = |post_copy: bool| {
        (1..=samples.len()).find_map(|n| {
            let d = decide(
                &samples[..n],
                &set(),
                &c,
                &ctx(post_copy),
                samples[n - 1].at,
            );
            (d.action != Action::Continue).then_some((n, d.action))
        })
    };
    let (n, a) = first(true).unwrap();
    assert_eq!(a, Action::StartPostCopy);
    assert_eq!(
        n,
        7 + 30,
        "the last new low is at 7 s; a stall is a step (30 s) without one"
    );
    let (_, a) = first(false).unwrap();
    assert!(
        matches!(
            a,
            Action::Abort {
                reason: FailureReason::PostCopyUnavailable,
                ..
            }
        ),
        "{a:?}"
    );
}

#[test]
fn suspend_workload_climbs_its_ladder_step_by_step_and_ends_paused() {
    let c = ConvergenceConfig {
        progress_timeout: Duration::from_secs(15),
        ..cfg(ConvergenceMode::SuspendWorkloadIfNeeded)
    };
    let samples = synthetic(256 * MIB, 32 * MIB, 64 * MIB, 400);
    let mut tuning = set();
    let mut ladder = Vec::new();
    let mut last_at: Option<Timestamp> = None;
    for n in 1..=samples.len() {
        let now = samples[n - 1].at;
        let d = decide(&samples[..n], &tuning, &c, &ctx(true), now);
        if d.action == Action::Continue {
            continue;
        }
        if let Some(prev) = last_at {
            assert!(now.since(prev) >= step(&c), "escalations spaced by a step");
        }
        last_at = Some(now);
        match &d.action {
            Action::EnableAutoConverge { initial, .. } => {
                (tuning.auto_converge, tuning.throttle_percent) = (true, *initial)
            }
            Action::RaiseThrottle(p) => tuning.throttle_percent = *p,
            Action::SetDowntimeLimit(dt) => tuning.downtime_limit = Some(*dt),
            Action::PauseGuest => tuning.paused = true,
            other => panic!("unexpected {other:?}"),
        }
        tuning.last_change = Some(now);
        ladder.push(d.action.clone());
        if tuning.paused {
            break;
        }
    }
    let ms = Duration::from_millis;
    assert_eq!(
        ladder,
        vec![
            Action::EnableAutoConverge {
                initial: 50,
                increment: 20
            },
            Action::RaiseThrottle(70),
            Action::RaiseThrottle(90),
            Action::RaiseThrottle(99),
            Action::SetDowntimeLimit(ms(600)),
            Action::SetDowntimeLimit(ms(1200)),
            Action::SetDowntimeLimit(ms(2400)),
            Action::SetDowntimeLimit(ms(4800)),
            Action::SetDowntimeLimit(ms(5000)),
            Action::PauseGuest,
        ]
    );
}

/// Measured through `ferry up`: throttled to 99% a guest that paces its
/// writes by the clock still dirtied 7.6 MB/s against 8.3 MB/s on the link,
/// with the same 32 MiB left round after round. The rates say "converging";
/// remaining memory says otherwise.
fn plateau(secs: u64) -> Vec<ProgressSample> {
    (1..=secs)
        .map(|t| ProgressSample {
            at: at(t),
            iteration: t,
            total: 64 * MIB,
            transferred: t * 8_300_000,
            remaining: 32 * MIB,
            dirty_rate: 7_600_000,
            throughput: 8_300_000,
            expected_downtime: None,
            cpu_throttle_percent: 99,
        })
        .collect()
}

#[test]
fn rates_that_look_converging_without_a_new_low_still_escalate() {
    let samples = plateau(60);
    for (mode, want) in [
        (
            ConvergenceMode::SuspendWorkloadIfNeeded,
            Action::EnableAutoConverge {
                initial: THROTTLE_INITIAL,
                increment: THROTTLE_INCREMENT,
            },
        ),
        (ConvergenceMode::PostCopy, Action::StartPostCopy),
    ] {
        let c = cfg(mode);
        let first = (1..=samples.len()).find_map(|n| {
            let d = decide(&samples[..n], &set(), &c, &ctx(true), samples[n - 1].at);
            (d.action != Action::Continue).then_some((n, d))
        });
        let (n, d) = first.unwrap_or_else(|| panic!("{mode:?} never escalated"));
        assert_eq!(d.action, want, "{mode:?}");
        // The first sample is the low; a step without a new one is a stall.
        assert_eq!(at(n as u64).since(at(1)), step(&c), "{mode:?}");
        assert!(!d.assessment.converging, "{}", d.assessment.explanation);
        assert!(
            d.assessment.explanation.starts_with("not converging"),
            "{}",
            d.assessment.explanation
        );
    }
    // Before a step has passed the rates are believed.
    let d = decide(
        &samples[..5],
        &set(),
        &cfg(ConvergenceMode::SuspendWorkloadIfNeeded),
        &ctx(true),
        at(5),
    );
    assert!(d.assessment.converging && d.assessment.eta.is_some());
}

#[test]
fn legacy_keeps_qemu_defaults_and_aborts_at_the_progress_timeout() {
    let c = ConvergenceConfig {
        progress_timeout: Duration::from_secs(20),
        ..cfg(ConvergenceMode::Legacy)
    };
    let samples = synthetic(256 * MIB, 32 * MIB, 64 * MIB, 60);
    let actions: Vec<Action> = (1..=samples.len())
        .map(|n| {
            decide(
                &samples[..n],
                &Tuning::default(),
                &c,
                &ctx(true),
                samples[n - 1].at,
            )
            .action
        })
        .collect();
    assert!(
        actions
            .iter()
            .all(|a| matches!(a, Action::Continue | Action::Abort { .. })),
        "{actions:?}"
    );
    assert!(actions.iter().any(|a| matches!(a, Action::Abort { .. })));
}

/// A stalled link: 5 s of transfer, then `transferred` frozen.
fn stalled() -> Vec<ProgressSample> {
    let mut s = synthetic(GIB, 100 * MIB, 0, 5);
    let last = *s.last().unwrap();
    for t in 6..=60 {
        s.push(ProgressSample {
            at: at(t),
            throughput: 0,
            ..last
        });
    }
    s
}

#[test]
fn a_stalled_link_is_aborted_within_the_stall_timeout_in_every_mode() {
    let samples = stalled();
    for mode in [
        ConvergenceMode::MinimalDowntime,
        ConvergenceMode::PostCopy,
        ConvergenceMode::SuspendWorkloadIfNeeded,
        ConvergenceMode::Legacy,
    ] {
        let c = ConvergenceConfig {
            progress_timeout: Duration::from_secs(20),
            ..cfg(mode)
        };
        let mut aborted = None;
        for n in 1..=samples.len() {
            let now = samples[n - 1].at;
            let d = decide(&samples[..n], &set(), &c, &ctx(true), now);
            match d.action {
                Action::Continue => {}
                Action::Abort {
                    reason: FailureReason::TransferStalled,
                    ..
                } => {
                    aborted.get_or_insert(now);
                }
                other => {
                    panic!("{mode:?}: nothing but abort helps a dead link, got {other:?} at {n}")
                }
            }
        }
        assert_eq!(
            aborted,
            Some(at(25)),
            "{mode:?}: 20 s after the last byte at 5 s"
        );
    }
}

#[test]
fn a_stall_during_post_copy_asks_for_recovery_never_abort() {
    let samples = stalled();
    let tuning = Tuning {
        post_copy: true,
        ..set()
    };
    let c = cfg(ConvergenceMode::PostCopy);
    assert_eq!(
        decide(&samples, &tuning, &c, &ctx(true), at(60)).action,
        Action::RecoverPostCopy
    );
    assert_eq!(
        decide(&samples[..6], &tuning, &c, &ctx(true), at(6)).action,
        Action::Continue
    );
}

#[test]
fn the_completion_deadline_ends_each_mode_its_own_way() {
    // 1 GiB, 150 s per GiB: the deadline is T0 + 150 s.
    let samples = synthetic(GIB, 8 * MIB, 4 * MIB, 160);
    let table = [
        (ConvergenceMode::MinimalDowntime, false, "CompletionTimeout"),
        (ConvergenceMode::Legacy, false, "CompletionTimeout"),
        (ConvergenceMode::PostCopy, false, "StartPostCopy"),
        (
            ConvergenceMode::SuspendWorkloadIfNeeded,
            false,
            "PauseGuest",
        ),
        (
            ConvergenceMode::SuspendWorkloadIfNeeded,
            true,
            "CompletionTimeout",
        ),
    ];
    for (mode, paused, want) in table {
        let tuning = Tuning { paused, ..set() };
        let d = decide(&samples, &tuning, &cfg(mode), &ctx(true), at(160));
        let got = match &d.action {
            Action::Abort { reason, .. } => reason.as_str(),
            Action::StartPostCopy => "StartPostCopy",
            Action::PauseGuest => "PauseGuest",
            other => panic!("{mode:?}: {other:?}"),
        };
        assert_eq!(got, want, "{mode:?} paused={paused}");
    }
}

fn arb_samples() -> impl Strategy<Value = Vec<ProgressSample>> {
    prop::collection::vec((0u64..200, 0u64..200, 0u64..100, any::<bool>()), 1..80).prop_map(
        |steps| {
            let (mut transferred, mut out) = (0u64, Vec::new());
            for (i, (sent, remaining, dirty, freeze)) in steps.into_iter().enumerate() {
                if !freeze {
                    transferred += sent * MIB;
                }
                out.push(ProgressSample {
                    at: at(i as u64 + 1),
                    iteration: 1 + i as u64 / 10,
                    total: GIB,
                    transferred,
                    remaining: remaining * MIB,
                    dirty_rate: dirty * MIB,
                    throughput: sent * MIB,
                    expected_downtime: None,
                    cpu_throttle_percent: 0,
                });
            }
            out
        },
    )
}

proptest! {
    #[test]
    fn decisions_respect_the_safety_rules(
        samples in arb_samples(),
        mode in prop_oneof![Just(ConvergenceMode::MinimalDowntime), Just(ConvergenceMode::PostCopy), Just(ConvergenceMode::SuspendWorkloadIfNeeded), Just(ConvergenceMode::Legacy)],
        post_copy_available: bool,
        in_post_copy: bool,
        extra in 0u64..300,
    ) {
        let tuning = Tuning { post_copy: in_post_copy, ..set() };
        let now = samples.last().unwrap().at.plus(Duration::from_secs(extra));
        let d = decide(&samples, &tuning, &cfg(mode), &ctx(post_copy_available), now);
        if in_post_copy {
            prop_assert!(matches!(d.action, Action::Continue | Action::RecoverPostCopy), "{:?}", d.action);
        }
        if d.action == Action::StartPostCopy {
            prop_assert!(post_copy_available && mode == ConvergenceMode::PostCopy);
        }
        if matches!(d.action, Action::StartPostCopy | Action::PauseGuest) {
            // Only while bytes flow.
            let last_moved = samples.windows(2).filter(|w| w[1].transferred > w[0].transferred).map(|w| w[1].at).next_back().unwrap_or(samples[0].at);
            prop_assert!(now.since(last_moved) <= Duration::from_secs(3));
        }
        if let Action::Abort { message, .. } = &d.action {
            prop_assert!(!message.is_empty());
        }
        prop_assert!(!d.assessment.explanation.is_empty());
    }
}
