//! The connection state an application can watch.

use std::sync::{Arc, Mutex, PoisonError};

use futures_channel::mpsc;

/// Where a client's connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connecting for the first time.
    Connecting,
    /// Connected, reply path armed: calls go out.
    Connected,
    /// The broker blocked the connection (a resource alarm): calls wait, within their deadline.
    Blocked {
        /// The broker's reason.
        reason: String,
    },
    /// The connection was lost; reconnecting. Calls wait, within their deadline.
    Reconnecting {
        /// The attempt under way, from 1.
        attempt: u32,
    },
    /// Closed for good.
    Closed,
}

/// Subscribers get every change, up to this many unread; a subscriber that falls further behind
/// misses changes (and can always read the current state).
const SUBSCRIBER_BACKLOG: usize = 16;

/// The current state and its subscribers, shared by the driver task and the handles.
#[derive(Debug)]
pub(crate) struct StateCell {
    inner: Mutex<(ConnectionState, Vec<mpsc::Sender<ConnectionState>>)>,
}

impl StateCell {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new((ConnectionState::Connecting, Vec::new())),
        })
    }

    pub(crate) fn get(&self) -> ConnectionState {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    pub(crate) fn set(&self, state: ConnectionState) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.0 == state {
            return;
        }
        inner.0 = state.clone();
        // A full subscriber misses this change; a dropped one is forgotten.
        inner.1.retain_mut(|tx| match tx.try_send(state.clone()) {
            Ok(()) => true,
            Err(e) => e.is_full(),
        });
    }

    pub(crate) fn subscribe(&self) -> mpsc::Receiver<ConnectionState> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BACKLOG);
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .push(tx);
        rx
    }
}
