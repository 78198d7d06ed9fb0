//! `meta.k8s.io/v1` `Table` rendering for `kubectl get`, as the real server
//! renders it when asked with `Accept: application/json;as=Table;g=meta.k8s.io;v=v1`.
//!
//! For custom resources the columns are the implicit `Name` then the CRD
//! version's `additionalPrinterColumns` (just `Age` when it declares none,
//! as the CRD defaulting does); each cell is the first JSONPath result,
//! typed by the column (`integer`, `number`, `boolean`, `string`, and `date`
//! shown as an age such as `5m`), `null` when the path finds nothing.
//! Built-in kinds get the columns of the real server's printers
//! ([`render_builtin`]).

mod builtin;
pub mod jsonpath;

use chrono::{DateTime, Utc};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceColumnDefinition;
use serde_json::{Map, Value, json};

pub use builtin::render_builtin;
use jsonpath::JsonPath;

/// The `includeObject` query parameter of a Table request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IncludeObjectPolicy {
    /// No object in the rows.
    None,
    /// A `PartialObjectMetadata` per row (the default).
    #[default]
    Metadata,
    /// The full object per row.
    Object,
}

impl IncludeObjectPolicy {
    /// Parses the parameter (`None`, `Metadata`, `Object`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "None" => Some(Self::None),
            "Metadata" => Some(Self::Metadata),
            "Object" => Some(Self::Object),
            _ => None,
        }
    }
}

/// `ObjectMeta.name`'s documentation, the description of the Name column.
pub(crate) const NAME_DESCRIPTION: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";

/// `ObjectMeta.creationTimestamp`'s documentation, the description of Age.
pub(crate) const AGE_DESCRIPTION: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

/// A column definition object.
pub(crate) fn column(
    name: &str,
    ty: &str,
    format: &str,
    description: &str,
    priority: i32,
) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

/// The `Name` column every table starts with.
pub(crate) fn name_column() -> Value {
    column("Name", "string", "name", NAME_DESCRIPTION, 0)
}

/// Renders custom resources with their CRD version's printer columns.
pub fn render(
    columns: &[CustomResourceColumnDefinition],
    objects: &[Value],
    include: IncludeObjectPolicy,
    now: DateTime<Utc>,
) -> Value {
    let age = CustomResourceColumnDefinition {
        name: "Age".into(),
        type_: "date".into(),
        json_path: ".metadata.creationTimestamp".into(),
        ..Default::default()
    };
    let columns: Vec<&CustomResourceColumnDefinition> = if columns.is_empty() {
        vec![&age]
    } else {
        columns.iter().collect()
    };
    let mut defs = vec![name_column()];
    let mut paths = Vec::new();
    for c in &columns {
        let desc = c.description.clone().unwrap_or_else(|| {
            format!(
                "Custom resource definition column (in JSONPath format): {}",
                c.json_path
            )
        });
        defs.push(column(
            &c.name,
            &c.type_,
            c.format.as_deref().unwrap_or(""),
            &desc,
            c.priority.unwrap_or(0),
        ));
        paths.push(JsonPath::parse(&c.json_path).ok());
    }
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![json!(
                o.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            )];
            for (c, p) in columns.iter().zip(&paths) {
                let found = p.as_ref().and_then(|p| p.find(o).into_iter().next());
                cells.push(match found {
                    None => Value::Null,
                    Some(v) => cell(&c.type_, v, now),
                });
            }
            row(cells, o, include)
        })
        .collect();
    table(defs, rows)
}

/// A `Table` with the given column definitions and rows.
pub(crate) fn table(defs: Vec<Value>, rows: Vec<Value>) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": defs,
        "rows": rows,
    })
}

/// One row, with the object as the policy asks.
pub(crate) fn row(cells: Vec<Value>, obj: &Value, include: IncludeObjectPolicy) -> Value {
    let mut r = Map::new();
    r.insert("cells".into(), Value::Array(cells));
    match include {
        IncludeObjectPolicy::None => {}
        IncludeObjectPolicy::Object => {
            r.insert("object".into(), obj.clone());
        }
        IncludeObjectPolicy::Metadata => {
            r.insert(
                "object".into(),
                json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
                }),
            );
        }
    }
    Value::Object(r)
}

/// A cell of a column of type `ty` (apiextensions' `cellForJSONValue`).
fn cell(ty: &str, v: &Value, now: DateTime<Utc>) -> Value {
    match (ty, v) {
        (_, Value::Null) => Value::Null,
        ("integer", Value::Number(n)) => n
            .as_i64()
            .map(|i| json!(i))
            .or_else(|| n.as_f64().map(|f| json!(f as i64)))
            .unwrap_or(Value::Null),
        ("number", Value::Number(n)) => n.as_f64().map(|f| json!(f)).unwrap_or(Value::Null),
        ("boolean", Value::Bool(b)) => json!(b),
        ("string", v) => json!(print_text(v)),
        ("date", Value::String(s)) => json!(age(s, now)),
        _ => Value::Null,
    }
}

/// JSONPath's text printing of one value.
fn print_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "<nil>".to_string(),
        other => other.to_string(),
    }
}

/// The age of an RFC 3339 timestamp, `<invalid>` when it does not parse.
pub fn age(timestamp: &str, now: DateTime<Utc>) -> String {
    match DateTime::parse_from_rfc3339(timestamp) {
        Ok(t) => human_duration(now.signed_duration_since(t.with_timezone(&Utc))),
        Err(_) => "<invalid>".to_string(),
    }
}

/// apimachinery's `duration.HumanDuration`: `45s`, `5m3s`, `3h20m`, `4d2h`, `2y30d`.
pub fn human_duration(d: chrono::TimeDelta) -> String {
    let seconds = d.num_seconds();
    if seconds < -1 {
        return "<invalid>".into();
    } else if seconds < 0 {
        return "0s".into();
    } else if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    } else if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    } else if hours < 48 {
        return format!("{hours}h");
    } else if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    } else if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    } else if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn col(name: &str, ty: &str, path: &str) -> CustomResourceColumnDefinition {
        CustomResourceColumnDefinition {
            name: name.into(),
            type_: ty.into(),
            json_path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn crd_columns_render_typed_cells() {
        let mut phase = col("Phase", "string", ".status.phase");
        phase.description = Some("The phase".into());
        let mut host = col("Host", "string", ".spec.host");
        host.priority = Some(1);
        let cols = vec![
            phase,
            host,
            col("Replicas", "integer", ".spec.replicas"),
            col("Ratio", "number", ".spec.ratio"),
            col("Ready", "boolean", ".status.ready"),
            col("Ports", "string", ".spec.ports"),
            col("Started", "date", ".status.startTime"),
        ];
        let o = json!({"metadata": {"name": "vm1", "creationTimestamp": "2026-01-01T11:00:00Z"},
            "spec": {"host": "h1", "replicas": 3.0, "ratio": 2, "ports": [80, 443]},
            "status": {"phase": "Running", "ready": true, "startTime": "2026-01-01T11:55:00Z"}});
        let t = render(
            &cols,
            std::slice::from_ref(&o),
            IncludeObjectPolicy::Metadata,
            now(),
        );
        assert_eq!(t["kind"], "Table");
        assert_eq!(t["apiVersion"], "meta.k8s.io/v1");
        assert_eq!(t["columnDefinitions"][0], name_column());
        assert_eq!(t["columnDefinitions"][1]["description"], "The phase");
        assert_eq!(
            t["columnDefinitions"][2]["description"],
            "Custom resource definition column (in JSONPath format): .spec.host"
        );
        assert_eq!(t["columnDefinitions"][2]["priority"], 1);
        assert_eq!(
            t["rows"][0]["cells"],
            json!(["vm1", "Running", "h1", 3, 2.0, true, "[80,443]", "5m"])
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["rows"][0]["object"]["metadata"]["name"], "vm1");
        let missing = render(
            &cols,
            &[json!({"metadata": {"name": "x"}})],
            IncludeObjectPolicy::None,
            now(),
        );
        assert_eq!(
            missing["rows"][0]["cells"],
            json!(["x", null, null, null, null, null, null, null])
        );
        assert!(missing["rows"][0].get("object").is_none());
        let full = render(
            &cols,
            std::slice::from_ref(&o),
            IncludeObjectPolicy::Object,
            now(),
        );
        assert_eq!(full["rows"][0]["object"], o);
    }

    #[test]
    fn crd_without_columns_gets_age() {
        let o = json!({"metadata": {"name": "a", "creationTimestamp": "2025-12-30T12:00:00Z"}});
        let t = render(&[], &[o], IncludeObjectPolicy::Metadata, now());
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Name", "Age"]);
        assert_eq!(t["columnDefinitions"][1]["type"], "date");
        assert_eq!(t["rows"][0]["cells"], json!(["a", "2d"]));
    }

    #[test]
    fn human_durations_match_apimachinery() {
        let d = chrono::TimeDelta::seconds;
        for (secs, want) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (600, "10m"),
            (179 * 60, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 60, "3h1m"),
            (8 * 3600, "8h"),
            (47 * 3600, "47h"),
            (48 * 3600, "2d"),
            (50 * 3600, "2d2h"),
            (8 * 86400, "8d"),
            (730 * 86400, "2y"),
            (731 * 86400, "2y1d"),
            (8 * 365 * 86400, "8y"),
        ] {
            assert_eq!(human_duration(d(secs)), want, "{secs}s");
        }
        assert_eq!(age("garbage", now()), "<invalid>");
    }
}
