//! Encoding JSON objects as protobuf, and content negotiation of responses
//! by the request's `Accept` header, as kube-apiserver negotiates:
//!
//! ```text
//! Accept (by q, then order)        response
//! absent, */*, application/json    JSON (the handlers' own output)
//! application/vnd.kubernetes.protobuf
//!     kind in the tables           protobuf
//!     otherwise (CRs, Tables, ...) the next acceptable type, else 406
//! ```
//!
//! Watch streams stay JSON (client-go decodes by the response's
//! Content-Type, so a client that also accepts JSON reads them).

use axum::body::Body;
use axum::body::HttpBody;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Map, Value};

use super::{Desc, K, MEDIA_TYPE, ProtobufError, message_for};
use crate::apiserver::ApiError;

/// The largest response body re-encoded (a list of 10,000 objects fits).
const MAX_REENCODE: usize = 256 * 1024 * 1024;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, num: u64, wire: u64) {
    varint(out, (num << 3) | wire);
}

fn len_delimited(out: &mut Vec<u8>, num: u64, data: &[u8]) {
    key(out, num, 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn bad(desc: &'static Desc, field: &str) -> ProtobufError {
    ProtobufError::Unencodable {
        message: desc.name,
        field: field.to_string(),
    }
}

fn time(s: &str, desc: &'static Desc, field: &str) -> Result<Vec<u8>, ProtobufError> {
    let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|_| bad(desc, field))?;
    let mut m = Vec::new();
    key(&mut m, 1, 0);
    varint(&mut m, t.timestamp() as u64);
    let nanos = t.timestamp_subsec_nanos();
    if nanos != 0 {
        key(&mut m, 2, 0);
        varint(&mut m, u64::from(nanos));
    }
    Ok(m)
}

fn quantity(v: &Value, desc: &'static Desc, field: &str) -> Result<Vec<u8>, ProtobufError> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(bad(desc, field)),
    };
    let mut m = Vec::new();
    len_delimited(&mut m, 1, s.as_bytes());
    Ok(m)
}

/// Write one (non-repeated) value of `kind` as field `num`.
fn value(
    out: &mut Vec<u8>,
    num: u64,
    kind: K,
    v: &Value,
    desc: &'static Desc,
    field: &str,
) -> Result<(), ProtobufError> {
    let err = || bad(desc, field);
    match kind {
        K::Str => len_delimited(out, num, v.as_str().ok_or_else(err)?.as_bytes()),
        K::Bytes => {
            let b = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().ok_or_else(err)?)
                .map_err(|_| err())?;
            len_delimited(out, num, &b);
        }
        K::Int => {
            key(out, num, 0);
            varint(out, v.as_i64().ok_or_else(err)? as u64);
        }
        K::Bool => {
            key(out, num, 0);
            varint(out, u64::from(v.as_bool().ok_or_else(err)?));
        }
        K::Time | K::MicroTime => {
            len_delimited(out, num, &time(v.as_str().ok_or_else(err)?, desc, field)?)
        }
        K::Quantity => len_delimited(out, num, &quantity(v, desc, field)?),
        K::IntOrString => {
            let mut m = Vec::new();
            match v {
                Value::Number(n) => {
                    key(&mut m, 1, 0);
                    varint(&mut m, 0);
                    key(&mut m, 2, 0);
                    varint(&mut m, n.as_i64().ok_or_else(err)? as u64);
                }
                Value::String(s) => {
                    key(&mut m, 1, 0);
                    varint(&mut m, 1);
                    len_delimited(&mut m, 3, s.as_bytes());
                }
                _ => return Err(err()),
            }
            len_delimited(out, num, &m);
        }
        K::RawJson => {
            let mut m = Vec::new();
            len_delimited(&mut m, 1, v.to_string().as_bytes());
            len_delimited(out, num, &m);
        }
        K::MapStr | K::MapBytes | K::MapQuantity => {
            let map = v.as_object().ok_or_else(err)?;
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let vkind = match kind {
                K::MapBytes => K::Bytes,
                K::MapQuantity => K::Quantity,
                _ => K::Str,
            };
            for k in keys {
                let mut entry = Vec::new();
                len_delimited(&mut entry, 1, k.as_bytes());
                value(&mut entry, 2, vkind, &map[k], desc, field)?;
                len_delimited(out, num, &entry);
            }
        }
        K::Msg(d) | K::Inline(d) => {
            let mut m = Vec::new();
            message(d, v.as_object().ok_or_else(err)?, &mut m)?;
            len_delimited(out, num, &m);
        }
    }
    Ok(())
}

/// Encode the JSON object `obj` as message `desc`. Every JSON field must
/// have a place (apiVersion and kind are TypeMeta, not fields).
fn message(
    desc: &'static Desc,
    obj: &Map<String, Value>,
    out: &mut Vec<u8>,
) -> Result<(), ProtobufError> {
    let own = |name: &str| desc.fields.iter().any(|f| f.name == name);
    let type_meta = |k: &str| (k == "apiVersion" || k == "kind") && !own(k);
    let mut used = obj.keys().filter(|k| type_meta(k)).count();
    for f in desc.fields {
        if let K::Inline(d) = f.kind {
            let sub: Map<String, Value> = d
                .fields
                .iter()
                .filter_map(|g| obj.get_key_value(g.name))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !sub.is_empty() {
                used += sub.len();
                value(out, f.num, f.kind, &Value::Object(sub), desc, f.name)?;
            }
            continue;
        }
        let Some(v) = obj.get(f.name) else { continue };
        used += 1;
        match (f.repeated, v) {
            (_, Value::Null) => {}
            (true, Value::Array(items)) => {
                for item in items {
                    value(out, f.num, f.kind, item, desc, f.name)?;
                }
            }
            (true, _) => return Err(bad(desc, f.name)),
            (false, v) => value(out, f.num, f.kind, v, desc, f.name)?,
        }
    }
    if used != obj.len() {
        let inline = |k: &str| {
            desc.fields.iter().any(|f| match f.kind {
                K::Inline(d) => d.fields.iter().any(|g| g.name == k),
                _ => false,
            })
        };
        let extra = obj
            .keys()
            .find(|k| !type_meta(k) && !own(k) && !inline(k))
            .cloned()
            .unwrap_or_default();
        return Err(bad(desc, &extra));
    }
    Ok(())
}

/// Encode a JSON object of a kind in the tables (its `apiVersion` and
/// `kind` say which) as a `k8s\0`-enveloped protobuf body.
pub fn encode_object(obj: &Value) -> Result<Vec<u8>, ProtobufError> {
    let map = obj.as_object().ok_or(ProtobufError::Malformed("object"))?;
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("");
    let desc = message_for(api_version, kind)
        .ok_or_else(|| ProtobufError::UnsupportedKind(format!("{api_version}/{kind}")))?;
    let mut raw = Vec::new();
    message(desc, map, &mut raw)?;
    let mut type_meta = Vec::new();
    len_delimited(&mut type_meta, 1, api_version.as_bytes());
    len_delimited(&mut type_meta, 2, kind.as_bytes());
    let mut out = b"k8s\0".to_vec();
    len_delimited(&mut out, 1, &type_meta);
    len_delimited(&mut out, 2, &raw);
    len_delimited(&mut out, 3, b"");
    len_delimited(&mut out, 4, b"");
    Ok(out)
}

/// The media ranges of an Accept header, best first (by q, then order),
/// without those refused with q=0; `true` for a plain range (no `as=` or
/// other representation parameters).
fn ranges(accept: &str) -> Vec<(String, bool)> {
    let mut out: Vec<(f32, usize, String, bool)> = Vec::new();
    for (i, part) in accept.split(',').enumerate() {
        let mut params = part.split(';');
        let base = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let (mut q, mut plain) = (1.0f32, true);
        for p in params {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match k.trim() {
                "q" => q = v.trim().parse().unwrap_or(1.0),
                // as=Table, stream=watch, ...: a different representation.
                _ => plain = false,
            }
        }
        if q > 0.0 && !base.is_empty() {
            out.push((q, i, base, plain));
        }
    }
    out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    out.into_iter().map(|(_, _, b, p)| (b, p)).collect()
}

/// Give `resp` (a handler's JSON response) the representation the client's
/// `Accept` header asks for: unchanged when JSON is wanted, protobuf for the
/// kinds in the tables, 406 when nothing acceptable can be produced.
pub async fn negotiate(accept: Option<&str>, resp: Response) -> Response {
    let Some(accept) = accept.filter(|a| a.contains(MEDIA_TYPE)) else {
        return resp;
    };
    // Streams (watches) and non-JSON bodies stay as they are.
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/json");
    if !is_json || resp.body().size_hint().exact().is_none() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_REENCODE).await else {
        return ApiError::internal("re-reading a response for content negotiation").into_response();
    };
    for (range, plain) in ranges(accept) {
        match range.as_str() {
            // The handlers already chose JSON's representation (a Table
            // for `as=Table`).
            "application/json" | "application/*" | "*/*" => {
                return Response::from_parts(parts, Body::from(bytes));
            }
            MEDIA_TYPE if plain => {
                let encoded = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| encode_object(&v).ok());
                if let Some(pb) = encoded {
                    parts
                        .headers
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(MEDIA_TYPE));
                    parts.headers.remove(header::CONTENT_LENGTH);
                    return Response::from_parts(parts, Body::from(pb));
                }
            }
            _ => {}
        }
    }
    if parts.status.is_success() {
        ApiError::not_acceptable(accept).into_response()
    } else {
        // An error in a form the client did not ask for: keep the JSON
        // Status rather than hide the error behind a 406.
        Response::from_parts(parts, Body::from(bytes))
    }
}
