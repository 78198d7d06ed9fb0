//! The agent's tap management in a real network namespace: a tap per VM
//! NIC joins the mapped bridge, a missing bridge is named, and the sweep
//! removes exactly the Ferry taps no QEMU uses. Root only.

mod net_support;

use std::collections::BTreeSet;
use std::process::Command;

use ferry::agent::net::{self, BridgeMap, NetError};
use ferry::agent::qemu::{Boot, MachineSpec, NicSpec};
use net_support::{in_ns, segment};

fn master_of(ns: &str, link: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", link])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "master")
        .map(|i| words[i + 1].to_string())
}

#[test]
fn taps_join_the_mapped_bridge_and_the_sweep_removes_unused_ones() {
    let seg = segment("taps");
    let ns = seg.host_ns("a").unwrap().to_string();
    let bridges = BridgeMap::parse(&["default=br-ferry", "lost=br-nowhere"]).unwrap();
    let (spec, missing, swept, left) = in_ns(&ns, move || {
        let mut spec = MachineSpec::new("default.web", 64, Boot::Disk);
        for mac in ["52:54:00:00:00:01", "52:54:00:00:00:02"] {
            spec.nics.push(NicSpec {
                mac: mac.into(),
                tap: None,
            });
        }
        let networks = ["default".to_string(), "other".to_string()];
        net::prepare_taps(&mut spec, &networks, &bridges).unwrap();
        // Idempotent: an existing tap is reused.
        net::prepare_taps(&mut spec, &networks, &bridges).unwrap();
        let mut lost = MachineSpec::new("default.lost", 64, Boot::Disk);
        lost.nics.push(NicSpec {
            mac: "52:54:00:00:00:03".into(),
            tap: None,
        });
        let missing = net::prepare_taps(&mut lost, &["lost".to_string()], &bridges);
        // A stale tap of a VM that no longer runs here.
        let stale = net::tap_name("default.gone", 0);
        net::ensure_tap(&stale, "br-ferry", "default").unwrap();
        let keep: BTreeSet<String> = spec.nics.iter().filter_map(|n| n.tap.clone()).collect();
        let swept = net::sweep_taps(&keep).unwrap();
        let left = net::list_taps().unwrap();
        (spec, missing, swept, left)
    })
    .join()
    .unwrap();
    let tap = net::tap_name("default.web", 0);
    assert_eq!(spec.nics[0].tap.as_deref(), Some(tap.as_str()));
    assert_eq!(
        spec.nics[1].tap, None,
        "unmapped network keeps user networking"
    );
    assert_eq!(master_of(&ns, &tap).as_deref(), Some("br-ferry"));
    match missing {
        Err(NetError::BridgeMissing { network, bridge }) => {
            assert_eq!((network.as_str(), bridge.as_str()), ("lost", "br-nowhere"));
        }
        other => panic!("expected BridgeMissing, got {other:?}"),
    }
    assert_eq!(swept, vec![net::tap_name("default.gone", 0)]);
    assert_eq!(left, vec![tap]);
}
