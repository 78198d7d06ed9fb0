//! Shared by the chart tests: run `tests/helm/helm.py` (Helm v4 through the
//! `helm-python-sdk` PyPI package) and pick objects out of rendered charts.
//!
//! Python is `$FERRY_PYTHON` if set, else `python3` on `PATH`. A missing
//! interpreter or package fails the test with what to install.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The chart directory.
pub fn chart() -> PathBuf {
    repo().join("charts/ferry")
}

fn python() -> String {
    std::env::var("FERRY_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Run `helm.py COMMAND ARGS`; `Err(stderr)` when Helm reports an error.
pub fn helm(command: &str, args: &Value) -> Result<Value, String> {
    let script = repo().join("tests/helm/helm.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(command)
        .arg(args.to_string())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): install Python 3 with `pip install helm-python-sdk pyyaml`, or set FERRY_PYTHON",
                python()
            )
        });
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    match out.status.code() {
        Some(0) => Ok(serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("helm.py {command} printed no JSON ({e}): {stderr}"))),
        Some(3) => panic!("{stderr}"),
        _ => Err(stderr),
    }
}

/// One rendered object and the template it came from.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// e.g. `ferry/templates/agent.yaml`.
    pub template: String,
    /// The object.
    pub object: Value,
}

/// Render the chart into `ferry-system` as release `ferry`.
pub fn render(values: Value) -> Vec<Rendered> {
    render_in("ferry-system", values).unwrap_or_else(|e| panic!("render failed: {e}"))
}

/// Render the chart into `namespace`.
pub fn render_in(namespace: &str, values: Value) -> Result<Vec<Rendered>, String> {
    let out = helm(
        "render",
        &json!({"chart": chart(), "values": values, "namespace": namespace, "name": "ferry"}),
    )?;
    Ok(out["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .map(|o| Rendered {
            template: o["template"].as_str().unwrap_or_default().to_string(),
            object: o["object"].clone(),
        })
        .collect())
}

/// The object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Rendered], kind: &str, name: &str) -> &'a Value {
    try_find(objects, kind, name).unwrap_or_else(|| {
        let have: Vec<String> = objects
            .iter()
            .map(|o| format!("{}/{}", o.object["kind"], o.object["metadata"]["name"]))
            .collect();
        panic!("no {kind} {name} among {have:?}")
    })
}

/// The object of `kind` named `name`, if rendered.
pub fn try_find<'a>(objects: &'a [Rendered], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .map(|o| &o.object)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

/// Every object of `kind`.
pub fn all_of<'a>(objects: &'a [Rendered], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .map(|o| &o.object)
        .filter(|o| o["kind"] == kind)
        .collect()
}

/// A role's rules flattened into `group resource verb [names]` lines.
pub fn grants(role: &Value) -> BTreeSet<String> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let names = strings(&rule["resourceNames"]);
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    let g = if g.is_empty() {
                        "core".to_string()
                    } else {
                        g.clone()
                    };
                    if names.is_empty() {
                        out.insert(format!("{g} {r} {v}"));
                    } else {
                        out.insert(format!("{g} {r} {v} {}", names.join(",")));
                    }
                }
            }
        }
    }
    out
}

/// `group resource verbs...` lines expanded like [`grants`].
pub fn expect_grants(lines: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in lines {
        let mut parts = line.split_whitespace();
        let group = parts.next().expect("group");
        let resource = parts.next().expect("resource");
        for verb in parts {
            out.insert(format!("{group} {resource} {verb}"));
        }
    }
    out
}

/// The named container of a pod template (`spec.template.spec`).
pub fn container<'a>(workload: &'a Value, list: &str, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"][list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} entry {name} in {workload}"))
}

/// A container's args as strings.
pub fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
