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
    /// The broker refused the last attempt to reconnect (a rotated password: 403
    /// ACCESS_REFUSED; a vhost deleted or no longer permitted: 530 NOT_ALLOWED); retrying
    /// within [`crate::Backoff::refusal_budget`]. Calls wait, within their deadline, and
    /// then end with [`crate::CallError::Unavailable`] carrying `error`.
    Refused {
        /// The attempt under way, from 1.
        attempt: u32,
        /// The broker's refusal: its reply code and words (never a password).
        error: amqp_rpc_core::ConnectionError,
    },
    /// Closed for good by [`crate::Client::close`] (or because every handle was dropped).
    Closed,
    /// Closed for good because reconnecting gave up (the refusal budget or the backoff's
    /// attempts were spent). Calls end at once with [`crate::CallError::Unavailable`]
    /// carrying `error`.
    Failed {
        /// Why the last attempt failed: the broker's refusal with its code and words, or how
        /// the connection ended (`ConnectionLost` when the broker could not be reached).
        error: amqp_rpc_core::ConnectionError,
    },
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
