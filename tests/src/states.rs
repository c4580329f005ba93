//! Watching a client's [`ConnectionState`] from a test: every change, with when it happened.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use amqp_rpc_driver::{Client, ConnectionState, Runtime};
use futures_util::StreamExt;

use crate::rt::sleep;

/// Every state change of one client since [`StateLog::watch`], in order, with its time.
#[derive(Debug, Clone)]
pub struct StateLog {
    changes: Arc<Mutex<Vec<(Instant, ConnectionState)>>>,
}

impl StateLog {
    /// Starts recording `client`'s state changes (from a task of `R`'s that ends with the
    /// client).
    pub fn watch<R: Runtime>(client: &Client<R>) -> Self {
        let mut changes = client.watch_state();
        let log = Self {
            changes: Arc::default(),
        };
        let record = log.changes.clone();
        R::spawn(async move {
            while let Some(state) = changes.next().await {
                record
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((Instant::now(), state));
            }
        });
        log
    }

    /// The changes so far.
    pub fn changes(&self) -> Vec<(Instant, ConnectionState)> {
        self.changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The states so far, without times.
    pub fn states(&self) -> Vec<ConnectionState> {
        self.changes().into_iter().map(|(_, s)| s).collect()
    }

    /// Waits (at most `limit`) for a change at or after `since` into a state that `matches`;
    /// returns when it happened and the state. Panics with the states seen otherwise.
    pub async fn wait_for<R: Runtime>(
        &self,
        since: Instant,
        what: &str,
        matches: impl Fn(&ConnectionState) -> bool,
        limit: Duration,
    ) -> (Instant, ConnectionState) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self
                .changes()
                .into_iter()
                .find(|(at, state)| *at >= since && matches(state))
            {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no change to {what} within {limit:?}; states seen: {:?}",
                self.states()
            );
            sleep::<R>(Duration::from_millis(10)).await;
        }
    }
}
