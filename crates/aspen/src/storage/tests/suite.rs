//! openraft's own storage conformance suite, and scan pages capped in bytes.

use super::*;

struct Builder;

impl StoreBuilder<TypeConfig, RedbLogStore, RedbStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, RedbLogStore, RedbStateMachine), OpenraftStorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open_log(dir.path(), NO_CAP);
        let sm = open_sm(dir.path());
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

/// A page of large values ends early (by bytes), with a continuation that resumes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_pages_are_capped_in_bytes() {
    use crate::{
        api::{ReadConsistency, ScanRequest},
        storage::scan::{scan_local, SCAN_PAGE_MAX_BYTES},
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let value = vec![7u8; 1024 * 1024];
    let n = SCAN_PAGE_MAX_BYTES / value.len() + 4;
    let entries: Vec<Entry> = (0..n).map(|i| put(1, i as u64 + 1, &format!("big/{i:03}"), &value)).collect();
    apply(&mut sm, entries).await;
    let reader = sm.reader();
    let mut req = ScanRequest {
        prefix: b"big/".to_vec(),
        start: None,
        end: None,
        limit: 1000,
        continuation: None,
        consistency: ReadConsistency::Stale,
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = scan_local(&reader, &req, 1000, crate::storage::scan::SCAN_PAGE_MAX_BYTES).unwrap();
        pages += 1;
        let bytes: usize = page.entries.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
        assert!(bytes <= SCAN_PAGE_MAX_BYTES + value.len() + 64, "page of {bytes} bytes");
        seen.extend(page.entries.into_iter().map(|kv| String::from_utf8(kv.key).unwrap()));
        match page.continuation {
            Some(c) => req.continuation = Some(c),
            None => break,
        }
    }
    assert!(pages >= 2, "large values need more than one page");
    let want: Vec<String> = (0..n).map(|i| format!("big/{i:03}")).collect();
    assert_eq!(seen, want);
}
