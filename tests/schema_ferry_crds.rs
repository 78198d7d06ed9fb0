//! Ferry's own CRDs through the admission pipeline: every checked-in CRD
//! compiles, every example is admitted strictly, and every manifest under
//! `tests/data/invalid` is refused naming the field and message its header
//! promises (`# expect-field:` / `# expect-message:`).

use std::collections::HashMap;
use std::path::Path;

use ferry::apiserver::schema::{
    AdmitError, AdmitOptions, FieldValidation, Validator, validate_crd,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Deserialize;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `apiVersion/kind` → the validator of that CRD version.
fn validators() -> HashMap<(String, String), Validator> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(root().join("crds")).unwrap() {
        let path = entry.unwrap().path();
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            validate_crd(&crd),
            Vec::new(),
            "{} is refused",
            path.display()
        );
        for v in &crd.spec.versions {
            let validator = Validator::new(v)
                .unwrap_or_else(|e| panic!("{}: {} does not compile: {e}", path.display(), v.name));
            out.insert(
                (
                    format!("{}/{}", crd.spec.group, v.name),
                    crd.spec.names.kind.clone(),
                ),
                validator,
            );
        }
    }
    assert!(
        out.len() >= 5,
        "expected Ferry's five kinds, found {}",
        out.len()
    );
    out
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn key(obj: &Value) -> (String, String) {
    (
        obj["apiVersion"].as_str().unwrap_or("").to_string(),
        obj["kind"].as_str().unwrap_or("").to_string(),
    )
}

const STRICT: AdmitOptions = AdmitOptions {
    field_validation: FieldValidation::Strict,
};

#[test]
fn every_example_is_admitted_strictly() {
    let validators = validators();
    let mut admitted = 0;
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        for mut obj in documents(&path) {
            let Some(v) = validators.get(&key(&obj)) else {
                continue;
            };
            if let Err(e) = v.admit(&mut obj, None, &STRICT) {
                panic!("{} is refused: {e}", path.display());
            }
            // Updating it unchanged passes every transition rule too.
            let mut again = obj.clone();
            if let Err(e) = v.admit(&mut again, Some(&obj), &STRICT) {
                panic!("{} is refused on an unchanged update: {e}", path.display());
            }
            assert_eq!(again, obj, "admission is idempotent");
            admitted += 1;
        }
    }
    assert!(admitted >= 10, "only {admitted} examples were Ferry kinds");
}

#[test]
fn every_invalid_manifest_is_refused_as_its_header_says() {
    let validators = validators();
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("tests/data/invalid")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let header = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {name}: ")))
                .map(str::trim)
                .map(str::to_string)
        };
        let (Some(field), Some(message)) = (header("expect-field"), header("expect-message"))
        else {
            panic!("{} lacks expect-field / expect-message", path.display());
        };
        for mut obj in documents(&path) {
            let v = validators
                .get(&key(&obj))
                .unwrap_or_else(|| panic!("{}: not a Ferry kind", path.display()));
            match v.admit(&mut obj, None, &STRICT) {
                Err(AdmitError::Invalid(errs)) => {
                    assert!(
                        errs.iter()
                            .any(|e| e.field == field && e.to_string().contains(&message)),
                        "{}: expected {field}: …{message}…, got {errs:?}",
                        path.display()
                    );
                }
                other => panic!("{}: expected a 422, got {other:?}", path.display()),
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} invalid manifests");
}

#[test]
fn vm_uuid_is_immutable_once_set() {
    let validators = validators();
    let path = root().join("examples/vm-kernel.yaml");
    let mut old = documents(&path)
        .into_iter()
        .find(|o| o["kind"] == "VirtualMachine")
        .expect("a VirtualMachine example");
    let v = &validators[&key(&old)];
    old["spec"]["uuid"] = Value::String("6e8f0d5c-2f1b-4c63-9d0e-6e1f1d1b2a3c".into());
    v.admit(&mut old, None, &STRICT).unwrap();
    let mut same = old.clone();
    v.admit(&mut same, Some(&old), &STRICT).unwrap();
    let mut changed = old.clone();
    changed["spec"]["uuid"] = Value::String("00000000-0000-4000-8000-000000000000".into());
    let Err(AdmitError::Invalid(errs)) = v.admit(&mut changed, Some(&old), &STRICT) else {
        panic!("changing the uuid was admitted");
    };
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].field, "spec.uuid");
    assert!(
        errs[0].to_string().ends_with("uuid is immutable once set"),
        "{}",
        errs[0]
    );
}

#[test]
fn migration_transition_rules_hold() {
    let validators = validators();
    let path = root().join("examples/migration-cold.yaml");
    let mut old = documents(&path)
        .into_iter()
        .find(|o| o["kind"] == "Migration")
        .expect("a Migration example");
    let v = &validators[&key(&old)];
    v.admit(&mut old, None, &STRICT).unwrap();
    assert_eq!(old["spec"]["cancel"], false, "defaulted");

    let mut cancelled = old.clone();
    cancelled["spec"]["cancel"] = Value::Bool(true);
    v.admit(&mut cancelled, Some(&old), &STRICT).unwrap();
    let mut withdrawn = cancelled.clone();
    withdrawn["spec"]["cancel"] = Value::Bool(false);
    let Err(e) = v.admit(&mut withdrawn, Some(&cancelled), &STRICT) else {
        panic!("withdrawing a cancel was admitted");
    };
    assert_eq!(
        e.to_string(),
        r#"spec.cancel: Invalid value: "boolean": a cancel cannot be withdrawn"#
    );
    let mut retyped = old.clone();
    retyped["spec"]["type"] = Value::String("Live".into());
    let Err(e) = v.admit(&mut retyped, Some(&old), &STRICT) else {
        panic!("changing the type was admitted");
    };
    assert!(e.to_string().ends_with("type is immutable"), "{e}");
}
