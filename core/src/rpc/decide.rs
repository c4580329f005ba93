//! The server's ack/reply decision as one pure function, so that every case is a row in a
//! table test rather than a path through the machine.

/// What the server knows about a request when it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFacts {
    /// The request names a queue to reply to.
    pub has_reply_to: bool,
    /// Its deadline has passed (or its `expiration` ran out) by the time we look at it.
    pub deadline_passed: bool,
    /// The broker delivered it before (`redelivered` flag).
    pub redelivered: bool,
}

/// Where the handler is with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// Not run yet: the request is being taken off the prefetch buffer.
    NotRun,
    /// The handler produced a result (a value or an error reply).
    Answered,
    /// The reply handle was dropped without an answer (the handler panicked or was cancelled).
    Abandoned,
    /// The server is shutting down and the request was never handed to a handler.
    ShuttingDown,
}

/// Why a request was acknowledged without being run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No `reply_to`: nobody could receive an answer.
    NoReplyTo,
    /// The caller's deadline passed while the request waited.
    Expired,
}

/// What to do with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Hand it to a handler.
    Run,
    /// Publish the reply to `reply_to`, then ack. Reply first: if we die between the two, the
    /// request is redelivered and answered twice, which clients tolerate; acking first would
    /// lose the answer.
    ReplyThenAck,
    /// Ack without running or replying; count it.
    AckAndDrop(DropReason),
    /// Give it back to the broker: with `requeue`, for another server (or us) to run.
    Reject {
        /// Whether the broker should deliver it again.
        requeue: bool,
    },
}

/// Decides what the server does with a request (DESIGN §4, "Server").
pub fn decide(facts: RequestFacts, handler: HandlerOutcome) -> Decision {
    match handler {
        HandlerOutcome::NotRun if !facts.has_reply_to => {
            Decision::AckAndDrop(DropReason::NoReplyTo)
        }
        HandlerOutcome::NotRun if facts.deadline_passed => {
            Decision::AckAndDrop(DropReason::Expired)
        }
        HandlerOutcome::NotRun => Decision::Run,
        // Even past the deadline: the caller may still be waiting if its clock runs behind ours,
        // and a reply it no longer wants costs one dropped message.
        HandlerOutcome::Answered => Decision::ReplyThenAck,
        // One more try elsewhere, unless this is already the second: a request that kills its
        // handler every time must not circle forever (a poison message).
        HandlerOutcome::Abandoned => Decision::Reject {
            requeue: !facts.redelivered,
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
        // (has_reply_to, deadline_passed, redelivered, handler) => decision
        let table = [
            ((true, false, false, NotRun), Run),
            ((true, false, true, NotRun), Run),
            (
                (false, false, false, NotRun),
                AckAndDrop(DropReason::NoReplyTo),
            ),
            (
                (false, true, false, NotRun),
                AckAndDrop(DropReason::NoReplyTo),
            ),
            ((true, true, false, NotRun), AckAndDrop(DropReason::Expired)),
            ((true, false, false, Answered), ReplyThenAck),
            ((true, false, true, Answered), ReplyThenAck),
            ((true, true, false, Answered), ReplyThenAck),
            ((true, false, false, Abandoned), Reject { requeue: true }),
            ((true, false, true, Abandoned), Reject { requeue: false }),
            ((true, true, true, Abandoned), Reject { requeue: false }),
            ((true, false, false, ShuttingDown), Reject { requeue: true }),
            ((true, false, true, ShuttingDown), Reject { requeue: true }),
        ];
        for ((has_reply_to, deadline_passed, redelivered, handler), want) in table {
            let facts = RequestFacts {
                has_reply_to,
                deadline_passed,
                redelivered,
            };
            assert_eq!(decide(facts, handler), want, "{facts:?} {handler:?}");
        }
    }
}
