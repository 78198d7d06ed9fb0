//! VM networks on the host: a tap device per NIC on the bridge mapped to
//! the NIC's network, and the L2 segment that joins the hosts' bridges.
//!
//! ```text
//!   host A (netns or machine)            host B
//!   ┌────────────────────────┐           ┌────────────────────────┐
//!   │ QEMU ─ tap fy…n0 ─┐    │           │    ┌─ tap fy…n0 ─ QEMU  │  (target, same MAC)
//!   │              br-ferry ─┼── segment ┼─ br-ferry              │
//!   └────────────────────────┘     │     └────────────────────────┘
//!                               client
//! ```
//!
//! A VM's MAC is stable ([`crate::agent::daemon::machine::effective_mac`])
//! and its tap name is derived from the VM alone ([`tap_name`]), so source
//! and target of a migration each create the same-named tap on their own
//! host's bridge. The agent opens each tap and QEMU inherits it
//! ([`TapHandle`]), so the target agent can announce the guest from its tap
//! the moment the source stops it, before QEMU could; after switchover
//! QEMU's self-announce (RARP from the target, read from the target's
//! `announce-*` parameters) and the guest's own traffic keep the bridges
//! right. The source QEMU is quit and its tap removed by [`sweep_taps`].
//!
//! Tap names are the same on every host, so each host needs its own network
//! namespace (or machine) — agents sharing one namespace must not map
//! networks.
//!
//! Networks without a bridge mapping keep QEMU's user networking (no tap):
//! the VM boots, but its address is not reachable from outside and does not
//! move.

mod announce;
mod handle;
mod segment;
mod tap;

pub use announce::{Announce, AnnounceSelf, SetAnnounceParameters, announce_self};
pub use handle::{TapHandle, parse_mac, rarp_frame};

pub use segment::{Segment, SegmentError, enter};
pub use tap::{
    BridgeMap, NetError, TAP_PREFIX, attach_taps, delete_tap, ensure_tap, list_taps, prepare_taps,
    sweep_taps, tap_name,
};
