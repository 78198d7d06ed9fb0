//! Following long work: a live progress bar on a terminal, plain lines
//! otherwise (one per phase change, and progress at most every few seconds).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kube::Api;

use crate::api::{HostMaintenance, MaintenancePhase, Migration, MigrationPhase};

use super::output::bytes;

/// How often the object is read again.
const POLL: Duration = Duration::from_millis(500);
/// Least time between two plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(3);

/// Whether a migration phase is final.
pub fn migration_done(phase: MigrationPhase) -> bool {
    matches!(
        phase,
        MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::Cancelled
    )
}

/// One line describing a migration, as both outputs show it.
pub fn migration_line(m: &Migration) -> String {
    let status = m.status.clone().unwrap_or_default();
    let route = format!(
        "{} -> {}",
        status.source_host.as_deref().unwrap_or("?"),
        status
            .target_host
            .as_deref()
            .or(m.spec.target_host.as_deref())
            .unwrap_or("?")
    );
    let mut line = format!("{:?} {route}", status.phase);
    if let Some(p) = &status.progress {
        line.push_str(&format!(
            " {}% {}/{} at {}/s, dirtying {}/s, iteration {}",
            p.percent,
            bytes(p.memory_transferred),
            bytes(p.memory_total),
            bytes(p.throughput),
            bytes(p.dirty_rate),
            p.iteration
        ));
        if let Some(eta) = p.eta_seconds {
            line.push_str(&format!(", ~{eta}s left"));
        }
    }
    if let Some(ms) = status.downtime_ms {
        line.push_str(&format!(", downtime {ms} ms"));
    }
    if let Some(ms) = status.pause_ms {
        line.push_str(&format!(", pause {ms} ms"));
        if let Some(e) = status.pause_error_ms {
            line.push_str(&format!(" ± {e}"));
        }
    }
    if let Some(reason) = &status.failure_reason {
        line.push_str(&format!(" [{reason}]"));
    }
    if let Some(message) = &status.message {
        line.push_str(&format!(": {message}"));
    }
    line
}

/// Follow a migration until it ends or `timeout` passes; returns its last state.
pub async fn follow_migration(
    api: &Api<Migration>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<Migration> {
    let deadline = Instant::now() + timeout;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(100);
        bar.set_style(
            ProgressStyle::with_template("{prefix:.bold} [{bar:30.cyan/blue}] {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(name.to_string());
        bar
    });
    let mut last_line = String::new();
    let mut last_print = Instant::now() - PLAIN_EVERY;
    let mut last_phase = None;
    loop {
        let m = api
            .get(name)
            .await
            .with_context(|| format!("reading migration {name}"))?;
        let phase = m.status.as_ref().map(|s| s.phase).unwrap_or_default();
        let line = migration_line(&m);
        match &bar {
            Some(bar) => {
                bar.set_position(
                    m.status
                        .as_ref()
                        .and_then(|s| s.progress.as_ref())
                        .map_or(0, |p| u64::from(p.percent)),
                );
                bar.set_message(line.clone());
            }
            None => {
                if (last_phase != Some(phase) || last_print.elapsed() >= PLAIN_EVERY)
                    && line != last_line
                {
                    eprintln!("{name}: {line}");
                    last_print = Instant::now();
                    last_line = line.clone();
                }
            }
        }
        last_phase = Some(phase);
        if migration_done(phase) {
            if let Some(bar) = bar {
                bar.finish_with_message(line);
            }
            return Ok(m);
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "gave up waiting for migration {name} after {}s; it goes on",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether a maintenance phase is final for a follower.
pub fn maintenance_done(phase: MaintenancePhase) -> bool {
    matches!(
        phase,
        MaintenancePhase::Planned | MaintenancePhase::Completed | MaintenancePhase::Failed
    )
}

/// Follow a host maintenance until it ends or `timeout` passes.
pub async fn follow_maintenance(
    api: &Api<HostMaintenance>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<HostMaintenance> {
    let deadline = Instant::now() + timeout;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} VMs moved {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(name.to_string());
        bar
    });
    let mut last_line = String::new();
    loop {
        let hm = api
            .get(name)
            .await
            .with_context(|| format!("reading host maintenance {name}"))?;
        let status = hm.status.clone().unwrap_or_default();
        let moved = status.vms_total.saturating_sub(status.vms_remaining);
        let line = format!(
            "{:?}: {moved}/{} moved, {} remaining, {} blocked{}",
            status.phase,
            status.vms_total,
            status.vms_remaining,
            status.vms_blocked,
            status
                .message
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        );
        match &bar {
            Some(bar) => {
                bar.set_length(u64::from(status.vms_total.max(1)));
                bar.set_position(u64::from(moved));
                bar.set_message(format!("{:?}", status.phase));
            }
            None if line != last_line => {
                eprintln!("{name}: {line}");
                last_line = line;
            }
            None => {}
        }
        if maintenance_done(status.phase) {
            if let Some(bar) = bar {
                bar.finish();
            }
            return Ok(hm);
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "gave up waiting for host maintenance {name} after {}s; it goes on",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
