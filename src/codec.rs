//! Body codecs: JSON (the default, for any client) and a compact bincode form for Rust clients.
//!
//! Handlers see a `serde_json::Value` either way. The bincode form carries a self-describing
//! value tree ([`Tagged`]) encoded with bincode 2's serde support, because bincode itself is not
//! self-describing and job inputs such as `echo`'s are arbitrary JSON.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `Content-Type` of JSON bodies.
pub const JSON: &str = "application/json";
/// `Content-Type` of bincode bodies.
pub const BINCODE: &str = "application/x-bincode";

/// How a body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// UTF-8 JSON.
    #[default]
    Json,
    /// bincode 2 (standard config) of a [`Tagged`] value tree.
    Bincode,
}

impl Codec {
    /// Picks the codec from a `Content-Type` value; absent means JSON.
    /// Parameters such as `; charset=utf-8` are ignored.
    pub fn from_content_type(ct: Option<&str>) -> Result<Codec> {
        let base = ct
            .map(|c| {
                c.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        match base.as_str() {
            "" | JSON | "text/json" | "text/plain" => Ok(Codec::Json),
            BINCODE => Ok(Codec::Bincode),
            other => Err(Error::Codec(format!(
                "unsupported Content-Type {other:?}: use {JSON} or {BINCODE}"
            ))),
        }
    }

    /// The `Content-Type` this codec writes.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Json => JSON,
            Codec::Bincode => BINCODE,
        }
    }

    /// Encodes a value.
    pub fn encode(self, value: &Value) -> Result<Vec<u8>> {
        match self {
            Codec::Json => serde_json::to_vec(value).map_err(|e| Error::Codec(e.to_string())),
            Codec::Bincode => {
                bincode::serde::encode_to_vec(Tagged::from(value), bincode::config::standard())
                    .map_err(|e| Error::Codec(e.to_string()))
            }
        }
    }

    /// Decodes a body. An empty body decodes to `null`.
    pub fn decode(self, body: &[u8]) -> Result<Value> {
        if body.is_empty() {
            return Ok(Value::Null);
        }
        match self {
            Codec::Json => serde_json::from_slice(body)
                .map_err(|e| Error::Codec(format!("malformed JSON: {e}"))),
            Codec::Bincode => {
                let limit = bincode::config::standard().with_limit::<{ 64 * 1024 * 1024 }>();
                let (tagged, used): (Tagged, usize) =
                    bincode::serde::decode_from_slice(body, limit)
                        .map_err(|e| Error::Codec(format!("malformed bincode: {e}")))?;
                if used != body.len() {
                    return Err(Error::Codec(format!(
                        "malformed bincode: {} trailing bytes",
                        body.len() - used
                    )));
                }
                Ok(tagged.into())
            }
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "json" => Ok(Codec::Json),
            "bincode" => Ok(Codec::Bincode),
            other => Err(Error::Config(format!(
                "unknown codec {other:?}: use json or bincode"
            ))),
        }
    }
}

/// A JSON value tree that bincode can carry (it needs the variant tags spelled out).
///
/// Decoding refuses trees nested deeper than [`MAX_DEPTH`], so hostile input cannot overflow the
/// stack (JSON has the same limit through serde_json).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Tagged {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A negative integer.
    Int(i64),
    /// A non-negative integer.
    UInt(u64),
    /// A number that is not an integer.
    Float(f64),
    /// A string.
    Str(String),
    /// An array.
    Array(Vec<Tagged>),
    /// An object, keys in order.
    Object(Vec<(String, Tagged)>),
}

/// Deepest nesting a bincode body may have.
pub const MAX_DEPTH: usize = 128;

thread_local! {
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Mirror of [`Tagged`] (same variant order) that the derive decodes; children go back through
/// `Tagged`'s own impl, which counts depth.
#[derive(Deserialize)]
enum Repr {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Array(Vec<Tagged>),
    Object(Vec<(String, Tagged)>),
}

impl<'de> Deserialize<'de> for Tagged {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let depth = DEPTH.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        let out = if depth > MAX_DEPTH {
            Err(serde::de::Error::custom(format!(
                "value nested deeper than {MAX_DEPTH} levels"
            )))
        } else {
            Repr::deserialize(d)
        };
        DEPTH.with(|c| c.set(c.get().saturating_sub(1)));
        Ok(match out? {
            Repr::Null => Tagged::Null,
            Repr::Bool(b) => Tagged::Bool(b),
            Repr::Int(i) => Tagged::Int(i),
            Repr::UInt(u) => Tagged::UInt(u),
            Repr::Float(f) => Tagged::Float(f),
            Repr::Str(s) => Tagged::Str(s),
            Repr::Array(a) => Tagged::Array(a),
            Repr::Object(o) => Tagged::Object(o),
        })
    }
}

impl From<&Value> for Tagged {
    fn from(v: &Value) -> Self {
        match v {
            Value::Null => Tagged::Null,
            Value::Bool(b) => Tagged::Bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    Tagged::UInt(u)
                } else if let Some(i) = n.as_i64() {
                    Tagged::Int(i)
                } else {
                    Tagged::Float(n.as_f64().unwrap_or(0.0))
                }
            }
            Value::String(s) => Tagged::Str(s.clone()),
            Value::Array(a) => Tagged::Array(a.iter().map(Tagged::from).collect()),
            Value::Object(o) => Tagged::Object(
                o.iter()
                    .map(|(k, v)| (k.clone(), Tagged::from(v)))
                    .collect(),
            ),
        }
    }
}

impl From<Tagged> for Value {
    fn from(t: Tagged) -> Self {
        match t {
            Tagged::Null => Value::Null,
            Tagged::Bool(b) => Value::Bool(b),
            Tagged::Int(i) => Value::from(i),
            Tagged::UInt(u) => Value::from(u),
            Tagged::Float(f) => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            Tagged::Str(s) => Value::String(s),
            Tagged::Array(a) => Value::Array(a.into_iter().map(Value::from).collect()),
            Tagged::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, v.into())).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_codecs_round_trip() {
        let v = json!({"a": [1, -2, 3.5, null, true, "x"], "b": {"c": u64::MAX}});
        for codec in [Codec::Json, Codec::Bincode] {
            let bytes = codec.encode(&v).expect("encode");
            assert_eq!(codec.decode(&bytes).expect("decode"), v, "{codec:?}");
        }
    }

    #[test]
    fn bincode_is_smaller_for_floats_and_flags() {
        let v = json!([
            1.234_567_890_123_4,
            9.876_543_210_987_6,
            true,
            false,
            true,
            1e-9
        ]);
        let j = Codec::Json.encode(&v).expect("json");
        let b = Codec::Bincode.encode(&v).expect("bincode");
        assert!(b.len() < j.len(), "{} vs {}", b.len(), j.len());
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        assert!(Codec::Json.decode(b"{nope").is_err());
        assert!(Codec::Bincode.decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Codec::Bincode
            .decode(&[7, 250, 255, 255, 255, 255, 255, 255, 255, 127])
            .is_err());
    }

    #[test]
    fn deep_bincode_nesting_is_refused() {
        // Array(len 1) repeated: variant 6, length 1, ... then Null.
        let mut body = Vec::new();
        for _ in 0..100_000 {
            body.extend_from_slice(&[6, 1]);
        }
        body.push(0);
        let err = Codec::Bincode.decode(&body).err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("nested deeper"));
        let ok = json!([[[[1]]]]);
        let bytes = Codec::Bincode.encode(&ok).expect("encode");
        assert_eq!(Codec::Bincode.decode(&bytes).expect("decode"), ok);
    }

    #[test]
    fn content_types() {
        assert_eq!(Codec::from_content_type(None).ok(), Some(Codec::Json));
        assert_eq!(
            Codec::from_content_type(Some("application/json; charset=utf-8")).ok(),
            Some(Codec::Json)
        );
        assert_eq!(
            Codec::from_content_type(Some(BINCODE)).ok(),
            Some(Codec::Bincode)
        );
        assert!(Codec::from_content_type(Some("text/xml")).is_err());
    }
}
