//! `src/core` is pure: plain data in, decisions out. This test fails if any
//! file there reaches for I/O, a runtime or the clock.

use std::path::{Path, PathBuf};

/// Patterns that mean I/O, a Kubernetes client, an async runtime or a clock
/// read, with why each is forbidden.
const FORBIDDEN: &[(&str, &str)] = &[
    (r"\bkube(_runtime|_client|_core)?::", "Kubernetes client"),
    (r"\buse\s+kube\b", "Kubernetes client"),
    (
        r"\bk8s_openapi\b",
        "Kubernetes API types (map them onto domain types in the controller)",
    ),
    (r"\btokio\b", "async runtime"),
    (r"\bstd::net\b", "sockets"),
    (r"\bstd::fs\b", "files"),
    (r"\bstd::process\b", "processes"),
    (
        r"\bstd::\{[^}]*\b(net|fs|process)\b",
        "I/O via a grouped import",
    ),
    (r"\bSystemTime\b", "wall clock (pass `now` in)"),
    (r"\bInstant::now\b", "clock read (pass `now` in)"),
    (r"\b(Utc|Local)::now\b", "clock read (pass `now` in)"),
    (r"\bqapi\b", "QMP"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Code without comments (line comments and doc comments), so that prose may
/// name what the code must not use.
fn code_of(source: &str) -> String {
    source
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn violations(source: &str) -> Vec<String> {
    let code = code_of(source);
    FORBIDDEN
        .iter()
        .filter_map(|(pattern, why)| {
            let re = regex::Regex::new(pattern).unwrap();
            re.find(&code).map(|m| format!("`{}` ({why})", m.as_str()))
        })
        .collect()
}

#[test]
fn core_imports_no_io_runtime_or_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(
        files.len() > 10,
        "expected the core's files under {}",
        root.display()
    );
    let mut bad = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for v in violations(&text) {
            bad.push(format!("{}: {v}", f.display()));
        }
    }
    assert!(
        bad.is_empty(),
        "src/core must stay pure:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checker_catches_each_kind_of_violation() {
    let planted = [
        "use kube::Api;",
        "use k8s_openapi::api::core::v1::Pod;",
        "async fn f() { tokio::time::sleep(d).await }",
        "use std::net::TcpStream;",
        "let s = std::fs::read_to_string(p);",
        "use std::{collections::HashMap, fs};",
        "std::process::Command::new(\"qemu\")",
        "let t = std::time::SystemTime::now();",
        "let t = Instant::now();",
        "let t = chrono::Utc::now();",
    ];
    for p in planted {
        assert!(!violations(p).is_empty(), "not caught: {p}");
    }
    assert!(violations("// we never use tokio here\nlet x = 1;").is_empty());
    assert!(violations("use crate::core::time::Timestamp;").is_empty());
}
