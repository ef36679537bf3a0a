//! Human-readable rendering of histories: byte strings, ops, results and per-key listings, plus the serde
//! representation of byte strings (escaped text, so a dumped history can be read and edited by hand).

use std::fmt;

use super::{Op, OpResult, Operation, Outcome};

/// Renders bytes as text: printable ASCII as is, `\` and `"` escaped with a backslash, anything else as
/// `\xNN`. [`History::from_json`](super::History::from_json) parses it back.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// Parses the output of [`escape_bytes`] (other characters stand for their UTF-8 bytes).
pub(crate) fn unescape_bytes(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b != b'\\' {
            out.push(b);
            rest = tail;
            continue;
        }
        match tail {
            [b'\\', t @ ..] => {
                out.push(b'\\');
                rest = t;
            }
            [b'"', t @ ..] => {
                out.push(b'"');
                rest = t;
            }
            [b'x', h, l, t @ ..] => {
                let hex = [*h, *l];
                let digits = std::str::from_utf8(&hex).map_err(|_| format!("bad escape in {text:?}"))?;
                let byte = u8::from_str_radix(digits, 16).map_err(|_| format!("bad escape in {text:?}"))?;
                out.push(byte);
                rest = t;
            }
            _ => return Err(format!("bad escape in {text:?}")),
        }
    }
    Ok(out)
}

fn quoted(bytes: &[u8]) -> String {
    format!("\"{}\"", escape_bytes(bytes))
}

fn opt_quoted(bytes: &Option<Vec<u8>>) -> String {
    match bytes {
        Some(b) => quoted(b),
        None => "absent".to_string(),
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Get { key } => write!(f, "get {}", quoted(key)),
            Op::Put { key, value } => write!(f, "put {} = {}", quoted(key), quoted(value)),
            Op::Delete { key } => write!(f, "delete {}", quoted(key)),
            Op::Cas { key, expected, new } => {
                write!(f, "cas {} {} -> {}", quoted(key), opt_quoted(expected), opt_quoted(new))
            }
        }
    }
}

impl fmt::Display for OpResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpResult::Get(v) => write!(f, "{}", opt_quoted(v)),
            OpResult::Put => write!(f, "ok"),
            OpResult::Delete(Some(true)) => write!(f, "existed"),
            OpResult::Delete(Some(false)) => write!(f, "did not exist"),
            OpResult::Delete(None) => write!(f, "ok (existence unknown)"),
            OpResult::Cas(true) => write!(f, "swapped"),
            OpResult::Cas(false) => write!(f, "not swapped"),
        }
    }
}

fn millis(micros: u64) -> String {
    format!("{}.{:03}ms", micros / 1000, micros % 1000)
}

impl fmt::Display for Operation {
    /// One line: `#id client c [t invoke..return] (+wall clock) op -> result`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ret, wall, result) = match &self.outcome {
            Outcome::Pending => ("inf".to_string(), "never returned".to_string(), "PENDING (unknown)".to_string()),
            Outcome::Ok { ret, ret_micros, result } => (ret.to_string(), millis(*ret_micros), result.to_string()),
            Outcome::Unknown { noticed, noticed_micros } => (
                "inf".to_string(),
                format!("gave up at t {noticed}, {}", millis(*noticed_micros)),
                "UNKNOWN".to_string(),
            ),
            Outcome::Failed { ret, ret_micros } => {
                (ret.to_string(), millis(*ret_micros), "FAILED (did not take effect)".to_string())
            }
        };
        write!(
            f,
            "#{} client {} [t {}..{}] (+{} .. {}) {} -> {}",
            self.id,
            self.client,
            self.invoke,
            ret,
            millis(self.invoke_micros),
            wall,
            self.op,
            result
        )
    }
}

/// Lists every op on `key` in invocation order, one per line, for test failure messages.
pub fn describe_key(ops: &[Operation], key: &[u8]) -> String {
    let mut on_key: Vec<&Operation> = ops.iter().filter(|o| o.op.key() == key).collect();
    on_key.sort_by_key(|o| (o.invoke, o.id));
    let mut out = format!("history of key {} ({} ops):\n", quoted(key), on_key.len());
    for op in on_key {
        out.push_str("  ");
        out.push_str(&op.to_string());
        out.push('\n');
    }
    out
}

/// Serde of `Vec<u8>` as [`escape_bytes`] text.
pub(crate) mod bytes_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::escape_bytes(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        super::unescape_bytes(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde of `Option<Vec<u8>>` as [`escape_bytes`] text or `null`.
pub(crate) mod opt_bytes_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&super::escape_bytes(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => super::unescape_bytes(&text).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}
