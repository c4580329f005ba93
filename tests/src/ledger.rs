//! "Nothing lost": the checker every fault case runs its calls through, and the load that feeds
//! it.
//!
//! A [`Ledger`] records every call a test starts and how it ended. [`Ledger::check`] then holds
//! the fault suite's promise:
//! - every call started ended, exactly once;
//! - with the correct value (fib(n) for the n it asked: a reply that reached the wrong caller
//!   shows up as a wrong value) or a typed error of a class the case allows;
//! - none later than its deadline plus the recovery budget.
//!
//! [`assert_queue_drained`] checks the last part: the request queue ends empty. [`Load`] runs
//! callers in a loop, bounded by count and by time, each call through the ledger.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use amqp_rpc_cli::cpu::proc_status_kib;
use amqp_rpc_cli::fib;
use amqp_rpc_core::rpc::REPLY_TOO_LARGE;
use amqp_rpc_core::ReplyCode;
use amqp_rpc_driver::{CallError, CallRequest, Client, RpcError, RpcReply, Runtime};

use crate::broker::Node;
use crate::rt::{blocking, sleep, spawn, timeout, Task};

/// How a call ended, by class: what the fault suite counts and allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Class {
    /// The right reply.
    Ok,
    /// `ConnectionLost { sent: true }`: may have run.
    ConnectionLost,
    /// `ConnectionLost { sent: false }`: never ran.
    ConnectionLostUnsent,
    /// Sent, no reply by the deadline: may have run.
    TimedOut,
    /// Never sent before the deadline.
    Expired,
    /// Nobody consumes the request queue.
    NoServers,
    /// The request queue does not exist.
    NotRouted,
    /// An error reply for a request that ran.
    Remote,
    /// A reply too large to travel: the error reply `reply_too_large` (`Remote { code:
    /// REPLY_TOO_LARGE }`: the handler's answer exceeded the broker's `max_message_size`), or
    /// `RpcError::ReplyTooLarge` (the reply exceeded the client's `max_body_size`). The request
    /// ran either way.
    ReplyTooLarge,
    /// An error reply for a request refused before running.
    Rejected,
    /// Backpressure: the client's in-flight limit.
    TooManyCalls,
    /// The client was closed.
    Closed,
    /// `Refused`: the broker refused the publish (e.g. 404, no such exchange); never ran.
    Refused,
    /// `Refused { code: 406 }`: the broker refused the publish as a precondition failure, e.g.
    /// a body above its `max_message_size`; never ran.
    RefusedPrecondition,
    /// `QueueFull`: the request queue's length limit with `overflow: reject-publish` refused
    /// the request (the broker nacked it); never ran.
    QueueFull,
    /// `ReplyPathLost`: the reply consumer was cancelled after the request was sent; may have
    /// run.
    ReplyPathLost,
    /// `CallError::Invalid`: refused by the client before sending (a body above
    /// `max_message_size`, a name too long, a foreign `user_id`).
    Invalid,
    /// The caller dropped the call's future before it ended (see [`Ledger::abandon`]).
    Dropped,
    /// Anything else (a malformed request, a new error variant).
    Other,
}

impl Class {
    /// The class of a call's result (its value is checked separately).
    pub fn of<T>(result: &Result<T, CallError>) -> Self {
        match result {
            Ok(_) => Class::Ok,
            Err(CallError::Rpc(e)) => match e {
                RpcError::ConnectionLost { sent: true } => Class::ConnectionLost,
                RpcError::ConnectionLost { sent: false } => Class::ConnectionLostUnsent,
                RpcError::TimedOut => Class::TimedOut,
                RpcError::Expired => Class::Expired,
                RpcError::NoServers => Class::NoServers,
                RpcError::NotRouted => Class::NotRouted,
                RpcError::Remote { code, .. } if code == REPLY_TOO_LARGE => Class::ReplyTooLarge,
                RpcError::Remote { .. } => Class::Remote,
                RpcError::Rejected { .. } => Class::Rejected,
                RpcError::Refused { code, .. } if *code == ReplyCode::PRECONDITION_FAILED => {
                    Class::RefusedPrecondition
                }
                RpcError::Refused { .. } => Class::Refused,
                RpcError::ReplyPathLost => Class::ReplyPathLost,
                RpcError::QueueFull => Class::QueueFull,
                RpcError::ReplyTooLarge { .. } => Class::ReplyTooLarge,
                _ => Class::Other,
            },
            Err(CallError::TooManyCalls { .. }) => Class::TooManyCalls,
            Err(CallError::Closed) => Class::Closed,
            Err(CallError::Invalid(_)) => Class::Invalid,
            Err(_) => Class::Other,
        }
    }

    /// Errors that mean the request never ran, or may have: what a connection loss, a restart
    /// or a stalled network may end a call with. Error replies, wrong values and `Other` are
    /// never allowed.
    pub const RECOVERY: &'static [Class] = &[
        Class::ConnectionLost,
        Class::ConnectionLostUnsent,
        Class::TimedOut,
        Class::Expired,
        Class::NoServers,
        Class::NotRouted,
    ];
}

/// A call's place in a [`Ledger`], from [`Ledger::start`] to [`Ledger::end`] or
/// [`Ledger::abandon`]. `Copy`, so that a second end of one call can be recorded (and caught).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

/// A call that has not ended.
#[derive(Debug, Clone, Copy)]
struct Pending {
    n: u32,
    timeout: Duration,
    started: Instant,
}

/// When one call started and ended.
#[derive(Debug, Clone, Copy)]
pub struct CallEnd {
    /// When it started.
    pub started: Instant,
    /// When it ended.
    pub ended: Instant,
    /// Its timeout.
    pub timeout: Duration,
}

/// How long successful calls took, in buckets of about 9 % (8 per doubling), for percentiles
/// without keeping every latency.
#[derive(Debug, Clone)]
struct Histogram {
    buckets: Vec<u64>,
}

impl Histogram {
    const PER_DOUBLING: f64 = 8.0;

    fn new() -> Self {
        // 2^40 µs is 12 days: more than any call.
        Self {
            buckets: vec![0; 40 * 8 + 1],
        }
    }

    fn bucket(latency: Duration) -> usize {
        let us = latency.as_micros().max(1) as f64;
        (us.log2() * Self::PER_DOUBLING) as usize
    }

    fn add(&mut self, latency: Duration) {
        let i = Self::bucket(latency).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
    }

    /// The upper bound of the bucket holding the `p` quantile (0 to 1).
    fn quantile(&self, p: f64) -> Duration {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64 * p).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let us = 2f64.powf((i + 1) as f64 / Self::PER_DOUBLING);
                return Duration::from_micros(us as u64);
            }
        }
        Duration::MAX
    }
}

/// How long [`Ledger::ok_since`] looks back.
const RECENT_WINDOW: Duration = Duration::from_secs(120);
/// Violations kept word for word (the rest are only counted).
const MAX_VIOLATIONS: usize = 100;

#[derive(Debug)]
struct State {
    created: Instant,
    next: u64,
    pending: std::collections::HashMap<u64, Pending>,
    /// Every ended call, when the ledger keeps them (tests); `None` aggregates only (soak).
    kept: Option<Vec<(Class, CallEnd)>>,
    /// Start times (ms since `created`) of the recent successful calls, oldest first.
    recent_oks: std::collections::VecDeque<u32>,
    started: u64,
    ended: u64,
    /// Ends of calls that had already ended (or were never started).
    ended_twice: u64,
    classes: BTreeMap<Class, u64>,
    max_latency: Duration,
    ok_latency: Histogram,
    violations: Vec<String>,
    more_violations: u64,
}

impl State {
    fn violation(&mut self, line: String) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(line);
        } else {
            self.more_violations += 1;
        }
    }
}

/// The record of every call a test made; cheap to clone (all clones share it).
#[derive(Debug, Clone)]
pub struct Ledger {
    state: Arc<Mutex<State>>,
    budget: Duration,
}

/// What a ledger holds, in numbers.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Calls started.
    pub started: u64,
    /// Calls ended (each counted once).
    pub ended: u64,
    /// Second (or later) ends of a call, and ends of calls never started: each a violation.
    pub ended_twice: u64,
    /// Calls per end class.
    pub classes: BTreeMap<Class, u64>,
    /// The longest a call took.
    pub max_latency: Duration,
    /// Broken promises, one line each (empty when nothing was lost).
    pub violations: Vec<String>,
}

impl Summary {
    /// Calls that ended with `class`.
    pub fn count(&self, class: Class) -> u64 {
        self.classes.get(&class).copied().unwrap_or(0)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "started {}, ended {}", self.started, self.ended)?;
        for (class, count) in &self.classes {
            write!(f, ", {class:?} {count}")?;
        }
        if self.ended_twice > 0 {
            write!(f, ", ended twice {}", self.ended_twice)?;
        }
        write!(f, "; max latency {:.0?}", self.max_latency)?;
        if !self.violations.is_empty() {
            write!(f, "; {} violations", self.violations.len())?;
        }
        Ok(())
    }
}

impl Ledger {
    /// An empty ledger that keeps every ended call (for [`Ledger::ends`]). A call may end at
    /// most `budget` after its deadline (the time a loaded machine needs to notice; the client
    /// promises to end every call by its deadline).
    pub fn new(budget: Duration) -> Self {
        Self::with(budget, true)
    }

    /// A ledger that only counts ended calls (its memory does not grow with them), for long
    /// runs: [`Ledger::ends`] is empty.
    pub fn counting(budget: Duration) -> Self {
        Self::with(budget, false)
    }

    fn with(budget: Duration, keep: bool) -> Self {
        let state = State {
            created: Instant::now(),
            next: 0,
            pending: Default::default(),
            kept: keep.then(Vec::new),
            recent_oks: Default::default(),
            started: 0,
            ended: 0,
            ended_twice: 0,
            classes: BTreeMap::new(),
            max_latency: Duration::ZERO,
            ok_latency: Histogram::new(),
            violations: Vec::new(),
            more_violations: 0,
        };
        Self {
            state: Arc::new(Mutex::new(state)),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `request` (which asks for fib(`n`)) through `client`, recording its start, its
    /// end and whether the value is right. Returns its class.
    pub async fn call<R: Runtime>(
        &self,
        client: &Client<R>,
        request: CallRequest,
        n: u32,
    ) -> Class {
        let ticket = self.start(n, request.timeout);
        let result = client.call_with(request).await;
        self.end(ticket, &result)
    }

    /// Records the start of a call that asks for fib(`n`) with `timeout`. Every ticket must
    /// come back once: through [`Ledger::end`] with the call's result, or [`Ledger::abandon`]
    /// when its caller dropped the call.
    pub fn start(&self, n: u32, timeout: Duration) -> Ticket {
        let mut state = self.lock();
        state.next += 1;
        state.started += 1;
        let id = state.next;
        state.pending.insert(
            id,
            Pending {
                n,
                timeout,
                started: Instant::now(),
            },
        );
        Ticket(id)
    }

    /// Records how the call of `ticket` ended: its class, whether the value is right, whether
    /// it ended in time. A ticket that already ended (or was never started here) is a
    /// violation: "ended twice". Returns the class.
    pub fn end(&self, ticket: Ticket, result: &Result<RpcReply, CallError>) -> Class {
        self.finish(ticket, Class::of(result), Some(result))
    }

    /// Records that the caller of `ticket` dropped the call's future before it ended (a
    /// cancellation, class [`Class::Dropped`]): not an outcome, but the call is accounted for.
    pub fn abandon(&self, ticket: Ticket) {
        self.finish(ticket, Class::Dropped, None);
    }

    fn finish(
        &self,
        ticket: Ticket,
        class: Class,
        result: Option<&Result<RpcReply, CallError>>,
    ) -> Class {
        let id = ticket.0;
        let mut state = self.lock();
        let Some(pending) = state.pending.remove(&id) else {
            state.ended_twice += 1;
            let line = if id == 0 || id > state.next {
                format!("call #{id} ended ({class:?}) but was never started")
            } else {
                format!("call #{id} ended twice (again with {class:?})")
            };
            state.violation(line);
            return class;
        };
        let latency = pending.started.elapsed();
        let n = pending.n;
        state.ended += 1;
        *state.classes.entry(class).or_default() += 1;
        state.max_latency = state.max_latency.max(latency);
        match result {
            Some(Ok(reply)) => {
                let expected = fib(n).map(|v| v.to_string()).unwrap_or_default();
                if reply.body != expected.as_bytes() {
                    state.violation(format!(
                        "call #{id} asked fib({n}) = {expected} and got {:?}: a reply for \
                         another call",
                        String::from_utf8_lossy(&reply.body)
                    ));
                }
                state.ok_latency.add(latency);
                let offset = pending.started.saturating_duration_since(state.created);
                state
                    .recent_oks
                    .push_back(u32::try_from(offset.as_millis()).unwrap_or(u32::MAX));
                let horizon = state.created.elapsed().saturating_sub(RECENT_WINDOW);
                let horizon = u32::try_from(horizon.as_millis()).unwrap_or(u32::MAX);
                while state.recent_oks.front().is_some_and(|at| *at < horizon) {
                    state.recent_oks.pop_front();
                }
            }
            Some(Err(e)) if class == Class::Other => {
                state.violation(format!("call #{id} (fib({n})) ended with {e:?}"));
            }
            _ => {}
        }
        // A dropped call ends when its caller drops it, not by its deadline.
        if class != Class::Dropped && latency > pending.timeout + self.budget {
            state.violation(format!(
                "call #{id} (fib({n})) ended with {class:?} after {latency:.2?}: later than its \
                 timeout {:?} plus the recovery budget {:?}",
                pending.timeout, self.budget
            ));
        }
        if let Some(kept) = state.kept.as_mut() {
            kept.push((
                class,
                CallEnd {
                    started: pending.started,
                    ended: pending.started + latency,
                    timeout: pending.timeout,
                },
            ));
        }
        class
    }

    /// A snapshot: counts, and the violations so far. Calls not ended are not violations yet
    /// (see [`Ledger::check`]).
    pub fn summary(&self) -> Summary {
        let state = self.lock();
        let mut violations = state.violations.clone();
        if state.more_violations > 0 {
            violations.push(format!("… and {} more", state.more_violations));
        }
        Summary {
            started: state.started,
            ended: state.ended,
            ended_twice: state.ended_twice,
            classes: state.classes.clone(),
            max_latency: state.max_latency,
            violations,
        }
    }

    /// Start and end of every call that ended with `class`, in the order they ended (empty for
    /// a [`Ledger::counting`] one).
    pub fn ends(&self, class: Class) -> Vec<CallEnd> {
        self.lock()
            .kept
            .iter()
            .flatten()
            .filter(|(c, _)| *c == class)
            .map(|(_, end)| *end)
            .collect()
    }

    /// The `p` quantile (0 to 1) of the latency of successful calls, within about 9 %.
    pub fn ok_latency_quantile(&self, p: f64) -> Duration {
        self.lock().ok_latency.quantile(p)
    }

    /// How many calls started at or after `since` ended with the right value (looking back two
    /// minutes at most).
    pub fn ok_since(&self, since: Instant) -> u64 {
        let state = self.lock();
        let from = since.saturating_duration_since(state.created);
        let from = u32::try_from(from.as_millis()).unwrap_or(u32::MAX);
        // Calls end out of order, so the deque is only roughly sorted: count them all.
        state.recent_oks.iter().filter(|at| **at >= from).count() as u64
    }

    /// Waits until `oks` calls started at or after `since` got their right value (the service
    /// recovered), at most `limit` from now; returns how long after `since` that was. Panics
    /// with the summary when it does not happen in time.
    pub async fn wait_recovered<R: Runtime>(
        &self,
        since: Instant,
        oks: u64,
        limit: Duration,
    ) -> Duration {
        let deadline = Instant::now() + limit;
        loop {
            if self.ok_since(since) >= oks {
                return since.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "no recovery: fewer than {oks} calls started after the fault succeeded within \
                 {limit:?} ({})",
                self.summary()
            );
            sleep::<R>(Duration::from_millis(20)).await;
        }
    }

    /// Waits (at most `limit`) for every call to end, then checks that nothing was lost: each
    /// call ended once, in time, with the right value or an error of a class in `allowed`.
    /// Panics with the details otherwise; returns the summary for case-specific checks.
    pub async fn check<R: Runtime>(&self, allowed: &[Class], limit: Duration) -> Summary {
        let deadline = Instant::now() + limit;
        let mut summary = self.summary();
        while summary.ended < summary.started && Instant::now() < deadline {
            sleep::<R>(Duration::from_millis(20)).await;
            summary = self.summary();
        }
        if summary.ended < summary.started {
            let state = self.lock();
            let mut stuck: Vec<_> = state.pending.iter().collect();
            stuck.sort_by_key(|(id, _)| **id);
            for (id, call) in stuck.into_iter().take(20) {
                summary.violations.push(format!(
                    "call #{id} (fib({}), timeout {:?}) never ended: started {:.1?} ago",
                    call.n,
                    call.timeout,
                    call.started.elapsed()
                ));
            }
        }
        for (class, count) in &summary.classes {
            if *class != Class::Ok && !allowed.contains(class) {
                summary.violations.push(format!(
                    "{count} calls ended with {class:?}, which this case does not allow \
                     (allowed: {allowed:?})"
                ));
            }
        }
        assert!(
            summary.violations.is_empty(),
            "calls were lost or mixed up ({summary}):\n  {}",
            summary
                .violations
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
        summary
    }
}

/// Waits until `queue` on `node` has no message ready, at most `limit` (requests whose callers
/// gave up are taken by a server and dropped, or expire by their per-message TTL). Panics with
/// what is left otherwise; a missing queue counts as empty.
pub async fn assert_queue_drained<R: Runtime>(node: &Node, queue: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (node, name) = (node.clone(), queue.to_owned());
        let status = blocking(move || node.queue_status(&name)).await;
        match status {
            Ok(None) => return,
            Ok(Some(s)) if s.messages == 0 => return,
            Ok(Some(s)) if Instant::now() >= deadline => {
                panic!(
                    "queue {queue} still holds {} messages after {limit:?}",
                    s.messages
                )
            }
            Err(e) if Instant::now() >= deadline => panic!("queue {queue}: {e}"),
            _ => sleep::<R>(Duration::from_millis(200)).await,
        }
    }
}

/// How a [`Load`] calls.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Concurrent callers, each making one call at a time.
    pub callers: usize,
    /// Timeout of each call.
    pub timeout: Duration,
    /// Pause after each call, so that a fast failure (`NoServers`) does not spin.
    pub pause: Duration,
    /// Most calls per caller.
    pub max_calls: u64,
    /// Longest a caller keeps calling.
    pub max_time: Duration,
    /// Whether calls are marked idempotent (sent again after a connection loss).
    pub idempotent: bool,
    /// Spaces appended to each body (for a handler that reads the leading number only, see
    /// [`crate::servers::fib_padded`]).
    pub pad: usize,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            callers: 8,
            timeout: Duration::from_secs(3),
            pause: Duration::from_millis(5),
            max_calls: 20_000,
            max_time: Duration::from_secs(60),
            idempotent: false,
            pad: 0,
        }
    }
}

/// Callers calling in a loop, through a [`Ledger`], until stopped (or their count or time
/// bound is reached).
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    callers: Vec<Task<u64>>,
    spec: LoadSpec,
}

impl Load {
    /// Starts `spec.callers` callers of `queue` through clones of `client`.
    pub fn start<R: Runtime>(
        client: &Client<R>,
        queue: &str,
        ledger: &Ledger,
        spec: LoadSpec,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let callers = (0..spec.callers)
            .map(|caller| {
                let (client, queue, ledger) = (client.clone(), queue.to_owned(), ledger.clone());
                let (stop, spec) = (stop.clone(), spec.clone());
                spawn::<R, _>(async move {
                    let until = Instant::now() + spec.max_time;
                    let mut made = 0;
                    while made < spec.max_calls
                        && !stop.load(Ordering::SeqCst)
                        && Instant::now() < until
                    {
                        // Callers ask for different n at any moment, so that a reply delivered
                        // to the wrong caller shows as a wrong value; from 2, where fib is
                        // strictly increasing (fib(1) = fib(2)).
                        let n = 2 + ((caller as u64 * 23 + made) % 185) as u32;
                        let body = format!("{n}{}", " ".repeat(spec.pad));
                        let mut request = CallRequest::new(queue.clone(), body, spec.timeout);
                        request.idempotent = spec.idempotent;
                        let class = ledger.call(&client, request, n).await;
                        made += 1;
                        let pause = if class == Class::Ok {
                            spec.pause
                        } else {
                            spec.pause.max(Duration::from_millis(20))
                        };
                        if !pause.is_zero() {
                            sleep::<R>(pause).await;
                        }
                    }
                    made
                })
            })
            .collect();
        Self {
            stop,
            callers,
            spec,
        }
    }

    /// Stops the callers and waits for them (each finishes its call: at most its timeout plus
    /// `budget`, all together). Returns the calls made. A caller stuck in a call is left
    /// behind: [`Ledger::check`] reports its call as never ended.
    pub async fn stop<R: Runtime>(self, budget: Duration) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + self.spec.timeout + self.spec.pause + budget;
        let mut made = 0;
        for caller in self.callers {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout::<R, _>(left, caller.join()).await {
                Some(n) => made += n,
                None => eprintln!("e2e: a caller is still in a call when the load stops"),
            }
        }
        made
    }
}

/// Resident set size of process `pid` (this one for `None`), in KiB, from `/proc`.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// Peak resident set size of process `pid` (this one for `None`), in KiB.
pub fn peak_rss_kib(pid: Option<u32>) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rt::{Smol, TestRuntime};
    use amqp_rpc_core::types::BasicProperties;

    fn reply(body: &str) -> Result<RpcReply, CallError> {
        Ok(RpcReply {
            body: body.to_owned().into(),
            properties: BasicProperties::default(),
        })
    }

    /// Runs [`Ledger::check`] and returns its panic message, if it panicked.
    fn check_fails(ledger: &Ledger, allowed: &[Class]) -> Option<String> {
        let ledger = ledger.clone();
        let allowed = allowed.to_vec();
        let outcome = std::panic::catch_unwind(move || {
            Smol::block_on(ledger.check::<Smol>(&allowed, Duration::from_millis(100)))
        });
        match outcome {
            Ok(_) => None,
            Err(panic) => Some(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "a panic without a message".to_owned()),
            ),
        }
    }

    #[test]
    fn broker_limits_and_reply_too_large_have_classes_of_their_own() {
        let class = |e: RpcError| Class::of::<()>(&Err(CallError::Rpc(e)));
        let remote = |code: &str| RpcError::Remote {
            code: code.into(),
            message: String::new(),
        };
        let refused = |code: ReplyCode| RpcError::Refused {
            code,
            text: String::new(),
        };
        assert_eq!(class(remote(REPLY_TOO_LARGE)), Class::ReplyTooLarge);
        assert_eq!(class(remote("failed")), Class::Remote);
        assert_eq!(
            class(refused(ReplyCode::PRECONDITION_FAILED)),
            Class::RefusedPrecondition
        );
        assert_eq!(class(refused(ReplyCode::NOT_FOUND)), Class::Refused);
    }

    #[test]
    fn one_end_per_call_passes() {
        let ledger = Ledger::new(Duration::from_secs(1));
        let ticket = ledger.start(10, Duration::from_secs(5));
        assert_eq!(ledger.end(ticket, &reply("55")), Class::Ok);
        let dropped = ledger.start(11, Duration::from_secs(5));
        ledger.abandon(dropped);
        assert_eq!(check_fails(&ledger, &[Class::Dropped]), None);
        let summary = ledger.summary();
        assert_eq!((summary.started, summary.ended), (2, 2));
        assert_eq!(summary.ended_twice, 0);
    }

    #[test]
    fn a_call_ended_twice_fails_the_check() {
        let ledger = Ledger::new(Duration::from_secs(1));
        let ticket = ledger.start(10, Duration::from_secs(5));
        ledger.end(ticket, &reply("55"));
        ledger.end(ticket, &Err(CallError::Rpc(RpcError::TimedOut)));
        let message = check_fails(&ledger, &[Class::TimedOut]).expect("the check fails");
        assert!(message.contains("ended twice"), "{message}");
        assert_eq!(ledger.summary().ended_twice, 1);
        // Counted once: the second end changes no count.
        assert_eq!(ledger.summary().count(Class::TimedOut), 0);
    }

    #[test]
    fn an_abandoned_call_that_also_ends_fails_the_check() {
        let ledger = Ledger::new(Duration::from_secs(1));
        let ticket = ledger.start(10, Duration::from_secs(5));
        ledger.abandon(ticket);
        ledger.end(ticket, &reply("55"));
        let message = check_fails(&ledger, &[Class::Dropped]).expect("the check fails");
        assert!(message.contains("ended twice"), "{message}");
    }

    #[test]
    fn a_ticket_of_another_ledger_fails_the_check() {
        let other = Ledger::new(Duration::from_secs(1));
        other.start(1, Duration::from_secs(5));
        let stranger = other.start(2, Duration::from_secs(5));
        let ledger = Ledger::new(Duration::from_secs(1));
        ledger.end(stranger, &reply("1"));
        let message = check_fails(&ledger, &[]).expect("the check fails");
        assert!(message.contains("never started"), "{message}");
    }

    #[test]
    fn a_wrong_value_or_a_lost_call_fails_the_check() {
        let ledger = Ledger::new(Duration::from_secs(1));
        let wrong = ledger.start(10, Duration::from_secs(5));
        ledger.end(wrong, &reply("89"));
        let message = check_fails(&ledger, &[]).expect("the check fails");
        assert!(message.contains("another call"), "{message}");

        let ledger = Ledger::new(Duration::from_secs(1));
        let _lost = ledger.start(10, Duration::from_secs(5));
        let message = check_fails(&ledger, &[]).expect("the check fails");
        assert!(message.contains("never ended"), "{message}");
    }
}
