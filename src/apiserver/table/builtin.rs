//! The columns of the real server's printers for the built-in kinds this
//! server serves (`pkg/printers/internalversion`), generated wide as the
//! server does (kubectl hides the priority-1 columns unless `-o wide`).
//! Kinds without a printer get the default `Name`, `Created At`.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{AGE_DESCRIPTION, IncludeObjectPolicy, age, column, name_column, row, table};

fn s<'a>(o: &'a Value, ptr: &str) -> &'a str {
    o.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn int(o: &Value, ptr: &str) -> Value {
    json!(o.pointer(ptr).and_then(Value::as_i64).unwrap_or(0))
}

fn age_of(o: &Value, ptr: &str, now: DateTime<Utc>) -> String {
    match o.pointer(ptr).and_then(Value::as_str) {
        Some(t) if !t.is_empty() => age(t, now),
        _ => "<unknown>".into(),
    }
}

fn obj_age(o: &Value, now: DateTime<Utc>) -> Value {
    json!(age_of(o, "/metadata/creationTimestamp", now))
}

fn age_col() -> Value {
    column("Age", "string", "", AGE_DESCRIPTION, 0)
}

fn col(name: &str, ty: &str, desc: &str) -> Value {
    column(name, ty, "", desc, 0)
}

fn wide(name: &str, desc: &str) -> Value {
    column(name, "string", "", desc, 1)
}

fn count(o: &Value, ptr: &str) -> Value {
    let n = match o.pointer(ptr) {
        Some(Value::Object(m)) => m.len(),
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    };
    json!(n as i64)
}

/// `labels.FormatLabels`: `a=b,c=d`, or `<none>`.
fn format_labels(v: Option<&Value>) -> String {
    match v.and_then(Value::as_object) {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(","),
        _ => "<none>".into(),
    }
}

/// `metav1.FormatLabelSelector` for the common `matchLabels` and
/// `matchExpressions` forms.
fn format_selector(v: Option<&Value>) -> String {
    let Some(sel) = v.and_then(Value::as_object) else {
        return "<none>".into();
    };
    let mut parts: Vec<String> = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = s(e, "/key");
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        parts.push(match s(e, "/operator") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            op => format!("{key} {op} ({})", values.join(",")),
        });
    }
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

fn containers(o: &Value, field: &str) -> String {
    o.pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|c| c.get(field).and_then(Value::as_str).unwrap_or(""))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn service_ports(o: &Value) -> String {
    let ports: Vec<String> = o
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) if np != 0 => format!("{port}:{np}/{proto}"),
                _ => format!("{port}/{proto}"),
            }
        })
        .collect();
    if ports.is_empty() {
        "<none>".into()
    } else {
        ports.join(",")
    }
}

fn external_ip(o: &Value) -> String {
    let ext: Vec<&str> = o
        .pointer("/spec/externalIPs")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match s(o, "/spec/type") {
        "LoadBalancer" => {
            let ing: Vec<&str> = o
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|i| {
                            i.get("ip")
                                .or_else(|| i.get("hostname"))
                                .and_then(Value::as_str)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let all: Vec<&str> = ing.into_iter().chain(ext).collect();
            if all.is_empty() {
                "<pending>".into()
            } else {
                all.join(",")
            }
        }
        "ExternalName" => s(o, "/spec/externalName").to_string(),
        _ if !ext.is_empty() => ext.join(","),
        _ => "<none>".into(),
    }
}

fn event_cells(o: &Value, now: DateTime<Utc>) -> Vec<Value> {
    // core/v1 and events.k8s.io/v1 name the same facts differently.
    let first = ["/firstTimestamp", "/deprecatedFirstTimestamp", "/eventTime"]
        .iter()
        .find(|p| !s(o, p).is_empty())
        .map(|p| age_of(o, p, now))
        .unwrap_or_else(|| "<unknown>".into());
    let mut last = ["/lastTimestamp", "/deprecatedLastTimestamp"]
        .iter()
        .find(|p| !s(o, p).is_empty())
        .map(|p| age_of(o, p, now))
        .unwrap_or_else(|| first.clone());
    let mut n = o
        .get("count")
        .or_else(|| o.get("deprecatedCount"))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if let Some(series) = o.get("series") {
        last = age_of(series, "/lastObservedTime", now);
        n = series.get("count").and_then(Value::as_i64).unwrap_or(n);
    } else if n == 0 {
        n = 1;
    }
    let involved = o
        .get("involvedObject")
        .or_else(|| o.get("regarding"))
        .cloned()
        .unwrap_or(Value::Null);
    let kind = s(&involved, "/kind").to_lowercase();
    let target = match s(&involved, "/name") {
        "" => kind,
        name => format!("{kind}/{name}"),
    };
    let message = o
        .get("message")
        .or_else(|| o.get("note"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .trim();
    let source = {
        let component = match s(o, "/source/component") {
            "" => s(o, "/reportingController"),
            c => c,
        };
        let host = match s(o, "/source/host") {
            "" => s(o, "/reportingInstance"),
            h => h,
        };
        if host.is_empty() {
            component.to_string()
        } else {
            format!("{component}, {host}")
        }
    };
    vec![
        json!(last),
        json!(s(o, "/type")),
        json!(s(o, "/reason")),
        json!(target),
        json!(s(&involved, "/fieldPath")),
        json!(source),
        json!(message),
        json!(first),
        json!(n),
        json!(s(o, "/metadata/name")),
    ]
}

type Cells = fn(&Value, DateTime<Utc>) -> Vec<Value>;

/// The column definitions and cell function of a built-in kind's printer.
fn printer(kind: &str) -> (Vec<Value>, Cells) {
    match kind {
        "Namespace" => (
            vec![
                name_column(),
                col("Status", "string", "The status of the namespace"),
                age_col(),
            ],
            |o, now| vec![json!(s(o, "/status/phase")), obj_age(o, now)],
        ),
        "Lease" => (
            vec![
                name_column(),
                col("Holder", "string", "The holder of the lease"),
                age_col(),
            ],
            |o, now| vec![json!(s(o, "/spec/holderIdentity")), obj_age(o, now)],
        ),
        "ConfigMap" => (
            vec![
                name_column(),
                col("Data", "integer", "Data contains the configuration data."),
                age_col(),
            ],
            |o, now| {
                let n = count(o, "/data").as_i64().unwrap_or(0)
                    + count(o, "/binaryData").as_i64().unwrap_or(0);
                vec![json!(n), obj_age(o, now)]
            },
        ),
        "Secret" => (
            vec![
                name_column(),
                col(
                    "Type",
                    "string",
                    "Used to facilitate programmatic handling of secret data.",
                ),
                col("Data", "integer", "Data contains the secret data."),
                age_col(),
            ],
            |o, now| vec![json!(s(o, "/type")), count(o, "/data"), obj_age(o, now)],
        ),
        "ServiceAccount" => (
            vec![
                name_column(),
                col(
                    "Secrets",
                    "integer",
                    "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
                ),
                age_col(),
            ],
            |o, now| vec![count(o, "/secrets"), obj_age(o, now)],
        ),
        "Service" => (
            vec![
                name_column(),
                col(
                    "Type",
                    "string",
                    "type determines how the Service is exposed.",
                ),
                col(
                    "Cluster-IP",
                    "string",
                    "clusterIP is the IP address of the service.",
                ),
                col(
                    "External-IP",
                    "string",
                    "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
                ),
                col(
                    "Port(s)",
                    "string",
                    "The list of ports that are exposed by this service.",
                ),
                age_col(),
                wide(
                    "Selector",
                    "Route service traffic to pods with label keys and values matching this selector.",
                ),
            ],
            |o, now| {
                let ip = match s(o, "/spec/clusterIP") {
                    "" => "<none>",
                    ip => ip,
                };
                vec![
                    json!(s(o, "/spec/type")),
                    json!(ip),
                    json!(external_ip(o)),
                    json!(service_ports(o)),
                    obj_age(o, now),
                    json!(format_labels(o.pointer("/spec/selector"))),
                ]
            },
        ),
        "Deployment" => (
            vec![
                name_column(),
                col("Ready", "string", "Number of the pod with ready state"),
                col(
                    "Up-to-date",
                    "string",
                    "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
                ),
                col(
                    "Available",
                    "string",
                    "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
                ),
                age_col(),
                wide("Containers", "Names of each container in the template."),
                wide(
                    "Images",
                    "Images referenced by each container in the template.",
                ),
                wide(
                    "Selector",
                    "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.",
                ),
            ],
            |o, now| {
                let ready = int(o, "/status/readyReplicas");
                let want = o
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                vec![
                    json!(format!("{ready}/{want}")),
                    int(o, "/status/updatedReplicas"),
                    int(o, "/status/availableReplicas"),
                    obj_age(o, now),
                    json!(containers(o, "name")),
                    json!(containers(o, "image")),
                    json!(format_selector(o.pointer("/spec/selector"))),
                ]
            },
        ),
        "DaemonSet" => (
            vec![
                name_column(),
                col(
                    "Desired",
                    "integer",
                    "The total number of nodes that should be running the daemon pod.",
                ),
                col(
                    "Current",
                    "integer",
                    "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod.",
                ),
                col(
                    "Ready",
                    "integer",
                    "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running with a Ready Condition.",
                ),
                col(
                    "Up-to-date",
                    "integer",
                    "The total number of nodes that are running updated daemon pod",
                ),
                col(
                    "Available",
                    "integer",
                    "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available.",
                ),
                col(
                    "Node Selector",
                    "string",
                    "NodeSelector is a selector which must be true for the pod to fit on a node.",
                ),
                age_col(),
                wide("Containers", "Names of each container in the template."),
                wide(
                    "Images",
                    "Images referenced by each container in the template.",
                ),
                wide(
                    "Selector",
                    "A label query over pods that are managed by the daemon set.",
                ),
            ],
            |o, now| {
                vec![
                    int(o, "/status/desiredNumberScheduled"),
                    int(o, "/status/currentNumberScheduled"),
                    int(o, "/status/numberReady"),
                    int(o, "/status/updatedNumberScheduled"),
                    int(o, "/status/numberAvailable"),
                    json!(format_labels(o.pointer("/spec/template/spec/nodeSelector"))),
                    obj_age(o, now),
                    json!(containers(o, "name")),
                    json!(containers(o, "image")),
                    json!(format_selector(o.pointer("/spec/selector"))),
                ]
            },
        ),
        "Event" => (
            vec![
                col(
                    "Last Seen",
                    "string",
                    "The time at which the most recent occurrence of this event was recorded.",
                ),
                col(
                    "Type",
                    "string",
                    "Type of this event (Normal, Warning), new types could be added in the future",
                ),
                col(
                    "Reason",
                    "string",
                    "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
                ),
                col("Object", "string", "The object that this event is about."),
                wide("Subobject", "The field of the object this event is about."),
                wide("Source", "The component reporting this event."),
                col(
                    "Message",
                    "string",
                    "A human-readable description of the status of this operation.",
                ),
                wide(
                    "First Seen",
                    "The time at which the event was first recorded.",
                ),
                wide("Count", "The number of times this event has occurred."),
                column("Name", "string", "name", super::NAME_DESCRIPTION, 1),
            ],
            event_cells,
        ),
        "Role" | "ClusterRole" => (
            vec![name_column(), col("Created At", "string", AGE_DESCRIPTION)],
            |o, _| vec![json!(s(o, "/metadata/creationTimestamp"))],
        ),
        "RoleBinding" | "ClusterRoleBinding" => (
            vec![
                name_column(),
                col(
                    "Role",
                    "string",
                    "RoleRef can reference a Role in the current namespace or a ClusterRole in the global namespace.",
                ),
                age_col(),
                wide("Users", "Users in the binding"),
                wide("Groups", "Groups in the binding"),
                wide("ServiceAccounts", "ServiceAccounts in the binding"),
            ],
            |o, now| {
                let subjects = |kind: &str| -> String {
                    o.get("subjects")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter(|x| s(x, "/kind") == kind)
                        .map(|x| match (kind, s(x, "/namespace")) {
                            ("ServiceAccount", ns) => format!("{ns}/{}", s(x, "/name")),
                            _ => s(x, "/name").to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                vec![
                    json!(format!(
                        "{}/{}",
                        s(o, "/roleRef/kind"),
                        s(o, "/roleRef/name")
                    )),
                    obj_age(o, now),
                    json!(subjects("User")),
                    json!(subjects("Group")),
                    json!(subjects("ServiceAccount")),
                ]
            },
        ),
        _ => (
            vec![
                name_column(),
                column("Created At", "date", "", AGE_DESCRIPTION, 0),
            ],
            |o, _| vec![json!(s(o, "/metadata/creationTimestamp"))],
        ),
    }
}

/// Renders objects of a built-in `kind` with its printer's columns.
pub fn render_builtin(
    kind: &str,
    objects: &[Value],
    include: IncludeObjectPolicy,
    now: DateTime<Utc>,
) -> Value {
    let (defs, cells) = printer(kind);
    let leading_name = kind != "Event";
    let rows = objects
        .iter()
        .map(|o| {
            let mut c = Vec::new();
            if leading_name {
                c.push(json!(s(o, "/metadata/name")));
            }
            c.extend(cells(o, now));
            row(c, o, include)
        })
        .collect();
    table(defs, rows)
}

#[cfg(test)]
#[path = "builtin_tests.rs"]
mod tests;
