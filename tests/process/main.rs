//! Real `aspen-node` and `aspen-cli` processes on 127.0.0.1: a single node and every CLI
//! command ([`single`]), three nodes with `kill -9` ([`cluster`]), four shards ([`sharded`]) and
//! `aspen-cli bench` ([`bench`]). One test binary; the tests run one at a time.

#[path = "../support/mod.rs"]
mod support;

mod bench;
mod cluster;
mod first_hour;
mod readme;
mod sharded;
mod single;
