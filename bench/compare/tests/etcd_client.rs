//! Aspen's etcd v3 API (`NodeConfig::etcd_addr`, crates/aspen/src/etcd) driven by the Rust
//! `etcd-client` crate, as an application would use it: a 3-node cluster of one shard and one of
//! 4 shards, started in this process (real iroh on 127.0.0.1, test Raft timing as
//! tests/support's `InProcNode`), each node serving the etcd API on a TCP port of its own. Every
//! test starts its own cluster; each scenario runs on both clusters where it applies.
//!
//! Scenarios: tokens as etcd users (`token` / an Aspen token; no user, a bad password, scoped
//! tokens); member list and status; put/get (prev_kv, prefix, range, from-key, limit, keys only,
//! count only, sorting), deletes, etcd's revision and version semantics, header revisions that
//! never go back; txns with compares on value, version, create and mod revision (on 4 shards: a
//! txn whose keys span shards is refused); watches (start revision and prev_kv on one shard, a
//! prefix watch over every shard, filters, ranges, progress, cancel); leases (grant, keep-alive,
//! expiry, time-to-live with keys, list, revoke); less common calls (ignore_value/ignore_lease,
//! revision filters, nested txns, explicit lease ids, compaction); and two recipes under real
//! contention — etcd's `concurrency.Mutex` (one shard: lock keys with leases, owner by smallest
//! create revision, waiters watching the deletion of their predecessor) and an optimistic
//! compare-and-swap loop on a mod revision.
//!
//! Nothing here asserts timings: every wait is a generous deadline on a condition.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use aspen::{
    api::routing::ShardRouter,
    auth::{Scope, TokenKind},
    cluster::NodeHandle,
    config::HttpAddr,
    NodeConfig,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, Error, EventType, GetOptions, GetResponse,
    LeaseTimeToLiveOptions, LockOptions, ProclaimOptions, PutOptions, ResignOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchResponse, WatchStream,
};

#[path = "etcd_client/differential.rs"]
mod differential;

/// How long any one wait of these tests may take before it fails the test.
const PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// Three in-process nodes serving the etcd API, and what a client needs to reach them.
struct Cluster {
    nodes: Vec<NodeHandle>,
    /// `127.0.0.1:PORT` of each node's etcd API, by node id order.
    endpoints: Vec<String>,
    /// Node 1's admin token: the password of etcd user `token`.
    token: String,
    shards: u32,
    _root: tempfile::TempDir,
}

/// Node `node_id`'s config under `root`: test Raft timing (as tests/support's `InProcNode`), no
/// HTTP endpoint, the etcd API on `etcd_port`, `shards` shards.
fn node_config(root: &Path, node_id: u64, etcd_port: u16, shards: u32) -> NodeConfig {
    let mut c = NodeConfig {
        node_id,
        data_dir: root.join(format!("node-{node_id}")),
        bind_addr: SocketAddr::from(([127, 0, 0, 1], aspen_testkit::free_port())),
        http_addr: HttpAddr::Off,
        etcd_addr: Some(SocketAddr::from(([127, 0, 0, 1], etcd_port))),
        ..Default::default()
    };
    c.raft.heartbeat_interval_ms = 400;
    c.raft.election_timeout_min_ms = 1500;
    c.raft.election_timeout_max_ms = 3000;
    c.limits.request_timeout_ms = 20_000;
    if shards > 1 {
        c.sharding.enabled = true;
        c.sharding.num_shards = shards;
    }
    c
}

async fn boot(config: NodeConfig) -> NodeHandle {
    let id = config.node_id;
    let booted = tokio::time::timeout(Duration::from_secs(120), async move {
        if config.sharding.enabled {
            aspen::cluster::bootstrap_sharded_node(config).await
        } else {
            aspen::cluster::bootstrap_node(config).await
        }
    })
    .await;
    match booted {
        Ok(Ok(handle)) => handle,
        Ok(Err(e)) => panic!("node {id} starts: {e:?}"),
        Err(_) => panic!("node {id} did not start within 120 s"),
    }
}

impl Cluster {
    /// Node 1 initializes a cluster of `shards` shards; nodes 2 and 3 join it (concurrently)
    /// with its ticket and a join token. Returns once every node's etcd endpoint takes writes
    /// in every shard.
    async fn start(shards: u32) -> Cluster {
        Self::start_with(shards, |_| {}).await
    }

    /// [`Self::start`] with every node's config changed by `tweak` first.
    async fn start_with(shards: u32, tweak: impl Fn(&mut NodeConfig)) -> Cluster {
        let root = tempfile::tempdir().expect("temp dir");
        let ports = aspen_testkit::free_tcp_ports(3).expect("free TCP ports");
        let mut configs: Vec<NodeConfig> =
            (1..=3u64).map(|id| node_config(root.path(), id, ports[id as usize - 1], shards)).collect();
        configs.iter_mut().for_each(&tweak);
        let n1 = boot(configs[0].clone()).await;
        for c in &mut configs[1..] {
            c.join = vec![n1.ticket().encode()];
            c.join_token = Some(n1.join_token(3600, false).expect("join token"));
        }
        let (n2, n3) = tokio::join!(boot(configs[1].clone()), boot(configs[2].clone()));
        let token = n1.admin_token().expect("node 1 has an admin token");
        let endpoints = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let cluster = Cluster { nodes: vec![n1, n2, n3], endpoints, token, shards, _root: root };
        cluster.wait_writable().await;
        cluster
    }

    /// Waits until a write to every shard succeeds through every node's endpoint.
    async fn wait_writable(&self) {
        let probes = self.one_key_per_shard("ready/");
        for endpoint in &self.endpoints {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let attempt = async {
                    let mut c = Client::connect([endpoint], Some(self.options())).await?;
                    for k in &probes {
                        c.put(k.as_str(), "1", None).await?;
                    }
                    Ok::<_, Error>(())
                };
                let last = match tokio::time::timeout(Duration::from_secs(20), attempt).await {
                    Ok(Ok(())) => break,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_string(),
                };
                assert!(Instant::now() < deadline, "{endpoint} never took writes: {last}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Connect options with the admin token (etcd user `token`).
    fn options(&self) -> ConnectOptions {
        ConnectOptions::new()
            .with_user("token", self.token.clone())
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(30))
    }

    /// A client of all three endpoints, authenticated with the admin token.
    async fn client(&self) -> Client {
        Client::connect(&self.endpoints, Some(self.options())).await.expect("connect with the admin token")
    }

    /// A client of one node's endpoint alone.
    async fn client_of(&self, node: usize) -> Client {
        Client::connect([&self.endpoints[node]], Some(self.options())).await.expect("connect to one endpoint")
    }

    fn shard_of(&self, key: &str) -> u32 {
        ShardRouter::new(self.shards).shard_for_key(key.as_bytes())
    }

    /// `PREFIX` + a suffix, one key in each shard (by shard).
    fn one_key_per_shard(&self, prefix: &str) -> Vec<String> {
        let mut by_shard = BTreeMap::new();
        for i in 0.. {
            let k = format!("{prefix}{i}");
            by_shard.entry(self.shard_of(&k)).or_insert(k);
            if by_shard.len() == self.shards as usize {
                break;
            }
        }
        by_shard.into_values().collect()
    }

    /// Keys `PREFIX<name>…`, one per name, all in one shard (the shard of the first).
    fn keys_in_one_shard(&self, prefix: &str, names: &[&str]) -> Vec<String> {
        let first = format!("{prefix}{}", names[0]);
        let shard = self.shard_of(&first);
        let mut keys = vec![first];
        for name in &names[1..] {
            let key = (0..).map(|i| format!("{prefix}{name}-{i}")).find(|k| self.shard_of(k) == shard).unwrap();
            keys.push(key);
        }
        keys
    }

    /// Stops every node gracefully (a stop that stalls is reported, not failed: the test's
    /// scenario is done).
    async fn stop(mut self) {
        for node in self.nodes.drain(..) {
            let id = node.base.config.node_id;
            match tokio::time::timeout(Duration::from_secs(120), node.shutdown_reporting()).await {
                Ok(stalled) if stalled.is_empty() => {}
                Ok(stalled) => eprintln!("node {id}: shutdown steps stalled: {stalled:?}"),
                Err(_) => eprintln!("node {id} did not shut down within 120 s"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn rev(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.expect("a response header").revision()
}

fn keys_of(r: &GetResponse) -> Vec<String> {
    r.kvs().iter().map(|kv| kv.key_str().expect("UTF-8 key").to_string()).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The gRPC code (as its name) and message of an error; panics on an error that is not a gRPC
/// status.
fn grpc(e: &Error) -> (String, String) {
    match e {
        Error::GRpcStatus(s) => (format!("{:?}", s.code()), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

/// The next message of a watch stream (the stream must not end or fail).
async fn next_message(ws: &mut WatchStream, what: &str) -> WatchResponse {
    match tokio::time::timeout(PATIENCE, ws.message()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => panic!("{what}: the watch stream ended"),
        Ok(Err(e)) => panic!("{what}: the watch stream failed: {e:?}"),
        Err(_) => panic!("{what}: nothing within {PATIENCE:?}"),
    }
}

/// Opens a watch stream on `c` with one watcher; returns the stream and the watcher's id (its
/// `created` answer checked).
async fn watch(c: &mut Client, key: &str, options: WatchOptions) -> (WatchStream, i64) {
    let mut ws = c.watch(key, Some(options)).await.expect("watch");
    let created = next_message(&mut ws, "the watch's created answer").await;
    assert!(created.created() && !created.canceled(), "{created:?}");
    (ws, created.watch_id())
}

/// An event as (type, key, value, create revision, mod revision, version, previous value).
type Ev = (EventType, String, String, i64, i64, i64, Option<String>);

fn events_of(m: &WatchResponse) -> Vec<Ev> {
    m.events()
        .iter()
        .map(|e| {
            let kv = e.kv().expect("an event's key");
            (
                e.event_type(),
                text(kv.key()),
                text(kv.value()),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                e.prev_kv().map(|p| text(p.value())),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Scenarios (each against a running cluster; keys of different scenarios do not overlap)
// ---------------------------------------------------------------------------------------------

/// Tokens as etcd users; the member list and every node's status.
async fn auth_members_and_status(c: &Cluster) {
    // The admin token, through all three endpoints and through each alone.
    let mut all = c.client().await;
    all.put("auth/k", "v", None).await.expect("put with the admin token");
    for node in 0..3 {
        let mut one = c.client_of(node).await;
        let got = one.get("auth/k", None).await.expect("get through one endpoint");
        assert_eq!(got.kvs().first().map(|kv| kv.value()), Some(&b"v"[..]), "node {}", node + 1);
        one.put(format!("auth/{node}"), "x", None).await.expect("put through one endpoint");
    }

    // No credentials: connecting works (there is nothing to authenticate), KV calls are refused.
    let mut anon = Client::connect(&c.endpoints, None).await.expect("connect without a user");
    let e = anon.get("auth/k", None).await.expect_err("a read without a token is refused");
    let (code, msg) = grpc(&e);
    assert!(msg.contains("user name is empty"), "{code}: {msg}");
    let e = anon.put("auth/k", "w", None).await.expect_err("a write without a token is refused");
    assert!(grpc(&e).1.contains("user name is empty"), "{e:?}");
    // A wrong password, or a user other than `token`, fails at Authenticate (in connect).
    for (user, password) in [("token", "not-a-token".to_string()), ("root", c.token.clone())] {
        let options = ConnectOptions::new().with_user(user, password);
        let e = Client::connect(&c.endpoints, Some(options)).await.err().expect("a bad user or password is refused");
        assert!(grpc(&e).1.contains("authentication failed"), "user {user}: {e:?}");
    }
    // The refused write wrote nothing.
    assert_eq!(all.get("auth/k", None).await.unwrap().kvs()[0].value(), b"v");

    // Scoped tokens (issued by node 1, honoured by every node): a read-only one reads but
    // cannot write or grant leases; one limited to a prefix writes there only.
    let issue = |scope: Scope| {
        let (token, _) = c.nodes[0].base.authority.issue(TokenKind::Client(scope), Some(3600)).expect("issue a token");
        ConnectOptions::new().with_user("token", token)
    };
    let read_only = Scope { read: true, write: false, admin: false, prefixes: Vec::new() };
    let mut reader = Client::connect(&c.endpoints, Some(issue(read_only))).await.expect("connect read-only");
    assert_eq!(reader.get("auth/k", None).await.expect("a read-only token reads").kvs()[0].value(), b"v");
    let e = reader.put("auth/k", "r", None).await.expect_err("a read-only token cannot write");
    assert!(grpc(&e).1.contains("permission denied"), "{e:?}");
    let e = reader.lease_grant(60, None).await.expect_err("nor grant leases");
    assert!(grpc(&e).1.contains("permission denied"), "{e:?}");
    let scoped = Scope { read: true, write: true, admin: false, prefixes: vec![b"scoped/".to_vec()] };
    let mut limited = Client::connect(&c.endpoints, Some(issue(scoped))).await.expect("connect scoped");
    limited.put("scoped/a", "1", None).await.expect("a write under the token's prefix");
    let e = limited.put("auth/k", "s", None).await.expect_err("a write outside the prefix");
    assert!(grpc(&e).1.contains("permission denied"), "{e:?}");
    let e = limited.get("auth/", Some(GetOptions::new().with_prefix())).await.expect_err("a read outside the prefix");
    assert!(grpc(&e).1.contains("permission denied"), "{e:?}");
    assert_eq!(all.get("auth/k", None).await.unwrap().kvs()[0].value(), b"v");

    // Streams outlive their token's check: a watch and a keep-alive stream opened with a token
    // end (invalid auth token) once it is revoked.
    let admin = aspen::AspenClient::connect(vec![c.nodes[0].ticket()], PATIENCE).await.expect("native client");
    let admin = admin.with_token(&c.token);
    let (info, doomed) = admin.create_token(true, true, false, vec![], None).await.expect("create a token");
    let options = ConnectOptions::new().with_user("token", doomed);
    let mut holder = Client::connect(&c.endpoints, Some(options)).await.expect("connect with the token");
    let (mut ws, _) = watch(&mut holder, "revoked/", WatchOptions::new().with_prefix()).await;
    let lease = holder.lease_grant(60, None).await.expect("grant").id();
    let (mut keeper, mut kept) = holder.lease_keep_alive(lease).await.expect("keep-alive stream");
    keeper.keep_alive().await.expect("a keep-alive");
    assert!(kept.message().await.expect("keep-alive answer").is_some_and(|k| k.ttl() > 0));
    admin.revoke_token(info.id).await.expect("revoke");
    let deadline = Instant::now() + PATIENCE;
    let ended = loop {
        match tokio::time::timeout(PATIENCE, ws.message()).await.expect("the watch ends") {
            Ok(Some(_)) => assert!(Instant::now() < deadline, "the watch goes on after the revocation"),
            Ok(None) => panic!("the watch ended without an error"),
            Err(e) => break e,
        }
    };
    assert!(grpc(&ended).1.contains("invalid auth token"), "{ended:?}");
    let deadline = Instant::now() + PATIENCE;
    let ended = loop {
        let sent = keeper.keep_alive().await;
        match kept.message().await {
            Ok(Some(_)) if sent.is_ok() => {
                assert!(Instant::now() < deadline, "keep-alives go on after the revocation");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => break e,
            other => panic!("the keep-alive stream ended without an error: {other:?} (send: {sent:?})"),
        }
    };
    assert!(grpc(&ended).1.contains("invalid auth token"), "{ended:?}");

    // MemberList (no token needed): three voters, each with its etcd address as client URL
    // (without a scheme). Each member is asked for its URL briefly: poll until all answer.
    let mut want_urls = c.endpoints.clone();
    want_urls.sort();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = anon.member_list().await.expect("member list");
        let mut ids: Vec<u64> = r.members().iter().map(|m| m.id()).collect();
        ids.sort_unstable();
        let mut urls: Vec<String> = r.members().iter().flat_map(|m| m.client_urls().to_vec()).collect();
        urls.sort();
        if ids == [1, 2, 3] && urls == want_urls {
            assert!(r.members().iter().all(|m| !m.is_learner() && !m.name().is_empty()), "{:?}", r.members());
            break;
        }
        assert!(Instant::now() < deadline, "member list never showed 3 members with their URLs: {:?}", r.members());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Status of each node (no token needed): the same non-zero leader, one of the members.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut leaders = Vec::new();
        for (node, endpoint) in c.endpoints.iter().enumerate() {
            let mut one = Client::connect([endpoint], None).await.expect("connect without a user");
            let s = one.status().await.expect("status");
            assert_eq!(s.header().map(|h| h.member_id()), Some(node as u64 + 1), "the answering member");
            assert!(!s.version().is_empty(), "{s:?}");
            leaders.push(s.leader());
        }
        if leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0]) {
            assert!((1..=3).contains(&leaders[0]), "the leader is a member: {leaders:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the nodes never agreed on a leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Put, get, prefixes, limits, keys only, sorting, deletes; etcd's revision and version
/// semantics; header revisions that never go back.
async fn kv_semantics(c: &Cluster) {
    let sharded = c.shards > 1;
    let mut kv = c.client().await;
    let keys: Vec<String> = (0..12).map(|i| format!("kv/{i:02}")).collect();
    if sharded {
        let shards: BTreeSet<u32> = keys.iter().map(|k| c.shard_of(k)).collect();
        assert_eq!(shards.len(), c.shards as usize, "the keys reach every shard");
    }
    // Header revisions of one client's writes go up (per shard: revisions are a shard's).
    let mut last_rev: BTreeMap<u32, i64> = BTreeMap::new();
    let mut check_rising = |key: &str, r: i64| {
        let shard = c.shard_of(key);
        let before = last_rev.insert(shard, r).unwrap_or(0);
        assert!(r > before, "the header revision of a write to {key} went from {before} to {r}");
    };
    let mut created = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let put = kv.put(k.as_str(), format!("v{i}"), None).await.expect("put");
        assert!(put.prev_key().is_none(), "no prev_kv unless asked");
        check_rising(k, rev(put.header()));
        created.push(rev(put.header()));
    }

    // A new key: version 1, create == mod == the put's revision; the read's header is at or
    // after it.
    let got = kv.get("kv/00", None).await.expect("get");
    assert_eq!((got.count(), got.more(), got.kvs().len()), (1, false, 1));
    let k0 = &got.kvs()[0];
    assert_eq!((k0.key(), k0.value(), k0.version(), k0.lease()), (&b"kv/00"[..], &b"v0"[..], 1, 0));
    assert_eq!((k0.create_revision(), k0.mod_revision()), (created[0], created[0]));
    assert!(rev(got.header()) >= created[0], "a read's header revision is at or after the writes it sees");

    // An update with prev_kv: the previous key as it was; the create revision stays, the mod
    // revision is the update's, the version counts.
    let put = kv.put("kv/00", "v0b", Some(PutOptions::new().with_prev_key())).await.expect("put with prev_kv");
    let updated = rev(put.header());
    check_rising("kv/00", updated);
    let prev = put.prev_key().expect("the previous key");
    assert_eq!((prev.key(), prev.value(), prev.version()), (&b"kv/00"[..], &b"v0"[..], 1));
    assert_eq!((prev.create_revision(), prev.mod_revision()), (created[0], created[0]));
    let got = kv.get("kv/00", None).await.expect("get");
    let k0 = &got.kvs()[0];
    assert_eq!((k0.value(), k0.version()), (&b"v0b"[..], 2));
    assert_eq!((k0.create_revision(), k0.mod_revision()), (created[0], updated));
    // prev_kv of a new key: none.
    let put = kv.put("kv/new", "n", Some(PutOptions::new().with_prev_key())).await.expect("put");
    assert!(put.prev_key().is_none());
    kv.delete("kv/new", None).await.expect("delete");

    // Header revisions seen by linearizable reads through each node, between writes, never go
    // back, and a read's is at or after every write before it.
    let mut per_node = Vec::new();
    for node in 0..3 {
        per_node.push(c.client_of(node).await);
    }
    let mut last = updated;
    for i in 0..30 {
        if i % 5 == 4 {
            let put = kv.put("kv/00", "v0b", None).await.expect("put");
            assert!(rev(put.header()) > last, "a write's revision {} after {last}", rev(put.header()));
            last = rev(put.header());
        }
        let got = per_node[i % 3].get("kv/00", None).await.expect("get");
        let h = rev(got.header());
        assert!(h >= last, "node {}: a read's header revision {h} went back from {last}", i % 3 + 1);
        assert!(h >= got.kvs()[0].mod_revision());
        last = h;
    }
    let updated = kv.get("kv/00", None).await.expect("get").kvs()[0].mod_revision();

    // Prefix with a limit: the first keys in key order, the count of all, `more`.
    let page = kv.get("kv/", Some(GetOptions::new().with_prefix().with_limit(5))).await.expect("prefix get");
    assert_eq!((page.count(), page.more()), (12, true));
    assert_eq!(keys_of(&page), keys[..5]);
    let whole = kv.get("kv/", Some(GetOptions::new().with_prefix())).await.expect("prefix get");
    assert_eq!((whole.count(), whole.more()), (12, false));
    assert_eq!(keys_of(&whole), keys);
    let values: Vec<String> = whole.kvs().iter().map(|kv| text(kv.value())).collect();
    assert_eq!(values[0], "v0b");
    assert_eq!(values[11], "v11");
    // Keys only, count only, from a key.
    let ko = kv.get("kv/", Some(GetOptions::new().with_prefix().with_keys_only())).await.expect("keys only");
    assert_eq!((ko.count(), keys_of(&ko)), (12, keys.clone()));
    assert!(ko.kvs().iter().all(|kv| kv.value().is_empty()), "keys only carries no values");
    assert!(ko.kvs().iter().all(|kv| kv.mod_revision() > 0 && kv.version() > 0), "but the revisions");
    let co = kv.get("kv/", Some(GetOptions::new().with_prefix().with_count_only())).await.expect("count only");
    assert_eq!((co.count(), co.kvs().len()), (12, 0));
    let from = kv.get("kv/10", Some(GetOptions::new().with_from_key().with_keys_only())).await.expect("from key");
    assert_eq!(keys_of(&from)[..2], ["kv/10", "kv/11"], "from kv/10 on: every key after it");
    assert!(keys_of(&from)[2..].iter().all(|k| k.as_str() > "kv/"), "{:?}", keys_of(&from));
    let range = kv.get("kv/03", Some(GetOptions::new().with_range("kv/06"))).await.expect("range get");
    assert_eq!((keys_of(&range), range.count()), (keys[3..6].to_vec(), 3));

    // Sorted by mod revision, newest first: in a shard, the order of the writes.
    let by_mod =
        |limit: i64| GetOptions::new().with_prefix().with_sort(SortTarget::Mod, SortOrder::Descend).with_limit(limit);
    let sorted = kv.get("kv/", Some(by_mod(0))).await.expect("sorted get");
    // (Revisions are a shard's: two shards may have written at the same one.)
    let mods: Vec<i64> = sorted.kvs().iter().map(|kv| kv.mod_revision()).collect();
    assert!(mods.windows(2).all(|w| w[0] >= w[1]), "descending mod revisions: {mods:?}");
    for shard in 0..c.shards {
        let of_shard: Vec<i64> =
            sorted.kvs().iter().filter(|kv| c.shard_of(&text(kv.key())) == shard).map(|kv| kv.mod_revision()).collect();
        assert!(of_shard.windows(2).all(|w| w[0] > w[1]), "shard {shard}: {of_shard:?}");
    }
    assert_eq!(sorted.count(), 12);
    let by_create = GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend);
    let sorted_create = kv.get("kv/", Some(by_create)).await.expect("sorted get");
    let creates: Vec<i64> = sorted_create.kvs().iter().map(|kv| kv.create_revision()).collect();
    assert!(creates.windows(2).all(|w| w[0] <= w[1]), "ascending create revisions: {creates:?}");
    if !sharded {
        // One history: kv/00 was written last, then kv/11, kv/10, …; created first.
        let mut want: Vec<String> = keys[1..].iter().rev().cloned().collect();
        want.insert(0, "kv/00".into());
        assert_eq!(keys_of(&sorted), want);
        assert_eq!(keys_of(&sorted_create), keys);
        let newest = kv.get("kv/", Some(by_mod(1))).await.expect("sorted get, limit 1");
        assert_eq!((keys_of(&newest), newest.count(), newest.more()), (vec!["kv/00".to_string()], 12, true));
        // A read at a past revision sees the key as it was then, not today's value.
        let then = kv.get("kv/00", Some(GetOptions::new().with_revision(created[0]))).await.expect("past rev");
        let k0 = &then.kvs()[0];
        assert_eq!((k0.value(), k0.version(), k0.mod_revision()), (&b"v0"[..], 1, created[0]));
    }
    let by_key_desc = GetOptions::new().with_prefix().with_keys_only().with_sort(SortTarget::Key, SortOrder::Descend);
    let desc = kv.get("kv/", Some(by_key_desc)).await.expect("sorted by key");
    let mut rev_keys = keys.clone();
    rev_keys.reverse();
    assert_eq!(keys_of(&desc), rev_keys);

    // Deletes: one key, then a prefix with the previous keys.
    let del = kv.delete("kv/01", None).await.expect("delete");
    assert_eq!(del.deleted(), 1);
    check_rising("kv/01", rev(del.header()));
    let gone = kv.get("kv/01", None).await.expect("get");
    assert_eq!((gone.count(), gone.kvs().len()), (0, 0));
    let del = kv.delete("kv/01", None).await.expect("delete of a missing key");
    assert_eq!(del.deleted(), 0);
    let del = kv.delete("kv/", Some(DeleteOptions::new().with_prefix().with_prev_key())).await.expect("delete");
    assert_eq!(del.deleted(), 11);
    let prev: Vec<(String, String)> = del.prev_kvs().iter().map(|kv| (text(kv.key()), text(kv.value()))).collect();
    let mut want: Vec<(String, String)> =
        keys.iter().enumerate().filter(|(i, _)| *i != 1).map(|(i, k)| (k.clone(), format!("v{i}"))).collect();
    want[0].1 = "v0b".into();
    let mut prev_sorted = prev.clone();
    prev_sorted.sort();
    assert_eq!(prev_sorted, want, "the deleted keys as they were");
    let left = kv.get("kv/", Some(GetOptions::new().with_prefix())).await.expect("get");
    assert_eq!((left.count(), left.kvs().len()), (0, 0));

    // A key created again starts over: version 1, a new create revision.
    let put = kv.put("kv/00", "again", None).await.expect("put");
    check_rising("kv/00", rev(put.header()));
    let got = kv.get("kv/00", None).await.expect("get");
    let k0 = &got.kvs()[0];
    assert_eq!(k0.version(), 1);
    assert_eq!((k0.create_revision(), k0.mod_revision()), (rev(put.header()), rev(put.header())));
    assert!(k0.create_revision() > updated);
}

/// A txn's compares on value, version, create and mod revision pick its branch; both branches
/// hold puts, gets and deletes. On several shards a txn over keys of different shards is refused.
async fn txns(c: &Cluster) {
    let mut kv = c.client().await;
    let names = ["k", "other", "del", "else", "bad", "missing"];
    let keys = c.keys_in_one_shard("txn/", &names);
    let [k, other, del, els, bad, missing] = [0, 1, 2, 3, 4, 5].map(|i| keys[i].clone());
    let r1 = rev(kv.put(k.as_str(), "v1", None).await.expect("put").header());
    kv.put(other.as_str(), "o", None).await.expect("put");
    kv.put(del.as_str(), "d", None).await.expect("put");

    // Every compare holds: the success branch runs.
    let t = Txn::new()
        .when([
            Compare::value(k.as_str(), CompareOp::Equal, "v1"),
            Compare::version(k.as_str(), CompareOp::Equal, 1),
            Compare::create_revision(k.as_str(), CompareOp::Equal, r1),
            Compare::mod_revision(k.as_str(), CompareOp::Equal, r1),
        ])
        .and_then([
            TxnOp::put(k.as_str(), "v2", Some(PutOptions::new().with_prev_key())),
            TxnOp::get(other.as_str(), None),
            TxnOp::delete(del.as_str(), Some(DeleteOptions::new().with_prev_key())),
        ])
        .or_else([TxnOp::put(bad.as_str(), "no", None)]);
    let r = kv.txn(t).await.expect("txn");
    assert!(r.succeeded(), "{r:?}");
    let r2 = rev(r.header());
    assert!(r2 > r1);
    let ops = r.op_responses();
    assert_eq!(ops.len(), 3, "{ops:?}");
    match &ops[0] {
        TxnOpResponse::Put(p) => assert_eq!(p.prev_key().map(|kv| kv.value()), Some(&b"v1"[..])),
        other => panic!("a put's answer: {other:?}"),
    }
    match &ops[1] {
        TxnOpResponse::Get(g) => {
            assert_eq!((g.count(), g.kvs().first().map(|kv| kv.value())), (1, Some(&b"o"[..])))
        }
        other => panic!("a get's answer: {other:?}"),
    }
    match &ops[2] {
        TxnOpResponse::Delete(d) => {
            assert_eq!(d.deleted(), 1);
            assert_eq!(d.prev_kvs().first().map(|kv| kv.value()), Some(&b"d"[..]));
        }
        other => panic!("a delete's answer: {other:?}"),
    }
    let got = kv.get(k.as_str(), None).await.expect("get");
    let kk = &got.kvs()[0];
    assert_eq!((kk.value(), kk.version(), kk.create_revision(), kk.mod_revision()), (&b"v2"[..], 2, r1, r2));
    assert_eq!(kv.get(del.as_str(), None).await.unwrap().count(), 0, "deleted in the txn");
    assert_eq!(kv.get(bad.as_str(), None).await.unwrap().count(), 0, "the failure branch did not run");

    // A txn's writes all happen at its one revision (as in etcd).
    let both = Txn::new().and_then([TxnOp::put(other.as_str(), "o2", None), TxnOp::put(els.as_str(), "e0", None)]);
    let r = kv.txn(both).await.expect("txn");
    for key in [&other, &els] {
        let got = kv.get(key.as_str(), None).await.expect("get");
        assert_eq!(got.kvs()[0].mod_revision(), rev(r.header()), "{key} written at the txn's revision");
    }
    kv.delete(els.as_str(), None).await.expect("delete");

    // A compare that fails (the value changed): the failure branch runs, the success one not.
    let t = Txn::new()
        .when([Compare::value(k.as_str(), CompareOp::Equal, "v1")])
        .and_then([TxnOp::put(bad.as_str(), "no", None)])
        .or_else([TxnOp::put(els.as_str(), "yes", None), TxnOp::get(k.as_str(), None)]);
    let r = kv.txn(t).await.expect("txn");
    assert!(!r.succeeded());
    match r.op_responses().get(1) {
        Some(TxnOpResponse::Get(g)) => assert_eq!(g.kvs()[0].value(), b"v2"),
        other => panic!("the failure branch's get: {other:?}"),
    }
    assert_eq!(kv.get(els.as_str(), None).await.unwrap().kvs()[0].value(), b"yes");
    assert_eq!(kv.get(bad.as_str(), None).await.unwrap().count(), 0);

    // Greater, less, not equal.
    let holds = |cmp: Compare| Txn::new().when([cmp]).and_then([TxnOp::get(k.as_str(), None)]);
    for (cmp, want) in [
        (Compare::version(k.as_str(), CompareOp::Greater, 1), true),
        (Compare::version(k.as_str(), CompareOp::Less, 2), false),
        (Compare::create_revision(k.as_str(), CompareOp::Less, r2), true),
        (Compare::mod_revision(k.as_str(), CompareOp::Less, r2), false),
        (Compare::mod_revision(k.as_str(), CompareOp::Greater, r1), true),
        (Compare::value(k.as_str(), CompareOp::NotEqual, "v1"), true),
        (Compare::value(k.as_str(), CompareOp::Greater, "v1"), true),
        (Compare::mod_revision(k.as_str(), CompareOp::NotEqual, r2), false),
    ] {
        let shown = format!("{cmp:?}");
        assert_eq!(kv.txn(holds(cmp)).await.expect("txn").succeeded(), want, "{shown}");
    }

    // Create if absent (the lock recipe's compare): once, then not again.
    let create = || {
        Txn::new()
            .when([Compare::create_revision(missing.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(missing.as_str(), "created", None)])
            .or_else([TxnOp::get(missing.as_str(), None)])
    };
    let first = kv.txn(create()).await.expect("txn");
    assert!(first.succeeded());
    let second = kv.txn(create()).await.expect("txn");
    assert!(!second.succeeded());
    match second.op_responses().first() {
        Some(TxnOpResponse::Get(g)) => assert_eq!(g.kvs()[0].create_revision(), rev(first.header())),
        other => panic!("the failure branch's get: {other:?}"),
    }

    // A branch that writes one key twice is refused (as etcd does).
    let twice = Txn::new().and_then([TxnOp::put(k.as_str(), "a", None), TxnOp::put(k.as_str(), "b", None)]);
    let e = kv.txn(twice).await.expect_err("one key twice");
    assert!(grpc(&e).1.contains("duplicate key"), "{e:?}");

    // Keys of two shards in one txn: refused, naming the shards; nothing written.
    if c.shards > 1 {
        let a = "txn/span-a".to_string();
        let b = (0..).map(|i| format!("txn/span-b{i}")).find(|x| c.shard_of(x) != c.shard_of(&a)).unwrap();
        let t = Txn::new()
            .when([Compare::version(a.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(a.as_str(), "1", None), TxnOp::put(b.as_str(), "2", None)]);
        let e = kv.txn(t).await.expect_err("a txn over two shards");
        let (code, msg) = grpc(&e);
        assert_eq!(code, "FailedPrecondition", "{msg}");
        let (sa, sb) = (c.shard_of(&a), c.shard_of(&b));
        assert!(msg.contains("shards") && msg.contains(&sa.to_string()) && msg.contains(&sb.to_string()), "{msg}");
        assert_eq!(kv.get(a.as_str(), None).await.unwrap().count(), 0);
        assert_eq!(kv.get(b.as_str(), None).await.unwrap().count(), 0);
    }
}

/// One shard: a prefix watch from a past revision with previous values sees the history, then
/// live events; a cancelled watcher stops while another on its stream goes on.
async fn watch_from_a_revision(c: &Cluster) {
    let mut kv = c.client().await;
    let r_one = rev(kv.put("w/1", "one", None).await.expect("put").header());
    let r_uno = rev(kv.put("w/1", "uno", None).await.expect("put").header());
    let mut wc = c.client().await;
    let options = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(r_one);
    let (mut ws, id) = watch(&mut wc, "w/", options).await;
    let r_two = rev(kv.put("w/2", "two", None).await.expect("put").header());
    let r_del = rev(kv.delete("w/1", None).await.expect("delete").header());
    let mut events = Vec::new();
    // Each previous key whole: (value, create revision, mod revision, version, lease).
    let mut prevs = Vec::new();
    while !events.iter().any(|e: &Ev| e.0 == EventType::Delete) {
        let m = next_message(&mut ws, "the watch's events").await;
        assert!(m.watch_id() == id && !m.canceled(), "{m:?}");
        events.extend(events_of(&m));
        for p in m.events().iter().filter_map(|e| e.prev_kv()) {
            prevs.push((text(p.value()), p.create_revision(), p.mod_revision(), p.version(), p.lease()));
        }
    }
    let s = |x: &str| x.to_string();
    let want: Vec<Ev> = vec![
        (EventType::Put, s("w/1"), s("one"), r_one, r_one, 1, None),
        (EventType::Put, s("w/1"), s("uno"), r_one, r_uno, 2, Some(s("one"))),
        (EventType::Put, s("w/2"), s("two"), r_two, r_two, 1, None),
        (EventType::Delete, s("w/1"), s(""), 0, r_del, 0, Some(s("uno"))),
    ];
    assert_eq!(events, want);
    assert_eq!(prevs, [(s("one"), r_one, r_one, 1, 0), (s("uno"), r_one, r_uno, 2, 0)]);

    // Cancel: acknowledged; the watcher sees nothing more, a new one on the stream does.
    ws.cancel(id).await.expect("cancel");
    let m = next_message(&mut ws, "the cancel's answer").await;
    assert!(m.canceled() && m.watch_id() == id && m.events().is_empty(), "{m:?}");
    ws.watch("w2/", Some(WatchOptions::new().with_prefix())).await.expect("a second watch on the stream");
    let m = next_message(&mut ws, "the second watch's created answer").await;
    assert!(m.created() && !m.canceled(), "{m:?}");
    let id2 = m.watch_id();
    assert_ne!(id2, id);
    kv.put("w/3", "after cancel", None).await.expect("put");
    kv.put("w2/k", "seen", None).await.expect("put");
    loop {
        let m = next_message(&mut ws, "the second watch's event").await;
        assert_ne!(m.watch_id(), id, "the cancelled watcher answered: {m:?}");
        let evs = events_of(&m);
        if evs.iter().any(|e| e.1 == "w2/k") {
            assert_eq!(evs[0].2, "seen");
            break;
        }
    }
}

/// Several shards: a prefix watch sees the puts of every shard; a start revision (a position in
/// one shard's history) is refused; cancel.
async fn watch_every_shard(c: &Cluster) {
    let mut kv = c.client().await;
    let mut wc = c.client().await;
    let (mut ws, id) = watch(&mut wc, "s/", WatchOptions::new().with_prefix()).await;
    // Established in every shard before the real writes: probe each shard until it is seen.
    let probes = c.one_key_per_shard("s/probe-");
    let mut unseen: BTreeSet<String> = probes.iter().cloned().collect();
    let deadline = Instant::now() + PATIENCE;
    while !unseen.is_empty() {
        for p in &unseen {
            kv.put(p.as_str(), "p", None).await.expect("probe put");
        }
        while let Ok(m) = tokio::time::timeout(Duration::from_millis(300), ws.message()).await {
            let m = m.expect("watch stream").expect("the watch stream goes on");
            for e in events_of(&m) {
                unseen.remove(&e.1);
            }
        }
        assert!(Instant::now() < deadline, "the watch never saw the probes of {unseen:?}");
    }
    let keys: Vec<String> = (0..12).map(|i| format!("s/{i:02}")).collect();
    let shards: BTreeSet<u32> = keys.iter().map(|k| c.shard_of(k)).collect();
    assert_eq!(shards.len(), c.shards as usize, "the keys reach every shard");
    let mut revs = BTreeMap::new();
    for k in &keys {
        let r = kv.put(k.as_str(), format!("v{k}"), None).await.expect("put");
        revs.insert(k.clone(), rev(r.header()));
    }
    let mut seen: BTreeMap<String, Ev> = BTreeMap::new();
    while seen.len() < keys.len() {
        let m = next_message(&mut ws, "the events of every shard").await;
        assert!(m.watch_id() == id && !m.canceled(), "{m:?}");
        for e in events_of(&m) {
            if !e.1.starts_with("s/probe") {
                seen.insert(e.1.clone(), e);
            }
        }
    }
    for k in &keys {
        let e = &seen[k];
        assert_eq!((e.0, e.2.as_str(), e.4, e.5), (EventType::Put, format!("v{k}").as_str(), revs[k], 1), "{k}");
    }
    ws.cancel(id).await.expect("cancel");
    loop {
        let m = next_message(&mut ws, "the cancel's answer").await;
        if m.canceled() {
            assert_eq!(m.watch_id(), id);
            break;
        }
    }

    // A start revision of a prefix watch over every shard: the watcher is created and
    // cancelled, the reason naming shards.
    ws.watch("s/", Some(WatchOptions::new().with_prefix().with_start_revision(1))).await.expect("send a watch");
    loop {
        let m = next_message(&mut ws, "the refused watch's answer").await;
        if m.canceled() {
            assert!(m.cancel_reason().contains("shard"), "{m:?}");
            break;
        }
    }
}

/// Leases: grant, keys with the lease (in every shard), keep-alive, time-to-live with keys,
/// list, revoke (the keys go), time-to-live of a revoked lease.
async fn leases(c: &Cluster) {
    let mut kv = c.client().await;
    let granted = kv.lease_grant(60, None).await.expect("lease grant");
    let id = granted.id();
    assert!(id > 0 && granted.ttl() == 60, "{granted:?}");
    let keys = if c.shards > 1 {
        c.one_key_per_shard("leased/")
    } else {
        vec!["leased/a".to_string(), "leased/b".to_string()]
    };
    for k in &keys {
        kv.put(k.as_str(), "v", Some(PutOptions::new().with_lease(id))).await.expect("put with the lease");
    }
    kv.put("leased/free", "v", None).await.expect("put without a lease");
    let got = kv.get(keys[0].as_str(), None).await.expect("get");
    assert_eq!(got.kvs()[0].lease(), id, "the key carries its lease");

    // Keep-alive with the crate's stream: each request answered with the TTL.
    let (mut keeper, mut stream) = kv.lease_keep_alive(id).await.expect("keep-alive");
    assert_eq!(keeper.id(), id);
    for _ in 0..2 {
        keeper.keep_alive().await.expect("send a keep-alive");
        let answer = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("a keep-alive answer in time")
            .expect("the keep-alive stream")
            .expect("an answer");
        assert_eq!(answer.id(), id);
        assert!(answer.ttl() > 0 && answer.ttl() <= 60, "{answer:?}");
    }

    // Time to live, with the keys.
    let ttl = kv.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())).await.expect("ttl");
    assert_eq!((ttl.id(), ttl.granted_ttl()), (id, 60));
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 60, "{ttl:?}");
    let mut attached: Vec<String> = ttl.keys().iter().map(|k| text(k)).collect();
    attached.sort();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(attached, want);
    // Listed.
    let list = kv.leases().await.expect("leases");
    assert!(list.leases().iter().any(|l| l.id() == id), "{list:?}");

    // A short lease outlives its TTL while kept alive, and expires (its key with it) once not.
    let short = kv.lease_grant(2, None).await.expect("grant a 2 s lease").id();
    kv.put("leased/short", "v", Some(PutOptions::new().with_lease(short))).await.expect("put");
    let (mut keeper, mut stream) = kv.lease_keep_alive(short).await.expect("keep-alive");
    let kept_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < kept_until {
        keeper.keep_alive().await.expect("send a keep-alive");
        let answer = tokio::time::timeout(PATIENCE, stream.message()).await.expect("in time").expect("stream");
        assert!(answer.is_some_and(|a| a.ttl() > 0), "the kept lease lives");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(kv.get("leased/short", None).await.unwrap().count(), 1, "kept alive past its TTL");
    drop((keeper, stream));
    let deadline = Instant::now() + PATIENCE;
    while kv.get("leased/short", None).await.unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(kv.lease_time_to_live(short, None).await.expect("ttl").ttl(), -1, "expired");

    // Revoke: the keys go, the others stay; the lease is gone.
    kv.lease_revoke(id).await.expect("revoke");
    let left = kv.get("leased/", Some(GetOptions::new().with_prefix())).await.expect("get");
    assert_eq!(keys_of(&left), ["leased/free"]);
    let ttl = kv.lease_time_to_live(id, None).await.expect("ttl of a revoked lease");
    assert_eq!(ttl.ttl(), -1, "{ttl:?}");
    let list = kv.leases().await.expect("leases");
    assert!(!list.leases().iter().any(|l| l.id() == id), "{list:?}");
    let e = kv.put("leased/a", "v", Some(PutOptions::new().with_lease(id))).await.expect_err("a revoked lease");
    assert!(grpc(&e).1.contains("requested lease not found"), "{e:?}");
    let e = kv.lease_revoke(id).await.expect_err("revoking twice");
    assert!(grpc(&e).1.contains("requested lease not found"), "{e:?}");
}

/// Less common parts of the API: ignore_value / ignore_lease puts, sorting by version and
/// value, revision filters, compares over a prefix, nested and read-only txns, explicit lease
/// ids, watch filters and ranges, progress requests, compaction.
async fn edges(c: &Cluster) {
    let sharded = c.shards > 1;
    let mut kv = c.client().await;

    // ignore_value: the value stays, the version and mod revision move; a missing key is refused.
    let r1 = rev(kv.put("e/iv", "keep", None).await.expect("put").header());
    let r2 = rev(kv.put("e/iv", "", Some(PutOptions::new().with_ignore_value())).await.expect("put").header());
    let got = kv.get("e/iv", None).await.expect("get");
    let e = &got.kvs()[0];
    assert_eq!((e.value(), e.version(), e.create_revision(), e.mod_revision()), (&b"keep"[..], 2, r1, r2));
    let err = kv.put("e/none", "", Some(PutOptions::new().with_ignore_value())).await.expect_err("missing key");
    assert!(grpc(&err).1.contains("key not found"), "{err:?}");
    // ignore_lease: the lease stays.
    let lease = kv.lease_grant(60, None).await.expect("grant").id();
    kv.put("e/il", "a", Some(PutOptions::new().with_lease(lease))).await.expect("put");
    kv.put("e/il", "b", Some(PutOptions::new().with_ignore_lease())).await.expect("put");
    let got = kv.get("e/il", None).await.expect("get");
    assert_eq!((got.kvs()[0].value(), got.kvs()[0].lease()), (&b"b"[..], lease));
    // A plain put drops the lease.
    kv.put("e/il", "c", None).await.expect("put");
    assert_eq!(kv.get("e/il", None).await.unwrap().kvs()[0].lease(), 0);
    kv.lease_revoke(lease).await.expect("revoke");
    assert_eq!(kv.get("e/il", None).await.unwrap().count(), 1, "a key that left the lease stays");

    // Sorting by version and by value.
    for (k, v, times) in [("e/s/a", "3", 1), ("e/s/b", "1", 3), ("e/s/c", "2", 2)] {
        for _ in 0..times {
            kv.put(k, v, None).await.expect("put");
        }
    }
    let by = |t: SortTarget, o: SortOrder| GetOptions::new().with_prefix().with_sort(t, o);
    let r = kv.get("e/s/", Some(by(SortTarget::Version, SortOrder::Descend))).await.expect("get");
    assert_eq!(keys_of(&r), ["e/s/b", "e/s/c", "e/s/a"]);
    let r = kv.get("e/s/", Some(by(SortTarget::Value, SortOrder::Ascend))).await.expect("get");
    assert_eq!(keys_of(&r), ["e/s/b", "e/s/c", "e/s/a"]);
    let r = kv.get("e/s/", Some(by(SortTarget::Value, SortOrder::Descend).with_limit(2))).await.expect("get");
    assert_eq!((keys_of(&r), r.count(), r.more()), (vec!["e/s/a".to_string(), "e/s/c".into()], 3, true));

    // Revision filters (within one key's shard: revisions are a shard's).
    let keys = c.keys_in_one_shard("e/f/", &["a", "b", "c"]);
    let mut revs = Vec::new();
    for k in &keys {
        revs.push(rev(kv.put(k.as_str(), "x", None).await.expect("put").header()));
    }
    let r = kv.get("e/f/", Some(GetOptions::new().with_prefix().with_min_mod_revision(revs[1]))).await.unwrap();
    assert_eq!(keys_of(&r).len(), 2, "modified at or after {}: {:?}", revs[1], keys_of(&r));
    assert!(!keys_of(&r).contains(&keys[0]));
    let r = kv.get("e/f/", Some(GetOptions::new().with_prefix().with_max_create_revision(revs[0]))).await.unwrap();
    assert!(keys_of(&r).contains(&keys[0]) && !keys_of(&r).contains(&keys[1]), "{:?}", keys_of(&r));

    // A compare over a prefix holds only if it holds for every key (one shard: a prefix
    // reaches every shard, so a sharded cluster refuses it).
    let all_x = Txn::new()
        .when([Compare::value("e/f/", CompareOp::Equal, "x").with_prefix()])
        .and_then([TxnOp::get(keys[0].as_str(), None)]);
    if sharded {
        let err = kv.txn(all_x).await.expect_err("a prefix compare on shards");
        assert_eq!(grpc(&err).0, "FailedPrecondition", "{err:?}");
    } else {
        assert!(kv.txn(all_x.clone()).await.expect("txn").succeeded());
        kv.put(keys[2].as_str(), "y", None).await.expect("put");
        assert!(!kv.txn(all_x).await.expect("txn").succeeded(), "one key differs");
    }

    // A nested txn, and a read-only txn whose header is at or after what it read.
    let inner = Txn::new()
        .when([Compare::value(keys[0].as_str(), CompareOp::Equal, "x")])
        .and_then([TxnOp::put(keys[1].as_str(), "inner", None)])
        .or_else([TxnOp::get(keys[1].as_str(), None)]);
    let outer = Txn::new()
        .when([Compare::version(keys[0].as_str(), CompareOp::Greater, 0)])
        .and_then([TxnOp::txn(inner), TxnOp::get(keys[0].as_str(), None)]);
    let r = kv.txn(outer).await.expect("nested txn");
    assert!(r.succeeded());
    match r.op_responses().first() {
        Some(TxnOpResponse::Txn(t)) => {
            assert!(t.succeeded());
            assert!(matches!(t.op_responses().first(), Some(TxnOpResponse::Put(_))), "{t:?}");
        }
        other => panic!("the nested txn's answer: {other:?}"),
    }
    assert_eq!(kv.get(keys[1].as_str(), None).await.unwrap().kvs()[0].value(), b"inner");
    let ro = Txn::new().and_then([TxnOp::get(keys[1].as_str(), None)]);
    let r = kv.txn(ro).await.expect("read-only txn");
    let read = match r.op_responses().first() {
        Some(TxnOpResponse::Get(g)) => g.kvs()[0].mod_revision(),
        other => panic!("{other:?}"),
    };
    assert!(rev(r.header()) >= read, "a read-only txn's header {} is before what it read {read}", rev(r.header()));
    // Read-only txns are reads: they add no log entry (on one shard, shard 0's log is theirs).
    if c.shards == 1 {
        let mut one = c.client_of(0).await;
        let before = one.status().await.expect("status").raft_index();
        for _ in 0..20 {
            let ro = Txn::new()
                .when([Compare::version(keys[1].as_str(), CompareOp::Greater, 0)])
                .and_then([TxnOp::get(keys[1].as_str(), None)])
                .or_else([TxnOp::get(keys[0].as_str(), None)]);
            let r = one.txn(ro).await.expect("read-only txn");
            assert!(r.succeeded() && matches!(r.op_responses().first(), Some(TxnOpResponse::Get(_))));
        }
        let after = one.status().await.expect("status").raft_index();
        assert!(after < before + 10, "20 read-only txns took {} log entries", after - before);
    }

    // Explicit lease ids; a taken one is refused; keep-alive of a revoked lease fails.
    let id = 0x5eed_0000_0000_0001 + i64::from(c.shards);
    let g = kv.lease_grant(30, Some(etcd_client::LeaseGrantOptions::new().with_id(id))).await.expect("grant");
    assert_eq!((g.id(), g.ttl()), (id, 30));
    let err = kv.lease_grant(30, Some(etcd_client::LeaseGrantOptions::new().with_id(id))).await.expect_err("taken");
    assert!(grpc(&err).1.contains("lease already exists"), "{err:?}");
    let ttl = kv.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())).await.expect("ttl");
    assert!(ttl.keys().is_empty() && ttl.granted_ttl() == 30, "{ttl:?}");
    kv.lease_revoke(id).await.expect("revoke");
    assert!(kv.lease_keep_alive(id).await.is_err(), "keep-alive of a revoked lease");

    // Watch filters and a range that is not a prefix; a progress request.
    let mut wc = c.client().await;
    let (mut ws, id_nop) =
        watch(&mut wc, "e/w/", WatchOptions::new().with_prefix().with_filters([etcd_client::WatchFilterType::NoPut]))
            .await;
    ws.watch("e/w/b", Some(WatchOptions::new().with_range("e/w/d"))).await.expect("a range watch");
    let m = next_message(&mut ws, "the range watch's created answer").await;
    assert!(m.created(), "{m:?}");
    let id_range = m.watch_id();
    // Both deliver before the real writes: a probe key put (the range watch) and deleted (the
    // no-put watch) until each has seen it.
    let deadline = Instant::now() + PATIENCE;
    let (mut range_live, mut nop_live) = (false, false);
    while !(range_live && nop_live) {
        kv.put("e/w/c", "probe", None).await.expect("put");
        kv.delete("e/w/c", None).await.expect("delete");
        while let Ok(m) = tokio::time::timeout(Duration::from_millis(300), ws.message()).await {
            let m = m.expect("watch stream").expect("watch stream goes on");
            for e in events_of(&m) {
                assert!(m.watch_id() != id_nop || e.0 == EventType::Delete, "a no-put watch saw {e:?}");
            }
            range_live |= m.watch_id() == id_range;
            nop_live |= m.watch_id() == id_nop;
        }
        assert!(Instant::now() < deadline, "the watches never delivered: range {range_live}, no-put {nop_live}");
    }
    kv.put("e/w/a", "outside", None).await.expect("put");
    kv.put("e/w/d", "outside", None).await.expect("put");
    kv.put("e/w/b", "inside", None).await.expect("put");
    kv.delete("e/w/a", None).await.expect("delete");
    let (mut got_range, mut got_delete) = (Vec::new(), Vec::new());
    while got_range.is_empty() || got_delete.is_empty() {
        let m = next_message(&mut ws, "the filtered watches' events").await;
        for e in events_of(&m).into_iter().filter(|e| e.1 != "e/w/c") {
            if m.watch_id() == id_range {
                got_range.push((e.1, e.2));
            } else {
                assert_eq!(m.watch_id(), id_nop);
                assert_eq!(e.0, EventType::Delete, "a no-put watch saw {e:?}");
                got_delete.push(e.1);
            }
        }
    }
    assert_eq!(got_range, [("e/w/b".to_string(), "inside".to_string())], "only keys in [e/w/b, e/w/d)");
    assert_eq!(got_delete, ["e/w/a"]);
    let last = rev(kv.put("e/w/z", "z", None).await.expect("put").header());
    ws.request_progress().await.expect("progress request");
    loop {
        let m = next_message(&mut ws, "the progress answer").await;
        if m.watch_id() == -1 {
            assert!(m.events().is_empty());
            if !sharded {
                assert!(rev(m.header()) >= last, "progress at {} before the last write {last}", rev(m.header()));
            }
            break;
        }
    }

    // Compaction: at the current revision nothing happens (one version per key); a future one
    // is refused.
    let current = rev(kv.get("e/iv", None).await.expect("get").header());
    kv.compact(current, None).await.expect("compact at the current revision");
    let err = kv.compact(current + 1_000_000, None).await.expect_err("a future revision");
    assert!(grpc(&err).1.contains("future revision"), "{err:?}");
    assert_eq!(kv.get("e/iv", None).await.unwrap().kvs()[0].value(), b"keep");
    // A delete over a range.
    let d = kv.delete("e/s/a", Some(DeleteOptions::new().with_range("e/s/c"))).await.expect("delete a range");
    assert_eq!(d.deleted(), 2);
    assert_eq!(keys_of(&kv.get("e/s/", Some(GetOptions::new().with_prefix())).await.unwrap()), ["e/s/c"]);
}

/// A progress request answers a revision no event of the stream at or before which is still to
/// come: after a burst of acknowledged puts from several clients, every one of their events is
/// on the stream before the progress answer, and a quiet watcher of the same stream does not
/// hold the answer back. Headers carry the Raft term.
async fn progress_after_a_burst(c: &Cluster) {
    const PUTS: usize = 240;
    let mut wc = c.client().await;
    let (mut ws, busy) = watch(&mut wc, "pb/", WatchOptions::new().with_prefix()).await;
    ws.watch("pq/quiet", None).await.expect("a quiet key's watch");
    let m = next_message(&mut ws, "the quiet watch's created answer").await;
    assert!(m.created(), "{m:?}");
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let endpoints = c.endpoints.clone();
            let token = c.token.clone();
            tokio::spawn(async move {
                let options = ConnectOptions::new().with_user("token", token);
                let mut kv = Client::connect([endpoints[w % endpoints.len()].clone()], Some(options)).await.unwrap();
                let mut revs = Vec::new();
                for i in (w..PUTS).step_by(4) {
                    let put = kv.put(format!("pb/{i:03}"), "v", None).await.expect("put");
                    let header = put.header().expect("a header");
                    assert!(header.raft_term() > 0, "{header:?}");
                    revs.push(header.revision());
                }
                revs
            })
        })
        .collect();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    ws.request_progress().await.expect("progress request");
    let mut seen = BTreeSet::new();
    let progress = loop {
        let m = next_message(&mut ws, "events, then the progress answer").await;
        if m.watch_id() == -1 {
            break rev(m.header());
        }
        assert_eq!(m.watch_id(), busy, "only the busy watch has events: {m:?}");
        seen.extend(events_of(&m).into_iter().map(|e| e.1));
    };
    assert_eq!(seen.len(), PUTS, "every acknowledged put's event came before the progress answer");
    if c.shards == 1 {
        let last = acked.iter().copied().max().unwrap_or(0);
        assert!(progress >= last, "progress at {progress}, before the last acknowledged put {last}");
    }
}

/// etcd's lock service (`Client::lock`/`unlock`, v3lock): lockers with leases of their own
/// hold the lock one at a time, each once; one that gives up waiting leaves no
/// key behind; a lock without a lease gets one. On several shards too: a lock's keys live in
/// its name's shard.
async fn lock_service(c: &Cluster) {
    const LOCKERS: usize = 5;
    let held = Arc::new(AtomicBool::new(false));
    let order = Arc::new(Mutex::new(Vec::new()));
    // The first holder keeps the lock until every other locker has queued.
    let mut first = c.client().await;
    let lease = first.lease_grant(30, None).await.expect("grant").id();
    let mine = first.lock("svc-lock", Some(LockOptions::new().with_lease(lease))).await.expect("the first lock");
    assert!(mine.key().starts_with(b"svc-lock/"), "{:?}", mine.key());
    // The same lease asking again holds it already (etcd: one acquisition per lease).
    let again = first.lock("svc-lock", Some(LockOptions::new().with_lease(lease))).await.expect("again");
    assert_eq!(again.key(), mine.key());
    let lockers: Vec<_> = (0..LOCKERS)
        .map(|i| {
            let (endpoints, token) = (c.endpoints.clone(), c.token.clone());
            let (held, order) = (held.clone(), order.clone());
            tokio::spawn(async move {
                let options = ConnectOptions::new().with_user("token", token);
                let mut kv = Client::connect([endpoints[i % endpoints.len()].clone()], Some(options)).await.unwrap();
                let lease = kv.lease_grant(30, None).await.expect("grant").id();
                let got = kv.lock("svc-lock", Some(LockOptions::new().with_lease(lease))).await.expect("lock");
                assert!(!held.swap(true, Ordering::SeqCst), "locker {i} got the lock while another held it");
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(30)).await;
                held.store(false, Ordering::SeqCst);
                kv.unlock(got.key()).await.expect("unlock");
            })
        })
        .collect();
    // Queued: one key per locker besides the holder's.
    let deadline = Instant::now() + PATIENCE;
    while first.get("svc-lock/", Some(GetOptions::new().with_prefix())).await.unwrap().count() < 1 + LOCKERS as i64 {
        assert!(Instant::now() < deadline, "the lockers never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One more gives up waiting: its key goes, it never holds the lock.
    let mut quitter = c.client().await;
    let q_lease = quitter.lease_grant(30, None).await.expect("grant").id();
    let waited = tokio::time::timeout(
        Duration::from_millis(500),
        quitter.lock("svc-lock", Some(LockOptions::new().with_lease(q_lease))),
    )
    .await;
    assert!(waited.is_err(), "the lock was free while held: {waited:?}");
    let quitters = |got: etcd_client::GetResponse| got.kvs().iter().filter(|kv| kv.lease() == q_lease).count();
    let deadline = Instant::now() + PATIENCE;
    while quitters(first.get("svc-lock/", Some(GetOptions::new().with_prefix())).await.unwrap()) > 0 {
        assert!(Instant::now() < deadline, "a locker that gave up left its key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.unlock(mine.key()).await.expect("unlock");
    for l in lockers {
        l.await.expect("a locker");
    }
    assert_eq!(order.lock().unwrap().len(), LOCKERS, "every locker held the lock once");
    assert_eq!(first.get("svc-lock/", Some(GetOptions::new().with_prefix())).await.unwrap().count(), 0);
    // Without a lease, the lock gets one of its own (etcd: a 60 s session lease).
    let free = first.lock("svc-free", None).await.expect("a lock without a lease");
    let got = first.get(free.key(), None).await.unwrap();
    assert!(got.kvs().first().is_some_and(|kv| kv.lease() != 0), "{got:?}");
    first.unlock(free.key()).await.expect("unlock");
}

/// The value of the next leader an observe stream reports.
async fn next_observed(observed: &mut etcd_client::ObserveStream) -> String {
    let m = tokio::time::timeout(PATIENCE, observed.message()).await.expect("an observation");
    let m = m.expect("the observe stream").expect("goes on");
    text(m.kv().expect("the leader's key").value())
}

/// etcd's election service (v3election): the first candidate leads, a second waits; proclaim
/// changes the leader's value, observe streams each change, resign hands over; a former
/// leader's key can neither proclaim nor resign; no candidate: no leader. On several shards
/// too (the candidates' keys live in the election's shard), with an observer that starts before
/// any candidate.
async fn election_service(c: &Cluster) {
    let mut a = c.client().await;
    // Observed from before the first candidate: the first leader is reported.
    let mut early = c.client().await;
    let mut early_observed = early.observe("svc-elect").await.expect("observe with no candidate yet");
    let lease_a = a.lease_grant(30, None).await.expect("grant").id();
    let won = a.campaign("svc-elect", "a", lease_a).await.expect("campaign");
    let key_a = won.leader().expect("a leader key").clone();
    // etcd's key `NAME/LEASE`; on several shards perhaps with a suffix that puts it in the
    // election's shard.
    let plain = format!("svc-elect/{lease_a:x}");
    if c.shards == 1 {
        assert_eq!(key_a.key(), plain.as_bytes());
    } else {
        assert!(key_a.key().starts_with(plain.as_bytes()), "{:?}", key_a.key());
    }
    assert_eq!(next_observed(&mut early_observed).await, "a");
    let leader_value = |r: &etcd_client::LeaderResponse| text(r.kv().expect("the leader's key").value());
    assert_eq!(leader_value(&a.leader("svc-elect").await.expect("leader")), "a");
    let mut watcher = c.client().await;
    let mut observed = watcher.observe("svc-elect").await.expect("observe");
    assert_eq!(next_observed(&mut observed).await, "a");
    // A second candidate waits while the first leads.
    let (endpoints, token) = (c.endpoints.clone(), c.token.clone());
    let second = tokio::spawn(async move {
        let options = ConnectOptions::new().with_user("token", token);
        let mut b = Client::connect(&endpoints, Some(options)).await.unwrap();
        let lease_b = b.lease_grant(30, None).await.expect("grant").id();
        let won = b.campaign("svc-elect", "b", lease_b).await.expect("campaign b");
        (b, won.leader().expect("b's leader key").clone())
    });
    let deadline = Instant::now() + PATIENCE;
    while a.get("svc-elect/", Some(GetOptions::new().with_prefix())).await.unwrap().count() < 2 {
        assert!(Instant::now() < deadline, "the second candidate never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!second.is_finished(), "the second candidate won while the first led");
    a.proclaim("a2", Some(ProclaimOptions::new().with_leader(key_a.clone()))).await.expect("proclaim");
    assert_eq!(next_observed(&mut observed).await, "a2");
    a.resign(Some(ResignOptions::new().with_leader(key_a.clone()))).await.expect("resign");
    let (mut b, key_b) = tokio::time::timeout(PATIENCE, second).await.expect("b leads").expect("b");
    assert_eq!(next_observed(&mut observed).await, "b");
    assert_eq!(leader_value(&b.leader("svc-elect").await.expect("leader")), "b");
    let e = a.proclaim("stale", Some(ProclaimOptions::new().with_leader(key_a.clone()))).await.expect_err("stale");
    assert!(grpc(&e).1.contains("not leader"), "{e:?}");
    a.resign(Some(ResignOptions::new().with_leader(key_a))).await.expect("a resign that changes nothing");
    assert_eq!(leader_value(&b.leader("svc-elect").await.expect("leader")), "b");
    b.resign(Some(ResignOptions::new().with_leader(key_b))).await.expect("resign");
    let e = b.leader("svc-elect").await.expect_err("no candidate, no leader");
    assert!(grpc(&e).1.contains("no leader"), "{e:?}");
}

/// What the lockers of [`lock_recipe`] share: who holds the lock now, and when each held it.
#[derive(Default)]
struct LockLog {
    held: AtomicBool,
    /// Enter and exit events, numbered in one sequence.
    clock: AtomicU64,
    /// (locker, enter, exit) by that sequence.
    spans: Mutex<Vec<(usize, u64, u64)>>,
    /// What went wrong inside a critical section (asserted after the lockers end).
    violations: Mutex<Vec<String>>,
    /// Set by the first holder, which keeps the lock until every locker has queued its key.
    first_taken: AtomicBool,
    /// Lockers that had to wait for the deletion of keys before theirs.
    waited: AtomicU64,
}

const LOCK_PREFIX: &str = "lock/";

/// The get of etcd's `WithFirstCreate`: the prefix's key with the smallest create revision.
fn first_created() -> GetOptions {
    GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend).with_limit(1)
}

/// Waits until `key` is deleted, watching from `start` (etcd's `waitDelete`).
async fn wait_delete(c: &mut Client, key: &str, start: i64) {
    let (mut ws, id) = watch(c, key, WatchOptions::new().with_start_revision(start)).await;
    loop {
        let m = next_message(&mut ws, "the deletion of the key before ours").await;
        assert!(m.watch_id() == id && !m.canceled(), "the watch of {key} from {start} ended: {m:?}");
        if m.events().iter().any(|e| e.event_type() == EventType::Delete) {
            return;
        }
    }
}

/// etcd's `concurrency.Mutex.Lock`: puts `lock/<lease>` with the lease if absent; the owner is the
/// key with the smallest create revision; a waiter waits for the deletion of every key created
/// before its own, newest first (`waitDeletes`). Returns the key, its create revision and
/// whether it had to wait.
async fn acquire(c: &mut Client, lease: i64) -> (String, i64, bool) {
    let key = format!("{LOCK_PREFIX}{lease:x}");
    let txn = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put(key.as_str(), "", Some(PutOptions::new().with_lease(lease))),
            TxnOp::get(LOCK_PREFIX, Some(first_created())),
        ])
        .or_else([TxnOp::get(key.as_str(), None), TxnOp::get(LOCK_PREFIX, Some(first_created()))]);
    let r = c.txn(txn).await.expect("the lock's txn");
    let ops = r.op_responses();
    let my_rev = if r.succeeded() {
        rev(r.header())
    } else {
        match &ops[0] {
            TxnOpResponse::Get(g) => g.kvs()[0].create_revision(),
            other => panic!("the lock's get: {other:?}"),
        }
    };
    // The txn's revision is the create revision of the key it wrote.
    let mine = c.get(key.as_str(), None).await.expect("get the lock key");
    assert_eq!(mine.kvs().first().map(|kv| kv.create_revision()), Some(my_rev), "{key}: {r:?}");
    let owner = match &ops[1] {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.create_revision()),
        other => panic!("the owner's get: {other:?}"),
    };
    assert!(owner.is_some_and(|o| o <= my_rev), "the owner's key is at or before ours: {owner:?} vs {my_rev}");
    if owner == Some(my_rev) {
        return (key, my_rev, false);
    }
    // waitDeletes: the newest key created before ours, until there is none.
    loop {
        let before = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1)
            .with_max_create_revision(my_rev - 1);
        let r = c.get(LOCK_PREFIX, Some(before)).await.expect("the key before ours");
        let Some(last) = r.kvs().first() else { break };
        assert!(last.create_revision() < my_rev, "max_create_revision: {r:?}");
        let last = text(last.key());
        wait_delete(c, &last, rev(r.header()) + 1).await;
    }
    let still = c.get(key.as_str(), None).await.expect("get the lock key");
    assert_eq!(still.count(), 1, "our lock key is still there (the lease lives)");
    (key, my_rev, true)
}

/// N lockers, each its own client and lease, contend for etcd's mutex recipe; each holder adds
/// one to a counter with a compare-and-swap on its mod revision, then releases (delete or lease
/// revoke). The counter ends at N and no two held the lock at once.
async fn lock_recipe(c: &Cluster) {
    const N: usize = 8;
    let mut kv = c.client().await;
    kv.put("lock-counter", "0", None).await.expect("put the counter");
    let log = Arc::new(LockLog::default());
    let start = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let (log, start) = (log.clone(), start.clone());
        // Each locker its own client, on the endpoints in a rotated order.
        let mut endpoints = c.endpoints.clone();
        endpoints.rotate_left(i % 3);
        let options = c.options();
        tasks.spawn(async move {
            let mut cl = Client::connect(&endpoints, Some(options)).await.expect("connect");
            let lease = cl.lease_grant(120, None).await.expect("lease grant").id();
            start.wait().await;
            let (key, my_rev, waited) = acquire(&mut cl, lease).await;
            if waited {
                log.waited.fetch_add(1, Ordering::SeqCst);
            }

            let enter = log.clock.fetch_add(1, Ordering::SeqCst);
            if log.held.swap(true, Ordering::SeqCst) {
                log.violations.lock().unwrap().push(format!("locker {i} entered while another held the lock"));
            }
            let got = cl.get("lock-counter", None).await.expect("get the counter");
            let kv = &got.kvs()[0];
            let (value, seen): (u64, i64) = (text(kv.value()).parse().expect("a number"), kv.mod_revision());
            if !log.first_taken.swap(true, Ordering::SeqCst) {
                // The first holder keeps the lock until every other locker has queued its key:
                // all of them then go through waitDeletes, whatever the scheduling.
                let deadline = Instant::now() + PATIENCE;
                loop {
                    let queued = cl.get(LOCK_PREFIX, Some(GetOptions::new().with_prefix().with_count_only())).await;
                    if queued.expect("count the lock keys").count() == N as i64 {
                        break;
                    }
                    assert!(Instant::now() < deadline, "the other lockers never queued");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } else {
                // Widen the window in which an intruder would show.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let cas = Txn::new()
                .when([Compare::mod_revision("lock-counter", CompareOp::Equal, seen)])
                .and_then([TxnOp::put("lock-counter", (value + 1).to_string(), None)]);
            if !cl.txn(cas).await.expect("the counter's txn").succeeded() {
                log.violations.lock().unwrap().push(format!("locker {i}: the counter changed under the lock"));
            }
            log.held.store(false, Ordering::SeqCst);
            let exit = log.clock.fetch_add(1, Ordering::SeqCst);
            log.spans.lock().unwrap().push((i, enter, exit));

            // Release: half delete the key, half revoke the lease (the key goes with it).
            if i % 2 == 0 {
                let d = cl.delete(key.as_str(), None).await.expect("delete the lock key");
                assert_eq!(d.deleted(), 1, "locker {i} deletes its key (create revision {my_rev})");
                cl.lease_revoke(lease).await.expect("revoke");
            } else {
                cl.lease_revoke(lease).await.expect("revoke, releasing the lock");
            }
        });
    }
    let all = async {
        while let Some(done) = tasks.join_next().await {
            done.expect("a locker panicked");
        }
    };
    tokio::time::timeout(Duration::from_secs(300), all).await.expect("every locker ends within 300 s");

    let violations = log.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:#?}");
    let mut spans = log.spans.lock().unwrap().clone();
    spans.sort_by_key(|s| s.1);
    assert_eq!(spans.len(), N);
    for w in spans.windows(2) {
        assert!(w[0].2 < w[1].1, "lockers {} and {} held the lock at once: {spans:?}", w[0].0, w[1].0);
    }
    assert_eq!(log.waited.load(Ordering::SeqCst), N as u64 - 1, "every locker but the first waited its turn");
    let counter = kv.get("lock-counter", None).await.expect("get the counter");
    assert_eq!(counter.kvs()[0].value(), N.to_string().as_bytes(), "each locker added one");
    let left = kv.get(LOCK_PREFIX, Some(GetOptions::new().with_prefix())).await.expect("get");
    assert_eq!(left.count(), 0, "every lock key is gone: {:?}", keys_of(&left));
}

/// An optimistic compare-and-swap loop: get, then a txn on the seen mod revision putting v+1,
/// again on failure. 8 tasks × 10 increments: 80, none lost.
async fn cas_loop(c: &Cluster) {
    const TASKS: usize = 8;
    const EACH: u64 = 10;
    let mut kv = c.client().await;
    kv.put("cas-counter", "0", None).await.expect("put the counter");
    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let retries = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let (start, retries) = (start.clone(), retries.clone());
        let mut endpoints = c.endpoints.clone();
        endpoints.rotate_left(i % 3);
        let options = c.options();
        tasks.spawn(async move {
            let mut cl = Client::connect(&endpoints, Some(options)).await.expect("connect");
            start.wait().await;
            for _ in 0..EACH {
                loop {
                    let got = cl.get("cas-counter", None).await.expect("get the counter");
                    let kv = &got.kvs()[0];
                    let (value, seen): (u64, i64) = (text(kv.value()).parse().expect("a number"), kv.mod_revision());
                    let cas = Txn::new()
                        .when([Compare::mod_revision("cas-counter", CompareOp::Equal, seen)])
                        .and_then([TxnOp::put("cas-counter", (value + 1).to_string(), None)]);
                    if cl.txn(cas).await.expect("the counter's txn").succeeded() {
                        break;
                    }
                    retries.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let all = async {
        while let Some(done) = tasks.join_next().await {
            done.expect("a task panicked");
        }
    };
    tokio::time::timeout(Duration::from_secs(300), all).await.expect("every task ends within 300 s");
    let counter = kv.get("cas-counter", None).await.expect("get the counter");
    let total = TASKS as u64 * EACH;
    assert_eq!(text(counter.kvs()[0].value()), total.to_string(), "no increment lost");
    assert_eq!(counter.kvs()[0].version(), total as i64 + 1, "one version per increment");
    eprintln!("cas loop: {total} increments, {} retries", retries.load(Ordering::Relaxed));
}

// ---------------------------------------------------------------------------------------------
// Tests: each starts its own cluster
// ---------------------------------------------------------------------------------------------

macro_rules! cluster_test {
    ($name:ident, $shards:expr, $scenario:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let cluster = Cluster::start($shards).await;
            $scenario(&cluster).await;
            cluster.stop().await;
        }
    };
}

cluster_test!(one_shard_tokens_members_and_status, 1, auth_members_and_status);
cluster_test!(one_shard_kv, 1, kv_semantics);
cluster_test!(one_shard_txn, 1, txns);
cluster_test!(one_shard_watch_from_a_revision_and_cancel, 1, watch_from_a_revision);
cluster_test!(one_shard_leases, 1, leases);
cluster_test!(one_shard_lock_recipe_under_contention, 1, lock_recipe);
cluster_test!(one_shard_less_common_calls, 1, edges);
cluster_test!(one_shard_cas_loop_under_contention, 1, cas_loop);
cluster_test!(one_shard_progress_after_a_burst, 1, progress_after_a_burst);
cluster_test!(one_shard_lock_service, 1, lock_service);
cluster_test!(one_shard_election_service, 1, election_service);

/// gRPC's health service, as etcd serves it (no token): SERVING on every member; an unknown
/// service NOT_FOUND; once the other two members stop, the last one's shards have no quorum and
/// it says NOT_SERVING — to a Check and on a Watch stream opened while it served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_grpc_health() {
    use aspen::etcd::proto::health::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest, HealthCheckResponse,
    };
    let mut cluster = Cluster::start(1).await;
    let whole = || HealthCheckRequest { service: String::new() };
    for endpoint in &cluster.endpoints {
        let mut health = HealthClient::connect(format!("http://{endpoint}")).await.expect("connect");
        let r = health.check(whole()).await.expect("check").into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{endpoint}");
        let unknown = HealthCheckRequest { service: "etcdserverpb.KV".into() };
        let e = health.check(unknown).await.expect_err("an unknown service");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    }
    // etcd's plain HTTP endpoints on the same port.
    for endpoint in &cluster.endpoints {
        for path in ["/health", "/health?serializable=true", "/health?exclude=NOSPACE"] {
            let (status, body) = http_get(endpoint, path).await;
            assert_eq!(status, 200, "{endpoint}{path}: {body}");
            let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            assert_eq!(health["health"], "true", "{endpoint}{path}: {body}");
        }
    }
    let (status, body) = http_get(&cluster.endpoints[1], "/version").await;
    let version: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (status, version["etcdserver"].as_str(), version["etcdcluster"].as_str()),
        (200, Some("3.5.0"), Some("3.5.0"))
    );
    let (status, body) = http_get(&cluster.endpoints[2], "/metrics").await;
    assert!(status == 200 && body.contains("# TYPE aspen_"), "{status}: {body}");
    assert_eq!(http_get(&cluster.endpoints[0], "/no/such/page").await.0, 404);
    // A gRPC call of a service the node does not serve: UNIMPLEMENTED, as before the HTTP routes.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", cluster.endpoints[0]))
        .expect("URL")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/no.such.Service/Call");
    let e = grpc.unary(tonic::Request::new(whole()), path, codec).await.expect_err("an unknown service");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");

    let mut health = HealthClient::connect(format!("http://{}", cluster.endpoints[0])).await.expect("connect");
    let mut watch = health.watch(whole()).await.expect("watch").into_inner();
    let first = tokio::time::timeout(PATIENCE, watch.message()).await.expect("a first status");
    assert_eq!(first.expect("the stream").expect("a status").status(), ServingStatus::Serving);
    for node in cluster.nodes.drain(1..) {
        node.shutdown_reporting().await;
    }
    let next = tokio::time::timeout(PATIENCE, watch.message()).await.expect("a change within 60 s");
    assert_eq!(next.expect("the stream").expect("a status").status(), ServingStatus::NotServing);
    let r = health.check(whole()).await.expect("check").into_inner();
    assert_eq!(r.status(), ServingStatus::NotServing);
    for path in ["/health", "/health?serializable=true"] {
        let (status, body) = http_get(&cluster.endpoints[0], path).await;
        let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!((status, health["health"].as_str()), (503, Some("false")), "{path}: {body}");
        assert_eq!(health["reason"], "RAFT NO LEADER", "{path}: {body}");
    }
    cluster.stop().await;
}

/// `GET /health` on the etcd port while a NOSPACE alarm is raised (node 3's 1 MiB quota): 503
/// `ALARM NOSPACE` on every member, 200 with `?exclude=NOSPACE`; `Status` names the alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_http_health_and_an_alarm() {
    let cluster = Cluster::start_with(1, |c| {
        if c.node_id == 3 {
            c.limits.quota_bytes = 1024 * 1024;
        }
    })
    .await;
    let mut kv = cluster.client().await;
    let value = "v".repeat(64 * 1024);
    for i in 0..24 {
        if let Err(e) = kv.put(format!("big/{i:03}"), value.as_str(), None).await {
            assert!(e.to_string().contains("database space exceeded"), "{e}");
            break;
        }
    }
    // Each member learns of the alarm from its replica of shard 0: wait for each.
    for endpoint in &cluster.endpoints {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (status, body) = http_get(endpoint, "/health").await;
            let health: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            if (status, health["reason"].as_str()) == (503, Some("ALARM NOSPACE")) {
                break;
            }
            assert!(Instant::now() < deadline, "{endpoint}: no NOSPACE alarm on /health: {status} {body}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (status, body) = http_get(endpoint, "/health?exclude=NOSPACE").await;
        assert_eq!(status, 200, "{endpoint}: {body}");
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = kv.status().await.expect("status");
        if status.errors().iter().any(|e| e == "memberID:3 alarm:NOSPACE") {
            break;
        }
        assert!(Instant::now() < deadline, "Status never listed the alarm: {:?}", status.errors());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.stop().await;
}

/// One plain HTTP/1.1 GET: the status code and the body.
async fn http_get(endpoint: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(endpoint).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut answer)).await.expect("an answer").expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

cluster_test!(four_shards_tokens_members_and_status, 4, auth_members_and_status);
cluster_test!(four_shards_kv, 4, kv_semantics);
cluster_test!(four_shards_txn, 4, txns);
cluster_test!(four_shards_watch_every_shard, 4, watch_every_shard);
cluster_test!(four_shards_leases, 4, leases);
cluster_test!(four_shards_cas_loop_under_contention, 4, cas_loop);
cluster_test!(four_shards_less_common_calls, 4, edges);
cluster_test!(four_shards_progress_after_a_burst, 4, progress_after_a_burst);
cluster_test!(four_shards_lock_service, 4, lock_service);
cluster_test!(four_shards_election_service, 4, election_service);
cluster_test!(four_shards_reads_at_past_revisions, 4, reads_at_past_revisions);

/// Reads at a revision see the keys as they were then, as in etcd: a read "as of" one's own
/// write (`WithRev(put.header.revision)`), a key's every earlier version while the serving
/// node's watch history holds the changes since (deleted keys included; on these new clusters
/// that is every change, revision 1 included), a range with a limit and a count; later
/// revisions get the future-revision error. With several shards a key's revisions are its
/// shard's, and a range that reaches every shard cannot be read at a revision.
async fn reads_at_past_revisions(c: &Cluster) {
    let mut kv = c.client().await;
    let at = |r: i64| Some(GetOptions::new().with_revision(r));
    let value_at = |got: &GetResponse| got.kvs().first().map(|k| (k.value().to_vec(), k.version()));
    for key in c.one_key_per_shard("asof/") {
        let key = key.as_str();
        let p1 = rev(kv.put(key, "v1", None).await.expect("put").header());
        let got = kv.get(key, at(p1)).await.expect("a read at the put's revision");
        assert_eq!((got.kvs()[0].value(), got.kvs()[0].mod_revision()), (&b"v1"[..], p1));
        let p2 = rev(kv.put(key, "v2", None).await.expect("second put").header());
        let p3 = rev(kv.delete(key, None).await.expect("delete").header());
        kv.put(key, "v3", None).await.expect("put after the delete");
        for (r, want) in [
            (p1, Some((b"v1".to_vec(), 1))),
            (p2, Some((b"v2".to_vec(), 2))),
            (p3 - 1, Some((b"v2".to_vec(), 2))),
            (p3, None),
        ] {
            let got = kv.get(key, at(r)).await.unwrap_or_else(|e| panic!("{key} at {r}: {e}"));
            assert_eq!(value_at(&got), want, "{key} at revision {r}");
            assert!(rev(got.header()) > p3, "the header carries the current revision");
        }
        let now = kv.get(key, None).await.expect("get");
        assert_eq!(value_at(&now), Some((b"v3".to_vec(), 1)), "a key put again starts over");
        // The serving node has followed the shard since it began: its history holds every
        // change, as etcd's does until compacted (a shorter history: the test below).
        let first = kv.get(key, at(1)).await.expect("revision 1");
        assert_eq!(value_at(&first), None, "{key} did not exist at revision 1");
        let err = kv.get(key, at(rev(now.header()) + 1_000_000)).await.expect_err("a future revision");
        assert!(err.to_string().contains("required revision is a future revision"), "{err}");
    }
    // A range at a revision: keys created, changed and deleted since are undone.
    for k in ["r/a", "r/b", "r/c"] {
        kv.put(k, "1", None).await.expect("put");
    }
    let then = rev(kv.get("r/", Some(GetOptions::new().with_prefix())).await.expect("get").header());
    kv.put("r/b", "2", None).await.expect("put");
    kv.delete("r/a", None).await.expect("delete");
    kv.put("r/0", "new", None).await.expect("put");
    let page = kv.get("r/", Some(GetOptions::new().with_prefix().with_revision(then).with_limit(2))).await;
    if c.shards == 1 {
        let page = page.expect("a range at a revision");
        let got: Vec<(&[u8], &[u8])> = page.kvs().iter().map(|k| (k.key(), k.value())).collect();
        assert_eq!(got, [(&b"r/a"[..], &b"1"[..]), (b"r/b", b"1")], "the first two keys as they were");
        assert_eq!((page.count(), page.more()), (3, true));
    } else {
        let err = page.expect_err("a range of every shard at a revision");
        assert!(err.to_string().contains("several shards cannot be read at a revision"), "{err}");
    }
}

cluster_test!(one_shard_reads_at_past_revisions, 1, reads_at_past_revisions);

/// With a watch history of 8 events, a read at a revision whose later changes it no longer holds
/// gets etcd's compaction error — unless the key read last changed at or before that revision
/// (it was the same then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_reads_past_a_short_history() {
    let cluster = Cluster::start_with(1, |c| c.watch.history_entries = 8).await;
    let mut kv = cluster.client().await;
    let at = |r: i64| Some(GetOptions::new().with_revision(r));
    let old = rev(kv.put("short/old", "v", None).await.expect("put").header());
    let moved = rev(kv.put("short/moved", "1", None).await.expect("put").header());
    kv.put("short/moved", "2", None).await.expect("put");
    for i in 0..20 {
        kv.put(format!("short/fill/{i}"), "x", None).await.expect("put");
    }
    let got = kv.get("short/old", at(old)).await.expect("a key unchanged since the revision");
    assert_eq!((got.kvs()[0].value(), got.kvs()[0].mod_revision()), (&b"v"[..], old));
    let err = kv.get("short/moved", at(moved)).await.expect_err("a key changed after the history's start");
    assert!(err.to_string().contains("required revision has been compacted"), "{err}");
    let err = kv.get("short/", Some(GetOptions::new().with_prefix().with_revision(old))).await.expect_err("a range");
    assert!(err.to_string().contains("required revision has been compacted"), "{err}");
    cluster.stop().await;
}
