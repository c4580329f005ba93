//! The server's ack/reply policy: one pure function, so that every case is a row in a table
//! test rather than a path through the machine. The machine feeds it the facts it really
//! has about the delivery at hand (see `server.rs`), never stand-ins.

/// What the server knows about a request when it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestFacts {
    /// The request names a queue to reply to.
    pub has_reply_to: bool,
    /// A reply to it could reach someone without harm (see `reply_to.rs`: a direct reply-to
    /// name that decodes to no pid makes RabbitMQ close the server's connection).
    pub answerable: bool,
    /// The caller has given up by now: the budget the request carries (its `expiration`,
    /// counted from when it reached us, or its `x-rpc-deadline` plus the clock-skew tolerance)
    /// has run out.
    pub expired: bool,
    /// Which delivery of this request this is: 1 for the first, more after redeliveries
    /// (`x-delivery-count` + 1 on quorum queues, and our own count of deliveries whose
    /// channel died while a handler had them).
    pub deliveries: u32,
    /// [`crate::rpc::ServerConfig::max_deliveries`].
    pub max_deliveries: u32,
}

/// Where the handler is with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandlerOutcome {
    /// Not run yet: the request is being taken off the prefetch buffer.
    NotRun,
    /// The handler produced a result (a value or an error reply).
    Answered,
    /// The reply handle was given up without an answer (`RpcServer::abandon`: the handler
    /// panicked or was cancelled).
    Abandoned,
    /// The server is shutting down and the request was never handed to a handler.
    ShuttingDown,
}

/// Why a request was settled without being run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// No `reply_to`: nobody could receive an answer. Acked.
    NoReplyTo,
    /// The caller's budget ran out while the request waited. Acked.
    Expired,
    /// Its `reply_to` is a direct reply-to name that names no channel (forged or garbled):
    /// nobody can hear a reply, and publishing one would make RabbitMQ 3.10 close the server's
    /// connection (541 INTERNAL_ERROR). Acked.
    BadReplyTo,
    /// Delivered more often than [`crate::rpc::ServerConfig::max_deliveries`]: it keeps
    /// killing the servers that take it (a poison message). Rejected without requeue, so the
    /// broker dead-letters it where the queue has a dead-letter exchange.
    TooManyDeliveries {
        /// Which delivery this was.
        deliveries: u32,
    },
}

/// What to do with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Hand it to a handler.
    Run,
    /// Publish the reply to `reply_to`, then ack. Reply first: if we die between the two, the
    /// request is redelivered and answered twice, which clients tolerate; acking first would
    /// lose the answer.
    ReplyThenAck,
    /// Settle it without running or replying, and count it: acked, except
    /// [`DropReason::TooManyDeliveries`] which is rejected without requeue.
    Drop(DropReason),
    /// Give it back to the broker: with `requeue`, for another server (or us) to run; without,
    /// to be dead-lettered or discarded.
    Reject {
        /// Whether the broker should deliver it again.
        requeue: bool,
    },
}

/// Decides what the server does with a request (ARCHITECTURE §5, "Server").
pub(crate) fn decide(facts: RequestFacts, handler: HandlerOutcome) -> Decision {
    match handler {
        HandlerOutcome::NotRun if !facts.has_reply_to => Decision::Drop(DropReason::NoReplyTo),
        HandlerOutcome::NotRun if !facts.answerable => Decision::Drop(DropReason::BadReplyTo),
        HandlerOutcome::NotRun if facts.expired => Decision::Drop(DropReason::Expired),
        HandlerOutcome::NotRun if facts.deliveries > facts.max_deliveries => {
            Decision::Drop(DropReason::TooManyDeliveries {
                deliveries: facts.deliveries,
            })
        }
        HandlerOutcome::NotRun => Decision::Run,
        // Even past the deadline: the caller may still be waiting if its clock runs behind ours,
        // and a reply it no longer wants costs one dropped message.
        HandlerOutcome::Answered => Decision::ReplyThenAck,
        // One more try elsewhere while deliveries are left: a request that kills its handler
        // every time must not circle forever (a poison message).
        HandlerOutcome::Abandoned => Decision::Reject {
            requeue: facts.deliveries < facts.max_deliveries,
        },
        // Never ran: another server may take it at once.
        HandlerOutcome::ShuttingDown => Decision::Reject { requeue: true },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::*;
    use HandlerOutcome::*;

    #[test]
    fn decision_table() {
        // (has_reply_to, expired, deliveries, handler) => decision, with max_deliveries 2
        let table = [
            ((true, false, 1, NotRun), Run),
            ((true, false, 2, NotRun), Run),
            (
                (true, false, 3, NotRun),
                Drop(DropReason::TooManyDeliveries { deliveries: 3 }),
            ),
            ((false, false, 1, NotRun), Drop(DropReason::NoReplyTo)),
            ((false, true, 1, NotRun), Drop(DropReason::NoReplyTo)),
            ((false, false, 3, NotRun), Drop(DropReason::NoReplyTo)),
            ((true, true, 1, NotRun), Drop(DropReason::Expired)),
            ((true, true, 3, NotRun), Drop(DropReason::Expired)),
            ((true, false, 1, Answered), ReplyThenAck),
            ((true, false, 2, Answered), ReplyThenAck),
            ((true, true, 1, Answered), ReplyThenAck),
            ((true, false, 1, Abandoned), Reject { requeue: true }),
            ((true, false, 2, Abandoned), Reject { requeue: false }),
            ((true, true, 2, Abandoned), Reject { requeue: false }),
            ((true, false, 1, ShuttingDown), Reject { requeue: true }),
            ((true, false, 2, ShuttingDown), Reject { requeue: true }),
        ];
        let bad = RequestFacts {
            has_reply_to: true,
            answerable: false,
            expired: false,
            deliveries: 1,
            max_deliveries: 2,
        };
        assert_eq!(decide(bad, NotRun), Drop(DropReason::BadReplyTo));
        for ((has_reply_to, expired, deliveries, handler), want) in table {
            let facts = RequestFacts {
                has_reply_to,
                answerable: true,
                expired,
                deliveries,
                max_deliveries: 2,
            };
            assert_eq!(decide(facts, handler), want, "{facts:?} {handler:?}");
        }
    }
}
