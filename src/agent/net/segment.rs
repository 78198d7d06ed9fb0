//! One L2 segment across network namespaces: what `ferry up` and the
//! network tests stand in for a data-centre network with.
//!
//! ```text
//!   <prefix>-<host> (per host)     <prefix>-sw (switch)          <prefix>-cl (client)
//!   ┌───────────────────────┐      ┌──────────────────┐          ┌──────────────┐
//!   │ <bridge> ── uplink ───┼──────┼─ h<i> ── sw ── c0┼──────────┼─ eth0 (addr) │
//!   │   └ taps of the VMs   │      └──────────────────┘          └──────────────┘
//!   └───────────────────────┘
//! ```
//!
//! Interface names are local to their namespaces, so segments built by
//! parallel tests never clash as long as their prefixes differ. Dropping the
//! [`Segment`] deletes its namespaces (and with them every veth, bridge and
//! tap inside) unless it was made [`Segment::persist`]ent.

use std::process::Command;

/// Why building or using a segment failed.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// A name would exceed what Linux allows.
    #[error("namespace prefix {0:?} is unusable: [a-z0-9-], at most 40 bytes")]
    BadPrefix(String),
    /// `ip` could not be run.
    #[error("running ip {args}")]
    Spawn {
        /// The arguments.
        args: String,
        /// Cause.
        source: std::io::Error,
    },
    /// `ip` failed.
    #[error("ip {args}: {stderr}")]
    Ip {
        /// The arguments.
        args: String,
        /// What `ip` said.
        stderr: String,
    },
    /// Entering a namespace failed.
    #[error("entering network namespace {ns}")]
    Enter {
        /// The namespace.
        ns: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn ip(args: &[&str]) -> Result<(), SegmentError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| SegmentError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SegmentError::Ip {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Host namespaces with a bridge each, a client namespace, all on one L2
/// segment through a switch namespace.
#[derive(Debug)]
pub struct Segment {
    switch: String,
    client: String,
    hosts: Vec<(String, String)>,
    bridge: String,
    persistent: bool,
}

impl Segment {
    /// Builds `<prefix>-sw`, `<prefix>-cl` (its `eth0` gets `client_cidr`,
    /// e.g. `10.80.0.1/24`) and `<prefix>-<host>` for each host, each host
    /// with bridge `bridge` joined to the switch. On failure whatever was
    /// built is removed.
    pub fn create(
        prefix: &str,
        hosts: &[&str],
        bridge: &str,
        client_cidr: &str,
    ) -> Result<Segment, SegmentError> {
        if prefix.is_empty()
            || prefix.len() > 40
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(SegmentError::BadPrefix(prefix.to_string()));
        }
        // Built up as we go, so that a failure half-way is cleaned by Drop.
        let mut segment = Segment {
            switch: format!("{prefix}-sw"),
            client: format!("{prefix}-cl"),
            hosts: Vec::new(),
            bridge: bridge.to_string(),
            persistent: false,
        };
        let sw = segment.switch.clone();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "sw", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "sw", "up"])?;
        for (i, host) in hosts.iter().enumerate() {
            let ns = format!("{prefix}-{host}");
            ip(&["netns", "add", &ns])?;
            segment.hosts.push((host.to_string(), ns.clone()));
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "add", bridge, "type", "bridge"])?;
            let port = format!("h{i}");
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "uplink", "netns",
                &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "sw", "up"])?;
            ip(&["-n", &ns, "link", "set", "uplink", "master", bridge, "up"])?;
            ip(&["-n", &ns, "link", "set", bridge, "up"])?;
        }
        let cl = segment.client.clone();
        ip(&["netns", "add", &cl])?;
        ip(&["-n", &cl, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &sw, "link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", &cl,
        ])?;
        ip(&["-n", &sw, "link", "set", "c0", "master", "sw", "up"])?;
        ip(&["-n", &cl, "addr", "add", client_cidr, "dev", "eth0"])?;
        ip(&["-n", &cl, "link", "set", "eth0", "up"])?;
        Ok(segment)
    }

    /// The namespace standing in for `host`.
    pub fn host_ns(&self, host: &str) -> Option<&str> {
        self.hosts
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, ns)| ns.as_str())
    }

    /// The client namespace (reaches the VMs' addresses on the segment).
    pub fn client_ns(&self) -> &str {
        &self.client
    }

    /// The switch namespace.
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// The bridge name in every host namespace (map VM networks to it).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Keeps the namespaces after the `Segment` is dropped (`ferry up`);
    /// remove them later with [`Segment::remove`].
    pub fn persist(mut self) {
        self.persistent = true;
    }

    /// Deletes the namespaces of the segment built with `prefix` and
    /// `hosts`; namespaces already gone are skipped.
    pub fn remove(prefix: &str, hosts: &[&str]) {
        let names = std::iter::once(format!("{prefix}-sw"))
            .chain(std::iter::once(format!("{prefix}-cl")))
            .chain(hosts.iter().map(|h| format!("{prefix}-{h}")));
        for ns in names {
            // Best effort: a namespace that does not exist is not an error here.
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        let names = std::iter::once(&self.switch)
            .chain(std::iter::once(&self.client))
            .chain(self.hosts.iter().map(|(_, ns)| ns));
        for ns in names {
            // Best effort in Drop: nothing to report to.
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Moves the calling thread into network namespace `ns` (as created by
/// `ip netns add`). Only this thread moves; sockets it opens afterwards
/// live in `ns`.
pub fn enter(ns: &str) -> Result<(), SegmentError> {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|source| SegmentError::Enter {
        ns: ns.to_string(),
        source,
    })?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        SegmentError::Enter {
            ns: ns.to_string(),
            source: std::io::Error::from(e),
        }
    })
}
