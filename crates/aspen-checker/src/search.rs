//! The Wing–Gong–Lowe linearizability search over one key's register, with Lowe's memoization of
//! (linearized set, model state) and porcupine's doubly-linked entry lists, plus the per-history driver that
//! validates ops, splits them by key and assembles the [`CheckReport`].
//!
//! Unknown ops live in a list of their own (they have no return entry); they are candidates while their
//! invocation is not after the first pending return. Three reductions keep them cheap, each preserving the
//! verdict: unknown ops no result can observe are left out up front, an unknown op is only placed where it
//! changes the state and right before an op that observes it, and a failed point also rules out points with
//! the same known set and state that used up a superset of its unknown ops. The cross-check against a
//! brute-force oracle in `tests.rs` guards all three.

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

/// Sentinels of the two entry lists: known ops' calls and returns by time, and unknown ops' calls.
const MAIN_HEAD: usize = 0;
const MAIN_TAIL: usize = 1;
const UNKNOWN_HEAD: usize = 2;
const UNKNOWN_TAIL: usize = 3;
const NONE: usize = usize::MAX;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Call,
    Return,
    Sentinel,
}

/// One node of an entry list: the call or return of an op.
#[derive(Clone, Copy)]
struct Node {
    prev: usize,
    next: usize,
    kind: Kind,
    op: usize,
    time: u64,
    /// For a known op's call, its return node; otherwise `NONE`.
    ret: usize,
}

/// A point of the search: the ops linearized, the register state after them and, when the last op linearized
/// is unknown, that op and the state before it (which restricts the next op, see [`KeyCheck::useless_after`]).
#[derive(PartialEq, Eq, Hash)]
struct Point {
    known: Vec<u64>,
    unknown: Vec<u64>,
    state: State,
    after: Option<(usize, State)>,
}

/// A point all of whose continuations failed.
struct Failed {
    known: Vec<u64>,
    state: State,
    unknown: Vec<u64>,
    after: Option<(usize, State)>,
}

/// Lowe's memo of points already visited (each one failed, or is on the search path, where the sets strictly
/// grow, so meeting it again is never useful), plus the failed points by (known set, state): one that has
/// linearized a subset of the unknown ops, with no restriction or the same one, had at least as many choices,
/// so it rules out the point too.
struct Memo {
    seen: HashSet<Point, FxBuild>,
    /// By hash of (known set, state); `None` when the key has no unknown ops.
    failed: Option<HashMap<u64, Vec<Failed>, FxBuild>>,
}

type FxBuild = BuildHasherDefault<FxHasher>;

impl Memo {
    fn new(with_unknown: bool) -> Self {
        Memo { seen: HashSet::default(), failed: with_unknown.then(HashMap::default) }
    }

    fn len(&self) -> usize {
        self.seen.len()
    }

    fn base_hash(known: &[u64], state: State) -> u64 {
        let mut h = FxHasher::default();
        h.write_u32(state);
        for w in known {
            h.write_u64(*w);
        }
        h.finish()
    }

    fn covers(&self, p: &Point) -> bool {
        if self.seen.contains(p) {
            return true;
        }
        let Some(failed) = &self.failed else { return false };
        failed.get(&Self::base_hash(&p.known, p.state)).is_some_and(|list| {
            list.iter().any(|f| f.known == p.known && f.state == p.state && Self::dominates(f, &p.unknown, p.after))
        })
    }

    fn dominates(f: &Failed, unknown: &[u64], after: Option<(usize, State)>) -> bool {
        (f.after.is_none() || f.after == after) && is_subset(&f.unknown, unknown)
    }

    fn mark_failed(&mut self, p: &Point) {
        let Some(failed) = &mut self.failed else { return };
        let list = failed.entry(Self::base_hash(&p.known, p.state)).or_default();
        let same_base = |f: &Failed| f.known == p.known && f.state == p.state;
        if list.iter().any(|f| same_base(f) && Self::dominates(f, &p.unknown, p.after)) {
            return;
        }
        let new = Failed { known: p.known.clone(), state: p.state, unknown: p.unknown.clone(), after: p.after };
        list.retain(|f| !(same_base(f) && Self::dominates(&new, &f.unknown, f.after)));
        list.push(new);
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
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
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

fn bit(bits: &[u64], i: usize) -> bool {
    bits.get(i / 64).is_some_and(|w| w & (1u64 << (i % 64)) != 0)
}

fn set_bit(bits: &mut [u64], i: usize, on: bool) {
    if let Some(w) = bits.get_mut(i / 64) {
        if on {
            *w |= 1u64 << (i % 64);
        } else {
            *w &= !(1u64 << (i % 64));
        }
    }
}

fn is_subset(small: &[u64], big: &[u64]) -> bool {
    small.iter().zip(big).all(|(s, b)| s & !b == 0)
}

/// The check of one key's sub-history.
struct KeyCheck<'a> {
    key: &'a [u8],
    /// Known ops first (`0..known`), then unknown ones.
    ops: Vec<KeyOp<'a>>,
    known: usize,
    /// Value of each state (index = state); index 0 (absent) is unused.
    values: Vec<Option<&'a [u8]>>,
    /// Unknown ops left out because no result can observe them (see [`KeyCheck::drop_unobservable`]).
    dropped: usize,
}

/// The deepest point the search reached: the longest linearizable prefix it found.
struct Deepest {
    path: Vec<usize>,
    known: Vec<u64>,
    unknown: Vec<u64>,
    state: State,
}

/// Where the search looks for the next op to linearize. Known ops are tried before unknown ones: a valid
/// history rarely needs an unknown op, and exploring without them first lets a failed visit rule out the
/// visits that differ only by having used up more unknown ops.
#[derive(Clone, Copy)]
enum Cursor {
    /// Walking the main list: calls before its first return node are candidates.
    Known(usize),
    /// Walking the unknown list: calls invoked by `deadline` (the first pending return) are candidates.
    Unknown { node: usize, deadline: u64 },
}

struct Frame {
    /// The call node linearized.
    node: usize,
    prev_state: State,
    /// The unknown phase's deadline when `node` is an unknown op's call.
    deadline: Option<u64>,
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
        ops.sort_by_key(|o| o.ret.is_none());
        let known = ops.iter().filter(|o| o.ret.is_some()).count();
        KeyCheck { key, ops, known, values, dropped }
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

    /// Builds the two entry lists. The main one holds known ops' calls and returns by time, a call before a
    /// return at the same time (such ops count as concurrent, the lenient reading); the unknown one holds
    /// unknown ops' calls by time (they never return).
    fn entry_lists(&self) -> Vec<Node> {
        let sentinel = Node { prev: NONE, next: NONE, kind: Kind::Sentinel, op: NONE, time: u64::MAX, ret: NONE };
        let mut nodes = vec![sentinel; 4];
        let mut main: Vec<(u64, bool, usize)> = Vec::with_capacity(self.known * 2);
        let mut unknown: Vec<(u64, usize)> = Vec::with_capacity(self.ops.len() - self.known);
        for (i, o) in self.ops.iter().enumerate() {
            match o.ret {
                Some(ret) => {
                    main.push((o.src.invoke, false, i));
                    main.push((ret, true, i));
                }
                None => unknown.push((o.src.invoke, i)),
            }
        }
        main.sort_unstable();
        unknown.sort_unstable();
        let mut call_node = vec![NONE; self.ops.len()];
        let mut chain = vec![MAIN_HEAD];
        for (time, is_return, op) in main {
            let index = nodes.len();
            let kind = if is_return { Kind::Return } else { Kind::Call };
            nodes.push(Node { prev: NONE, next: NONE, kind, op, time, ret: NONE });
            if is_return {
                if let Some(call) = call_node.get(op).copied().and_then(|c| nodes.get_mut(c)) {
                    call.ret = index;
                }
            } else if let Some(slot) = call_node.get_mut(op) {
                *slot = index;
            }
            chain.push(index);
        }
        chain.push(MAIN_TAIL);
        link(&mut nodes, &chain);
        let mut chain = vec![UNKNOWN_HEAD];
        for (time, op) in unknown {
            chain.push(nodes.len());
            nodes.push(Node { prev: NONE, next: NONE, kind: Kind::Call, op, time, ret: NONE });
        }
        chain.push(UNKNOWN_TAIL);
        link(&mut nodes, &chain);
        nodes
    }

    /// Whether linearizing `next` (result `next_state`) right after the unknown op `unknown`, which moved the
    /// register from `before` to `state`, is pointless because a linearization without that adjacency exists.
    ///
    /// If `next` also fits `before` and ends in the same state either way, `unknown` can be dropped. If `next`
    /// fits `before` and `unknown` applied after it ends where the pair did, the two can be swapped: `unknown`
    /// never has to take effect by any time and nothing must follow it, so moving it later keeps real-time
    /// order. Repeating both moves turns any linearization into one where each unknown op is followed by an
    /// op that observes it, so the search only tries those (exchange of two unknown ops always leaves the
    /// first a no-op, which is dropped, so the rewriting ends).
    fn useless_after(&self, unknown: usize, before: State, next: usize, next_state: State) -> bool {
        match self.ops[next].step.apply(before) {
            Some(alone) => alone == next_state || self.ops[unknown].step.apply(alone) == Some(next_state),
            None => false,
        }
    }

    fn run(&self, config: &CheckConfig, deadline: Option<Instant>) -> (CheckResult, u64) {
        if self.known == 0 {
            return (CheckResult::Ok, 0);
        }
        let mut nodes = self.entry_lists();
        let mut known_bits = vec![0u64; self.known.div_ceil(64)];
        let mut unknown_bits = vec![0u64; (self.ops.len() - self.known).div_ceil(64)];
        let mut memo = Memo::new(self.known < self.ops.len());
        let mut stack: Vec<Frame> = Vec::new();
        let mut deepest =
            Deepest { path: vec![], known: known_bits.clone(), unknown: unknown_bits.clone(), state: ABSENT };
        let mut state = ABSENT;
        let mut linearized_known = 0;
        let mut cursor = Cursor::Known(nodes[MAIN_HEAD].next);
        let mut iterations: u64 = 0;
        // The restriction of the current point: the last op linearized when unknown, and the state before it.
        let restriction = |stack: &[Frame], nodes: &[Node]| {
            stack.last().map(|f| (nodes[f.node].op, f.prev_state)).filter(|&(op, _)| op >= self.known)
        };

        loop {
            iterations += 1;
            if iterations % 4096 == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                let reason = format!("time limit reached after {} states", memo.len());
                return (CheckResult::Incomplete { key: self.key.to_vec(), reason }, memo.len() as u64);
            }
            let candidate = match cursor {
                Cursor::Known(n) if nodes[n].kind == Kind::Call => Some((n, None)),
                Cursor::Known(n) => {
                    // The first pending return: unknown ops invoked by then are the other candidates.
                    cursor = Cursor::Unknown { node: nodes[UNKNOWN_HEAD].next, deadline: nodes[n].time };
                    continue;
                }
                Cursor::Unknown { node, deadline } => {
                    (nodes[node].kind == Kind::Call && nodes[node].time <= deadline).then_some((node, Some(deadline)))
                }
            };
            let Some((node, phase_deadline)) = candidate else {
                // No candidate left: the op whose return was reached cannot be linearized after this prefix,
                // so undo the latest choice and try the next candidate instead.
                let after = restriction(&stack, &nodes);
                let Some(frame) = stack.pop() else {
                    let explanation = self.explain(&deepest, config);
                    return (CheckResult::Violation { key: self.key.to_vec(), explanation }, memo.len() as u64);
                };
                let point = Point {
                    known: std::mem::take(&mut known_bits),
                    unknown: std::mem::take(&mut unknown_bits),
                    state,
                    after,
                };
                memo.mark_failed(&point);
                (known_bits, unknown_bits) = (point.known, point.unknown);
                let op = nodes[frame.node].op;
                if op < self.known {
                    set_bit(&mut known_bits, op, false);
                    linearized_known -= 1;
                } else {
                    set_bit(&mut unknown_bits, op - self.known, false);
                }
                unlift(&mut nodes, frame.node);
                state = frame.prev_state;
                cursor = advance(&nodes, frame.node, frame.deadline);
                continue;
            };
            let op = nodes[node].op;
            let is_unknown = op >= self.known;
            let pointless = match self.ops[op].step.apply(state) {
                None => None,
                // An unknown op that changes nothing can as well not happen.
                Some(next_state) if is_unknown && next_state == state => None,
                Some(next_state) => match restriction(&stack, &nodes) {
                    Some((unknown, before)) if self.useless_after(unknown, before, op, next_state) => None,
                    _ => Some(next_state),
                },
            };
            let Some(next_state) = pointless else {
                cursor = advance(&nodes, node, phase_deadline);
                continue;
            };
            let (bits, bit_index) =
                if is_unknown { (&mut unknown_bits, op - self.known) } else { (&mut known_bits, op) };
            set_bit(bits, bit_index, true);
            let after = is_unknown.then_some((op, state));
            let point = Point {
                known: std::mem::take(&mut known_bits),
                unknown: std::mem::take(&mut unknown_bits),
                state: next_state,
                after,
            };
            let seen = memo.covers(&point);
            if !seen {
                if memo.len() >= config.max_states_per_key {
                    let reason = format!("explored {} states (limit {})", memo.len(), config.max_states_per_key);
                    return (CheckResult::Incomplete { key: self.key.to_vec(), reason }, memo.len() as u64);
                }
                memo.seen.insert(Point {
                    known: point.known.clone(),
                    unknown: point.unknown.clone(),
                    state: next_state,
                    after,
                });
            }
            (known_bits, unknown_bits) = (point.known, point.unknown);
            if seen {
                let (bits, bit_index) =
                    if is_unknown { (&mut unknown_bits, op - self.known) } else { (&mut known_bits, op) };
                set_bit(bits, bit_index, false);
                cursor = advance(&nodes, node, phase_deadline);
                continue;
            }
            stack.push(Frame { node, prev_state: state, deadline: phase_deadline });
            state = next_state;
            lift(&mut nodes, node);
            if !is_unknown {
                linearized_known += 1;
                if linearized_known == self.known {
                    return (CheckResult::Ok, memo.len() as u64);
                }
            }
            if stack.len() > deepest.path.len() {
                deepest.path = stack.iter().map(|f| nodes[f.node].op).collect();
                deepest.known.clone_from(&known_bits);
                deepest.unknown.clone_from(&unknown_bits);
                deepest.state = state;
            }
            cursor = Cursor::Known(nodes[MAIN_HEAD].next);
        }
    }

    fn is_linearized(&self, deepest: &Deepest, op: usize) -> bool {
        if op < self.known {
            bit(&deepest.known, op)
        } else {
            bit(&deepest.unknown, op - self.known)
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
        let known = self.known;
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
        let is_linearized = |i: usize| self.is_linearized(deepest, i);
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

/// The candidate after `node` in the same phase.
fn advance(nodes: &[Node], node: usize, deadline: Option<u64>) -> Cursor {
    match deadline {
        None => Cursor::Known(nodes[node].next),
        Some(deadline) => Cursor::Unknown { node: nodes[node].next, deadline },
    }
}

/// Chains `order` into a doubly-linked list (its first and last entries are the sentinels).
fn link(nodes: &mut [Node], order: &[usize]) {
    for pair in order.windows(2) {
        nodes[pair[0]].next = pair[1];
        nodes[pair[1]].prev = pair[0];
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
    nodes[next].prev = prev;
}

fn relink(nodes: &mut [Node], x: usize) {
    let Node { prev, next, .. } = nodes[x];
    nodes[prev].next = x;
    nodes[next].prev = x;
}
