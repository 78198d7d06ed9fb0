//! `application/vnd.kubernetes.protobuf` for the built-in kinds: request
//! bodies client-go's typed clients write (kubectl `create deployment`,
//! `create service`, Helm's release Secrets, leader-election Leases, Events,
//! typed deletes) are decoded into the JSON the rest of the server works on,
//! and responses are encoded back when the client prefers protobuf (see
//! [`negotiate`]).
//!
//! ```text
//! body = "k8s\0" ++ runtime.Unknown{ 1: TypeMeta{1 apiVersion, 2 kind},
//!                                     2: raw (the kind's message),
//!                                     3: contentEncoding, 4: contentType }
//! ```
//!
//! Messages are described by the generated tables in [`tables`]: field
//! numbers from the `k8s-pb` crate (prost code generated from the
//! `generated.proto` files of k8s.io/api and apimachinery), JSON names from
//! `k8s-openapi` (`tools/gen-protobuf-tables.py`). `k8s-pb` is not used at
//! run time: its prost structs have no JSON form, and the server works on
//! JSON.
//!
//! gogo-protobuf writes non-pointer scalars even when empty, so empty
//! strings, zeros, `false` and zero timestamps are treated as absent, as
//! Go's JSON encoding of those fields (`omitempty`) would — except for the
//! fields that are pointers in Go (`replicas`, `automountServiceAccountToken`,
//! ...; marked `ptr` in the tables), whose zero is a value. A field number a
//! table does not know is an error, never silently dropped, unless it
//! carries only a zero value (a newer client's non-pointer field left
//! empty).

mod encode;
#[rustfmt::skip]
mod tables;

pub use encode::{encode_object, negotiate};

use base64::Engine;
use serde_json::{Map, Value, json};

/// The protobuf media type.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// A body that could not be decoded or encoded.
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
    /// A JSON value that has no protobuf form in the tables (encoding).
    #[error("{message}.{field} cannot be encoded as protobuf")]
    Unencodable {
        /// The message.
        message: &'static str,
        /// The JSON field.
        field: String,
    },
}

/// How a field's value is written.
#[derive(Clone, Copy)]
enum K {
    Str,
    Bytes,
    Int,
    Bool,
    /// `meta/v1.Time`: seconds and nanos; RFC 3339 to the second in JSON.
    Time,
    /// `meta/v1.MicroTime`: RFC 3339 with microseconds in JSON.
    MicroTime,
    /// `resource.Quantity`: its string in field 1.
    Quantity,
    /// `intstr.IntOrString`: type, intVal, strVal.
    IntOrString,
    /// `FieldsV1` / `RawExtension`: JSON bytes in field 1.
    RawJson,
    MapStr,
    MapBytes,
    MapQuantity,
    Msg(&'static Desc),
    /// A Go embedded struct: a field in protobuf, inlined in JSON.
    Inline(&'static Desc),
}

/// One field of a message.
struct F {
    num: u64,
    name: &'static str,
    kind: K,
    repeated: bool,
    /// A pointer in Go: zero values are kept.
    ptr: bool,
}

/// A message description.
pub struct Desc {
    name: &'static str,
    fields: &'static [F],
}

static UNKNOWN: Desc = Desc {
    name: "Unknown",
    fields: &[
        F {
            num: 1,
            name: "typeMeta",
            kind: K::Msg(&TYPE_META),
            repeated: false,
            ptr: false,
        },
        F {
            num: 2,
            name: "raw",
            kind: K::Bytes,
            repeated: false,
            ptr: false,
        },
        F {
            num: 3,
            name: "contentEncoding",
            kind: K::Str,
            repeated: false,
            ptr: false,
        },
        F {
            num: 4,
            name: "contentType",
            kind: K::Str,
            repeated: false,
            ptr: false,
        },
    ],
};
static TYPE_META: Desc = Desc {
    name: "TypeMeta",
    fields: &[
        F {
            num: 1,
            name: "apiVersion",
            kind: K::Str,
            repeated: false,
            ptr: false,
        },
        F {
            num: 2,
            name: "kind",
            kind: K::Str,
            repeated: false,
            ptr: false,
        },
    ],
};

/// The message of a kind; `DeleteOptions` in any group version (client-go
/// sends it under the resource's own group version).
fn message_for(api_version: &str, kind: &str) -> Option<&'static Desc> {
    tables::message_for(api_version, kind).or_else(|| {
        (kind == "DeleteOptions").then(|| tables::message_for("meta.k8s.io/v1", kind))?
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    msg: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], msg: &'static str) -> Self {
        Self { buf, pos: 0, msg }
    }
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
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
    fn fixed(&mut self, n: usize) -> Result<(), ProtobufError> {
        let end = self.pos + n;
        if end > self.buf.len() {
            return Err(ProtobufError::Malformed(self.msg));
        }
        self.pos = end;
        Ok(())
    }
    /// Skip an unknown field, returning whether it held a non-zero value.
    fn skip(&mut self, wire: u64) -> Result<bool, ProtobufError> {
        Ok(match wire {
            0 => self.varint()? != 0,
            1 => {
                self.fixed(8)?;
                true
            }
            2 => !self.bytes()?.is_empty(),
            5 => {
                self.fixed(4)?;
                true
            }
            _ => return Err(ProtobufError::Malformed(self.msg)),
        })
    }
}

fn string(b: &[u8], msg: &'static str) -> Result<String, ProtobufError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtobufError::Malformed(msg))
}

fn b64(b: &[u8]) -> Value {
    json!(base64::engine::general_purpose::STANDARD.encode(b))
}

/// A `Time` or `MicroTime` message; `None` for the zero time.
fn time(b: &[u8], micro: bool) -> Result<Option<String>, ProtobufError> {
    let mut rd = Reader::new(b, "Time");
    let (mut secs, mut nanos) = (0i64, 0u32);
    while !rd.done() {
        let key = rd.varint()?;
        match (key >> 3, key & 7) {
            (1, 0) => secs = rd.varint()? as i64,
            (2, 0) => nanos = rd.varint()? as u32,
            (n, w) => {
                if rd.skip(w)? {
                    return Err(ProtobufError::UnknownField {
                        message: "Time",
                        number: n,
                    });
                }
            }
        }
    }
    if secs == 0 && nanos == 0 {
        return Ok(None);
    }
    let t =
        chrono::DateTime::from_timestamp(secs, nanos).ok_or(ProtobufError::Malformed("Time"))?;
    let format = if micro {
        chrono::SecondsFormat::Micros
    } else {
        chrono::SecondsFormat::Secs
    };
    Ok(Some(t.to_rfc3339_opts(format, true)))
}

/// A message whose only field 1 is a string (Quantity) or JSON bytes.
fn field1<'a>(b: &'a [u8], msg: &'static str) -> Result<&'a [u8], ProtobufError> {
    let mut rd = Reader::new(b, msg);
    let mut out: &[u8] = &[];
    while !rd.done() {
        let key = rd.varint()?;
        if key == (1 << 3) | 2 {
            out = rd.bytes()?;
        } else if rd.skip(key & 7)? {
            return Err(ProtobufError::UnknownField {
                message: msg,
                number: key >> 3,
            });
        }
    }
    Ok(out)
}

fn int_or_string(b: &[u8]) -> Result<Value, ProtobufError> {
    let mut rd = Reader::new(b, "IntOrString");
    let (mut ty, mut int, mut s) = (0u64, 0i64, String::new());
    while !rd.done() {
        let key = rd.varint()?;
        match key {
            0x08 => ty = rd.varint()?,
            0x10 => int = rd.varint()? as i64 as i32 as i64,
            0x1a => s = string(rd.bytes()?, "IntOrString")?,
            _ => return Err(ProtobufError::Malformed("IntOrString")),
        }
    }
    Ok(if ty == 1 { json!(s) } else { json!(int) })
}

fn map_entry(b: &[u8], kind: K) -> Result<(String, Value), ProtobufError> {
    let mut rd = Reader::new(b, "map entry");
    let (mut k, mut v) = (String::new(), json!(""));
    while !rd.done() {
        let key = rd.varint()?;
        let data = rd.bytes()?;
        match (key >> 3, kind) {
            (1, _) => k = string(data, "map entry")?,
            (2, K::MapBytes) => v = b64(data),
            (2, K::MapQuantity) => v = json!(string(field1(data, "Quantity")?, "Quantity")?),
            (2, _) => v = json!(string(data, "map entry")?),
            (n, _) => {
                return Err(ProtobufError::UnknownField {
                    message: "map entry",
                    number: n,
                });
            }
        }
    }
    Ok((k, v))
}

/// Decode one field's value (`None`: absent, as Go's JSON would omit it).
fn value(field: &F, wire: u64, rd: &mut Reader<'_>) -> Result<Option<Value>, ProtobufError> {
    let keep = field.ptr || field.repeated;
    Ok(match (field.kind, wire) {
        (K::Int, 0) => {
            let v = rd.varint()? as i64;
            (v != 0 || keep).then(|| json!(v))
        }
        (K::Bool, 0) => {
            let v = rd.varint()? != 0;
            (v || keep).then(|| json!(v))
        }
        (K::Str, 2) => {
            let s = string(rd.bytes()?, rd.msg)?;
            (!s.is_empty() || keep).then(|| json!(s))
        }
        (K::Bytes, 2) => Some(b64(rd.bytes()?)),
        (K::Time, 2) => time(rd.bytes()?, false)?.map(Value::String),
        (K::MicroTime, 2) => time(rd.bytes()?, true)?.map(Value::String),
        (K::Quantity, 2) => Some(json!(string(field1(rd.bytes()?, "Quantity")?, "Quantity")?)),
        (K::IntOrString, 2) => Some(int_or_string(rd.bytes()?)?),
        (K::RawJson, 2) => {
            let raw = field1(rd.bytes()?, "raw JSON")?;
            if raw.is_empty() {
                None
            } else {
                Some(
                    serde_json::from_slice(raw)
                        .map_err(|_| ProtobufError::Malformed("raw JSON"))?,
                )
            }
        }
        (K::Msg(d), 2) => Some(decode(d, rd.bytes()?)?),
        _ => return Err(ProtobufError::Malformed(rd.msg)),
    })
}

fn decode_into(
    desc: &'static Desc,
    b: &[u8],
    out: &mut Map<String, Value>,
) -> Result<(), ProtobufError> {
    let mut rd = Reader::new(b, desc.name);
    while !rd.done() {
        let key = rd.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let Some(field) = desc.fields.iter().find(|fl| fl.num == num) else {
            if rd.skip(wire)? {
                return Err(ProtobufError::UnknownField {
                    message: desc.name,
                    number: num,
                });
            }
            continue;
        };
        match field.kind {
            K::Inline(d) => {
                decode_into(d, rd.bytes()?, out)?;
                continue;
            }
            K::MapStr | K::MapBytes | K::MapQuantity => {
                let (k, v) = map_entry(rd.bytes()?, field.kind)?;
                if let Some(m) = out
                    .entry(field.name)
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                {
                    m.insert(k, v);
                }
                continue;
            }
            K::Int if field.repeated && wire == 2 => {
                // A packed repeated integer field.
                let mut packed = Reader::new(rd.bytes()?, desc.name);
                let a = out.entry(field.name).or_insert_with(|| json!([]));
                while !packed.done() {
                    let v = packed.varint()? as i64;
                    if let Some(a) = a.as_array_mut() {
                        a.push(json!(v));
                    }
                }
                continue;
            }
            _ => {}
        }
        let Some(v) = value(field, wire, &mut rd)? else {
            continue;
        };
        if field.repeated {
            if let Some(a) = out
                .entry(field.name)
                .or_insert_with(|| json!([]))
                .as_array_mut()
            {
                a.push(v);
            }
        } else {
            out.insert(field.name.to_string(), v);
        }
    }
    Ok(())
}

fn decode(desc: &'static Desc, b: &[u8]) -> Result<Value, ProtobufError> {
    let mut out = Map::new();
    decode_into(desc, b, &mut out)?;
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
    let desc = message_for(api_version, kind)
        .ok_or_else(|| ProtobufError::UnsupportedKind(format!("{api_version}/{kind}")))?;
    let raw = unknown["raw"].as_str().unwrap_or("");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .map_err(|_| ProtobufError::Malformed("Unknown"))?;
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    decode_into(desc, &raw, &mut obj)?;
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests;
