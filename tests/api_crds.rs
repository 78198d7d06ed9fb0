//! The CRDs checked in under `crds/` are exactly what the Rust types generate,
//! and the CEL rules in them compile and mean what they say.

use std::path::Path;

use ferry::api;

#[test]
fn checked_in_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected_files = Vec::new();
    for crd in api::crds() {
        let name = api::crd_file_name(&crd);
        let generated = serde_yaml::to_string(&crd).unwrap();
        let checked_in = std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| {
            panic!("crds/{name} is missing ({e}); run `ferry crds --dir crds`")
        });
        assert!(
            generated == checked_in,
            "crds/{name} is stale: run `cargo run -- crds --dir crds` and commit the result"
        );
        expected_files.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "crds/ holds files that no type generates"
    );
}

#[test]
fn every_kind_is_in_the_ferry_category_with_a_status_subresource() {
    for crd in api::crds() {
        let names = &crd.spec.names;
        assert_eq!(
            names.categories.as_deref(),
            Some(&["ferry".to_string()][..]),
            "{}",
            names.kind
        );
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{} has no status subresource",
            names.kind
        );
        let columns = version
            .additional_printer_columns
            .as_deref()
            .unwrap_or_default();
        assert!(
            columns
                .iter()
                .any(|c| c.name == "Phase" || c.name == "Convergence"),
            "{}",
            names.kind
        );
    }
    let short: Vec<Option<Vec<String>>> = api::crds()
        .iter()
        .map(|c| c.spec.names.short_names.clone())
        .collect();
    for s in ["fvm", "mig", "hm", "mpol"] {
        assert!(
            short.iter().flatten().any(|v| v.iter().any(|x| x == s)),
            "short name {s} missing"
        );
    }
}

#[test]
fn every_spec_field_is_documented() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, sub) in props {
                let p = format!("{path}.{name}");
                if sub.get("description").is_none()
                    && !["apiVersion", "kind", "metadata"].contains(&name.as_str())
                {
                    missing.push(p.clone());
                }
                walk(&p, sub, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in api::crds() {
        let schema = serde_json::to_value(
            &crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema,
        )
        .unwrap();
        walk(&crd.spec.names.kind, &schema, &mut missing);
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}
