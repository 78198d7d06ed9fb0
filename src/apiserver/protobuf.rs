//! Decoding of `application/vnd.kubernetes.protobuf` request bodies for the
//! built-in kinds client-go's typed clients write (kubectl `create
//! namespace|configmap|secret|serviceaccount|role|rolebinding|...`, Helm's
//! release Secrets, typed deletes), into the JSON the rest of the server
//! works on. Responses are always JSON, which those clients accept.
//!
//! ```text
//! body = "k8s\0" ++ runtime.Unknown{ 1: TypeMeta{1 apiVersion, 2 kind},
//!                                     2: raw (the kind's message), ... }
//! ```
//!
//! Messages are described by tables of (field number, JSON name, kind),
//! following the `generated.proto` files of k8s.io/api and apimachinery.
//! gogo-protobuf writes non-pointer scalars even when empty, so empty
//! strings, zeros, `false` and zero timestamps are treated as absent, as
//! Go's JSON encoding of those fields (`omitempty`) would. A field number a
//! table does not know is an error, never silently dropped.

use base64::Engine;
use serde_json::{Map, Value, json};

/// The protobuf media type.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// A body that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtobufError {
    /// Not the `k8s\0` envelope.
    #[error("protobuf body does not start with the k8s envelope")]
    Envelope,
    /// The wire data is truncated or malformed.
    #[error("malformed protobuf in {0}")]
    Malformed(&'static str),
    /// A kind this server does not decode from protobuf.
    #[error("protobuf encoding of {0} is not supported; send application/json")]
    UnsupportedKind(String),
    /// A field the tables do not describe.
    #[error("protobuf field {number} of {message} is not supported; send application/json")]
    UnknownField {
        /// The message.
        message: &'static str,
        /// The field number.
        number: u64,
    },
}

#[derive(Clone, Copy)]
enum K {
    Str,
    Bytes,
    Int,
    Bool,
    Time,
    Msg(&'static Desc),
    MapStr,
    MapBytes,
    /// FieldsV1: raw JSON bytes in field 1.
    RawJson,
}

struct Field {
    num: u64,
    name: &'static str,
    kind: K,
    repeated: bool,
}

/// A message description.
pub struct Desc {
    name: &'static str,
    fields: &'static [Field],
}

const fn f(num: u64, name: &'static str, kind: K) -> Field {
    Field {
        num,
        name,
        kind,
        repeated: false,
    }
}
const fn r(num: u64, name: &'static str, kind: K) -> Field {
    Field {
        num,
        name,
        kind,
        repeated: true,
    }
}

static TYPE_META: Desc = Desc {
    name: "TypeMeta",
    fields: &[f(1, "apiVersion", K::Str), f(2, "kind", K::Str)],
};
static UNKNOWN: Desc = Desc {
    name: "Unknown",
    fields: &[
        f(1, "typeMeta", K::Msg(&TYPE_META)),
        f(2, "raw", K::Bytes),
        f(3, "contentEncoding", K::Str),
        f(4, "contentType", K::Str),
    ],
};
static OWNER_REF: Desc = Desc {
    name: "OwnerReference",
    fields: &[
        f(1, "kind", K::Str),
        f(3, "name", K::Str),
        f(4, "uid", K::Str),
        f(5, "apiVersion", K::Str),
        f(6, "controller", K::Bool),
        f(7, "blockOwnerDeletion", K::Bool),
    ],
};
static MANAGED_FIELDS: Desc = Desc {
    name: "ManagedFieldsEntry",
    fields: &[
        f(1, "manager", K::Str),
        f(2, "operation", K::Str),
        f(3, "apiVersion", K::Str),
        f(4, "time", K::Time),
        f(6, "fieldsType", K::Str),
        f(7, "fieldsV1", K::RawJson),
        f(8, "subresource", K::Str),
    ],
};
static OBJECT_META: Desc = Desc {
    name: "ObjectMeta",
    fields: &[
        f(1, "name", K::Str),
        f(2, "generateName", K::Str),
        f(3, "namespace", K::Str),
        f(4, "selfLink", K::Str),
        f(5, "uid", K::Str),
        f(6, "resourceVersion", K::Str),
        f(7, "generation", K::Int),
        f(8, "creationTimestamp", K::Time),
        f(9, "deletionTimestamp", K::Time),
        f(10, "deletionGracePeriodSeconds", K::Int),
        f(11, "labels", K::MapStr),
        f(12, "annotations", K::MapStr),
        r(13, "ownerReferences", K::Msg(&OWNER_REF)),
        r(14, "finalizers", K::Str),
        r(17, "managedFields", K::Msg(&MANAGED_FIELDS)),
    ],
};
static NAMESPACE_SPEC: Desc = Desc {
    name: "NamespaceSpec",
    fields: &[r(1, "finalizers", K::Str)],
};
static NAMESPACE_STATUS: Desc = Desc {
    name: "NamespaceStatus",
    fields: &[f(1, "phase", K::Str)],
};
static NAMESPACE: Desc = Desc {
    name: "Namespace",
    fields: &[
        f(1, "metadata", K::Msg(&OBJECT_META)),
        f(2, "spec", K::Msg(&NAMESPACE_SPEC)),
        f(3, "status", K::Msg(&NAMESPACE_STATUS)),
    ],
};
static CONFIG_MAP: Desc = Desc {
    name: "ConfigMap",
    fields: &[
        f(1, "metadata", K::Msg(&OBJECT_META)),
        f(2, "data", K::MapStr),
        f(3, "binaryData", K::MapBytes),
        f(4, "immutable", K::Bool),
    ],
};
static SECRET: Desc = Desc {
    name: "Secret",
    fields: &[
        f(1, "metadata", K::Msg(&OBJECT_META)),
        f(2, "data", K::MapBytes),
        f(3, "type", K::Str),
        f(4, "stringData", K::MapStr),
        f(5, "immutable", K::Bool),
    ],
};
static OBJECT_REF: Desc = Desc {
    name: "ObjectReference",
    fields: &[
        f(1, "kind", K::Str),
        f(2, "namespace", K::Str),
        f(3, "name", K::Str),
        f(4, "uid", K::Str),
        f(5, "apiVersion", K::Str),
        f(6, "resourceVersion", K::Str),
        f(7, "fieldPath", K::Str),
    ],
};
static LOCAL_REF: Desc = Desc {
    name: "LocalObjectReference",
    fields: &[f(1, "name", K::Str)],
};
static SERVICE_ACCOUNT: Desc = Desc {
    name: "ServiceAccount",
    fields: &[
        f(1, "metadata", K::Msg(&OBJECT_META)),
        r(2, "secrets", K::Msg(&OBJECT_REF)),
        r(3, "imagePullSecrets", K::Msg(&LOCAL_REF)),
        f(4, "automountServiceAccountToken", K::Bool),
    ],
};
static POLICY_RULE: Desc = Desc {
    name: "PolicyRule",
    fields: &[
        r(1, "verbs", K::Str),
        r(2, "apiGroups", K::Str),
        r(3, "resources", K::Str),
        r(4, "resourceNames", K::Str),
        r(5, "nonResourceURLs", K::Str),
    ],
};
static ROLE: Desc = Desc {
    name: "Role",
    fields: &[
        f(1, "metadata", K::Msg(&OBJECT_META)),
        r(2, "rules", K::Msg(&POLICY_RULE)),
    ],
};
static CLUSTER_ROLE: Desc = Desc {
    name: "ClusterRole",
    fields: &[
        f(1, "metadata", K::Msg(&OBJECT_META)),
        r(2, "rules", K::Msg(&POLICY_RULE)),
    ],
};
static SUBJECT: Desc = Desc {
    name: "Subject",
    fields: &[
        f(1, "kind", K::Str),
        f(2, "apiGroup", K::Str),
        f(3, "name", K::Str),
        f(4, "namespace", K::Str),
    ],
};
static ROLE_REF: Desc = Desc {
    name: "RoleRef",
    fields: &[
        f(1, "apiGroup", K::Str),
        f(2, "kind", K::Str),
        f(3, "name", K::Str),
    ],
};
static ROLE_BINDING: Desc = Desc {
    name: "RoleBinding",
    fields: &[
        f(1, "metadata", K::Msg(&OBJECT_META)),
        r(2, "subjects", K::Msg(&SUBJECT)),
        f(3, "roleRef", K::Msg(&ROLE_REF)),
    ],
};
static PRECONDITIONS: Desc = Desc {
    name: "Preconditions",
    fields: &[f(1, "uid", K::Str), f(2, "resourceVersion", K::Str)],
};
static DELETE_OPTIONS: Desc = Desc {
    name: "DeleteOptions",
    fields: &[
        f(1, "gracePeriodSeconds", K::Int),
        f(2, "preconditions", K::Msg(&PRECONDITIONS)),
        f(3, "orphanDependents", K::Bool),
        f(4, "propagationPolicy", K::Str),
        r(5, "dryRun", K::Str),
        f(
            6,
            "ignoreStoreReadErrorWithClusterBreakingPotential",
            K::Bool,
        ),
    ],
};

fn desc_for(api_version: &str, kind: &str) -> Option<&'static Desc> {
    Some(match (api_version, kind) {
        ("v1", "Namespace") => &NAMESPACE,
        ("v1", "ConfigMap") => &CONFIG_MAP,
        ("v1", "Secret") => &SECRET,
        ("v1", "ServiceAccount") => &SERVICE_ACCOUNT,
        ("rbac.authorization.k8s.io/v1", "Role") => &ROLE,
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => &CLUSTER_ROLE,
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => &ROLE_BINDING,
        (_, "DeleteOptions") => &DELETE_OPTIONS,
        _ => return None,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    msg: &'static str,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ProtobufError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or(ProtobufError::Malformed(self.msg))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ProtobufError::Malformed(self.msg))
    }
    fn bytes(&mut self) -> Result<&'a [u8], ProtobufError> {
        let len =
            usize::try_from(self.varint()?).map_err(|_| ProtobufError::Malformed(self.msg))?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|e| *e <= self.buf.len())
            .ok_or(ProtobufError::Malformed(self.msg))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
}

fn string(b: &[u8], msg: &'static str) -> Result<String, ProtobufError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtobufError::Malformed(msg))
}

fn time(b: &[u8]) -> Result<Option<String>, ProtobufError> {
    let mut rd = Reader {
        buf: b,
        pos: 0,
        msg: "Time",
    };
    let (mut secs, mut nanos) = (0i64, 0u32);
    while rd.pos < b.len() {
        let key = rd.varint()?;
        match (key >> 3, key & 7) {
            (1, 0) => secs = rd.varint()? as i64,
            (2, 0) => nanos = rd.varint()? as u32,
            (n, _) => {
                return Err(ProtobufError::UnknownField {
                    message: "Time",
                    number: n,
                });
            }
        }
    }
    if secs == 0 && nanos == 0 {
        return Ok(None);
    }
    let t =
        chrono::DateTime::from_timestamp(secs, nanos).ok_or(ProtobufError::Malformed("Time"))?;
    Ok(Some(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
}

fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), ProtobufError> {
    let mut rd = Reader {
        buf: b,
        pos: 0,
        msg: "map entry",
    };
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    while rd.pos < b.len() {
        let key = rd.varint()?;
        let data = rd.bytes()?;
        match key >> 3 {
            1 => k = string(data, "map entry")?,
            2 if bytes_value => v = json!(base64::engine::general_purpose::STANDARD.encode(data)),
            2 => v = json!(string(data, "map entry")?),
            n => {
                return Err(ProtobufError::UnknownField {
                    message: "map entry",
                    number: n,
                });
            }
        }
    }
    Ok((k, v))
}

fn decode(desc: &'static Desc, b: &[u8]) -> Result<Value, ProtobufError> {
    let mut rd = Reader {
        buf: b,
        pos: 0,
        msg: desc.name,
    };
    let mut out = Map::new();
    while rd.pos < b.len() {
        let key = rd.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let field =
            desc.fields
                .iter()
                .find(|fl| fl.num == num)
                .ok_or(ProtobufError::UnknownField {
                    message: desc.name,
                    number: num,
                })?;
        let value = match (field.kind, wire) {
            (K::Int, 0) => {
                let v = rd.varint()? as i64;
                (v != 0).then(|| json!(v))
            }
            (K::Bool, 0) => rd.varint()?.ne(&0).then(|| json!(true)),
            (K::Str, 2) => {
                let s = string(rd.bytes()?, desc.name)?;
                (!s.is_empty() || field.repeated).then(|| json!(s))
            }
            (K::Bytes, 2) => Some(json!(
                base64::engine::general_purpose::STANDARD.encode(rd.bytes()?)
            )),
            (K::Time, 2) => time(rd.bytes()?)?.map(Value::String),
            (K::Msg(d), 2) => Some(decode(d, rd.bytes()?)?),
            (K::RawJson, 2) => {
                let inner = rd.bytes()?;
                let mut ir = Reader {
                    buf: inner,
                    pos: 0,
                    msg: "FieldsV1",
                };
                let mut v = None;
                while ir.pos < inner.len() {
                    let k = ir.varint()?;
                    let raw = ir.bytes()?;
                    if k >> 3 == 1 {
                        v = serde_json::from_slice(raw).ok();
                    }
                }
                v
            }
            (K::MapStr | K::MapBytes, 2) => {
                let (k, v) = map_entry(rd.bytes()?, matches!(field.kind, K::MapBytes))?;
                let m = out.entry(field.name).or_insert_with(|| json!({}));
                if let Some(m) = m.as_object_mut() {
                    m.insert(k, v);
                }
                continue;
            }
            _ => return Err(ProtobufError::Malformed(desc.name)),
        };
        let Some(value) = value else { continue };
        if field.repeated {
            let a = out.entry(field.name).or_insert_with(|| json!([]));
            if let Some(a) = a.as_array_mut() {
                a.push(value);
            }
        } else {
            out.insert(field.name.to_string(), value);
        }
    }
    Ok(Value::Object(out))
}

/// Decode a protobuf request body into the JSON object it encodes.
pub fn decode_body(body: &[u8]) -> Result<Value, ProtobufError> {
    let rest = body.strip_prefix(b"k8s\0").ok_or(ProtobufError::Envelope)?;
    let unknown = decode(&UNKNOWN, rest)?;
    let api_version = unknown
        .pointer("/typeMeta/apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = unknown
        .pointer("/typeMeta/kind")
        .and_then(Value::as_str)
        .unwrap_or("");
    let desc = desc_for(api_version, kind)
        .ok_or_else(|| ProtobufError::UnsupportedKind(format!("{api_version}/{kind}")))?;
    let raw = unknown["raw"].as_str().unwrap_or("");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .map_err(|_| ProtobufError::Malformed("Unknown"))?;
    let mut obj = decode(desc, &raw)?;
    if let Some(o) = obj.as_object_mut() {
        o.insert("apiVersion".into(), json!(api_version));
        o.insert("kind".into(), json!(kind));
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_kubectl_create_namespace() {
        // Captured from `kubectl create ns foo` (kubectl 1.37).
        let body: &[u8] = &[
            0x6b, 0x38, 0x73, 0x00, 0x0a, 0x0f, 0x0a, 0x02, 0x76, 0x31, 0x12, 0x09, b'N', b'a',
            b'm', b'e', b's', b'p', b'a', b'c', b'e', 0x12, 0x1b, 0x0a, 0x13, 0x0a, 0x03, b'f',
            b'o', b'o', 0x12, 0x00, 0x1a, 0x00, 0x22, 0x00, 0x2a, 0x00, 0x32, 0x00, 0x38, 0x00,
            0x42, 0x00, 0x12, 0x00, 0x1a, 0x02, 0x0a, 0x00, 0x1a, 0x00, 0x22, 0x00,
        ];
        let v = decode_body(body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "foo"}, "spec": {}, "status": {}})
        );
    }

    #[test]
    fn unknown_fields_are_errors() {
        // ConfigMap with field 9 (not in the table).
        let raw = [0x48, 0x01];
        assert!(matches!(
            decode(&CONFIG_MAP, &raw),
            Err(ProtobufError::UnknownField { number: 9, .. })
        ));
    }
}
