//! Request validation: every key, value, batch, prefix delete, txn and scan a client sends is
//! checked against the node's limits (`[limits]` in the configuration) before it reaches a
//! shard, and refused with a typed error (`InvalidRequest` or `TooLarge`) that names the limit.

use crate::{
    api::{
        lease, ApiError, BatchOp, CompareTarget, KeyRange, KvCompareTarget, KvOp, KvTxn, ScanRequest, TxnOp,
        WriteCommand, MAX_FRAME_BYTES,
    },
    config::LimitsConfig,
};

/// Most bytes the gets of one txn may return in the worst case (every key read at the largest
/// allowed key and value size): a quarter frame, so the answer always fits one frame, even
/// inside a forwarded batch.
pub const MAX_TXN_ANSWER_BYTES: u64 = MAX_FRAME_BYTES as u64 / 4;
/// Room for one get result's own fields besides its key and value.
const GET_RESULT_OVERHEAD: u64 = 64;

/// Checks a key: not empty, at most `max_key_bytes`.
pub fn check_key(limits: &LimitsConfig, key: &[u8]) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::InvalidRequest("key must not be empty".into()));
    }
    if key.len() as u64 > limits.max_key_bytes {
        return Err(ApiError::TooLarge { what: "key".into(), size: key.len() as u64, limit: limits.max_key_bytes });
    }
    Ok(())
}

fn check_value(limits: &LimitsConfig, value: &[u8]) -> Result<(), ApiError> {
    if value.len() as u64 > limits.max_value_bytes {
        return Err(ApiError::TooLarge {
            what: "value".into(),
            size: value.len() as u64,
            limit: limits.max_value_bytes,
        });
    }
    Ok(())
}

/// Checks a write against the limits before it reaches the log.
pub fn check_write(limits: &LimitsConfig, command: &WriteCommand) -> Result<(), ApiError> {
    match command {
        WriteCommand::Put { key, value } => {
            check_key(limits, key)?;
            check_value(limits, value)
        }
        WriteCommand::Delete { key } => check_key(limits, key),
        WriteCommand::Cas { key, expected, new_value } => {
            check_key(limits, key)?;
            if let Some(e) = expected {
                check_value(limits, e)?;
            }
            check_value(limits, new_value)
        }
        WriteCommand::Batch { ops } => {
            if ops.is_empty() {
                return Err(ApiError::InvalidRequest("batch must hold at least one operation".into()));
            }
            if ops.len() as u64 > limits.max_batch_ops {
                return Err(ApiError::TooLarge {
                    what: "batch".into(),
                    size: ops.len() as u64,
                    limit: limits.max_batch_ops,
                });
            }
            let mut total = 0u64;
            for op in ops {
                check_key(limits, op.key())?;
                if let BatchOp::Put { value, .. } = op {
                    check_value(limits, value)?;
                    total += value.len() as u64;
                }
            }
            let cap = limits.max_value_bytes * 4;
            if total > cap {
                return Err(ApiError::TooLarge { what: "batch values".into(), size: total, limit: cap });
            }
            Ok(())
        }
        WriteCommand::DeletePrefix { prefix } => {
            // Empty is allowed: every key.
            if prefix.len() as u64 > limits.max_key_bytes {
                return Err(ApiError::TooLarge {
                    what: "prefix".into(),
                    size: prefix.len() as u64,
                    limit: limits.max_key_bytes,
                });
            }
            Ok(())
        }
        WriteCommand::Txn { compares, success, failure } => check_txn(limits, compares, success, failure),
        WriteCommand::PutLease { key, value, lease, .. } => {
            check_key(limits, key)?;
            check_value(limits, value)?;
            lease::check_lease_id(*lease).map_err(ApiError::InvalidRequest)
        }
        WriteCommand::LeaseGrant { id, ttl_secs } => {
            lease::check_lease_id(*id).map_err(ApiError::InvalidRequest)?;
            lease::check_lease_ttl(*ttl_secs).map_err(ApiError::InvalidRequest)
        }
        WriteCommand::LeaseRevoke { id } | WriteCommand::LeaseDrop { id } | WriteCommand::LeaseForget { id } => {
            lease::check_lease_id(*id).map_err(ApiError::InvalidRequest)
        }
        WriteCommand::KvTxn { txn, .. } => check_kv_txn(limits, txn),
    }
}

/// A txn's compares and ops in all: at least one, at most `max_batch_ops`.
fn check_txn_size(limits: &LimitsConfig, count: usize) -> Result<(), ApiError> {
    if count == 0 {
        return Err(ApiError::InvalidRequest("a txn must hold at least one compare or operation".into()));
    }
    if count as u64 > limits.max_batch_ops {
        return Err(ApiError::TooLarge {
            what: "txn (compares and operations)".into(),
            size: count as u64,
            limit: limits.max_batch_ops,
        });
    }
    Ok(())
}

/// Most levels of txns nested in a txn's ops (etcd allows nesting; a bound keeps apply's
/// recursion shallow).
pub const MAX_TXN_DEPTH: usize = 8;

/// An etcd-shaped txn: at least one compare or op, at most `max_batch_ops` compares and ops in
/// all (nested ones included), at most [`MAX_TXN_DEPTH`] levels, keys and range ends within the
/// key limit, values within theirs and at most four times the value limit in all, leases valid.
pub fn check_kv_txn(limits: &LimitsConfig, txn: &KvTxn) -> Result<(), ApiError> {
    let count = txn.size();
    check_txn_size(limits, count)?;
    let mut values = 0u64;
    check_kv_txn_level(limits, txn, 1, &mut values)?;
    let cap = limits.max_value_bytes * 4;
    if values > cap {
        return Err(ApiError::TooLarge { what: "txn values".into(), size: values, limit: cap });
    }
    Ok(())
}

fn check_kv_txn_level(limits: &LimitsConfig, txn: &KvTxn, depth: usize, values: &mut u64) -> Result<(), ApiError> {
    if depth > MAX_TXN_DEPTH {
        return Err(ApiError::InvalidRequest(format!("txns nest at most {MAX_TXN_DEPTH} levels deep")));
    }
    let range = |r: &KeyRange| -> Result<(), ApiError> {
        if r.is_single() {
            return check_key(limits, &r.key);
        }
        for k in [Some(&r.key), r.end.as_ref()].into_iter().flatten() {
            if k.len() as u64 > limits.max_key_bytes {
                return Err(ApiError::TooLarge {
                    what: "key".into(),
                    size: k.len() as u64,
                    limit: limits.max_key_bytes,
                });
            }
        }
        Ok(())
    };
    for c in &txn.compares {
        range(&c.range)?;
        if let KvCompareTarget::Value(v) = &c.target {
            check_value(limits, v)?;
            *values += v.len() as u64;
        }
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            KvOp::Range(q) => range(&q.range)?,
            KvOp::DeleteRange { range: r, .. } => range(r)?,
            KvOp::Put(p) => {
                check_key(limits, &p.key)?;
                check_value(limits, &p.value)?;
                *values += p.value.len() as u64;
                if p.lease != 0 {
                    lease::check_lease_id(p.lease).map_err(ApiError::InvalidRequest)?;
                }
            }
            KvOp::Txn(t) => check_kv_txn_level(limits, t, depth + 1, values)?,
        }
    }
    Ok(())
}

/// Checks a watched key, or prefix (which may be empty: every key).
pub fn check_key_or_prefix(limits: &LimitsConfig, key: &[u8], prefix: bool) -> Result<(), ApiError> {
    if !prefix {
        return check_key(limits, key);
    }
    if key.len() as u64 > limits.max_key_bytes {
        return Err(ApiError::TooLarge { what: "prefix".into(), size: key.len() as u64, limit: limits.max_key_bytes });
    }
    Ok(())
}

/// Checks a write as a client (or a node forwarding a client's write) sends it: within the
/// limits, and none of the steps only nodes take (a revocation's per-shard parts, a put whose
/// lease a node checked) — a client taking them could leave keys no lease ever removes.
pub fn check_client_write(limits: &LimitsConfig, command: &WriteCommand) -> Result<(), ApiError> {
    match command {
        WriteCommand::LeaseDrop { .. }
        | WriteCommand::LeaseForget { .. }
        | WriteCommand::PutLease { checked: true, .. }
        | WriteCommand::KvTxn { leases_checked: true, .. } => Err(ApiError::InvalidRequest(
            "this lease operation is a node's step of a revocation or a put; send lease revoke or a put with the lease"
                .into(),
        )),
        _ => check_write(limits, command),
    }
}

/// A txn: at least one compare or op, at most `max_batch_ops` of them in all, keys and values
/// within their limits, values in all at most four times the value limit (as a batch), and a
/// worst-case answer of at most [`MAX_TXN_ANSWER_BYTES`].
fn check_txn(
    limits: &LimitsConfig,
    compares: &[crate::api::Compare],
    success: &[TxnOp],
    failure: &[TxnOp],
) -> Result<(), ApiError> {
    let count = compares.len() + success.len() + failure.len();
    check_txn_size(limits, count)?;
    let mut total = 0u64;
    for c in compares {
        check_key(limits, &c.key)?;
        if let CompareTarget::Value(v) = &c.target {
            check_value(limits, v)?;
            total += v.len() as u64;
        }
    }
    for op in success.iter().chain(failure) {
        check_key(limits, op.key())?;
        if let TxnOp::Put { value, .. } = op {
            check_value(limits, value)?;
            total += value.len() as u64;
        }
    }
    let cap = limits.max_value_bytes * 4;
    if total > cap {
        return Err(ApiError::TooLarge { what: "txn values".into(), size: total, limit: cap });
    }
    // Only one branch runs; its gets may each return a key and value of the largest sizes.
    let gets = |ops: &[TxnOp]| ops.iter().filter(|op| matches!(op, TxnOp::Get { .. })).count() as u64;
    let gets = gets(success).max(gets(failure));
    let per_get = limits.max_key_bytes.saturating_add(limits.max_value_bytes).saturating_add(GET_RESULT_OVERHEAD);
    let answer = gets.saturating_mul(per_get);
    if answer > MAX_TXN_ANSWER_BYTES {
        return Err(ApiError::TooLarge {
            what: format!(
                "txn answer ({gets} gets in one branch, up to {per_get} bytes each at the key and value limits)"
            ),
            size: answer,
            limit: MAX_TXN_ANSWER_BYTES,
        });
    }
    Ok(())
}

/// Checks a scan's limit and bounds.
pub fn check_scan(limits: &LimitsConfig, req: &ScanRequest) -> Result<(), ApiError> {
    if req.limit == 0 {
        return Err(ApiError::InvalidRequest("scan limit must be at least 1".into()));
    }
    for k in [Some(&req.prefix), req.start.as_ref(), req.end.as_ref(), req.continuation.as_ref()].into_iter().flatten()
    {
        if k.len() as u64 > limits.max_key_bytes {
            return Err(ApiError::TooLarge {
                what: "scan bound".into(),
                size: k.len() as u64,
                limit: limits.max_key_bytes,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LimitsConfig {
        LimitsConfig { max_key_bytes: 8, max_value_bytes: 16, max_batch_ops: 3, ..LimitsConfig::default() }
    }

    fn put(key: &str, value: usize) -> BatchOp {
        BatchOp::Put { key: key.into(), value: vec![0; value] }
    }

    #[test]
    fn keys_and_values_are_held_to_their_limits() {
        let l = limits();
        assert!(matches!(check_key(&l, b""), Err(ApiError::InvalidRequest(_))));
        assert!(check_key(&l, b"12345678").is_ok());
        assert!(matches!(check_key(&l, b"123456789"), Err(ApiError::TooLarge { size: 9, limit: 8, .. })));
        let put_of = |n| WriteCommand::Put { key: b"k".to_vec(), value: vec![1; n] };
        assert!(check_write(&l, &put_of(16)).is_ok());
        assert!(matches!(check_write(&l, &put_of(17)), Err(ApiError::TooLarge { size: 17, limit: 16, .. })));
        let cas = WriteCommand::Cas { key: b"k".to_vec(), expected: Some(vec![0; 17]), new_value: vec![] };
        assert!(matches!(check_write(&l, &cas), Err(ApiError::TooLarge { .. })), "the expected value counts too");
        assert!(matches!(check_write(&l, &WriteCommand::Delete { key: vec![] }), Err(ApiError::InvalidRequest(_))));
    }

    #[test]
    fn batches_are_held_to_their_count_and_total_size() {
        let l = limits();
        assert!(matches!(check_write(&l, &WriteCommand::Batch { ops: vec![] }), Err(ApiError::InvalidRequest(_))));
        let four = WriteCommand::Batch { ops: (0..4).map(|i| put(&i.to_string(), 1)).collect() };
        assert!(matches!(check_write(&l, &four), Err(ApiError::TooLarge { size: 4, limit: 3, .. })));
        let three = WriteCommand::Batch { ops: vec![put("a", 16), put("b", 16), put("c", 16)] };
        assert!(check_write(&l, &three).is_ok(), "48 bytes of values is under 4 × 16");
        let l2 = LimitsConfig { max_batch_ops: 8, ..limits() };
        let big = WriteCommand::Batch { ops: (0..5).map(|i| put(&i.to_string(), 16)).collect() };
        assert!(matches!(check_write(&l2, &big), Err(ApiError::TooLarge { size: 80, limit: 64, .. })));
    }

    #[test]
    fn prefix_deletes_take_any_prefix_up_to_a_key() {
        let l = limits();
        let dp = |n| WriteCommand::DeletePrefix { prefix: vec![b'p'; n] };
        assert!(check_write(&l, &dp(0)).is_ok(), "the empty prefix deletes every key");
        assert!(check_write(&l, &dp(8)).is_ok());
        assert!(matches!(check_write(&l, &dp(9)), Err(ApiError::TooLarge { size: 9, limit: 8, .. })));
    }

    #[test]
    fn txns_are_held_to_their_count_sizes_and_answer() {
        use crate::api::{Compare, CompareOp};
        let l = limits();
        let txn = |compares, success, failure| WriteCommand::Txn { compares, success, failure };
        assert!(matches!(check_write(&l, &txn(vec![], vec![], vec![])), Err(ApiError::InvalidRequest(_))));
        let ok = txn(
            vec![Compare::value("k", CompareOp::Equal, vec![0; 16])],
            vec![TxnOp::put("k", vec![0; 16])],
            vec![TxnOp::get("k")],
        );
        assert!(check_write(&l, &ok).is_ok());
        let four =
            txn(vec![Compare::version("a", CompareOp::Equal, 0)], vec![TxnOp::get("a"); 2], vec![TxnOp::delete("a")]);
        assert!(
            matches!(check_write(&l, &four), Err(ApiError::TooLarge { size: 4, limit: 3, .. })),
            "ops and compares count"
        );
        let empty_key = txn(vec![], vec![TxnOp::get("")], vec![]);
        assert!(matches!(check_write(&l, &empty_key), Err(ApiError::InvalidRequest(_))));
        let long_key = txn(vec![Compare::mod_revision("123456789", CompareOp::Less, 1)], vec![], vec![]);
        assert!(matches!(check_write(&l, &long_key), Err(ApiError::TooLarge { size: 9, .. })));
        let big_compare = txn(vec![Compare::value("k", CompareOp::Less, vec![0; 17])], vec![], vec![]);
        assert!(matches!(check_write(&l, &big_compare), Err(ApiError::TooLarge { size: 17, limit: 16, .. })));
        let l8 = LimitsConfig { max_batch_ops: 8, ..limits() };
        let values = txn(
            vec![Compare::value("k", CompareOp::Equal, vec![0; 16])],
            (0..4).map(|i| TxnOp::put(i.to_string(), vec![0; 16])).collect(),
            vec![],
        );
        assert!(matches!(check_write(&l8, &values), Err(ApiError::TooLarge { size: 80, limit: 64, .. })));
        // Gets: the worst-case answer of the branch with most gets must fit a quarter frame.
        let big =
            LimitsConfig { max_key_bytes: 4 * 1024, max_value_bytes: 1024 * 1024, max_batch_ops: 1024, ..limits() };
        let gets = |n: usize| txn(vec![], (0..n).map(|i| TxnOp::get(i.to_string())).collect(), vec![TxnOp::get("x")]);
        assert!(check_write(&big, &gets(15)).is_ok());
        let err = check_write(&big, &gets(16)).unwrap_err();
        assert!(
            matches!(&err, ApiError::TooLarge { what, limit, .. } if what.contains("16 gets") && *limit == MAX_TXN_ANSWER_BYTES),
            "{err}"
        );
    }

    #[test]
    fn scans_need_a_limit_and_bounds_no_longer_than_a_key() {
        let l = limits();
        let scan = ScanRequest {
            prefix: b"p".to_vec(),
            start: None,
            end: None,
            limit: 10,
            continuation: None,
            consistency: Default::default(),
        };
        assert!(check_scan(&l, &scan).is_ok());
        assert!(matches!(check_scan(&l, &ScanRequest { limit: 0, ..scan.clone() }), Err(ApiError::InvalidRequest(_))));
        let long = ScanRequest { end: Some(vec![0; 9]), ..scan };
        assert!(matches!(check_scan(&l, &long), Err(ApiError::TooLarge { size: 9, .. })));
    }
}
