//! Which of a node's protocol handlers are still shutting down (docs/design.md §12), so a stop
//! of the node's router that does not end in time can say what holds it.
//!
//! Owns: [`Tracked`], a protocol handler that records when its shutdown begins and ends, and
//! [`Shutdowns`], the record the handlers of one router share. iroh's `Router::shutdown` runs
//! every handler's shutdown, then closes the endpoint, then waits for each connection's task:
//! once every handler has ended, what is left is the endpoint's close or a connection's task.
//!
//! Never: change how a handler serves or stops; it only watches.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Instant,
};

use iroh::{
    endpoint::{Accepting, Connection},
    protocol::{AcceptError, ProtocolHandler},
};

#[derive(Debug, Default)]
struct Record {
    handlers: BTreeSet<&'static str>,
    begun: Option<Instant>,
    ended: BTreeSet<&'static str>,
}

/// The shutdowns of one router's protocol handlers.
#[derive(Clone, Debug, Default)]
pub struct Shutdowns(Arc<Mutex<Record>>);

impl Shutdowns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `handler`, served under `name` (its ALPN), with its shutdown recorded here.
    pub fn track<H: ProtocolHandler>(&self, name: &'static str, handler: H) -> Tracked<H> {
        self.lock().handlers.insert(name);
        Tracked { name, handler, shutdowns: self.clone() }
    }

    /// What a router's stop is waiting for, as far as this record tells.
    pub fn describe(&self) -> String {
        let r = self.lock();
        let Some(begun) = r.begun else {
            return "no protocol handler began shutting down (the router's accept loop did not stop)".into();
        };
        let pending: Vec<&str> = r.handlers.difference(&r.ended).copied().collect();
        if pending.is_empty() {
            "every protocol handler stopped; the endpoint's close or a connection's task holds it".into()
        } else {
            format!("protocol handlers still shutting down after {:?}: {}", begun.elapsed(), pending.join(", "))
        }
    }
}

/// A protocol handler whose shutdown is recorded in its [`Shutdowns`].
#[derive(Debug)]
pub struct Tracked<H> {
    name: &'static str,
    handler: H,
    shutdowns: Shutdowns,
}

impl<H: ProtocolHandler> ProtocolHandler for Tracked<H> {
    async fn on_accepting(&self, accepting: Accepting) -> Result<Connection, AcceptError> {
        self.handler.on_accepting(accepting).await
    }

    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        self.handler.accept(connection).await
    }

    async fn shutdown(&self) {
        self.shutdowns.lock().begun.get_or_insert_with(Instant::now);
        self.handler.shutdown().await;
        self.shutdowns.lock().ended.insert(self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler whose shutdown ends only when told.
    #[derive(Debug, Clone)]
    struct Slow(Arc<tokio::sync::Notify>);

    impl ProtocolHandler for Slow {
        async fn accept(&self, _connection: Connection) -> Result<(), AcceptError> {
            Ok(())
        }

        async fn shutdown(&self) {
            self.0.notified().await;
        }
    }

    #[derive(Debug)]
    struct Quick;

    impl ProtocolHandler for Quick {
        async fn accept(&self, _connection: Connection) -> Result<(), AcceptError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_stalled_stop_names_the_handlers_it_waits_for() {
        let shutdowns = Shutdowns::default();
        let release = Arc::new(tokio::sync::Notify::new());
        let slow = shutdowns.track("slow/1", Slow(release.clone()));
        let quick = shutdowns.track("quick/1", Quick);
        assert!(shutdowns.describe().contains("did not stop"), "{}", shutdowns.describe());
        quick.shutdown().await;
        let stopping = tokio::spawn(async move { slow.shutdown().await });
        tokio::task::yield_now().await;
        let said = shutdowns.describe();
        assert!(said.contains("still shutting down") && said.contains("slow/1") && !said.contains("quick/1"), "{said}");
        release.notify_one();
        stopping.await.unwrap();
        assert!(shutdowns.describe().contains("every protocol handler stopped"), "{}", shutdowns.describe());
    }
}
