//! The network of `ferry up` when run as root: one network namespace per
//! host, with two networks in it.
//!
//! ```text
//!  root namespace                          ferry-<id>-host-1                     ferry-<id>-sw (switch)
//!  ┌────────────────────────────┐          ┌───────────────────────────────┐     ┌────────────────────┐
//!  │ API server 127.0.0.1:PORT  │          │ eth0 10.77.S.11/24 (agent)    │     │                    │
//!  │ forwarder 10.77.S.1:PORT ┐ │  veth    │ relay :7443, API via .1:PORT  │     │  h0 ─┐             │
//!  │ bridge fbr-<id> 10.77.S.1◄┼─┼fv-<id>-1─┤                               │veth │      ├─ bridge sw  │
//!  │                          └─┼fv-<id>-2┐│ br-ferry ── uplink ───────────┼─────┼──────┘   │   │     │
//!  └────────────────────────────┘         ││   └ taps fy…n0 of the VMs     │     │  h1 ─────┘   c0    │
//!                                         │└───────────────────────────────┘     └──────────────┼─────┘
//!                                         └► ferry-<id>-host-2: the same (…12, h1)               │ veth
//!                                                              ferry-<id>-cl (client): eth0 10.78.0.1/24
//! ```
//!
//! * **Management network** (`10.77.S.0/24`): each host's `eth0` on the
//!   bridge `fbr-<id>` in the root namespace. The agents reach the API
//!   server through it (a forwarder on the bridge address when the server
//!   listens on loopback) and each other's relays (migration streams).
//!   Cutting a host off is `ip -n ferry-<id>-host-N link set eth0 down`:
//!   its agent then reaches neither the API server nor the other agents.
//! * **VM network** `default` (`10.78.0.0/24`): in each host namespace a
//!   bridge `br-ferry` ([`VM_BRIDGE`]) whose `uplink` joins the switch
//!   namespace; the client namespace `ferry-<id>-cl` is on the same L2
//!   segment with address [`CLIENT_CIDR`]. Each agent runs with `--network
//!   default=br-ferry`, so a VM's NIC on network `default` gets a tap on
//!   its host's `br-ferry`, and its MAC and static IP are reachable from the
//!   client namespace wherever the VM runs (`ip netns exec ferry-<id>-cl
//!   ping 10.78.0.101`). This part is [`crate::agent::net::Segment`], built
//!   with the prefix `ferry-<id>`. The segment is isolated from the root
//!   namespace, so every instance may use the same VM subnet.
//!
//! `<id>` is six hex digits of a hash of the data directory's path, so two
//! `ferry up` on different data directories (parallel tests) never share a
//! name. The subnet number `S` is chosen free among the root namespace's
//! addresses under a machine-wide lock and remembered in the data directory
//! (`network.json`), so a restart gets the same addresses. A restart after
//! `ferry up` itself was killed finds the whole network still in place and
//! keeps it (the adopted QEMUs' taps stay on their bridges); otherwise
//! leftovers are removed and everything is built again. Everything is
//! created with `ip` (iproute2) and removed by deleting the namespaces
//! (which deletes the veth pairs, bridges and taps inside) and the root
//! bridge.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The first two octets of every `ferry up` subnet.
const PREFIX: [u8; 2] = [10, 77];
/// Host `i` (1-based) gets `10.77.S.(HOST_OFFSET + i)`.
const HOST_OFFSET: u8 = 10;
/// Serialises subnet choice between `ferry up` instances on one machine.
const SUBNET_LOCK: &str = "/run/ferry-up-subnets.lock";
/// The VM network every agent maps (`--network default=br-ferry`).
pub const VM_NETWORK: &str = "default";
/// The bridge of the VM network in every host namespace.
pub const VM_BRIDGE: &str = "br-ferry";
/// The VM network's subnet (isolated in the instance's namespaces).
pub const VM_SUBNET: &str = "10.78.0.0/24";
/// The client namespace's address on the VM network.
pub const CLIENT_CIDR: &str = "10.78.0.1/24";
/// Demo VM `i` (1-based) gets `10.78.0.(VM_OFFSET + i)`.
const VM_OFFSET: u8 = 100;

/// Failure to build or remove the network.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `ip` could not be run at all.
    #[error("running `ip {args}` (is iproute2 installed?)")]
    Spawn {
        /// The arguments.
        args: String,
        /// The cause.
        source: std::io::Error,
    },
    /// `ip` refused.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// The arguments.
        args: String,
        /// What `ip` said.
        stderr: String,
    },
    /// The VM network's segment.
    #[error("building the VM network")]
    Segment(#[from] crate::agent::net::SegmentError),
    /// Every 10.77.S.0/24 is in use.
    #[error("no free subnet 10.77.S.0/24 left in the root network namespace")]
    NoSubnet,
    /// The lock or the remembered network could not be read or written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The names and addresses of one `ferry up`'s network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Six hex digits naming this instance.
    pub id: String,
    /// The third octet of the subnet.
    pub subnet: u8,
    /// How many hosts.
    pub hosts: u32,
}

impl Network {
    /// The bridge in the root namespace (≤ 15 characters).
    pub fn bridge(&self) -> String {
        format!("fbr-{}", self.id)
    }
    /// The bridge's address: the hosts reach the API server here.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], self.subnet, 1)
    }
    /// The subnet, `10.77.S.0/24`.
    pub fn cidr(&self) -> String {
        format!("{}.{}.{}.0/24", PREFIX[0], PREFIX[1], self.subnet)
    }
    /// The namespace of host `i` (1-based).
    pub fn namespace(&self, i: u32) -> String {
        namespace_name(&self.id, i)
    }
    /// The root-namespace end of host `i`'s veth pair.
    pub fn veth(&self, i: u32) -> String {
        format!("fv-{}-{i}", self.id)
    }
    /// Host `i`'s address inside its namespace.
    pub fn address(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::new(
            PREFIX[0],
            PREFIX[1],
            self.subnet,
            HOST_OFFSET.saturating_add(i as u8),
        )
    }
    /// Every host namespace's name.
    pub fn namespaces(&self) -> Vec<String> {
        (1..=self.hosts).map(|i| self.namespace(i)).collect()
    }
    /// The prefix of the VM network's [`crate::agent::net::Segment`].
    pub fn segment_prefix(&self) -> String {
        format!("ferry-{}", self.id)
    }
    /// The client namespace: on the VM network, reaches the VMs' addresses.
    pub fn client_namespace(&self) -> String {
        client_namespace_name(&self.id)
    }
    /// The switch namespace joining the hosts' VM bridges and the client.
    pub fn switch_namespace(&self) -> String {
        format!("ferry-{}-sw", self.id)
    }
    /// The client namespace's address on the VM network.
    pub fn client_address(&self) -> Ipv4Addr {
        cidr_address(CLIENT_CIDR)
    }
    /// Every namespace of the instance: hosts, switch, client.
    pub fn all_namespaces(&self) -> Vec<String> {
        let mut all = self.namespaces();
        all.push(self.switch_namespace());
        all.push(self.client_namespace());
        all
    }
}

/// The client namespace of instance `id`.
pub fn client_namespace_name(id: &str) -> String {
    format!("ferry-{id}-cl")
}

/// The address of a `a.b.c.d/len` constant.
fn cidr_address(cidr: &str) -> Ipv4Addr {
    cidr.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// The VM network address of demo VM `i` (1-based), with its prefix:
/// `10.78.0.(100 + i)/24`.
pub fn demo_vm_cidr(i: u32) -> String {
    let base = cidr_address(VM_SUBNET).octets();
    let host = VM_OFFSET.saturating_add(u8::try_from(i).unwrap_or(u8::MAX));
    format!("{}.{}.{}.{host}/24", base[0], base[1], base[2])
}

/// The namespace of host `i` of instance `id`.
pub fn namespace_name(id: &str, i: u32) -> String {
    format!("ferry-{id}-host-{i}")
}

/// The instance id of a data directory: FNV-1a of its absolute path, six
/// hex digits (stable across builds).
pub fn instance_id(data_dir: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:06x}", h & 0xff_ffff)
}

/// Whether namespaces can be used: root, and `ip` runs.
pub fn available() -> bool {
    nix::unistd::geteuid().is_root()
        && Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetnsError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetnsError::Ip {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The subnets 10.77.S.0/24 in use in the root namespace, from
/// `ip -o -4 addr show` output.
pub fn used_subnets(ip_addr_output: &str) -> Vec<u8> {
    ip_addr_output
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            let addr: Ipv4Addr = words.next()?.split('/').next()?.parse().ok()?;
            let o = addr.octets();
            (o[0] == PREFIX[0] && o[1] == PREFIX[1]).then_some(o[2])
        })
        .collect()
}

/// The first free subnet number, preferring `preferred` when it is free.
pub fn pick_subnet(used: &[u8], preferred: Option<u8>) -> Option<u8> {
    if let Some(p) = preferred.filter(|p| !used.contains(p) && *p != 0) {
        return Some(p);
    }
    (1..=254u8).find(|s| !used.contains(s))
}

/// Build the network for `hosts` hosts of the instance `id`, reusing the
/// subnet remembered in `state_file` when it is still free. A complete
/// network left by an earlier run that was killed is kept as it is
/// (returned with `true`); otherwise its leftovers are removed first.
pub fn setup(id: &str, hosts: u32, state_file: &Path) -> Result<(Network, bool), NetnsError> {
    let lock_file = std::fs::File::create(SUBNET_LOCK).map_err(|source| NetnsError::Io {
        what: format!("opening {SUBNET_LOCK}"),
        source,
    })?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(
        |(_, e)| NetnsError::Io {
            what: format!("locking {SUBNET_LOCK}"),
            source: e.into(),
        },
    )?;
    let remembered = std::fs::read_to_string(state_file)
        .ok()
        .and_then(|s| serde_json::from_str::<Network>(&s).ok());
    if let Some(net) = remembered.as_ref()
        && net.id == id
        && net.hosts == hosts
        && intact(net)
    {
        return Ok((net.clone(), true));
    }
    teardown_instance(id);
    let remembered = remembered.map(|n| n.subnet);
    let used = used_subnets(&ip(&["-o", "-4", "addr", "show"])?);
    let subnet = pick_subnet(&used, remembered).ok_or(NetnsError::NoSubnet)?;
    let net = Network {
        id: id.to_string(),
        subnet,
        hosts,
    };
    let json = serde_json::to_string_pretty(&net).unwrap_or_default();
    std::fs::write(state_file, json).map_err(|source| NetnsError::Io {
        what: format!("writing {}", state_file.display()),
        source,
    })?;
    if let Err(e) = build(&net) {
        teardown(&net);
        return Err(e);
    }
    Ok((net, false))
}

/// Whether everything of `net` exists: its namespaces, the root bridge with
/// the gateway address, and each host's veth (left by a `ferry up` that
/// was killed).
fn intact(net: &Network) -> bool {
    let namespaces = list_namespaces();
    let links = list_links();
    let addresses = ip(&["-o", "-4", "addr", "show", "dev", &net.bridge()]).unwrap_or_default();
    net.all_namespaces().iter().all(|n| namespaces.contains(n))
        && (1..=net.hosts).all(|i| links.contains(&net.veth(i)))
        && addresses.contains(&format!("inet {}/24", net.gateway()))
}

fn build(net: &Network) -> Result<(), NetnsError> {
    // The VM network first: it creates the host namespaces.
    let hosts: Vec<String> = (1..=net.hosts).map(super::layout::host_name).collect();
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let segment = crate::agent::net::Segment::create(
        &net.segment_prefix(),
        &host_refs,
        VM_BRIDGE,
        CLIENT_CIDR,
    )?;
    segment.persist();
    let bridge = net.bridge();
    ip(&["link", "add", &bridge, "type", "bridge"])?;
    ip(&[
        "addr",
        "add",
        &format!("{}/24", net.gateway()),
        "dev",
        &bridge,
    ])?;
    ip(&["link", "set", &bridge, "up"])?;
    for i in 1..=net.hosts {
        let ns = net.namespace(i);
        let veth = net.veth(i);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &veth, "master", &bridge, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", net.address(i)),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    }
    Ok(())
}

/// Remove the network: the namespaces (and with them the veth pairs) and
/// the bridge. Missing pieces are not an error.
pub fn teardown(net: &Network) {
    for ns in net.all_namespaces() {
        let _ = ip(&["netns", "del", &ns]);
    }
    for i in 1..=net.hosts {
        let _ = ip(&["link", "del", &net.veth(i)]);
    }
    let _ = ip(&["link", "del", &net.bridge()]);
}

/// Remove whatever of instance `id` exists, whatever its host count:
/// namespaces named `ferry-<id>-*` (hosts, switch, client), links named
/// `fv-<id>-*` and the bridge. Returns what was removed.
pub fn teardown_instance(id: &str) -> Vec<String> {
    let mut removed = Vec::new();
    let ns_prefix = format!("ferry-{id}-");
    for ns in list_namespaces() {
        if ns.starts_with(&ns_prefix) && ip(&["netns", "del", &ns]).is_ok() {
            removed.push(ns);
        }
    }
    let veth_prefix = format!("fv-{id}-");
    let bridge = format!("fbr-{id}");
    for link in list_links() {
        if (link.starts_with(&veth_prefix) || link == bridge) && ip(&["link", "del", &link]).is_ok()
        {
            removed.push(link);
        }
    }
    removed
}

/// The names of the network namespaces (`ip netns list`).
pub fn list_namespaces() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The names of the root namespace's links (`ip -o link show`).
pub fn list_links() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim();
            Some(name.split('@').next().unwrap_or(name).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_in_an_interface_name() {
        let net = Network {
            id: instance_id(Path::new("/tmp/some/dir")),
            subnet: 3,
            hosts: 12,
        };
        assert_eq!(net.id.len(), 6);
        assert!(net.bridge().len() <= 15);
        assert!(net.veth(12).len() <= 15);
        assert_eq!(net.address(2), Ipv4Addr::new(10, 77, 3, 12));
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 77, 3, 1));
        assert_ne!(instance_id(Path::new("/a")), instance_id(Path::new("/b")));
        assert_eq!(net.namespace(1), format!("{}-host-1", net.segment_prefix()));
        assert!(net.client_namespace().starts_with(&net.segment_prefix()));
        assert_eq!(net.client_address(), Ipv4Addr::new(10, 78, 0, 1));
        assert_eq!(net.all_namespaces().len(), 14);
    }

    #[test]
    fn demo_vms_get_addresses_on_the_vm_subnet_apart_from_the_client() {
        assert_eq!(demo_vm_cidr(1), "10.78.0.101/24");
        assert_eq!(demo_vm_cidr(3), "10.78.0.103/24");
        assert_ne!(demo_vm_cidr(1).split('/').next(), Some("10.78.0.1"));
    }

    #[test]
    fn subnets_in_use_are_skipped_and_a_remembered_free_one_is_kept() {
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\n\
                   5: fbr-abc    inet 10.77.1.1/24 scope global fbr-abc\n\
                   6: eth0    inet 10.77.2.5/16 scope global eth0\n\
                   7: eth1    inet 10.78.3.5/24 scope global eth1\n";
        let used = used_subnets(out);
        assert_eq!(used, vec![1, 2]);
        assert_eq!(pick_subnet(&used, None), Some(3));
        assert_eq!(pick_subnet(&used, Some(9)), Some(9));
        assert_eq!(pick_subnet(&used, Some(2)), Some(3));
        let all: Vec<u8> = (1..=254).collect();
        assert_eq!(pick_subnet(&all, None), None);
    }
}
