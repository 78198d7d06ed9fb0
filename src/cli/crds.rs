//! `ferry crds`: print the CustomResourceDefinitions, or write them as files.

use std::path::Path;

use anyhow::Context;

/// Print every CRD as one YAML stream on stdout.
pub fn print() -> anyhow::Result<()> {
    print!(
        "{}",
        crate::api::crds_yaml().context("rendering the CRDs as YAML")?
    );
    Ok(())
}

/// Write one file per CRD into `dir` (`<plural>.<group>.yaml`).
pub fn write_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for crd in crate::api::crds() {
        let path = dir.join(crate::api::crd_file_name(&crd));
        let yaml = serde_yaml::to_string(&crd).context("rendering a CRD as YAML")?;
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
