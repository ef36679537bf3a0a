//! The concurrent history recorder: many client tasks share one [`History`] and record each op's invocation
//! and completion on a single logical clock, so real-time order between ops is captured exactly.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::search::{check, CheckConfig, CheckReport};
use super::{describe_key, CheckError, ClientId, Op, OpResult, Operation, Outcome};

/// A shared, append-only record of client ops. Cloning it is cheap and every clone records into the same
/// history, so hand one clone to each client task.
///
/// Record an op with [`History::invoke`] *before* sending the request and complete the returned
/// [`OpHandle`] *after* the response arrived: the checker relies on `invoke < return` bracketing the moment
/// the op took effect.
#[derive(Clone)]
pub struct History {
    shared: Arc<Shared>,
}

struct Shared {
    start: Instant,
    inner: Mutex<Recorded>,
}

struct Recorded {
    /// The logical clock: the next tick to hand out.
    next_tick: u64,
    ops: Vec<Operation>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").field("ops", &self.lock().ops.len()).finish()
    }
}

impl History {
    /// An empty history whose wall clock starts now.
    pub fn new() -> Self {
        History {
            shared: Arc::new(Shared {
                start: Instant::now(),
                inner: Mutex::new(Recorded { next_tick: 1, ops: vec![] }),
            }),
        }
    }

    /// A history holding already recorded ops (e.g. read back from a JSON dump) and recording after them.
    pub fn from_operations(ops: Vec<Operation>) -> Self {
        let last_tick = ops
            .iter()
            .flat_map(|o| {
                let end = match &o.outcome {
                    Outcome::Ok { ret, .. } | Outcome::Failed { ret, .. } => *ret,
                    Outcome::Unknown { noticed, .. } => *noticed,
                    Outcome::Pending => 0,
                };
                [o.invoke, end]
            })
            .max()
            .unwrap_or(0);
        History {
            shared: Arc::new(Shared {
                start: Instant::now(),
                inner: Mutex::new(Recorded { next_tick: last_tick.saturating_add(1), ops }),
            }),
        }
    }

    /// A poisoned lock only means a recording task panicked; the ops recorded so far are still valid.
    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.shared.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn micros(&self) -> u64 {
        u64::try_from(self.shared.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Records that `client` invokes `op` now. Complete the returned handle with [`OpHandle::ok`],
    /// [`OpHandle::unknown`] or [`OpHandle::failed`]; a handle dropped without that stays pending, which the
    /// checker treats as unknown.
    pub fn invoke(&self, client: ClientId, op: Op) -> OpHandle {
        let micros = self.micros();
        let mut rec = self.lock();
        let tick = rec.next_tick;
        rec.next_tick += 1;
        let index = rec.ops.len();
        let id = index as u64;
        rec.ops.push(Operation { id, client, op, invoke: tick, invoke_micros: micros, outcome: Outcome::Pending });
        OpHandle { history: self.clone(), index }
    }

    fn complete(&self, index: usize, outcome: impl FnOnce(u64, u64) -> Outcome) {
        let micros = self.micros();
        let mut rec = self.lock();
        let tick = rec.next_tick;
        rec.next_tick += 1;
        if let Some(op) = rec.ops.get_mut(index) {
            op.outcome = outcome(tick, micros);
        }
    }

    /// A copy of every op recorded so far (ops still running are [`Outcome::Pending`]).
    pub fn operations(&self) -> Vec<Operation> {
        self.lock().ops.clone()
    }

    /// Number of ops recorded so far.
    pub fn len(&self) -> usize {
        self.lock().ops.len()
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the history recorded so far for linearizability with `config`.
    pub fn check(&self, config: &CheckConfig) -> Result<CheckReport, CheckError> {
        check(&self.operations(), config)
    }

    /// Lists the ops on `key`, one per line (see [`describe_key`]).
    pub fn describe_key(&self, key: &[u8]) -> String {
        describe_key(&self.lock().ops, key)
    }

    /// The recorded ops as pretty JSON; read it back with [`History::from_json`].
    pub fn to_json(&self) -> Result<String, CheckError> {
        serde_json::to_string_pretty(&self.lock().ops).map_err(|e| CheckError::Serde(e.to_string()))
    }

    /// Parses a JSON dump made by [`History::to_json`].
    pub fn from_json(json: &str) -> Result<Self, CheckError> {
        let ops: Vec<Operation> = serde_json::from_str(json).map_err(|e| CheckError::Serde(e.to_string()))?;
        Ok(Self::from_operations(ops))
    }
}

/// An invoked op waiting for its outcome. Completing it consumes it, so an op ends at most once.
#[derive(Debug)]
#[must_use = "complete the op with ok(), unknown() or failed(); a dropped handle counts as unknown"]
pub struct OpHandle {
    history: History,
    index: usize,
}

impl OpHandle {
    /// The id of the op in its history.
    pub fn id(&self) -> u64 {
        self.index as u64
    }

    /// The op returned `result` now.
    pub fn ok(self, result: OpResult) {
        self.history.complete(self.index, |ret, ret_micros| Outcome::Ok { ret, ret_micros, result });
    }

    /// The client cannot tell whether the op took effect (timeout, lost connection, ambiguous error): it may
    /// take effect at any time after its invocation, or never.
    pub fn unknown(self) {
        self.history.complete(self.index, |noticed, noticed_micros| Outcome::Unknown { noticed, noticed_micros });
    }

    /// The op definitely did not take effect (e.g. refused before it was proposed to Raft). Only use this when
    /// that is certain: a wrong `failed` can make the checker report a violation that did not happen.
    pub fn failed(self) {
        self.history.complete(self.index, |ret, ret_micros| Outcome::Failed { ret, ret_micros });
    }
}
