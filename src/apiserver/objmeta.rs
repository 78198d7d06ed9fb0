//! Object metadata rules shared by the write paths: names, generated names,
//! timestamps, generation, and how an object is presented in a given version.

use rand::Rng;
use serde_json::{Value, json};

use super::error::{ApiError, Cause, Subject};
use super::resources::ResourceInfo;

/// Now, as Kubernetes writes timestamps (RFC 3339, seconds, `Z`).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Now with microseconds, for `MicroTime` fields.
pub fn now_micro() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The 5-character suffix `generateName` appends; the alphabet of
/// apimachinery's `utilrand.String` (no vowels, no confusable digits).
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The error subject for an object of `info` named `name`.
pub fn subject(info: &ResourceInfo, name: &str) -> Subject {
    Subject {
        group: info.group.clone(),
        resource: info.plural.clone(),
        name: name.to_string(),
    }
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Why `name` is not a valid object name for `info`, if it is not.
pub fn name_error(info: &ResourceInfo, name: &str) -> Option<Cause> {
    let label_only = info.group.is_empty() && info.plural == "namespaces";
    let ok = if label_only {
        is_label(name)
    } else {
        name.len() <= 253 && name.split('.').all(is_label)
    };
    // RBAC names are path segments, not DNS names (e.g. `system:controller`).
    let rbac = info.group == "rbac.authorization.k8s.io";
    if ok || (rbac && !name.is_empty() && !name.contains('/') && name != "." && name != "..") {
        return None;
    }
    Some(Cause {
        reason: "FieldValueInvalid".into(),
        message: format!(
            "Invalid value: \"{name}\": {}",
            if label_only { LABEL_MSG } else { SUBDOMAIN_MSG }
        ),
        field: "metadata.name".into(),
    })
}

/// The object as served at `info`'s version (custom resources are stored
/// once and served at every version with the `None` conversion strategy).
pub fn present(info: &ResourceInfo, obj: &Value) -> Value {
    let mut out = super::convert::from_storage(info, obj);
    if let Some(o) = out.as_object_mut() {
        o.insert("apiVersion".into(), json!(info.api_version()));
        o.insert("kind".into(), json!(info.kind));
    }
    out
}

/// `metadata.<field>` as a string.
pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// The object's finalizers.
pub fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether deletion has been requested.
pub fn is_deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// The object without the fields a write does not count as a change.
fn comparable(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        // Ownership changes are changes; a refreshed timestamp alone is not.
        if let Some(entries) = m.get_mut("managedFields").and_then(Value::as_array_mut) {
            for e in entries {
                if let Some(e) = e.as_object_mut() {
                    e.remove("time");
                }
            }
        }
    }
    o
}

/// Whether two versions of an object differ in anything a write stores.
pub fn changed(old: &Value, new: &Value) -> bool {
    comparable(old) != comparable(new)
}

/// Whether the change from `old` to `new` bumps `metadata.generation`: any
/// change outside metadata (and outside status when status is a subresource).
pub fn bumps_generation(info: &ResourceInfo, old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("metadata");
            o.remove("apiVersion");
            o.remove("kind");
            if info.status_subresource {
                o.remove("status");
            }
        }
        v
    };
    strip(old) != strip(new)
}

/// Decode a request body by its content type: JSON, YAML, or — for the
/// built-in kinds typed clients send that way — protobuf; anything else is
/// the real server's 415.
pub fn decode_body(headers: &axum::http::HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let base = ct.split(';').next().unwrap_or("").trim();
    match base {
        "" | "application/json" | "application/yaml" | "*/*" => parse_object(body),
        super::protobuf::MEDIA_TYPE => super::protobuf::decode_body(body)
            .map_err(|e| ApiError::unsupported_media_type_because(ct, &e.to_string())),
        _ => Err(ApiError::unsupported_media_type(ct)),
    }
}

/// Decode a JSON (or YAML) request body into an object.
pub fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(json_err) => serde_yaml::from_slice(body).map_err(|_| {
            ApiError::bad_request(format!("the object provided is unrecognized: {json_err}"))
        })?,
    };
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the object provided is unrecognized: not a JSON object",
        ));
    }
    Ok(v)
}

/// Check that `obj` names the right kind and version, filling them in if
/// absent.
pub fn check_type(info: &ResourceInfo, obj: &mut Value) -> Result<(), ApiError> {
    let expected = info.api_version();
    let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if !av.is_empty() && av != expected {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({expected})"
        )));
    }
    if !kind.is_empty() && kind != info.kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            info.kind
        )));
    }
    let o = obj
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("not an object"))?;
    o.insert("apiVersion".into(), json!(expected));
    o.insert("kind".into(), json!(info.kind));
    let meta = o.entry("metadata").or_insert_with(|| json!({}));
    if meta.is_null() {
        *meta = json!({});
    }
    if !meta.is_object() {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    Ok(())
}

/// Move a Secret's `stringData` into `data` (base64), as the real server does.
pub fn fold_string_data(info: &ResourceInfo, obj: &mut Value) {
    use base64::Engine;
    if !(info.group.is_empty() && info.plural == "secrets") {
        return;
    }
    let Some(o) = obj.as_object_mut() else { return };
    let Some(Value::Object(sd)) = o.remove("stringData") else {
        return;
    };
    let data = o.entry("data").or_insert_with(|| json!({}));
    if data.is_null() {
        *data = json!({});
    }
    if let Some(d) = data.as_object_mut() {
        for (k, v) in sd {
            let s = v.as_str().unwrap_or("");
            d.insert(
                k,
                json!(base64::engine::general_purpose::STANDARD.encode(s)),
            );
        }
    }
}
