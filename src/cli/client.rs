//! The Kubernetes client of the CLI, from the kubeconfig.

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::GlobalArgs;

/// A client for the cluster the kubeconfig names.
pub async fn connect(global: &GlobalArgs) -> anyhow::Result<kube::Client> {
    connect_path(global.kubeconfig.as_deref()).await
}

/// A client from a kubeconfig file, or the usual places when `None`.
pub async fn connect_path(path: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match path {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no kubeconfig found: pass --kubeconfig, set KUBECONFIG, or start one with `ferry up`",
        )?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}
