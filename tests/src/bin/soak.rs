//! The soak: load mixed with careless calls, a fault every so often, for a bounded time, then a
//! report.
//!
//! ```text
//! cargo run --release -p e2e-tests --bin soak -- [--minutes 10] [--fault-every 30]
//!     [--reply-cancel-every 30] [--bad-per-mille 10] [--drop-per-mille 10]
//!     [--transport tokio|smol] [--node second|main] [--callers 8] [--timeout-ms 5000]
//!     [--broker-max-message-size BYTES] [--oversized-reply-per-mille 0]
//!     [--oversized-request-per-mille 0] [--forged-reply-every 0] [--reject-publish-window 0]
//! ```
//!
//! It runs against the second RabbitMQ node by default (`scripts/second-node.sh`; started if
//! needed and stopped at the end if it started it), holding its exclusive lease
//! ([`node::exclusive`]) for the whole run, because one of its faults restarts the node and
//! the options below change the node's settings; `--node main` uses the main broker and skips
//! that fault, and refuses the options that change broker settings (the main broker is shared). A server runs in a process
//! of its own (this binary again, with `--serve`), so it can be killed; the client runs here,
//! through a fault-injecting proxy, with `--callers` callers calling in a loop.
//!
//! Each call is one of these kinds ([`Kind`]), drawn at random per call:
//! - `--bad-per-mille` (1 %) bad calls, half of them published to an exchange that does not
//!   exist, half with a body above the client's `max_message_size` ([`MAX_MESSAGE_SIZE`]);
//! - `--drop-per-mille` (1 %) calls whose future the caller drops after a random delay of up to
//!   [`MAX_DROP_DELAY`] (a `select` with a timer);
//! - `--oversized-reply-per-mille` (off by default; 1 is the issues' 0.1 %) calls whose
//!   handler answer ([`REPLY_BYTES`]) is one byte above the broker's limit;
//! - `--oversized-request-per-mille` (off by default) calls whose body is one byte above the
//!   broker's limit and below the client's own, so that the broker is what refuses the first
//!   on each connection (the client learns the limit from its words and refuses the rest
//!   before sending);
//! - the rest ordinary calls, fib(n) for varying n.
//!
//! The broker's limit is `--broker-max-message-size` (below the client's [`MAX_MESSAGE_SIZE`];
//! both oversized kinds need it): set on the node at the start with `rabbitmqctl eval
//! 'application:set_env(rabbit, max_message_size, N).'` (RabbitMQ 3.10 reads it when a channel
//! opens, so it is set before any connection, verified on a new channel, and checked again
//! after each node restart), and restored at exit, whatever the verdict ([`Undo`]).
//!
//! Beside the calls:
//! - every `--forged-reply-every` seconds, a request whose `reply_to` is a forged
//!   `amq.rabbitmq.reply-to.<garbage>` name is published to the request queue from a raw
//!   connection of its own ([`Node::publish`]): its reply can reach nobody, and it must harm no
//!   call;
//! - every `--reject-publish-window` seconds, for [`REJECT_PUBLISH_FOR`], a policy gives the
//!   request queue `max-length` 0 with `overflow: reject-publish`: the broker nacks every
//!   request, and calls end with `QueueFull` (never ran), during that window only.
//!
//! Every `--reply-cancel-every` seconds the broker cancels the client's reply consumer
//! (`rabbitmqctl delete_queue` of its exclusive reply queue), and every `--fault-every`
//! seconds, offset by half a period, it makes the next fault of the rotation:
//!
//! 1. `rabbitmqctl close_connection` on the client;
//! 2. the same on the server;
//! 3. SIGKILL the server process, start a new one;
//! 4. a TCP reset of the client's connection (proxy);
//! 5. a network black hole for 5 s (proxy, both directions);
//! 6. `rabbitmqctl stop_app`, 3 s, `start_app` (second node only).
//!
//! A live line every [`LIVE_EVERY`]: calls per second, errors by kind and class, RSS. At the
//! end, the report and its verdict. Every call must be accounted for:
//! - each kind's calls end once each (0 lost, 0 ended twice), with the right value or an error
//!   of the class its kind expects ([`expected`]: the one place that says so): every bad call
//!   with its own typed error;
//! - an error of a fault's class ([`FAULT_CLASSES`]) only while a fault and its recovery last,
//!   and `QueueFull` only while a reject-publish window lasts ([`Window`]): such an error
//!   anywhere else ("stray") means a call was harmed by another's fault, e.g. a bad call or a
//!   forged request that took a shared channel down: no innocent call harmed;
//! - every forged request was taken by the broker, every reject-publish policy cleared;
//! - the service recovers from each fault within [`RECOVERY_LIMIT`];
//! - no dropped call keeps its slot: with the link stalled, [`DROP_BATCH`] calls are dropped,
//!   then the client still takes its full `max_in_flight` ([`MAX_IN_FLIGHT`]) of new calls
//!   without a single `TooManyCalls`, and once the link is back a fresh call succeeds at once;
//! - the request queue ends empty;
//! - the RSS of this process, and the bytes its heap holds, are flat after warm-up
//!   ([`memory::check_flat`], within [`RSS_MARGIN_KIB`] and [`HEAP_MARGIN_KIB`]).
//!
//! `SOAK_LOG=FILE` keeps the client's and the server's logs (`RUST_LOG`, `warn` by default) in
//! FILE and FILE.server, to read what each side saw around a stray error.
//!
//! Exits 0 when all of that holds, 1 otherwise, 2 on bad arguments, 3 when the hard time cap
//! ([`MAX_MINUTES`] plus [`OVERRUN`]) is hit.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use amqp_rpc_cli::fib_handler;
use amqp_rpc_core::types::{BasicProperties, ShortString};
use amqp_rpc_core::ReplyCode;
use amqp_rpc_driver::{CallRequest, Client, HandlerError, ReplyMode, Request, Server};
use bytes::Bytes;
use e2e_tests::broker::{unique_name, Node, Published, QueueGuard};
use e2e_tests::faults::Proxy;
use e2e_tests::ledger::{assert_queue_drained, rss_kib, Class, Ledger, Summary};
use e2e_tests::memory::{self, Heap, Sampler};
use e2e_tests::node::{self as node, second_node, AppStopped};
use e2e_tests::process::ChildProcess;
use e2e_tests::proxy::FaultMode;
use e2e_tests::rt::{blocking, sleep, spawn, timeout, Smol, Task, TestRuntime, Tokio};
use e2e_tests::servers::{fault_client_options, fault_server_options};
use e2e_tests::states::StateLog;
use futures_util::future::{select, Either};

/// How late after its deadline a call may end.
const BUDGET: Duration = Duration::from_secs(2);
/// How long the service may take to answer again after a fault.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// Longest run `--minutes` accepts.
const MAX_MINUTES: f64 = 60.0;
/// Time for set-up, the final checks and the report, beyond `--minutes`; past it the
/// watchdog ends the process (exit 3).
const OVERRUN: Duration = Duration::from_secs(5 * 60);
/// The client's `max_message_size`: bad calls of [`Kind::TooLarge`] send one byte more.
const MAX_MESSAGE_SIZE: u64 = 64 * 1024;
/// The client's in-flight limit: small, so that leaked slots would show as `TooManyCalls`.
const MAX_IN_FLIGHT: usize = 256;
/// The longest a [`Kind::Dropped`] call runs before its caller drops it.
const MAX_DROP_DELAY: Duration = Duration::from_millis(3);
/// Calls dropped at once, with the link stalled, by the final slot check.
const DROP_BATCH: usize = 64;
/// How often the live line is printed (and the RSS sampled, every second).
const LIVE_EVERY: Duration = Duration::from_secs(5);
/// How much the RSS of this process may grow from the first quarter of the run (after
/// warm-up) to the last: allocator noise and the bounded structures of the soak itself. A leak
/// of 150 bytes per call shows within a minute at ~1,000 calls/s.
const RSS_MARGIN_KIB: u64 = 8 * 1024;
/// The same for the bytes this process's heap holds (exact, unlike the RSS): the soak's own
/// bounded records and the client's buffers at their high-water marks.
const HEAP_MARGIN_KIB: u64 = 4 * 1024;
/// Counts the bytes the heap holds (see [`HEAP_MARGIN_KIB`]).
#[global_allocator]
static HEAP: Heap = memory::heap();
/// "At once", for the fresh call after the run.
const PROMPT: Duration = Duration::from_secs(2);
/// How long each reject-publish window lasts.
const REJECT_PUBLISH_FOR: Duration = Duration::from_secs(3);
/// How long after its policy is cleared a window still explains `QueueFull`: the broker applies
/// a policy change to the queue asynchronously, and a nacked call ends a moment later.
const POLICY_LAG: Duration = Duration::from_secs(1);
/// The request body of a [`Kind::OversizedReply`] call: `reply-bytes:N` asks the soak's
/// server for an answer of N bytes.
const REPLY_BYTES: &[u8] = b"reply-bytes:";
/// The largest answer [`REPLY_BYTES`] may ask for (the request comes from the network).
const MAX_REPLY_BYTES: usize = 1024 * 1024;
/// The lowest `--broker-max-message-size`: room for every ordinary request and reply.
const MIN_BROKER_LIMIT: u64 = 1024;

/// What a call is, and so how it may end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// fib(n): the right value.
    Normal,
    /// Published to an exchange that does not exist.
    UnknownExchange,
    /// A body above the client's `max_message_size`.
    TooLarge,
    /// Its future dropped by the caller after up to [`MAX_DROP_DELAY`].
    Dropped,
    /// Asks for an answer one byte above the broker's `max_message_size`.
    OversizedReply,
    /// A body above the broker's `max_message_size`, below the client's.
    OversizedRequest,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Normal,
        Kind::UnknownExchange,
        Kind::TooLarge,
        Kind::Dropped,
        Kind::OversizedReply,
        Kind::OversizedRequest,
    ];

    fn describe(self) -> &'static str {
        match self {
            Kind::Normal => "normal",
            Kind::UnknownExchange => "unknown exchange",
            Kind::TooLarge => "body too large",
            Kind::Dropped => "dropped future",
            Kind::OversizedReply => "oversized reply",
            Kind::OversizedRequest => "oversized request",
        }
    }
}

/// How a call of `kind` may end, whenever it ends: the one place that says so. (Besides these,
/// any call may end with an error of a fault's class while a fault lasts, [`FAULT_CLASSES`],
/// and with `QueueFull` while a reject-publish window lasts, [`REJECT_PUBLISH_CLASSES`]. A
/// forged request is no call of the client: nothing comes back from it, and what is expected
/// of it is that every call still ends as said here.)
fn expected(kind: Kind) -> &'static [Class] {
    match kind {
        Kind::Normal => &[Class::Ok],
        // 404 NOT_FOUND from the broker, for this call alone; never ran.
        Kind::UnknownExchange => &[Class::Refused],
        // `CallError::Invalid(UsageError::MessageTooLarge)`, before sending.
        Kind::TooLarge => &[Class::Invalid],
        // Dropped (a cancellation, not an outcome), or answered before the caller dropped it.
        Kind::Dropped => &[Class::Dropped, Class::Ok],
        // The server ran it and answers `Remote { code: "reply_too_large" }` in place of an
        // answer the broker would refuse (and close the server's channel for).
        Kind::OversizedReply => &[Class::ReplyTooLarge],
        // `Refused { code: 406 }` (PRECONDITION_FAILED, "message size … larger than configured
        // max size"), for this call alone; never ran. The client learns the broker's limit from
        // those words, so on the same connection the later ones are refused before sending,
        // `Invalid` (`MessageTooLarge`), never ran too; a new connection learns it again.
        Kind::OversizedRequest => &[Class::RefusedPrecondition, Class::Invalid],
    }
}

/// What a reject-publish window may end any call with, while it lasts: `QueueFull` (the
/// broker nacked the request; never ran).
const REJECT_PUBLISH_CLASSES: &[Class] = &[Class::QueueFull];

/// What a fault may end a call with, while it and its recovery last.
const FAULT_CLASSES: &[Class] = &[
    Class::ConnectionLost,
    Class::ConnectionLostUnsent,
    Class::TimedOut,
    Class::Expired,
    Class::NoServers,
    Class::NotRouted,
    Class::ReplyPathLost,
];

#[derive(Debug, Clone)]
struct Args {
    minutes: f64,
    fault_every: u64,
    reply_cancel_every: u64,
    bad_per_mille: u32,
    drop_per_mille: u32,
    transport: String,
    node: String,
    callers: usize,
    timeout: Duration,
    /// The broker's `max_message_size` for the run, if lowered.
    broker_max_message_size: Option<u64>,
    oversized_reply_per_mille: u32,
    oversized_request_per_mille: u32,
    /// Seconds between forged requests (0: none).
    forged_reply_every: u64,
    /// Seconds between reject-publish windows (0: none).
    reject_publish_every: u64,
    /// `--serve QUEUE NAME URI`: be the server process.
    serve: Option<(String, String, String)>,
}

impl Args {
    /// The kind of a call, from a roll of 0 to 999.
    fn kind_of(&self, roll: u32) -> Kind {
        let mut bound = 0;
        for (kind, per_mille) in [
            (Kind::UnknownExchange, self.bad_per_mille / 2),
            (Kind::TooLarge, self.bad_per_mille - self.bad_per_mille / 2),
            (Kind::Dropped, self.drop_per_mille),
            (Kind::OversizedReply, self.oversized_reply_per_mille),
            (Kind::OversizedRequest, self.oversized_request_per_mille),
        ] {
            bound += per_mille;
            if roll < bound {
                return kind;
            }
        }
        Kind::Normal
    }

    /// The broker's limit: the oversized kinds exist only with one (see [`parse`]).
    fn broker_limit(&self) -> usize {
        self.broker_max_message_size
            .and_then(|b| usize::try_from(b).ok())
            .unwrap_or(MAX_MESSAGE_SIZE as usize)
    }
}

fn parse() -> Result<Args, String> {
    parse_from(&std::env::args().skip(1).collect::<Vec<_>>())
}

fn parse_from(flags: &[impl AsRef<str>]) -> Result<Args, String> {
    let mut args = Args {
        minutes: 5.0,
        fault_every: 30,
        reply_cancel_every: 30,
        bad_per_mille: 10,
        drop_per_mille: 10,
        transport: "tokio".into(),
        node: "second".into(),
        callers: 8,
        timeout: Duration::from_secs(5),
        broker_max_message_size: None,
        oversized_reply_per_mille: 0,
        oversized_request_per_mille: 0,
        forged_reply_every: 0,
        reject_publish_every: 0,
        serve: None,
    };
    let mut it = flags.iter().map(|f| f.as_ref().to_owned());
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => {
                let v = value()?;
                args.minutes = v
                    .parse()
                    .ok()
                    .filter(|m: &f64| *m > 0.0 && *m <= MAX_MINUTES)
                    .ok_or(format!(
                        "--minutes {v} (more than 0, at most {MAX_MINUTES})"
                    ))?;
            }
            "--fault-every" => {
                let v = value()?;
                args.fault_every = v
                    .parse()
                    .ok()
                    .filter(|s| *s == 0 || *s >= 5)
                    .ok_or(format!("--fault-every {v} (0 for none, else at least 5 s)"))?;
            }
            "--reply-cancel-every" => {
                let v = value()?;
                args.reply_cancel_every =
                    v.parse()
                        .ok()
                        .filter(|s| *s == 0 || *s >= 5)
                        .ok_or(format!(
                            "--reply-cancel-every {v} (0 for none, else at least 5 s)"
                        ))?;
            }
            "--bad-per-mille"
            | "--drop-per-mille"
            | "--oversized-reply-per-mille"
            | "--oversized-request-per-mille" => {
                let v = value()?;
                let per_mille = v
                    .parse()
                    .ok()
                    .filter(|p| *p <= 500)
                    .ok_or(format!("{flag} {v} (0 to 500)"))?;
                *match flag.as_str() {
                    "--bad-per-mille" => &mut args.bad_per_mille,
                    "--drop-per-mille" => &mut args.drop_per_mille,
                    "--oversized-reply-per-mille" => &mut args.oversized_reply_per_mille,
                    _ => &mut args.oversized_request_per_mille,
                } = per_mille;
            }
            "--broker-max-message-size" => {
                let v = value()?;
                args.broker_max_message_size = Some(
                    v.parse()
                        .ok()
                        .filter(|b| (MIN_BROKER_LIMIT..MAX_MESSAGE_SIZE).contains(b))
                        .ok_or(format!(
                            "--broker-max-message-size {v} ({MIN_BROKER_LIMIT} to \
                             {MAX_MESSAGE_SIZE} - 1: below the client's own limit)"
                        ))?,
                );
            }
            "--forged-reply-every" | "--reject-publish-window" => {
                let v = value()?;
                let secs = v
                    .parse()
                    .ok()
                    .filter(|s| *s == 0 || *s >= 5)
                    .ok_or(format!("{flag} {v} (0 for none, else at least 5 s)"))?;
                if flag == "--forged-reply-every" {
                    args.forged_reply_every = secs;
                } else {
                    args.reject_publish_every = secs;
                }
            }
            "--transport" => args.transport = value()?,
            "--node" => args.node = value()?,
            "--callers" => {
                let v = value()?;
                args.callers = v
                    .parse()
                    .ok()
                    .filter(|c| (1..=128).contains(c))
                    .ok_or(format!("--callers {v} (1 to 128)"))?;
            }
            "--timeout-ms" => {
                let v = value()?;
                let ms = v
                    .parse()
                    .ok()
                    .filter(|ms| (100..=60_000).contains(ms))
                    .ok_or(format!("--timeout-ms {v} (100 to 60000)"))?;
                args.timeout = Duration::from_millis(ms);
            }
            "--serve" => args.serve = Some((value()?, value()?, value()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !["tokio", "smol"].contains(&args.transport.as_str()) {
        return Err(format!("--transport tokio or smol, not {}", args.transport));
    }
    if !["second", "main"].contains(&args.node.as_str()) {
        return Err(format!("--node second or main, not {}", args.node));
    }
    let per_mille = args.bad_per_mille
        + args.drop_per_mille
        + args.oversized_reply_per_mille
        + args.oversized_request_per_mille;
    if per_mille > 1000 {
        return Err(format!(
            "the per-mille options add up to {per_mille}, above 1000"
        ));
    }
    let oversized = args.oversized_reply_per_mille + args.oversized_request_per_mille;
    if oversized > 0 && args.broker_max_message_size.is_none() {
        return Err("the oversized kinds need --broker-max-message-size".into());
    }
    if args.node == "main"
        && (args.broker_max_message_size.is_some() || args.reject_publish_every > 0)
    {
        return Err(
            "--broker-max-message-size and --reject-publish-window change broker settings: \
             --node second only"
                .into(),
        );
    }
    Ok(args)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The server process: serves `queue` until its stdin closes.
async fn serve<R: TestRuntime>(queue: String, name: String, uri: String) -> ExitCode {
    let options = fault_server_options(&uri, &queue, &name, 8);
    let server = Server::<R>::new(options).on_ready(|| say("ready"));
    match server.serve(soak_handler).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The soak server's handler: fib(n), and for a body `reply-bytes:N` ([`REPLY_BYTES`], N at
/// most [`MAX_REPLY_BYTES`]) an answer of N bytes.
async fn soak_handler(request: Request) -> Result<Bytes, HandlerError> {
    let Some(size) = request.body.strip_prefix(REPLY_BYTES) else {
        return fib_handler(request).await;
    };
    let size = std::str::from_utf8(size)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|n| *n <= MAX_REPLY_BYTES);
    match size {
        Some(n) => Ok(Bytes::from(vec![b'x'; n])),
        None => Err(HandlerError::Rejected {
            code: "invalid_request".into(),
            message: format!("reply-bytes: 0 to {MAX_REPLY_BYTES}"),
        }),
    }
}

/// The faults of the rotation, in order, and the reply consumer's cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    CloseClient,
    CloseServer,
    KillServer,
    Reset,
    BlackHole,
    RestartNode,
    CancelReplyConsumer,
}

impl Fault {
    const ROTATION: [Fault; 6] = [
        Fault::CloseClient,
        Fault::CloseServer,
        Fault::KillServer,
        Fault::Reset,
        Fault::BlackHole,
        Fault::RestartNode,
    ];

    fn describe(self) -> &'static str {
        match self {
            Fault::CloseClient => "close_connection (client)",
            Fault::CloseServer => "close_connection (server)",
            Fault::KillServer => "kill -9 the server, start a new one",
            Fault::Reset => "TCP reset (client)",
            Fault::BlackHole => "black hole 5 s (client)",
            Fault::RestartNode => "stop_app, 3 s, start_app",
            Fault::CancelReplyConsumer => "delete_queue the reply queue",
        }
    }
}

/// What explains some errors while it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    /// A fault, from its start to the end of its recovery: [`FAULT_CLASSES`].
    Fault,
    /// A reject-publish policy on the request queue: [`REJECT_PUBLISH_CLASSES`].
    RejectPublish,
}

impl Window {
    fn explains(self, class: Class) -> bool {
        match self {
            Window::Fault => FAULT_CLASSES.contains(&class),
            Window::RejectPublish => REJECT_PUBLISH_CLASSES.contains(&class),
        }
    }
}

/// The errors only a window explains, by when they happened, to tell those a window explains
/// from stray ones. Bounded: at most [`Strays::CAP`] are kept (the rest only counted).
#[derive(Debug, Default)]
struct Strays {
    /// (ms since the start, kind, class) of each error of a fault or reject-publish class.
    errors: Vec<(u32, Kind, Class)>,
    not_kept: u64,
    /// The windows, ms since the start.
    windows: Vec<(u32, u32, Window)>,
}

impl Strays {
    const CAP: usize = 200_000;

    /// The errors outside every window, by kind and class, and a few of them word for word.
    fn outside(&self) -> (BTreeMap<(Kind, Class), u64>, Vec<String>) {
        let mut counts = BTreeMap::new();
        let mut lines = Vec::new();
        for (at, kind, class) in &self.errors {
            let explained = self
                .windows
                .iter()
                .any(|(from, to, window)| at >= from && at <= to && window.explains(*class));
            if !explained {
                *counts.entry((*kind, *class)).or_default() += 1;
                if lines.len() < 10 {
                    lines.push(format!(
                        "{} call ended {class:?} at {:.1}s, outside every window that explains it",
                        kind.describe(),
                        f64::from(*at) / 1000.0
                    ));
                }
            }
        }
        (counts, lines)
    }
}

/// The calls of a soak: a ledger per kind, and the errors of fault classes by time.
#[derive(Debug, Clone)]
struct Books {
    started: Instant,
    ledgers: Arc<BTreeMap<Kind, Ledger>>,
    strays: Arc<Mutex<Strays>>,
    rejecting: Arc<AtomicBool>,
}

impl Books {
    fn new() -> Self {
        let ledgers = Kind::ALL
            .into_iter()
            .map(|kind| (kind, Ledger::counting(BUDGET)))
            .collect();
        Self {
            started: Instant::now(),
            ledgers: Arc::new(ledgers),
            strays: Arc::default(),
            rejecting: Arc::default(),
        }
    }

    fn ledger(&self, kind: Kind) -> &Ledger {
        // Every kind has its ledger from `new`.
        &self.ledgers[&kind]
    }

    fn ms(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.started).as_millis()).unwrap_or(u32::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Strays> {
        self.strays.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes how a call of `kind` ended, if with an error only a window explains.
    fn note(&self, kind: Kind, class: Class) {
        let windowed = FAULT_CLASSES.contains(&class) || REJECT_PUBLISH_CLASSES.contains(&class);
        if windowed && !expected(kind).contains(&class) {
            let at = self.ms(Instant::now());
            let mut strays = self.lock();
            if strays.errors.len() < Strays::CAP {
                strays.errors.push((at, kind, class));
            } else {
                strays.not_kept += 1;
            }
        }
    }

    /// A window that opened at `from` and whose effects ended by `to`.
    fn window(&self, from: Instant, to: Instant, window: Window) {
        let window = (self.ms(from), self.ms(to), window);
        self.lock().windows.push(window);
    }

    /// Prints `what` on the live output, stamped with the time since the start.
    fn say(&self, what: &str) {
        let at = Instant::now().saturating_duration_since(self.started);
        say(&format!("[{:>6.1}s] {what}", at.as_secs_f64()));
    }

    /// Whether a reject-publish window is open now (the forged requests wait for its end).
    fn rejecting(&self) -> bool {
        self.rejecting.load(Ordering::SeqCst)
    }

    fn summaries(&self) -> BTreeMap<Kind, Summary> {
        self.ledgers
            .iter()
            .map(|(kind, ledger)| (*kind, ledger.summary()))
            .collect()
    }
}

/// A small xorshift generator: which kind each call is, how long before a drop.
#[derive(Debug)]
struct Dice(u64);

impl Dice {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Callers calling in a loop, each call of a kind drawn at random, until stopped.
struct Callers {
    stop: Arc<AtomicBool>,
    tasks: Vec<Task<()>>,
}

impl Callers {
    fn start<R: TestRuntime>(client: &Client<R>, queue: &str, books: &Books, args: &Args) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seed = u64::from(std::process::id()) << 32 ^ books.started.elapsed().as_nanos() as u64;
        let tasks = (0..args.callers)
            .map(|caller| {
                let (client, queue, books) = (client.clone(), queue.to_owned(), books.clone());
                let (stop, args) = (Arc::clone(&stop), args.clone());
                let mut dice = Dice::new(seed ^ (caller as u64 + 1).wrapping_mul(0x9E37_79B9));
                spawn::<R, _>(async move {
                    let mut made = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let roll = dice.below(1000) as u32;
                        let kind = args.kind_of(roll);
                        // From 2, where fib is strictly increasing: a reply that reached the
                        // wrong caller shows as a wrong value.
                        let n = 2 + ((caller as u64 * 23 + made) % 185) as u32;
                        let drop_after = Duration::from_micros(
                            dice.below(MAX_DROP_DELAY.as_micros() as u64 + 1),
                        );
                        let class =
                            one_call(&client, &queue, &books, &args, kind, n, drop_after).await;
                        books.note(kind, class);
                        made += 1;
                        let pause = if class == Class::Ok || class == Class::Dropped {
                            Duration::from_millis(1)
                        } else {
                            Duration::from_millis(20)
                        };
                        sleep::<R>(pause).await;
                    }
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the callers and waits for them (each finishes its call: at most its timeout plus
    /// the budget, all together).
    async fn stop<R: TestRuntime>(self, timeout_each: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout_each + BUDGET + Duration::from_secs(1);
        for task in self.tasks {
            let left = deadline.saturating_duration_since(Instant::now());
            if timeout::<R, _>(left, task.join()).await.is_none() {
                eprintln!("soak: a caller is still in a call when the load stops");
            }
        }
    }
}

/// One call of `kind`, through its ledger; returns its class.
async fn one_call<R: TestRuntime>(
    client: &Client<R>,
    queue: &str,
    books: &Books,
    args: &Args,
    kind: Kind,
    n: u32,
    drop_after: Duration,
) -> Class {
    let ledger = books.ledger(kind);
    let mut request = CallRequest::new(queue, n.to_string(), args.timeout);
    match kind {
        Kind::Normal => ledger.call(client, request, n).await,
        Kind::UnknownExchange => {
            request.exchange = unique_name("no-such-exchange");
            ledger.call(client, request, n).await
        }
        Kind::TooLarge | Kind::OversizedRequest => {
            // The server would answer fib of the leading number, were it sent.
            let limit = match kind {
                Kind::TooLarge => MAX_MESSAGE_SIZE as usize,
                _ => args.broker_limit(),
            };
            let mut body = n.to_string().into_bytes();
            body.resize(limit + 1, b' ');
            request.body = body.into();
            ledger.call(client, request, n).await
        }
        Kind::OversizedReply => {
            let mut body = REPLY_BYTES.to_vec();
            body.extend_from_slice((args.broker_limit() + 1).to_string().as_bytes());
            request.body = body.into();
            ledger.call(client, request, n).await
        }
        Kind::Dropped => {
            let ticket = ledger.start(n, request.timeout);
            let call = Box::pin(client.call_with(request));
            let timer = Box::pin(sleep::<R>(drop_after));
            match select(call, timer).await {
                Either::Left((result, _)) => ledger.end(ticket, &result),
                Either::Right((_, call)) => {
                    drop(call);
                    ledger.abandon(ticket);
                    Class::Dropped
                }
            }
        }
    }
}

struct Soak {
    args: Args,
    node: Node,
    queue: String,
    server_name: String,
    server: ChildProcess,
}

fn start_server(args: &Args, queue: &str, name: &str, uri: &str) -> ChildProcess {
    let exe = std::env::current_exe().expect("the path of this program");
    let mut command = Command::new(exe);
    command.args(["--transport", &args.transport, "--serve", queue, name, uri]);
    ChildProcess::spawn("soak server", command)
}

/// Prints a live line every [`LIVE_EVERY`] until `stop`.
fn live<R: TestRuntime>(books: Books, stop: Arc<AtomicBool>) -> Task<()> {
    spawn::<R, _>(async move {
        let mut last = (Instant::now(), 0u64);
        while !stop.load(Ordering::SeqCst) {
            sleep::<R>(LIVE_EVERY).await;
            let summaries = books.summaries();
            let ended: u64 = summaries.values().map(|s| s.ended).sum();
            let now = Instant::now();
            let rate = (ended - last.1) as f64 / (now - last.0).as_secs_f64();
            last = (now, ended);
            let mut errors = Vec::new();
            for (kind, summary) in &summaries {
                for (class, count) in &summary.classes {
                    if *class != Class::Ok {
                        errors.push(format!("{} {class:?} {count}", kind.describe()));
                    }
                }
            }
            say(&format!(
                "[{:>6.1}s] {rate:>6.0} calls/s, {ended} ended; {}; RSS {:.1} MiB",
                books.started.elapsed().as_secs_f64(),
                if errors.is_empty() {
                    "no error".to_owned()
                } else {
                    errors.join(", ")
                },
                rss_kib(None).unwrap_or(0) as f64 / 1024.0
            ));
        }
    })
}

async fn run<R: TestRuntime>(args: Args) -> ExitCode {
    let node = if args.node == "second" {
        blocking(|| second_node().clone()).await
    } else {
        Node::main()
    };
    // Declared first, dropped last: whatever the verdict, the broker's settings are put back.
    let _undo = UndoOnDrop;
    let limit_line = match args.broker_max_message_size {
        None => "unchanged".to_owned(),
        Some(limit) => {
            let at = node.clone();
            match blocking(move || set_broker_limit(&at, limit)).await {
                Ok(line) => line,
                Err(e) => {
                    eprintln!("soak: --broker-max-message-size {limit}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let queue = QueueGuard::on(&node, "soak");
    let server_name = unique_name("soak-server");
    let mut server = start_server(&args, queue.name(), &server_name, node.uri());
    server
        .wait_line::<R>("ready", Duration::from_secs(30))
        .await;
    let server_rss_start = rss_kib(Some(server.id()));
    let mut soak = Soak {
        args: args.clone(),
        node: node.clone(),
        queue: queue.name().to_owned(),
        server_name,
        server,
    };

    let proxy = Proxy::start_to(node.uri());
    let client_name = unique_name("soak-client");
    let mut options = proxy.redirect(fault_client_options(
        node.uri(),
        ReplyMode::ExclusiveQueue,
        &client_name,
    ));
    for address in options.connect.iter_mut() {
        address.connection.max_message_size = MAX_MESSAGE_SIZE;
    }
    options.rpc.max_in_flight = MAX_IN_FLIGHT;
    let client = match Client::<R>::connect_with(options).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("soak: cannot connect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let states = StateLog::watch(&client);
    let books = Books::new();
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let callers = Callers::start(&client, queue.name(), &books, &args);
    let beside = Beside::start::<R>(&node, queue.name(), &books, &args);
    let started = books.started;
    let normal = books.ledger(Kind::Normal).clone();
    // Settle: the first calls pay for connection warm-up.
    normal
        .wait_recovered::<R>(started, 100, RECOVERY_LIMIT)
        .await;
    let warm = Instant::now();
    let sampler = Sampler::rss(None, Duration::from_secs(1)).expect("the RSS of this process");
    let heap = Sampler::heap(&HEAP, Duration::from_secs(1));
    let live_stop = Arc::new(AtomicBool::new(false));
    let live_task = live::<R>(books.clone(), Arc::clone(&live_stop));
    say(&format!(
        "soak: {:.1} min on {} against {} ({}), {} callers, timeout {:?}, a fault every {} s, \
         the reply consumer cancelled every {} s, {}‰ bad calls, {}‰ dropped futures, {}‰ \
         oversized replies, {}‰ oversized requests, a forged reply_to every {} s, a \
         reject-publish window every {} s; broker: {limit_line}",
        args.minutes,
        R::NAME,
        node.uri(),
        node.name().unwrap_or("main node"),
        args.callers,
        args.timeout,
        args.fault_every,
        args.reply_cancel_every,
        args.bad_per_mille,
        args.drop_per_mille,
        args.oversized_reply_per_mille,
        args.oversized_request_per_mille,
        args.forged_reply_every,
        args.reject_publish_every,
    ));

    let rotation: Vec<Fault> = Fault::ROTATION
        .into_iter()
        .filter(|f| *f != Fault::RestartNode || node.name().is_some())
        .collect();
    let never = started + total + Duration::from_secs(1);
    let every = |secs: u64, offset: u64| {
        if secs == 0 {
            never
        } else {
            started + Duration::from_secs(secs + offset)
        }
    };
    let mut next_fault_at = every(args.fault_every, args.fault_every / 2);
    let mut next_cancel_at = every(args.reply_cancel_every, 0);
    let mut recoveries: Vec<(Fault, Duration)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut next = 0usize;
    loop {
        let now = Instant::now();
        let due = next_fault_at.min(next_cancel_at);
        if now >= started + total {
            break;
        }
        if now < due {
            sleep::<R>(due.min(started + total) - now).await;
            continue;
        }
        let fault = if next_cancel_at <= next_fault_at {
            next_cancel_at += Duration::from_secs(args.reply_cancel_every);
            Fault::CancelReplyConsumer
        } else {
            next_fault_at += Duration::from_secs(args.fault_every);
            next += 1;
            rotation[(next - 1) % rotation.len()]
        };
        let at = Instant::now();
        let result = make_fault::<R>(&mut soak, fault, &client_name, &proxy).await;
        let ended = Instant::now();
        let outcome = match result {
            Err(e) => Err(format!("fault {} failed: {e}", fault.describe())),
            Ok(()) => timeout::<R, _>(
                RECOVERY_LIMIT,
                normal.wait_recovered::<R>(ended, 20, RECOVERY_LIMIT),
            )
            .await
            .ok_or(format!(
                "no recovery from {} within {RECOVERY_LIMIT:?}",
                fault.describe()
            )),
        };
        // Calls sent before the fault may end by their deadline after it.
        let window_end = Instant::now().max(at + args.timeout) + BUDGET;
        books.window(at, window_end, Window::Fault);
        let offset = at.saturating_duration_since(started).as_secs_f64();
        match outcome {
            Ok(took) => {
                recoveries.push((fault, took));
                say(&format!(
                    "[{offset:>6.1}s] {}: service back {took:.2?} after the fault ended",
                    fault.describe(),
                ));
            }
            Err(e) => {
                say(&format!("[{offset:>6.1}s] FAILED: {e}"));
                failures.push(e);
            }
        }
    }

    let beside = beside.stop::<R>().await;
    failures.extend(beside.failures.iter().cloned());
    callers.stop::<R>(args.timeout).await;
    sampler.sample_now();
    heap.sample_now();
    let rss = sampler.samples(warm, Instant::now());
    let rss_flat = memory::check_flat(&rss, RSS_MARGIN_KIB);
    let heap_samples = heap.samples(warm, Instant::now());
    let heap_flat = memory::check_flat(&heap_samples, HEAP_MARGIN_KIB);
    let server_rss_end = rss_kib(Some(soak.server.id()));
    let elapsed = started.elapsed();
    live_stop.store(true, Ordering::SeqCst);

    // Every call of every kind ended once, as its kind allows (fault classes are checked
    // against the fault windows below). The check panics with the details: a failure.
    let mut checked = BTreeMap::new();
    for kind in Kind::ALL {
        let ledger = books.ledger(kind).clone();
        let allowed: Vec<Class> = expected(kind)
            .iter()
            .chain(FAULT_CLASSES)
            .chain(REJECT_PUBLISH_CLASSES)
            .copied()
            .collect();
        let check = std::panic::AssertUnwindSafe(async move {
            ledger.check::<R>(&allowed, Duration::from_secs(30)).await
        });
        let ok = futures_util::FutureExt::catch_unwind(check).await.is_ok();
        checked.insert(kind, ok);
    }
    let (strays, stray_lines) = books.lock().outside();
    let slots = slot_check::<R>(&client, queue.name(), &proxy).await;
    let drained = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
        assert_queue_drained::<R>(&node, queue.name(), Duration::from_secs(30)),
    ))
    .await
    .is_ok();
    client.close().await;
    let _ = timeout::<R, _>(LIVE_EVERY * 2, live_task.join()).await;
    let reconnects = states
        .states()
        .iter()
        .filter(|s| {
            matches!(
                s,
                amqp_rpc_driver::ConnectionState::Reconnecting { attempt: 1 }
            )
        })
        .count();

    // The report.
    let summaries = books.summaries();
    let kib =
        |v: Option<u64>| v.map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    say("");
    say("==== soak report ====");
    say(&format!(
        "duration            {:.1?} on {} against {}",
        elapsed,
        R::NAME,
        node.name().unwrap_or("the main node")
    ));
    say(&format!(
        "{:<18}{:>9}{:>9}{:>6}{:>7}  {:<28}{}",
        "kind", "started", "ended", "lost", "twice", "outcomes", "expected"
    ));
    for (kind, summary) in &summaries {
        let outcomes: Vec<String> = summary
            .classes
            .iter()
            .map(|(class, count)| format!("{class:?} {count}"))
            .collect();
        say(&format!(
            "{:<18}{:>9}{:>9}{:>6}{:>7}  {:<28}{:?}{}",
            kind.describe(),
            summary.started,
            summary.ended,
            summary.started - summary.ended,
            summary.ended_twice,
            outcomes.join(", "),
            expected(*kind),
            if checked[kind] { "" } else { "  CHECK FAILED" }
        ));
    }
    let started_all: u64 = summaries.values().map(|s| s.started).sum();
    say(&format!(
        "calls per second    {:.0}",
        started_all as f64 / elapsed.as_secs_f64()
    ));
    let normal_ledger = books.ledger(Kind::Normal);
    say(&format!(
        "latency (normal ok) p50 ≤ {:.1?}, p99 ≤ {:.1?}; max of all normal calls {:.2?}",
        normal_ledger.ok_latency_quantile(0.5),
        normal_ledger.ok_latency_quantile(0.99),
        summaries[&Kind::Normal].max_latency
    ));
    let stray_total: u64 = strays.values().sum();
    say(&format!(
        "stray errors        {stray_total} (errors of a fault or reject-publish class outside \
         every window that explains them)"
    ));
    for ((kind, class), count) in &strays {
        say(&format!("  {:<18}{class:?} {count}", kind.describe()));
    }
    for line in &stray_lines {
        say(&format!("  e.g. {line}"));
    }
    say(&format!(
        "faults              {} ({} reconnects of the client)",
        recoveries.len() + failures.len(),
        reconnects
    ));
    for fault in rotation.iter().chain([&Fault::CancelReplyConsumer]) {
        let took: Vec<_> = recoveries
            .iter()
            .filter(|(f, _)| f == fault)
            .map(|(_, t)| format!("{:.2}s", t.as_secs_f64()))
            .collect();
        if !took.is_empty() {
            say(&format!(
                "  {:<36}back after {}",
                fault.describe(),
                took.join(", ")
            ));
        }
    }
    match memory::RssWindow::of(&rss) {
        Some(w) => say(&format!(
            "client RSS          after warm-up: first {}, last {}, max {} ({} samples); {}",
            kib(Some(w.first)),
            kib(Some(w.last)),
            kib(Some(w.max)),
            w.samples,
            match &rss_flat {
                Ok(growth) => format!("flat (last quarter {growth} KiB above the first)"),
                Err(e) => format!("NOT FLAT: {e}"),
            }
        )),
        None => say("client RSS          NO SAMPLES"),
    }
    match memory::RssWindow::of(&heap_samples) {
        Some(w) => say(&format!(
            "client heap         after warm-up: first {}, last {}, max {} ({} samples); {}",
            kib(Some(w.first)),
            kib(Some(w.last)),
            kib(Some(w.max)),
            w.samples,
            match &heap_flat {
                Ok(growth) => format!("flat (last quarter {growth} KiB above the first)"),
                Err(e) => format!("NOT FLAT: {e}"),
            }
        )),
        None => say("client heap         NO SAMPLES"),
    }
    say(&format!(
        "server RSS          {} at start (first process), {} at end (current process)",
        kib(server_rss_start),
        kib(server_rss_end)
    ));
    say(&format!(
        "slots after drops   {}",
        match &slots {
            Ok(line) => line.clone(),
            Err(e) => format!("FAILED: {e}"),
        }
    ));
    say(&format!("broker limit        {limit_line}"));
    if args.forged_reply_every > 0 {
        say(&format!(
            "forged reply_to     {} published and taken, every {} s; {} skipped{}",
            beside.forged_acked,
            args.forged_reply_every,
            beside.forged_skipped.len(),
            beside
                .forged_skipped
                .first()
                .map_or(String::new(), |e| format!(" (e.g. {e})"))
        ));
    }
    if args.reject_publish_every > 0 {
        say(&format!(
            "reject-publish      {} windows of {REJECT_PUBLISH_FOR:?}, every {} s; {} skipped{}",
            beside.windows,
            args.reject_publish_every,
            beside.windows_skipped.len(),
            beside
                .windows_skipped
                .first()
                .map_or(String::new(), |e| format!(" (e.g. {e})"))
        ));
    }
    say(&format!(
        "queue drained       {}",
        if drained { "yes" } else { "NO" }
    ));
    for failure in &failures {
        say(&format!("failure             {failure}"));
    }
    let all_checked = checked.values().all(|ok| *ok);
    let pass = all_checked
        && stray_total == 0
        && slots.is_ok()
        && drained
        && rss_flat.is_ok()
        && heap_flat.is_ok()
        && failures.is_empty();
    say(&format!(
        "verdict             {}",
        if pass {
            "PASS: every call accounted for"
        } else {
            "FAIL"
        }
    ));
    drop(soak);
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// No dropped call keeps its slot: with the link stalled (so no call can end by a reply),
/// [`DROP_BATCH`] calls are started and dropped, then [`MAX_IN_FLIGHT`] new calls must all be
/// taken (none `TooManyCalls`); once the link is back, a fresh call succeeds at once.
async fn slot_check<R: TestRuntime>(
    client: &Client<R>,
    queue: &str,
    proxy: &Proxy,
) -> Result<String, String> {
    // A healthy start: the client answers.
    let request = CallRequest::new(queue, "10", Duration::from_secs(10));
    client
        .call_with(request)
        .await
        .map_err(|e| format!("the call before the slot check failed: {e}"))?;
    proxy.set_mode(FaultMode::StallBoth);
    for _ in 0..DROP_BATCH {
        let call = client.call_with(CallRequest::new(queue, "10", Duration::from_secs(5)));
        // Long enough for the call to reach the client's task, far shorter than its deadline.
        if let Some(result) = timeout::<R, _>(Duration::from_millis(20), call).await {
            return Err(format!("a call ended on a stalled link: {result:?}"));
        }
    }
    let burst: Vec<_> = (0..MAX_IN_FLIGHT)
        .map(|_| {
            let (client, queue) = (client.clone(), queue.to_owned());
            spawn::<R, _>(async move {
                let request = CallRequest::new(queue, "10", Duration::from_secs(1));
                Class::of(&client.call_with(request).await)
            })
        })
        .collect();
    // Back before the 1 s heartbeat gives up on the stalled connection.
    sleep::<R>(Duration::from_millis(300)).await;
    proxy.set_mode(FaultMode::Pass);
    let mut classes: BTreeMap<Class, u64> = BTreeMap::new();
    for task in burst {
        *classes.entry(task.join().await).or_default() += 1;
    }
    let started = Instant::now();
    let request = CallRequest::new(queue, "10", PROMPT);
    let fresh = client.call_with(request).await;
    let took = started.elapsed();
    let line = format!(
        "{DROP_BATCH} dropped while stalled, then {MAX_IN_FLIGHT} calls: {classes:?}; a fresh \
         call after: {:?} in {took:.0?}",
        Class::of(&fresh)
    );
    if classes.contains_key(&Class::TooManyCalls) {
        return Err(format!("dropped calls kept their slots: {line}"));
    }
    if fresh.is_err() {
        return Err(format!("the fresh call failed: {line}"));
    }
    Ok(line)
}

async fn make_fault<R: TestRuntime>(
    soak: &mut Soak,
    fault: Fault,
    client_name: &str,
    proxy: &Proxy,
) -> Result<(), String> {
    match fault {
        Fault::CloseClient => {
            let (node, name) = (soak.node.clone(), client_name.to_owned());
            blocking(move || node.close_connection_named(&name)).await
        }
        Fault::CloseServer => {
            let (node, name) = (soak.node.clone(), soak.server_name.clone());
            blocking(move || node.close_connection_named(&name)).await?;
            soak.server.wait_line::<R>("ready", RECOVERY_LIMIT).await;
            Ok(())
        }
        Fault::KillServer => {
            soak.server.kill();
            soak.server = start_server(&soak.args, &soak.queue, &soak.server_name, soak.node.uri());
            soak.server.wait_line::<R>("ready", RECOVERY_LIMIT).await;
            Ok(())
        }
        Fault::Reset => {
            proxy.reset_all();
            Ok(())
        }
        Fault::BlackHole => {
            proxy.set_mode(FaultMode::StallBoth);
            sleep::<R>(Duration::from_secs(5)).await;
            proxy.set_mode(FaultMode::Pass);
            Ok(())
        }
        Fault::RestartNode => {
            let node = soak.node.clone();
            let stopped = blocking(move || AppStopped::stop(&node)).await?;
            sleep::<R>(Duration::from_secs(3)).await;
            blocking(move || stopped.start()).await?;
            soak.server.wait_line::<R>("ready", RECOVERY_LIMIT).await;
            if let Some(limit) = soak.args.broker_max_message_size {
                let node = soak.node.clone();
                blocking(move || recheck_broker_limit(&node, limit)).await?;
            }
            Ok(())
        }
        Fault::CancelReplyConsumer => {
            let (node, name) = (soak.node.clone(), client_name.to_owned());
            blocking(move || delete_reply_queue(&node, &name)).await
        }
    }
}

/// Deletes the exclusive reply queue of the connection named `client` (the broker then cancels
/// the client's consumer with `basic.cancel`); waits up to 10 s for the client to have one
/// (it may be reconnecting from the previous fault).
fn delete_reply_queue(node: &Node, client: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let path = node.reply_path_of(client);
        if let Ok(path) = &path {
            if let [queue] = path.exclusive_queues.as_slice() {
                return node.rabbitmqctl(&["delete_queue", queue]).map(|_| ());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no single reply queue to delete: {path:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A broker setting the soak changed, and the `rabbitmqctl` command that puts it back.
#[derive(Debug)]
struct Undo {
    what: String,
    node: Node,
    command: Vec<String>,
}

/// The settings to put back when the soak ends, however it ends: [`undo_all`] runs from the
/// drop of [`UndoOnDrop`] (a return or a panic of `run`) and from the watchdog (exit 3).
static UNDO: Mutex<Vec<Undo>> = Mutex::new(Vec::new());

impl Undo {
    /// Remembers how to put `what` back, before it is changed (a change that fails half-way
    /// is put back too).
    fn push(what: &str, node: &Node, command: &[&str]) {
        let undo = Undo {
            what: what.to_owned(),
            node: node.clone(),
            command: command.iter().map(|c| (*c).to_owned()).collect(),
        };
        UNDO.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(undo);
    }

    /// Forgets `what`: it was put back already.
    fn done(what: &str) {
        UNDO.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|u| u.what != what);
    }
}

/// Puts back every setting still changed, the latest first.
fn undo_all() {
    let undos = std::mem::take(&mut *UNDO.lock().unwrap_or_else(PoisonError::into_inner));
    for undo in undos.into_iter().rev() {
        let command: Vec<&str> = undo.command.iter().map(String::as_str).collect();
        match undo.node.rabbitmqctl(&command) {
            Ok(_) => say(&format!("soak: restored {}", undo.what)),
            Err(e) => eprintln!("soak: could not restore {}: {e}", undo.what),
        }
    }
}

/// Runs [`undo_all`] when dropped.
struct UndoOnDrop;

impl Drop for UndoOnDrop {
    fn drop(&mut self) {
        undo_all();
    }
}

/// The [`Undo`] name of the broker's `max_message_size`.
const LIMIT_SETTING: &str = "the broker's max_message_size";

/// Lowers the broker's `max_message_size` to `limit` (remembering the value to restore), and
/// checks that a new channel sees it.
fn set_broker_limit(node: &Node, limit: u64) -> Result<String, String> {
    let previous = broker_limit(node)?;
    let restore = match previous {
        Some(v) => format!("application:set_env(rabbit, max_message_size, {v})."),
        None => "application:unset_env(rabbit, max_message_size).".to_owned(),
    };
    Undo::push(LIMIT_SETTING, node, &["eval", &restore]);
    apply_broker_limit(node, limit)?;
    let checked = check_broker_limit(node, limit)?;
    Ok(format!(
        "{checked}; was {}, restored at exit",
        previous.map_or("unset".to_owned(), |v| v.to_string())
    ))
}

fn apply_broker_limit(node: &Node, limit: u64) -> Result<(), String> {
    let set = format!("application:set_env(rabbit, max_message_size, {limit}).");
    node.rabbitmqctl(&["eval", &set]).map(|_| ())
}

/// The node's `max_message_size` (`None`: unset, RabbitMQ's default applies).
fn broker_limit(node: &Node) -> Result<Option<u64>, String> {
    let out = node.rabbitmqctl(&["eval", "application:get_env(rabbit, max_message_size)."])?;
    let out = out.trim();
    if out == "undefined" {
        return Ok(None);
    }
    out.strip_prefix("{ok,")
        .and_then(|v| v.strip_suffix('}'))
        .and_then(|v| v.trim().parse().ok())
        .map(Some)
        .ok_or(format!("unexpected max_message_size: {out}"))
}

/// Checks that the node has `max_message_size` = `limit`, and that a new channel enforces it:
/// a body of `limit` bytes is taken, one of `limit + 1` closes the channel with 406.
fn check_broker_limit(node: &Node, limit: u64) -> Result<String, String> {
    let set = broker_limit(node)?;
    if set != Some(limit) {
        return Err(format!("max_message_size is {set:?}, not {limit}"));
    }
    // To no queue: unroutable, the broker drops it after its size check.
    let nowhere = unique_name("soak-size-probe");
    let size = usize::try_from(limit).map_err(|e| e.to_string())?;
    let props = BasicProperties::default();
    let at = node.publish(&nowhere, &props, &vec![b'x'; size])?;
    let above = node.publish(&nowhere, &props, &vec![b'x'; size + 1])?;
    match (&at, &above) {
        (
            Published::Acked,
            Published::ChannelClosed {
                code: ReplyCode::PRECONDITION_FAILED,
                ..
            },
        ) => Ok(format!(
            "max_message_size {limit}, in effect for new channels ({limit} bytes taken, one \
             more refused with 406)"
        )),
        _ => Err(format!(
            "max_message_size {limit} not in effect for a new channel: {limit} bytes {at:?}, \
             one more {above:?}"
        )),
    }
}

/// After a node restart: the limit is still set (set again if not).
fn recheck_broker_limit(node: &Node, limit: u64) -> Result<(), String> {
    if broker_limit(node)? != Some(limit) {
        say("soak: the node's restart reset max_message_size: setting it again");
        apply_broker_limit(node, limit)?;
    }
    check_broker_limit(node, limit).map(|_| ())
}

/// What the tasks beside the calls did ([`Beside`]).
#[derive(Debug, Default)]
struct BesideReport {
    forged_acked: u64,
    /// Forged requests not published: the node was unreachable (a fault), with why.
    forged_skipped: Vec<String>,
    windows: u64,
    windows_skipped: Vec<String>,
    failures: Vec<String>,
}

/// The tasks beside the calls: forged requests and reject-publish windows, until stopped.
struct Beside {
    stop: Arc<AtomicBool>,
    tasks: Vec<Task<BesideReport>>,
}

impl Beside {
    fn start<R: TestRuntime>(node: &Node, queue: &str, books: &Books, args: &Args) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        if args.forged_reply_every > 0 {
            let (node, queue, books, stop) =
                (node.clone(), queue.to_owned(), books.clone(), stop.clone());
            let every = Duration::from_secs(args.forged_reply_every);
            tasks.push(spawn::<R, _>(forge::<R>(node, queue, books, every, stop)));
        }
        if args.reject_publish_every > 0 {
            let (node, queue, books, stop) =
                (node.clone(), queue.to_owned(), books.clone(), stop.clone());
            let every = Duration::from_secs(args.reject_publish_every);
            tasks.push(spawn::<R, _>(reject_windows::<R>(
                node, queue, books, every, stop,
            )));
        }
        Self { stop, tasks }
    }

    /// Stops the tasks and waits for them (a window in progress is cleared first).
    async fn stop<R: TestRuntime>(self) -> BesideReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = BesideReport::default();
        for task in self.tasks {
            match timeout::<R, _>(RECOVERY_LIMIT, task.join()).await {
                Some(report) => {
                    all.forged_acked += report.forged_acked;
                    all.forged_skipped.extend(report.forged_skipped);
                    all.windows += report.windows;
                    all.windows_skipped.extend(report.windows_skipped);
                    all.failures.extend(report.failures);
                }
                None => all
                    .failures
                    .push("a task beside the calls did not stop in time".into()),
            }
        }
        all
    }
}

/// Sleeps `period` in short steps; `false` when `stop` was set meanwhile.
async fn pause<R: TestRuntime>(period: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + period;
    while !stop.load(Ordering::SeqCst) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        sleep::<R>(left.min(Duration::from_millis(200))).await;
    }
    false
}

/// Every `every`, publishes to `queue` a request whose `reply_to` is a forged direct reply-to
/// name, from a raw connection of its own. It must be taken (acked) by the broker; a node that
/// cannot be reached (a fault) skips one.
async fn forge<R: TestRuntime>(
    node: Node,
    queue: String,
    books: Books,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> BesideReport {
    let mut report = BesideReport::default();
    while pause::<R>(every, &stop).await {
        // Not while the queue refuses every request: that nack would say nothing.
        while books.rejecting() && pause::<R>(Duration::from_millis(200), &stop).await {}
        // RabbitMQ names a direct reply-to `amq.rabbitmq.reply-to.<encoded channel and key>`;
        // this suffix decodes to no channel.
        let forged = format!("amq.rabbitmq.reply-to.{}", unique_name("forged"));
        let properties = BasicProperties::default()
            .with_reply_to(ShortString::from(forged))
            .with_correlation_id(ShortString::from(unique_name("forged-call")));
        let (node, queue) = (node.clone(), queue.clone());
        match blocking(move || node.publish(&queue, &properties, b"10")).await {
            Ok(Published::Acked) => {
                books.say("a request with a forged reply_to published and taken");
                report.forged_acked += 1;
            }
            Ok(other) => report
                .failures
                .push(format!("a forged request was not taken: {other:?}")),
            Err(e) => report.forged_skipped.push(e),
        }
    }
    report
}

/// Every `every`, for [`REJECT_PUBLISH_FOR`], a policy on `queue` (`max-length` 0,
/// `overflow: reject-publish`: RabbitMQ "Queue Length Limit") has the broker nack every request.
/// A node that cannot be reached (a fault) skips a window; a policy that cannot be cleared is a
/// failure (and is cleared at exit).
async fn reject_windows<R: TestRuntime>(
    node: Node,
    queue: String,
    books: Books,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> BesideReport {
    let mut report = BesideReport::default();
    let policy = unique_name("soak-reject-publish");
    let what = format!("the policy {policy}");
    // The queue's name (`e2e-soak-<hex>`) has no regex metacharacter but `-`.
    let pattern = format!("^{queue}$");
    // The first window a third of a period early: apart from the reply consumer's cancels
    // (every 30 s by default, from the start) and the faults (offset by half a period), so that
    // the report can tell their effects apart.
    let mut period = every - every / 3;
    while pause::<R>(period, &stop).await {
        period = every;
        let from = Instant::now();
        books.rejecting.store(true, Ordering::SeqCst);
        Undo::push(&what, &node, &["clear_policy", &policy]);
        let set = {
            let (node, policy, pattern) = (node.clone(), policy.clone(), pattern.clone());
            blocking(move || {
                node.rabbitmqctl(&[
                    "set_policy",
                    &policy,
                    &pattern,
                    r#"{"max-length":0,"overflow":"reject-publish"}"#,
                    "--apply-to",
                    "queues",
                    "--priority",
                    "100",
                ])
            })
            .await
        };
        if let Err(e) = set {
            report.windows_skipped.push(e);
        } else {
            books.say("reject-publish policy set on the request queue");
            report.windows += 1;
            sleep::<R>(REJECT_PUBLISH_FOR).await;
        }
        // Cleared even when the set failed: it may have been applied all the same.
        let mut cleared = Err(String::new());
        let give_up = Instant::now() + RECOVERY_LIMIT;
        while cleared.is_err() && Instant::now() < give_up {
            let (node, policy) = (node.clone(), policy.clone());
            cleared = blocking(move || node.rabbitmqctl(&["clear_policy", &policy])).await;
            // A set that failed (the node was stopped) left nothing to clear: RabbitMQ 3.10
            // says "Parameter does not exist".
            if cleared
                .as_ref()
                .is_err_and(|e| e.contains("not found") || e.contains("does not exist"))
            {
                cleared = Ok(String::new());
            }
            if cleared.is_err() {
                sleep::<R>(Duration::from_secs(1)).await;
            }
        }
        match cleared {
            Ok(_) => {
                books.say("reject-publish policy cleared");
                Undo::done(&what);
            }
            Err(e) => report
                .failures
                .push(format!("{what} could not be cleared: {e}")),
        }
        books.window(
            from,
            Instant::now() + POLICY_LAG + BUDGET,
            Window::RejectPublish,
        );
        // The broker applies the clear asynchronously: a forged request published at once
        // could still be nacked (seen once in a 10-minute run).
        sleep::<R>(POLICY_LAG).await;
        books.rejecting.store(false, Ordering::SeqCst);
    }
    report
}

/// With `SOAK_LOG=FILE`, the driver's logs (`RUST_LOG`, `warn` when unset) go to FILE, and the
/// server processes' to FILE.server, each line stamped: what each side saw around a stray
/// error. Nothing is logged otherwise.
fn log_to_file(server: bool) {
    let Some(path) = std::env::var_os("SOAK_LOG") else {
        return;
    };
    let mut path = std::path::PathBuf::from(path);
    let mut server_path = path.clone().into_os_string();
    server_path.push(".server");
    if server {
        path = server_path.into();
    } else {
        // A new soak starts both files afresh; each server process appends to its file, so
        // that a killed server's successor logs after it.
        let _ = std::fs::remove_file(&server_path);
    }
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(server)
        .truncate(!server)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("soak: cannot write the log {}: {e}", path.display());
            return;
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init();
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    log_to_file(args.serve.is_some());
    if let Some((queue, name, uri)) = args.serve.clone() {
        // The server process never outlives the soak: it holds our stdin open.
        std::thread::spawn(|| {
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
        return match args.transport.as_str() {
            "smol" => Smol::block_on(serve::<Smol>(queue, name, uri)),
            _ => Tokio::block_on(serve::<Tokio>(queue, name, uri)),
        };
    }
    // The hard cap: whatever hangs, the soak ends (its server child with it, through stdin).
    let cap = Duration::from_secs_f64(args.minutes * 60.0) + OVERRUN;
    std::thread::spawn(move || {
        std::thread::sleep(cap);
        eprintln!("soak: still running after {cap:?}: giving up");
        undo_all();
        std::process::exit(3);
    });
    // Held to the end: no other test stops this node or changes its settings meanwhile.
    let _lease = (args.node == "second").then(node::exclusive);
    match args.transport.as_str() {
        "smol" => Smol::block_on(run::<Smol>(args)),
        _ => Tokio::block_on(run::<Tokio>(args)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_outside_every_fault_window_are_strays() {
        let strays = Strays {
            errors: vec![
                (1_000, Kind::Normal, Class::ConnectionLost),
                (5_000, Kind::Normal, Class::TimedOut),
                (5_500, Kind::Dropped, Class::ReplyPathLost),
                (9_000, Kind::UnknownExchange, Class::ConnectionLost),
            ],
            not_kept: 0,
            windows: vec![(4_000, 6_000, Window::Fault)],
        };
        let (counts, lines) = strays.outside();
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            vec![
                ((Kind::Normal, Class::ConnectionLost), 1),
                ((Kind::UnknownExchange, Class::ConnectionLost), 1),
            ]
        );
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn queue_full_is_explained_by_reject_publish_windows_only() {
        let strays = Strays {
            errors: vec![
                (1_500, Kind::Normal, Class::QueueFull),
                (1_600, Kind::Normal, Class::TimedOut),
                (5_000, Kind::OversizedReply, Class::QueueFull),
                (9_000, Kind::Normal, Class::QueueFull),
            ],
            not_kept: 0,
            windows: vec![
                (1_000, 2_000, Window::RejectPublish),
                (4_000, 6_000, Window::Fault),
            ],
        };
        let (counts, _) = strays.outside();
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            vec![
                ((Kind::Normal, Class::TimedOut), 1),
                ((Kind::Normal, Class::QueueFull), 1),
                ((Kind::OversizedReply, Class::QueueFull), 1),
            ]
        );
    }

    #[test]
    fn each_kind_gets_its_share_of_rolls() {
        let mut args = parse_from(&[] as &[&str]).expect("defaults");
        args.bad_per_mille = 3;
        args.drop_per_mille = 2;
        args.oversized_reply_per_mille = 1;
        args.oversized_request_per_mille = 4;
        let mut counts = BTreeMap::new();
        for roll in 0..1000 {
            *counts.entry(args.kind_of(roll)).or_insert(0u32) += 1;
        }
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            vec![
                (Kind::Normal, 990),
                (Kind::UnknownExchange, 1),
                (Kind::TooLarge, 2),
                (Kind::Dropped, 2),
                (Kind::OversizedReply, 1),
                (Kind::OversizedRequest, 4),
            ]
        );
    }

    #[test]
    fn broker_settings_and_their_kinds_are_checked_together() {
        let refused = |flags: &[&str]| parse_from(flags).err();
        assert!(refused(&["--oversized-reply-per-mille", "1"]).is_some());
        assert!(refused(&["--broker-max-message-size", "65536"]).is_some());
        assert!(refused(&["--node", "main", "--reject-publish-window", "30"]).is_some());
        assert!(refused(&["--node", "main", "--broker-max-message-size", "16384"]).is_some());
        assert!(refused(&[
            "--bad-per-mille",
            "500",
            "--drop-per-mille",
            "500",
            "--oversized-request-per-mille",
            "1",
            "--broker-max-message-size",
            "16384"
        ])
        .is_some());
        let args = parse_from(&[
            "--broker-max-message-size",
            "16384",
            "--oversized-reply-per-mille",
            "1",
            "--oversized-request-per-mille",
            "1",
            "--forged-reply-every",
            "30",
            "--reject-publish-window",
            "20",
        ])
        .expect("parses");
        assert_eq!(args.broker_limit(), 16384);
        assert_eq!(
            (args.forged_reply_every, args.reject_publish_every),
            (30, 20)
        );
    }

    #[test]
    fn the_handler_answers_reply_bytes_with_that_many_bytes() {
        let answer = |body: &'static [u8]| {
            Smol::block_on(soak_handler(Request {
                body: Bytes::from_static(body),
                properties: BasicProperties::default(),
                deadline: None,
            }))
        };
        assert_eq!(answer(b"reply-bytes:5").map(|b| b.len()), Ok(5));
        assert_eq!(answer(b"10").as_deref(), Ok(&b"55"[..]));
        assert!(answer(b"reply-bytes:99999999999").is_err());
        assert!(answer(b"reply-bytes:x").is_err());
    }

    #[test]
    fn only_errors_of_a_fault_class_a_kind_does_not_expect_are_noted() {
        let books = Books::new();
        books.note(Kind::Normal, Class::Ok);
        books.note(Kind::UnknownExchange, Class::Refused);
        books.note(Kind::Dropped, Class::Dropped);
        books.note(Kind::Normal, Class::TimedOut);
        let noted: Vec<_> = books.lock().errors.iter().map(|e| (e.1, e.2)).collect();
        assert_eq!(noted, vec![(Kind::Normal, Class::TimedOut)]);
    }
}
