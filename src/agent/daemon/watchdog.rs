//! The fencing watchdog: a process apart from the agent that stops the
//! host's VMs when the agent has not renewed the host's Lease for
//! `fenceAfter`.
//!
//! ```text
//!  agent ── renews Lease ──► touch <state>/heartbeat ("<fenceAfter ms>")
//!  watchdog (own process, own session) every 250 ms:
//!     age(heartbeat) > fenceAfter  ──► SIGKILL every QEMU in <state>/vms/*/qemu.pid
//!     heartbeat says "stop"        ──► exit (clean agent shutdown)
//! ```
//!
//! It is what makes evacuation safe when the agent itself is dead on a host
//! that is cut off: the controller waits `evacuateAfter` (longer than
//! `fenceAfter`) before it rebuilds the VMs elsewhere, and by then this
//! process has killed them here. An agent that restarts within `fenceAfter`
//! touches the heartbeat again and keeps its VMs. Only one watchdog runs per
//! state directory (an exclusive lock on `<state>/watchdog.lock`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

/// How often the watchdog looks.
const POLL: Duration = Duration::from_millis(250);
/// What the heartbeat holds when the agent shut down on purpose.
const STOP: &str = "stop";

/// The heartbeat file of a state directory.
pub fn heartbeat_path(state_dir: &Path) -> PathBuf {
    state_dir.join("heartbeat")
}

/// Record a successful Lease renewal: the watchdog allows `fence_after`
/// from now.
pub fn touch(state_dir: &Path, fence_after: Duration) -> std::io::Result<()> {
    touch_at(state_dir, fence_after, SystemTime::now())
}

/// Record a successful Lease renewal whose request was *sent* at `sent`:
/// the heartbeat carries that time, so the watchdog's count starts no later
/// than the renewal the API server accepted (a slow reply can only make it
/// fence earlier, never later).
pub fn touch_at(state_dir: &Path, fence_after: Duration, sent: SystemTime) -> std::io::Result<()> {
    let path = heartbeat_path(state_dir);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, fence_after.as_millis().to_string())?;
    File::options().write(true).open(&tmp)?.set_modified(sent)?;
    std::fs::rename(tmp, path)
}

/// Tell the watchdog the agent stopped on purpose (it exits).
pub fn stand_down(state_dir: &Path) -> std::io::Result<()> {
    std::fs::write(heartbeat_path(state_dir), STOP)
}

/// What the watchdog should do, from the heartbeat's content and age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The agent renewed in time (or has not started yet).
    Wait,
    /// The agent has not renewed for longer than it allowed: fence.
    Fence,
    /// The agent stood the watchdog down.
    Exit,
}

/// The pure rule: fence when the heartbeat is older than the allowance it
/// carries.
pub fn judge(content: Option<&str>, age: Duration) -> Verdict {
    match content.map(str::trim) {
        None => Verdict::Wait,
        Some(STOP) => Verdict::Exit,
        Some(ms) => match ms.parse::<u64>() {
            Ok(ms) if age > Duration::from_millis(ms) => Verdict::Fence,
            _ => Verdict::Wait,
        },
    }
}

/// Kill every QEMU whose pid file is under `state_dir/vms`; returns how many.
pub fn fence(state_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(state_dir.join("vms")) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let pid_file = entry.path().join("qemu.pid");
        let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        if crate::agent::qemu::pid_alive(pid)
            && nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        {
            tracing::warn!(pid, vm = %entry.file_name().to_string_lossy(), "fenced: killed QEMU");
            killed += 1;
        }
    }
    killed
}

/// Run the watchdog for `state_dir` until the agent stands it down. Returns
/// at once if another watchdog holds the lock.
pub fn run(state_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let lock = File::create(state_dir.join("watchdog.lock"))?;
    let _lock = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err(_) => return Ok(()),
    };
    let heartbeat = heartbeat_path(state_dir);
    loop {
        let content = std::fs::read_to_string(&heartbeat).ok();
        let age = std::fs::metadata(&heartbeat)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        match judge(content.as_deref(), age) {
            Verdict::Wait => {}
            Verdict::Exit => return Ok(()),
            Verdict::Fence => {
                fence(state_dir);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Whether a watchdog already guards `state_dir`.
pub fn is_running(state_dir: &Path) -> bool {
    let Ok(lock) = File::create(state_dir.join("watchdog.lock")) else {
        return false;
    };
    Flock::lock(lock, FlockArg::LockExclusiveNonblock).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_fences_only_after_the_allowance() {
        assert_eq!(judge(None, Duration::from_secs(999)), Verdict::Wait);
        assert_eq!(judge(Some("30000"), Duration::from_secs(29)), Verdict::Wait);
        assert_eq!(
            judge(Some("30000"), Duration::from_secs(31)),
            Verdict::Fence
        );
        assert_eq!(judge(Some("stop"), Duration::from_secs(999)), Verdict::Exit);
        assert_eq!(
            judge(Some("garbage"), Duration::from_secs(999)),
            Verdict::Wait
        );
    }

    #[test]
    fn a_heartbeat_is_dated_when_the_renewal_was_sent() {
        let dir = tempfile::tempdir().unwrap();
        let sent = SystemTime::now() - Duration::from_secs(7);
        touch_at(dir.path(), Duration::from_secs(5), sent).unwrap();
        let age = SystemTime::now()
            .duration_since(
                std::fs::metadata(heartbeat_path(dir.path()))
                    .unwrap()
                    .modified()
                    .unwrap(),
            )
            .unwrap();
        assert!(age >= Duration::from_secs(7), "{age:?}");
        let content = std::fs::read_to_string(heartbeat_path(dir.path())).unwrap();
        assert_eq!(
            judge(Some(&content), age),
            Verdict::Fence,
            "a slow renewal counts from when it was sent"
        );
    }

    #[test]
    fn a_touched_heartbeat_is_fresh_and_a_stood_down_one_exits() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), Duration::from_secs(5)).unwrap();
        let content = std::fs::read_to_string(heartbeat_path(dir.path())).unwrap();
        assert_eq!(judge(Some(&content), Duration::ZERO), Verdict::Wait);
        stand_down(dir.path()).unwrap();
        let content = std::fs::read_to_string(heartbeat_path(dir.path())).unwrap();
        assert_eq!(judge(Some(&content), Duration::ZERO), Verdict::Exit);
    }
}
