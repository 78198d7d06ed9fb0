//! The custom resources of `ferry.dev/v1alpha1`, and nothing else.
//!
//! | kind | scope | short name | what it is |
//! |---|---|---|---|
//! | [`VirtualMachine`] | namespaced | `fvm` | what runs, and where |
//! | [`Host`] | cluster | | a hypervisor host, published by its agent |
//! | [`Migration`] | namespaced | `mig` | one move of one VM |
//! | [`HostMaintenance`] | cluster | `hm` | drain a host |
//! | [`MigrationPolicy`] | cluster | `mpol` | how migrations behave |
//!
//! Every kind is in the category `ferry`, so `kubectl get ferry` lists them
//! all. The CRDs are generated from these types ([`crds`]) and checked in
//! under `crds/`.

pub mod host;
pub mod maintenance;
pub mod migration;
pub mod policy;
pub mod values;
pub mod vm;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use host::{Host, HostPhase, HostSpec, HostStatus};
pub use maintenance::{
    HostMaintenance, HostMaintenanceSpec, HostMaintenanceStatus, MaintenancePhase,
};
pub use migration::{
    AgentReport, AgentState, Migration, MigrationPhase, MigrationSpec, MigrationStatus,
    MigrationType,
};
pub use policy::{MigrationPolicy, MigrationPolicySpec};
pub use values::{Bandwidth, Duration, Quantity, ValueError};
pub use vm::{VirtualMachine, VirtualMachineSpec, VirtualMachineStatus, VmPhase};

/// The API group of every Ferry kind.
pub const GROUP: &str = "ferry.dev";
/// The API version of every Ferry kind.
pub const VERSION: &str = "v1alpha1";
/// The namespace where Ferry's own objects live (host Leases, the default
/// policy's Events).
pub const SYSTEM_NAMESPACE: &str = "ferry-system";
/// Label on Migrations created by automatic balancing.
pub const AUTOMATIC_LABEL: &str = "ferry.dev/automatic";
/// Label on Migrations created by a HostMaintenance, naming it.
pub const MAINTENANCE_LABEL: &str = "ferry.dev/maintenance";

/// The CustomResourceDefinitions of every Ferry kind, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        VirtualMachine::crd(),
        Host::crd(),
        Migration::crd(),
        HostMaintenance::crd(),
        MigrationPolicy::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, as `ferry crds` prints it.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// The file under `crds/` that holds a CRD: `<plural>.<group>.yaml`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}
