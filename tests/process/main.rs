//! Real `aspen-node` and `aspen-cli` processes on 127.0.0.1: a single node and every CLI
//! command ([`single`]), three nodes with `kill -9` ([`cluster`]), four shards ([`sharded`]),
//! `aspen-cli bench` ([`bench`]), leases and watches through the CLI ([`leases`], [`watch`]),
//! what the nodes' logs say ([`logs`]) and the memory a hostile client cannot grow
//! ([`memory`]), the operator HTTP endpoint ([`http`]), systemd readiness ([`systemd`]),
//! backup and restore ([`backup`]), NOSPACE alarms ([`quota`]), `defrag` ([`defrag`]) and the etcd API driven by
//! etcdctl ([`etcd`]) and by curl through its JSON gateway ([`etcd_json`]). One test binary; the tests run one at a time.

#[path = "../support/mod.rs"]
mod support;

mod backup;
mod bench;
mod cluster;
mod defrag;
mod etcd;
mod etcd_json;
mod first_hour;
mod http;
mod leases;
mod logs;
mod memory;
mod quota;
mod readme;
mod sharded;
mod single;
mod systemd;
mod watch;
