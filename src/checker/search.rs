//! The Wing–Gong–Lowe linearizability search over one key's register, with Lowe's memoization of
//! (linearized set, model state) and porcupine's doubly-linked entry list, plus the per-history driver that
//! validates ops, splits them by key and assembles the [`CheckReport`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::time::{Duration, Instant};

use super::format::escape_bytes;
use super::{CheckError, Op, OpResult, Operation, Outcome};

/// Limits of the search, so a pathological history yields [`CheckResult::Incomplete`] instead of hanging.
#[derive(Clone, Debug)]
pub struct CheckConfig {
    /// Most (linearized set, state) pairs memoized per key; bounds memory (each costs about `ops / 8` bytes).
    pub max_states_per_key: usize,
    /// Wall-clock limit for the whole check; `None` for none. Tests should rely on `max_states_per_key`.
    pub time_limit: Option<Duration>,
    /// How many ops of the longest linearizable prefix a violation explanation lists (the last ones).
    pub explain_prefix_ops: usize,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig { max_states_per_key: 1 << 20, time_limit: None, explain_prefix_ops: 30 }
    }
}

/// The verdict on one key or on a whole history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// Linearizable.
    Ok,
    /// Not linearizable; `explanation` lists the longest linearizable prefix found and the ops that could not
    /// be placed after it.
    Violation {
        /// The key whose history is not linearizable.
        key: Vec<u8>,
        /// A multi-line account for humans.
        explanation: String,
    },
    /// The search hit its budget before deciding.
    Incomplete {
        /// The key whose check did not finish.
        key: Vec<u8>,
        /// Which limit was hit.
        reason: String,
    },
}

impl CheckResult {
    /// Whether the history was proved linearizable.
    pub fn is_ok(&self) -> bool {
        matches!(self, CheckResult::Ok)
    }

    /// Whether the history was proved not linearizable.
    pub fn is_violation(&self) -> bool {
        matches!(self, CheckResult::Violation { .. })
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Ok => write!(f, "linearizable"),
            CheckResult::Violation { explanation, .. } => write!(f, "{explanation}"),
            CheckResult::Incomplete { key, reason } => {
                write!(f, "key \"{}\": check incomplete: {reason}", escape_bytes(key))
            }
        }
    }
}

/// The outcome of [`check`]: a verdict per key and overall.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// Verdict per key, for every key with at least one op that did not fail.
    pub per_key: BTreeMap<Vec<u8>, CheckResult>,
    /// The overall verdict: the first violating key if any, else the first incomplete key, else `Ok`.
    pub result: CheckResult,
    /// Memoized states explored over all keys (a measure of the search's effort).
    pub states_explored: u64,
}

impl CheckReport {
    /// Whether the whole history was proved linearizable.
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// Checks a history for linearizability against a register per key, initially absent.
///
/// Ops with [`Outcome::Failed`] are ignored; [`Outcome::Unknown`] and [`Outcome::Pending`] ops may take
/// effect at any point after their invocation, or never, with unconstrained results.
pub fn check(ops: &[Operation], config: &CheckConfig) -> Result<CheckReport, CheckError> {
    check_with(ops, config, true)
}

/// [`check`], with the dropping of unobservable unknown ops switchable so tests can show it changes nothing.
pub(crate) fn check_with(ops: &[Operation], config: &CheckConfig, prune: bool) -> Result<CheckReport, CheckError> {
    validate(ops)?;
    let deadline = config.time_limit.and_then(|limit| Instant::now().checked_add(limit));
    let mut by_key: BTreeMap<&[u8], Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        if !matches!(op.outcome, Outcome::Failed { .. }) {
            by_key.entry(op.op.key()).or_default().push(op);
        }
    }
    let mut per_key = BTreeMap::new();
    let mut states_explored = 0;
    for (key, key_ops) in by_key {
        let (result, states) = KeyCheck::new(key, &key_ops, prune).run(config, deadline);
        states_explored += states;
        per_key.insert(key.to_vec(), result);
    }
    let result = per_key
        .values()
        .find(|r| r.is_violation())
        .or_else(|| per_key.values().find(|r| !r.is_ok()))
        .cloned()
        .unwrap_or(CheckResult::Ok);
    Ok(CheckReport { per_key, result, states_explored })
}

fn validate(ops: &[Operation]) -> Result<(), CheckError> {
    let mut ids = HashSet::with_capacity(ops.len());
    for o in ops {
        if !ids.insert(o.id) {
            return Err(CheckError::DuplicateId(o.id));
        }
        if let Outcome::Ok { ret, result, .. } = &o.outcome {
            let fits = matches!(
                (&o.op, result),
                (Op::Get { .. }, OpResult::Get(_))
                    | (Op::Put { .. }, OpResult::Put)
                    | (Op::Delete { .. }, OpResult::Delete(_))
                    | (Op::Cas { .. }, OpResult::Cas(_))
            );
            if !fits {
                return Err(CheckError::ResultMismatch { id: o.id, op: o.op.to_string(), result: result.to_string() });
            }
            if *ret < o.invoke {
                return Err(CheckError::ReturnBeforeInvoke { id: o.id, invoke: o.invoke, ret: *ret });
            }
        }
    }
    Ok(())
}

/// A register state: 0 is absent, `n > 0` the n-th distinct value seen on the key.
type State = u32;
const ABSENT: State = 0;

/// An op reduced to its effect on the register and the constraint its result puts on the state.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// `sees: None` is an unknown read: no constraint, no effect.
    Get {
        sees: Option<State>,
    },
    Put {
        value: State,
    },
    Delete {
        existed: Option<bool>,
    },
    Cas {
        expected: State,
        new: State,
        swapped: Option<bool>,
    },
}

impl Step {
    /// The state after applying this op to `state`, or `None` when its result contradicts `state`.
    fn apply(self, state: State) -> Option<State> {
        match self {
            Step::Get { sees } => sees.is_none_or(|s| s == state).then_some(state),
            Step::Put { value } => Some(value),
            Step::Delete { existed } => existed.is_none_or(|e| e == (state != ABSENT)).then_some(ABSENT),
            Step::Cas { expected, new, swapped } => {
                let matches = state == expected;
                swapped.is_none_or(|s| s == matches).then_some(if matches { new } else { state })
            }
        }
    }
}

struct KeyOp<'a> {
    src: &'a Operation,
    /// `None` for unknown and pending ops: they never return.
    ret: Option<u64>,
    step: Step,
}

const HEAD: usize = 0;
const NONE: usize = usize::MAX;

/// One node of the entry list: the call or return of an op. Unknown ops have no return node.
#[derive(Clone, Copy)]
struct Node {
    prev: usize,
    next: usize,
    op: usize,
    is_call: bool,
    /// For a call, its return node (or `NONE`).
    ret: usize,
}

/// The memo key: which ops are linearized and the register state after them.
#[derive(PartialEq, Eq)]
struct Memo {
    bits: Vec<u64>,
    state: State,
}

impl Hash for Memo {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u32(self.state);
        for w in &self.bits {
            h.write_u64(*w);
        }
    }
}

/// FxHash: the memo holds millions of keys of trusted data, where SipHash's cost dominates the search.
#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.add(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The check of one key's sub-history.
struct KeyCheck<'a> {
    key: &'a [u8],
    ops: Vec<KeyOp<'a>>,
    /// Value of each state (index = state); index 0 (absent) is unused.
    values: Vec<Option<&'a [u8]>>,
    /// Unknown ops left out because no result can observe them (see [`KeyCheck::new`]).
    dropped: usize,
}

/// The deepest point the search reached: the longest linearizable prefix it found.
struct Deepest {
    path: Vec<usize>,
    bits: Vec<u64>,
    state: State,
}

impl<'a> KeyCheck<'a> {
    fn new(key: &'a [u8], src: &[&'a Operation], prune: bool) -> Self {
        let mut ids: HashMap<&'a [u8], State> = HashMap::new();
        let mut values: Vec<Option<&'a [u8]>> = vec![None];
        let mut intern = |v: Option<&'a [u8]>| -> State {
            match v {
                None => ABSENT,
                Some(bytes) => *ids.entry(bytes).or_insert_with(|| {
                    values.push(Some(bytes));
                    (values.len() - 1) as State
                }),
            }
        };
        let mut ops = Vec::with_capacity(src.len());
        for &o in src {
            let (ret, result) = match &o.outcome {
                Outcome::Ok { ret, result, .. } => (Some(*ret), Some(result)),
                _ => (None, None),
            };
            let step = match (&o.op, result) {
                (Op::Get { .. }, Some(OpResult::Get(v))) => Step::Get { sees: Some(intern(v.as_deref())) },
                (Op::Get { .. }, _) => Step::Get { sees: None },
                (Op::Put { value, .. }, _) => Step::Put { value: intern(Some(value)) },
                (Op::Delete { .. }, Some(OpResult::Delete(existed))) => Step::Delete { existed: *existed },
                (Op::Delete { .. }, _) => Step::Delete { existed: None },
                (Op::Cas { expected, new, .. }, result) => Step::Cas {
                    expected: intern(expected.as_deref()),
                    new: intern(new.as_deref()),
                    swapped: match result {
                        Some(OpResult::Cas(s)) => Some(*s),
                        _ => None,
                    },
                },
            };
            ops.push(KeyOp { src: o, ret, step });
        }
        let before = ops.len();
        if prune {
            ops = Self::drop_unobservable(ops);
        }
        let dropped = before - ops.len();
        KeyCheck { key, ops, values, dropped }
    }

    /// Leaves out unknown ops that no linearization needs, which keeps the search from trying them at every
    /// point after their invocation:
    ///
    /// - an unknown `Get` has no effect and no constrained result;
    /// - an unknown `Put(v)` when no op can observe `v` being there: no known `Get` returned `v`, no `Cas`
    ///   expects `v`, no known `Delete` reported `existed = true` and no known `Cas` failed. Then in any
    ///   linearization using it, every op between it and the next state change accepts any state (or is an
    ///   unknown no-op that can be dropped too), and that next change (a `Put`, an unchecked `Delete`) does
    ///   not care about the state before it; so it also linearizes without the `Put`;
    /// - an unknown `Delete`, symmetrically, when nothing can observe absence: no known `Get` returned absent,
    ///   no `Cas` expects absence, no known `Delete` reported `existed = false` and no known `Cas` failed.
    ///
    /// The conditions only mention ops that are never dropped, so dropping all such ops at once is sound.
    fn drop_unobservable(ops: Vec<KeyOp<'a>>) -> Vec<KeyOp<'a>> {
        let mut observed: HashSet<State> = HashSet::new();
        let mut existed_true = false;
        let mut existed_false = false;
        let mut cas_failed = false;
        for o in &ops {
            match o.step {
                Step::Get { sees: Some(s) } => {
                    observed.insert(s);
                }
                Step::Get { sees: None } => {}
                Step::Put { .. } => {}
                Step::Delete { existed } => {
                    existed_true |= existed == Some(true);
                    existed_false |= existed == Some(false);
                }
                Step::Cas { expected, swapped, .. } => {
                    observed.insert(expected);
                    cas_failed |= swapped == Some(false);
                }
            }
        }
        ops.into_iter()
            .filter(|o| {
                if o.ret.is_some() {
                    return true;
                }
                match o.step {
                    Step::Get { .. } => false,
                    Step::Put { value } => observed.contains(&value) || existed_true || cas_failed,
                    Step::Delete { .. } => observed.contains(&ABSENT) || existed_false || cas_failed,
                    Step::Cas { .. } => true,
                }
            })
            .collect()
    }

    /// Builds the entry list: calls and returns by time, a call before a return at the same time (such ops
    /// count as concurrent, the lenient reading).
    fn entry_list(&self) -> Vec<Node> {
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(self.ops.len() * 2);
        for (i, o) in self.ops.iter().enumerate() {
            events.push((o.src.invoke, false, i));
            if let Some(ret) = o.ret {
                events.push((ret, true, i));
            }
        }
        events.sort_unstable();
        let tail = events.len() + 1;
        let mut nodes = Vec::with_capacity(events.len() + 2);
        nodes.push(Node { prev: NONE, next: 1, op: NONE, is_call: false, ret: NONE });
        let mut call_node = vec![NONE; self.ops.len()];
        for (pos, &(_, is_return, op)) in events.iter().enumerate() {
            let index = pos + 1;
            nodes.push(Node { prev: index - 1, next: index + 1, op, is_call: !is_return, ret: NONE });
            if is_return {
                if let Some(call) = call_node.get(op).copied().and_then(|c| nodes.get_mut(c)) {
                    call.ret = index;
                }
            } else if let Some(slot) = call_node.get_mut(op) {
                *slot = index;
            }
        }
        nodes.push(Node { prev: tail - 1, next: NONE, op: NONE, is_call: false, ret: NONE });
        nodes
    }

    fn run(&self, config: &CheckConfig, deadline: Option<Instant>) -> (CheckResult, u64) {
        let known = self.ops.iter().filter(|o| o.ret.is_some()).count();
        if known == 0 {
            return (CheckResult::Ok, 0);
        }
        let mut nodes = self.entry_list();
        let tail = nodes.len() - 1;
        let words = self.ops.len().div_ceil(64);
        let mut bits = vec![0u64; words];
        let mut memo: HashSet<Memo, BuildHasherDefault<FxHasher>> = HashSet::default();
        let mut stack: Vec<(usize, State)> = Vec::new();
        let mut deepest = Deepest { path: vec![], bits: bits.clone(), state: ABSENT };
        let mut state = ABSENT;
        let mut linearized_known = 0;
        let mut entry = nodes[HEAD].next;
        let mut iterations: u64 = 0;

        loop {
            iterations += 1;
            if iterations % 4096 == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                let reason = format!("time limit reached after {} states", memo.len());
                return (CheckResult::Incomplete { key: self.key.to_vec(), reason }, memo.len() as u64);
            }
            let node = nodes[entry];
            if node.is_call {
                let op = &self.ops[node.op];
                if let Some(next_state) = op.step.apply(state) {
                    let (word, mask) = (node.op / 64, 1u64 << (node.op % 64));
                    bits[word] |= mask;
                    let probe = Memo { bits: std::mem::take(&mut bits), state: next_state };
                    let fresh = !memo.contains(&probe);
                    bits = probe.bits;
                    if fresh {
                        if memo.len() >= config.max_states_per_key {
                            let reason =
                                format!("explored {} states (limit {})", memo.len(), config.max_states_per_key);
                            return (CheckResult::Incomplete { key: self.key.to_vec(), reason }, memo.len() as u64);
                        }
                        memo.insert(Memo { bits: bits.clone(), state: next_state });
                        stack.push((entry, state));
                        state = next_state;
                        lift(&mut nodes, entry);
                        if op.ret.is_some() {
                            linearized_known += 1;
                            if linearized_known == known {
                                return (CheckResult::Ok, memo.len() as u64);
                            }
                        }
                        if stack.len() > deepest.path.len() {
                            deepest.path = stack.iter().map(|&(e, _)| nodes[e].op).collect();
                            deepest.bits.clone_from(&bits);
                            deepest.state = state;
                        }
                        entry = nodes[HEAD].next;
                        continue;
                    }
                    bits[word] &= !mask;
                }
                entry = node.next;
            } else {
                // A return (or the end of the list) while known ops remain: the op it closes had to be
                // linearized before here, so undo the latest choice and try the next candidate instead.
                let Some((call, prev_state)) = stack.pop() else {
                    let explanation = self.explain(&deepest, config);
                    return (CheckResult::Violation { key: self.key.to_vec(), explanation }, memo.len() as u64);
                };
                let op = nodes[call].op;
                bits[op / 64] &= !(1u64 << (op % 64));
                unlift(&mut nodes, call);
                state = prev_state;
                if self.ops[op].ret.is_some() {
                    linearized_known -= 1;
                }
                entry = nodes[call].next;
            }
            if entry == NONE {
                entry = tail;
            }
        }
    }

    fn show_state(&self, state: State) -> String {
        match self.values.get(state as usize).copied().flatten() {
            Some(v) => format!("\"{}\"", escape_bytes(v)),
            None => "absent".to_string(),
        }
    }

    /// What `step` would observe from `state`, for the explanation.
    fn model_says(&self, step: Step, state: State) -> String {
        match step {
            Step::Get { .. } => format!("a read here returns {}", self.show_state(state)),
            Step::Put { .. } => "a put can always apply".to_string(),
            Step::Delete { .. } => {
                format!("a delete here reports {}", if state == ABSENT { "did not exist" } else { "existed" })
            }
            Step::Cas { expected, .. } => {
                format!("a cas here {}", if state == expected { "swaps" } else { "does not swap" })
            }
        }
    }

    fn explain(&self, deepest: &Deepest, config: &CheckConfig) -> String {
        use std::fmt::Write;
        let known = self.ops.iter().filter(|o| o.ret.is_some()).count();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "key \"{}\" is not linearizable: {} ops ({} known, {} unknown; {} more unknown ops left out as \
             unobservable)",
            escape_bytes(self.key),
            self.ops.len(),
            known,
            self.ops.len() - known,
            self.dropped
        );
        let skip = deepest.path.len().saturating_sub(config.explain_prefix_ops);
        let _ = writeln!(
            out,
            "longest linearizable prefix found: {} ops{}, leaving the key {}:",
            deepest.path.len(),
            if skip > 0 { format!(" (the first {skip} not shown)") } else { String::new() },
            self.show_state(deepest.state)
        );
        for (n, &op) in deepest.path.iter().enumerate().skip(skip) {
            let _ = writeln!(out, "  {:>5}. {}", n + 1, self.ops[op].src);
        }
        let is_linearized = |i: usize| deepest.bits.get(i / 64).is_some_and(|w| w & (1u64 << (i % 64)) != 0);
        // The earliest-returning op left out: it must take effect before its return, so one of the ops invoked
        // by then must come next; none of them leads to a full linearization.
        let blocker =
            (0..self.ops.len()).filter(|&i| !is_linearized(i)).filter_map(|i| self.ops[i].ret.map(|r| (r, i))).min();
        if let Some((deadline, blocker)) = blocker {
            let _ = writeln!(
                out,
                "then op #{} must take effect by t {deadline}, but no op invoked by then can come next and lead \
                 to a linearization of the rest:",
                self.ops[blocker].src.id
            );
            let mut candidates: Vec<usize> =
                (0..self.ops.len()).filter(|&i| !is_linearized(i) && self.ops[i].src.invoke <= deadline).collect();
            candidates.sort_by_key(|&i| (self.ops[i].ret.is_none(), self.ops[i].src.invoke));
            let shown = 20;
            for &i in candidates.iter().take(shown) {
                let o = &self.ops[i];
                let fits = if o.step.apply(deepest.state).is_some() { "fits, but dead end" } else { "contradicts" };
                let _ = writeln!(out, "         {}   [{}: {}]", o.src, fits, self.model_says(o.step, deepest.state));
            }
            if candidates.len() > shown {
                let _ = writeln!(out, "         ... and {} more", candidates.len() - shown);
            }
        }
        out
    }
}

/// Unlinks a call node and its return node (dancing links: [`unlift`] restores them in LIFO order).
fn lift(nodes: &mut [Node], call: usize) {
    unlink(nodes, call);
    let ret = nodes[call].ret;
    if ret != NONE {
        unlink(nodes, ret);
    }
}

fn unlift(nodes: &mut [Node], call: usize) {
    let ret = nodes[call].ret;
    if ret != NONE {
        relink(nodes, ret);
    }
    relink(nodes, call);
}

fn unlink(nodes: &mut [Node], x: usize) {
    let Node { prev, next, .. } = nodes[x];
    nodes[prev].next = next;
    if next != NONE {
        nodes[next].prev = prev;
    }
}

fn relink(nodes: &mut [Node], x: usize) {
    let Node { prev, next, .. } = nodes[x];
    nodes[prev].next = x;
    if next != NONE {
        nodes[next].prev = x;
    }
}
