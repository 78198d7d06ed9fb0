//! QEMU's self-announce: after switchover the target sends RARP (or asks a
//! virtio-net guest with `GUEST_ANNOUNCE` for gratuitous ARP) so that the
//! bridges between the client and the VM re-learn where its MAC lives.
//!
//! QEMU reads the `announce-*` migration parameters on the *incoming* side
//! (QEMU-FACTS / issue 9: with `announce-rounds 0` on the target, traffic
//! kept going to the dead source for seconds), so the target sets them
//! before `migrate-incoming`; the agent sends `announce-self` once more after
//! the target runs, in case a bridge on the way dropped the first rounds.

use serde::Serialize;

use crate::agent::qmp::{Command, Empty, Qmp};

/// The announce timing, ms and rounds. The default is QEMU's own (50 ms
/// first, +100 ms per round, at most 550 ms, 5 rounds): ~1.25 s of
/// announcements, the first 50 ms after the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Announce {
    /// Delay before the first round, ms.
    pub initial: u64,
    /// Longest delay between rounds, ms.
    pub max: u64,
    /// Number of rounds (0 disables the announce).
    pub rounds: u64,
    /// Added to the delay after each round, ms.
    pub step: u64,
}

impl Default for Announce {
    fn default() -> Announce {
        Announce {
            initial: 50,
            max: 550,
            rounds: 5,
            step: 100,
        }
    }
}

/// `migrate-set-parameters` with only the `announce-*` parameters: set on
/// the target before `migrate-incoming`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SetAnnounceParameters {
    /// `announce-initial`.
    #[serde(rename = "announce-initial")]
    pub initial: u64,
    /// `announce-max`.
    #[serde(rename = "announce-max")]
    pub max: u64,
    /// `announce-rounds`.
    #[serde(rename = "announce-rounds")]
    pub rounds: u64,
    /// `announce-step`.
    #[serde(rename = "announce-step")]
    pub step: u64,
}

impl From<Announce> for SetAnnounceParameters {
    fn from(a: Announce) -> SetAnnounceParameters {
        SetAnnounceParameters {
            initial: a.initial,
            max: a.max,
            rounds: a.rounds,
            step: a.step,
        }
    }
}

impl Command for SetAnnounceParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Response = Empty;
}

/// `announce-self` with its (mandatory) timing: QEMU rejects the command
/// without `initial`, `max`, `rounds` and `step`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AnnounceSelf(pub Announce);

impl Command for AnnounceSelf {
    const NAME: &'static str = "announce-self";
    type Response = Empty;
}

/// Sends `announce-self` with QEMU's default timing on `qmp`, for the
/// host where the guest now runs (`where_` says which, in the log). A
/// failure is logged, not returned: the guest's own traffic teaches the
/// bridges too, only later.
pub async fn announce_self(qmp: &Qmp, where_: &str) {
    if let Err(e) = qmp.execute(&AnnounceSelf(Announce::default())).await {
        tracing::warn!(error = %e, "announce-self on {where_} failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_names_are_qemus() {
        let set = serde_json::to_value(SetAnnounceParameters::from(Announce::default())).unwrap();
        assert_eq!(
            set,
            serde_json::json!({"announce-initial": 50, "announce-max": 550,
                "announce-rounds": 5, "announce-step": 100})
        );
        let announce = serde_json::to_value(AnnounceSelf(Announce::default())).unwrap();
        assert_eq!(
            announce,
            serde_json::json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})
        );
    }
}
