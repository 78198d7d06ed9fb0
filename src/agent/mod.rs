//! The node agent.

pub mod daemon;
pub mod guest;
pub mod linux_guest;
pub mod machine;
pub mod migrate;
pub mod net;
pub mod pki;
pub mod qemu;
pub mod qmp;
pub mod relay;
pub mod vms;
