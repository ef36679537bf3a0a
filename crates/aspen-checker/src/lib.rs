//! Linearizability checking of recorded client histories: the oracle of the fault-injection tests.
//!
//! This module owns the history vocabulary ([`Op`], [`OpResult`], [`Operation`], [`Outcome`]), the concurrent
//! recorder ([`History`], [`OpHandle`]) and the checker ([`check`]): a Wing–Gong–Lowe search with Lowe's
//! memoization of (linearized set, model state), run per key (a register per key is P-compositional).
//!
//! The model is one register per key, initially absent: `Get -> Option<value>`, `Put(value)`,
//! `Delete -> existed` (optional result) and `Cas { expected, new } -> success`.
//!
//! Ops whose outcome the client does not know (timeout, crash, ambiguous error) — and ops never completed —
//! are *unknown*: they may take effect at any point after their invocation, or never, and their results are
//! unconstrained. They never return, so they stay candidates for ever, and the search succeeds once every
//! *known* op is linearized (unknown ops left over never took effect). To keep unknown ops from multiplying
//! the search, it only places an unknown op where it changes the state and right before an op that observes
//! it (any linearization can be rewritten into that form), tries known ops first, and lets a failed point
//! rule out the points that differ only by having used up more unknown ops (see `search.rs`).
//!
//! It must never talk to a cluster or import any other Aspen layer: it only judges what it is given, and it
//! must never panic on any input (malformed histories are a [`CheckError`]).

mod format;
mod history;
mod search;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use format::{describe_key, escape_bytes};
pub use history::{History, OpHandle};
pub use search::{check, CheckConfig, CheckReport, CheckResult};

/// Identifies a client (a logical process issuing one op at a time) in a history.
pub type ClientId = u64;

/// One client operation on one key, as invoked.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Op {
    /// Read the key's value.
    Get {
        /// The key read.
        #[serde(with = "format::bytes_text")]
        key: Vec<u8>,
    },
    /// Set the key to `value`.
    Put {
        /// The key written.
        #[serde(with = "format::bytes_text")]
        key: Vec<u8>,
        /// The value written.
        #[serde(with = "format::bytes_text")]
        value: Vec<u8>,
    },
    /// Remove the key.
    Delete {
        /// The key removed.
        #[serde(with = "format::bytes_text")]
        key: Vec<u8>,
    },
    /// Compare-and-swap: if the key's value equals `expected` (`None`: the key is absent), set it to `new`
    /// (`None`: delete it).
    Cas {
        /// The key updated.
        #[serde(with = "format::bytes_text")]
        key: Vec<u8>,
        /// The value the key must hold for the swap to happen; `None` means the key must be absent.
        #[serde(with = "format::opt_bytes_text")]
        expected: Option<Vec<u8>>,
        /// The value stored on success; `None` deletes the key.
        #[serde(with = "format::opt_bytes_text")]
        new: Option<Vec<u8>>,
    },
}

impl Op {
    /// The key this op acts on.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Get { key } | Op::Put { key, .. } | Op::Delete { key } | Op::Cas { key, .. } => key,
        }
    }
}

/// The result a client observed for a completed op. Its variant must match the op's.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum OpResult {
    /// The value read by a `Get` (`None`: the key was absent).
    Get(#[serde(with = "format::opt_bytes_text")] Option<Vec<u8>>),
    /// A `Put` was applied.
    Put,
    /// A `Delete` was applied; whether the key existed before, when the client knows it (`None`: not known,
    /// so not checked).
    Delete(Option<bool>),
    /// Whether a `Cas` swapped.
    Cas(bool),
}

/// How an op ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Never completed (the client task died or the history was read while it ran): checked as unknown.
    Pending,
    /// Completed with a known result at logical time `ret`.
    Ok {
        /// Logical return time (same clock as [`Operation::invoke`]).
        ret: u64,
        /// Wall-clock return time, microseconds since the history started (for humans only).
        ret_micros: u64,
        /// What the client observed.
        result: OpResult,
    },
    /// The client does not know whether or when it took effect (timeout, crash, ambiguous error). `noticed` is
    /// when the client gave up; the op may still take effect after it.
    Unknown {
        /// Logical time at which the client declared the op unknown (informational: not a return time).
        noticed: u64,
        /// Wall-clock time of `noticed`, microseconds since the history started.
        noticed_micros: u64,
    },
    /// The op definitely did not take effect (e.g. rejected before it was proposed); the checker ignores it.
    Failed {
        /// Logical time at which the failure was observed.
        ret: u64,
        /// Wall-clock time of `ret`, microseconds since the history started.
        ret_micros: u64,
    },
}

/// One recorded op: who invoked what when, and how it ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// Index of the op in its history (unique within it).
    pub id: u64,
    /// The invoking client.
    pub client: ClientId,
    /// What was invoked.
    pub op: Op,
    /// Logical invocation time: every invocation and return of a history takes a distinct, increasing tick.
    pub invoke: u64,
    /// Wall-clock invocation time, microseconds since the history started (for humans only).
    pub invoke_micros: u64,
    /// How the op ended.
    pub outcome: Outcome,
}

/// A history the checker cannot judge because it is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// A completed op's result does not fit the op (e.g. a `Get` completed with [`OpResult::Put`]).
    #[error("op #{id}: result {result} does not match op {op}")]
    ResultMismatch {
        /// The op's id.
        id: u64,
        /// The op, formatted.
        op: String,
        /// The result, formatted.
        result: String,
    },
    /// An op returned before it was invoked.
    #[error("op #{id}: returns at {ret}, before its invocation at {invoke}")]
    ReturnBeforeInvoke {
        /// The op's id.
        id: u64,
        /// Its invocation time.
        invoke: u64,
        /// Its return time.
        ret: u64,
    },
    /// Two ops share an id.
    #[error("op id #{0} appears twice")]
    DuplicateId(u64),
    /// The history could not be serialized or parsed.
    #[error("history (de)serialization: {0}")]
    Serde(String),
}
