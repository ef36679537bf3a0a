//! Network fault injection for tests (cargo feature `fault-injection`; without it every hook is
//! an inlined no-op and nothing here can be switched on).
//!
//! Owns: the process-wide table of faults between node endpoints, consulted by the Raft transport
//! ([`crate::raft::network`]) and by node-to-node request forwarding
//! ([`crate::transport::request::send_request`]). A fault applies to one direction of one pair of
//! endpoints, optionally to one shard's Raft traffic only: drop everything (a partition), drop a
//! fraction, or delay. Requests are checked on the way out (`from` → `to`); replies on the way
//! back (`to` → `from`), so a dropped reply means the request did reach the peer and may have
//! taken effect, exactly as with a real network. A dropped message surfaces as a transport error.
//!
//! Rules are keyed by endpoint ids, which are unique per node, so clusters of concurrent tests in
//! one process do not interfere as long as each heals only its own nodes.

use std::time::Duration;

use iroh::EndpointId;

use crate::api::ShardId;

/// What happens to messages in one direction between two endpoints.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rule {
    /// Probability in 0.0..=1.0 that a message is dropped (1.0: partitioned).
    pub drop: f64,
    /// Added one-way latency.
    pub delay: Duration,
}

impl Rule {
    /// Drop everything.
    pub const PARTITION: Rule = Rule { drop: 1.0, delay: Duration::ZERO };

    /// Drop a fraction of messages.
    pub fn loss(fraction: f64) -> Rule {
        Rule { drop: fraction.clamp(0.0, 1.0), delay: Duration::ZERO }
    }

    /// Delay every message.
    pub fn delay(delay: Duration) -> Rule {
        Rule { drop: 0.0, delay }
    }
}

/// A message the fault table dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message dropped by injected fault")]
pub struct Dropped;

#[cfg(feature = "fault-injection")]
mod table {
    use std::{
        collections::HashMap,
        sync::{Mutex, OnceLock},
    };

    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    type Key = (EndpointId, EndpointId, Option<ShardId>);

    pub(super) struct Table {
        pub rules: HashMap<Key, Rule>,
        pub rng: StdRng,
    }

    pub(super) fn table() -> &'static Mutex<Table> {
        static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
        TABLE.get_or_init(|| Mutex::new(Table { rules: HashMap::new(), rng: StdRng::seed_from_u64(0) }))
    }

    pub(super) fn with<T>(f: impl FnOnce(&mut Table) -> T) -> T {
        f(&mut table().lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The rule for `from` → `to` (a shard rule wins over a pair-wide one) and whether this
    /// message is dropped.
    pub(super) fn decide(from: EndpointId, to: EndpointId, shard: Option<ShardId>) -> Option<(bool, Duration)> {
        with(|t| {
            let rule = shard.and_then(|s| t.rules.get(&(from, to, Some(s)))).or_else(|| t.rules.get(&(from, to, None)));
            let rule = *rule?;
            let dropped = rule.drop >= 1.0 || (rule.drop > 0.0 && t.rng.random_bool(rule.drop));
            Some((dropped, rule.delay))
        })
    }
}

/// Sets the rule for messages from `from` to `to` (`shard`: that shard's Raft traffic only;
/// `None`: all traffic of the pair).
#[cfg(feature = "fault-injection")]
pub fn set(from: EndpointId, to: EndpointId, shard: Option<ShardId>, rule: Rule) {
    table::with(|t| t.rules.insert((from, to, shard), rule));
}

/// Removes the rule for `from` → `to` on `shard`.
#[cfg(feature = "fault-injection")]
pub fn clear(from: EndpointId, to: EndpointId, shard: Option<ShardId>) {
    table::with(|t| t.rules.remove(&(from, to, shard)));
}

/// Cuts all traffic between `a` and `b`, both directions.
#[cfg(feature = "fault-injection")]
pub fn partition(a: EndpointId, b: EndpointId) {
    set(a, b, None, Rule::PARTITION);
    set(b, a, None, Rule::PARTITION);
}

/// Cuts every endpoint of `side_a` off from every endpoint of `side_b`.
#[cfg(feature = "fault-injection")]
pub fn split(side_a: &[EndpointId], side_b: &[EndpointId]) {
    for a in side_a {
        for b in side_b {
            partition(*a, *b);
        }
    }
}

/// Removes every rule that involves one of `nodes`.
#[cfg(feature = "fault-injection")]
pub fn heal(nodes: &[EndpointId]) {
    table::with(|t| t.rules.retain(|(from, to, _), _| !nodes.contains(from) && !nodes.contains(to)));
}

/// Reseeds the generator that decides random drops.
#[cfg(feature = "fault-injection")]
pub fn seed(seed: u64) {
    use rand::SeedableRng;
    table::with(|t| t.rng = rand::rngs::StdRng::seed_from_u64(seed));
}

/// Number of rules in force that involve one of `nodes`.
#[cfg(feature = "fault-injection")]
pub fn active(nodes: &[EndpointId]) -> usize {
    table::with(|t| t.rules.keys().filter(|(from, to, _)| nodes.contains(from) || nodes.contains(to)).count())
}

/// Hook: a message from `from` to `to` is about to be sent.
#[inline]
pub(crate) async fn on_send(from: EndpointId, to: EndpointId, shard: Option<ShardId>) -> Result<(), Dropped> {
    apply(from, to, shard).await
}

/// Hook: the reply of `remote` to a message of `local` arrived.
#[inline]
pub(crate) async fn on_reply(local: EndpointId, remote: EndpointId, shard: Option<ShardId>) -> Result<(), Dropped> {
    apply(remote, local, shard).await
}

#[cfg(feature = "fault-injection")]
async fn apply(from: EndpointId, to: EndpointId, shard: Option<ShardId>) -> Result<(), Dropped> {
    match table::decide(from, to, shard) {
        None => Ok(()),
        Some((dropped, delay)) => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if dropped {
                Err(Dropped)
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
async fn apply(_from: EndpointId, _to: EndpointId, _shard: Option<ShardId>) -> Result<(), Dropped> {
    Ok(())
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    fn ep(seed: u8) -> EndpointId {
        iroh::SecretKey::from_bytes(&[seed; 32]).public()
    }

    #[tokio::test]
    async fn rules_apply_per_direction_and_shard() {
        let (a, b, c) = (ep(101), ep(102), ep(103));
        set(a, b, Some(3), Rule::PARTITION);
        assert_eq!(on_send(a, b, Some(3)).await, Err(Dropped));
        assert_eq!(on_send(a, b, Some(2)).await, Ok(()));
        assert_eq!(on_send(b, a, Some(3)).await, Ok(()), "other direction unaffected");
        // A reply from b to a travels b → a.
        assert_eq!(on_reply(b, a, Some(3)).await, Err(Dropped));
        partition(a, c);
        assert_eq!(on_send(c, a, None).await, Err(Dropped));
        assert_eq!(on_send(c, a, Some(1)).await, Err(Dropped), "pair-wide rule covers every shard");
        assert_eq!(active(&[a]), 3);
        heal(&[a]);
        assert_eq!(active(&[a, b, c]), 0);
        assert_eq!(on_send(a, b, Some(3)).await, Ok(()));
    }

    #[tokio::test]
    async fn loss_drops_about_the_given_fraction() {
        let (a, b) = (ep(111), ep(112));
        set(a, b, None, Rule::loss(0.3));
        let mut dropped = 0;
        for _ in 0..2000 {
            if on_send(a, b, None).await.is_err() {
                dropped += 1;
            }
        }
        heal(&[a]);
        assert!((450..750).contains(&dropped), "{dropped} of 2000 dropped at 30% loss");
    }
}
