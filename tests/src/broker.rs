//! The broker side of the tests: where it is, unique names, and administration (declare, delete,
//! consumer counts, closing a connection) with a plain blocking AMQP connection or `rabbitmqctl`.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::Command;
use std::time::{Duration, Instant};

use amqp_rpc_core::rpc::QueueKind;
use amqp_rpc_core::types::{AMQPValue, BasicProperties, FieldTable, LongString, ShortString};
use amqp_rpc_core::{
    ChannelId, Connection, ConnectionError, Event, QueueOptions, Reply, ReplyCode, RequestId,
    UsageError,
};
use amqp_rpc_driver::{ConnectOptions, DEFAULT_URI};

/// The broker the tests use: `AMQP_URL`, else the local default (guest on 127.0.0.1:5672).
pub fn uri() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_URI.to_owned())
}

/// `uri()` with `password` instead of the right one.
pub fn uri_with_password(password: &str) -> String {
    let options = ConnectOptions::from_uri(&uri()).expect("AMQP_URL does not parse");
    format!(
        "amqp://{}:{password}@{}:{}/{}",
        options.connection.credentials.username(),
        options.host,
        options.port,
        percent_encode(&options.connection.vhost)
    )
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A RabbitMQ node the tests talk to: its AMQP URI, and its Erlang node name for `rabbitmqctl`
/// (`None`: `rabbitmqctl`'s default node, the main broker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    uri: String,
    name: Option<String>,
}

impl Node {
    /// The main test broker: [`uri`], administered with plain `rabbitmqctl`.
    pub fn main() -> Self {
        Self {
            uri: uri(),
            name: None,
        }
    }

    /// The node at `uri` whose Erlang node name is `name` (`rabbitmqctl -n name`).
    pub fn new(uri: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            name: Some(name.into()),
        }
    }

    /// Its AMQP URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Its Erlang node name, when it is not `rabbitmqctl`'s default.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Runs `rabbitmqctl [-n name] args…` against this node (at most 30 s).
    pub fn rabbitmqctl(&self, args: &[&str]) -> Result<String, String> {
        let mut all: Vec<&str> = Vec::with_capacity(args.len() + 2);
        if let Some(name) = &self.name {
            all.extend(["-n", name.as_str()]);
        }
        all.extend_from_slice(args);
        rabbitmqctl(&all)
    }

    /// Declares `name` on this node (see [`declare_queue`]).
    pub fn declare_queue(&self, name: &str, kind: QueueKind) -> Result<(), String> {
        declare_queue_at(&self.uri, name, kind)
    }

    /// Deletes `name` on this node (a missing queue is fine).
    pub fn delete_queue(&self, name: &str) -> Result<(), String> {
        admin_request(&self.uri, |conn, ch| {
            conn.delete_queue(ch, name, false, false)
        })?
        .map(|_| ())
        .map_err(|e| format!("deleting {name}: {e}"))
    }

    /// Messages ready and consumers of `name` on this node, or `None` when it does not exist.
    pub fn queue_status(&self, name: &str) -> Result<Option<QueueStatus>, String> {
        let mut passive = QueueOptions::default();
        passive.passive = true;
        let reply = admin_request(&self.uri, |conn, ch| {
            conn.declare_queue(ch, name, passive, FieldTable::default())
        })?;
        match reply {
            Ok(Reply::QueueDeclared {
                message_count,
                consumer_count,
                ..
            }) => Ok(Some(QueueStatus {
                messages: message_count,
                consumers: consumer_count,
            })),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) if e.contains("404") || e.contains("NOT_FOUND") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Publishes one message to the default exchange with `routing_key`, from a connection of
    /// its own, on a channel in confirm mode, and says how the broker settled it: a raw publish,
    /// with any properties (e.g. a forged `reply_to`) and any size up to the URI's
    /// `max_message_size` (e.g. above the broker's own limit).
    pub fn publish(
        &self,
        routing_key: &str,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Result<Published, String> {
        drive(
            &self.uri,
            |conn, ch| {
                conn.confirm_select(ch)?;
                conn.publish(ch, "", routing_key, false, properties, body)
            },
            |seq, event| match event {
                Event::PublishConfirmed {
                    seq: settled,
                    acked,
                    ..
                } if Some(*settled) == *seq => Some(if *acked {
                    Published::Acked
                } else {
                    Published::Nacked
                }),
                Event::ChannelClosed(error) => Some(Published::ChannelClosed {
                    code: error.code,
                    text: error.text.clone(),
                }),
                _ => None,
            },
        )
    }

    /// Erlang pids of this node's connections named `name` (see [`connection_pids`]).
    pub fn connection_pids(&self, name: &str) -> Result<Vec<String>, String> {
        let listing = self.rabbitmqctl(&[
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])?;
        // rabbitmqctl prints the property as `{"connection_name","<name>"}`.
        let needle = format!("{{\"connection_name\",\"{name}\"}}");
        Ok(listing
            .lines()
            .filter(|line| line.contains(&needle))
            .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
            .collect())
    }

    /// The channels of the connections named `name`: each channel's number and its consumer
    /// count, in number order.
    pub fn channels_of(&self, name: &str) -> Result<Vec<(u16, u32)>, String> {
        let pids = self.connection_pids(name)?;
        let listing = self.rabbitmqctl(&[
            "-q",
            "list_channels",
            "--no-table-headers",
            "connection",
            "number",
            "consumer_count",
        ])?;
        let mut channels: Vec<(u16, u32)> = listing
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let pid = fields.next()?;
                let number = fields.next()?.parse().ok()?;
                let consumers = fields.next()?.parse().ok()?;
                pids.iter().any(|p| p == pid).then_some((number, consumers))
            })
            .collect();
        channels.sort_unstable();
        Ok(channels)
    }

    /// Has this node close the connections named `name` (see [`close_connection_named`]).
    pub fn close_connection_named(&self, name: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let pids = loop {
            let pids = self.connection_pids(name)?;
            if !pids.is_empty() {
                break pids;
            }
            if Instant::now() >= deadline {
                return Err(format!("no connection named {name}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        for pid in pids {
            self.rabbitmqctl(&["close_connection", &pid, "closed by the e2e test"])?;
        }
        Ok(())
    }

    /// The exclusive queues owned by the connection named `connection` (its reply queue in
    /// [`amqp_rpc_driver::ReplyMode::ExclusiveQueue`]), and the queues its channels consume:
    /// what the broker says about a client's reply path. Asks `rabbitmqctl` (list_connections,
    /// list_queues, list_channels, list_consumers). A direct reply-to consumer appears in none
    /// of these listings on RabbitMQ 3.10: it is a channel-level pseudo-consumer, not a queue
    /// consumer (<https://www.rabbitmq.com/direct-reply-to.html>).
    pub fn reply_path_of(&self, connection: &str) -> Result<ReplyPath, String> {
        let pids = self.connection_pids(connection)?;
        let [pid] = pids.as_slice() else {
            return Err(format!(
                "expected one connection named {connection}, found {}",
                pids.len()
            ));
        };
        // `owner_pid` of an exclusive queue is its owning connection's pid.
        let queues = self.rabbitmqctl(&[
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "exclusive",
            "owner_pid",
        ])?;
        let exclusive_queues = queues
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
                match fields.as_slice() {
                    [name, "true", owner] if owner == pid => Some((*name).to_owned()),
                    _ => None,
                }
            })
            .collect();
        let channels = self.rabbitmqctl(&[
            "-q",
            "list_channels",
            "--no-table-headers",
            "pid",
            "connection",
        ])?;
        let ours: Vec<&str> = channels
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
                match fields.as_slice() {
                    [channel, conn] if conn == pid => Some(*channel),
                    _ => None,
                }
            })
            .collect();
        let consumers = self.rabbitmqctl(&[
            "-q",
            "list_consumers",
            "--no-table-headers",
            "queue_name",
            "channel_pid",
        ])?;
        let consumed_queues = consumers
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
                match fields.as_slice() {
                    [queue, channel] if ours.contains(channel) => Some((*queue).to_owned()),
                    _ => None,
                }
            })
            .collect();
        Ok(ReplyPath {
            exclusive_queues,
            consumed_queues,
        })
    }

    /// The prefetch count of each consumer of `queue` (`rabbitmqctl list_consumers`).
    pub fn consumer_prefetch(&self, queue: &str) -> Result<Vec<u32>, String> {
        let listing = self.rabbitmqctl(&[
            "-q",
            "list_consumers",
            "--no-table-headers",
            "queue_name",
            "prefetch_count",
        ])?;
        Ok(listing
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(queue))
                    .then(|| fields.next().and_then(|p| p.parse().ok()))
                    .flatten()
            })
            .collect())
    }
}

/// What the broker lists for one connection's reply path (see [`Node::reply_path_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyPath {
    /// The exclusive queues the connection owns.
    pub exclusive_queues: Vec<String>,
    /// The queues the connection's channels consume (one entry per consumer).
    pub consumed_queues: Vec<String>,
}

/// How the broker settled a [`Node::publish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// `basic.ack`: the broker took it (routed, or dropped as unroutable).
    Acked,
    /// `basic.nack`: the broker refused it (e.g. a queue's `overflow: reject-publish`).
    Nacked,
    /// The broker closed the channel instead (e.g. 406 above its `max_message_size`).
    ChannelClosed {
        /// The `channel.close` reply code.
        code: ReplyCode,
        /// Its reply text.
        text: String,
    },
}

/// A name no other test uses, e.g. `e2e-round_trip-tokio-1f0c…`.
pub fn unique_name(what: &str) -> String {
    format!("e2e-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// A queue name that deletes its queue when dropped (after the test's servers stopped, so that
/// none declares it again).
#[derive(Debug)]
pub struct QueueGuard {
    name: String,
    node: Node,
}

impl QueueGuard {
    /// A fresh unique queue name on the main broker; nothing is declared.
    pub fn new(what: &str) -> Self {
        Self::on(&Node::main(), what)
    }

    /// A fresh unique queue name on `node`; nothing is declared.
    pub fn on(node: &Node, what: &str) -> Self {
        Self {
            name: unique_name(what),
            node: node.clone(),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        if let Err(e) = self.node.delete_queue(&self.name) {
            eprintln!("e2e: could not delete queue {}: {e}", self.name);
        }
    }
}

/// What a passive declare says about a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStatus {
    /// Messages ready.
    pub messages: u32,
    /// Consumers.
    pub consumers: u32,
}

/// Declares `name` the way a tutorial version does: a non-durable classic queue, or a durable
/// quorum queue.
pub fn declare_queue(name: &str, kind: QueueKind) -> Result<(), String> {
    declare_queue_at(&uri(), name, kind)
}

fn declare_queue_at(uri: &str, name: &str, kind: QueueKind) -> Result<(), String> {
    let (options, arguments) = match kind {
        QueueKind::Quorum => {
            let mut args = FieldTable::default();
            args.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString(LongString::from("quorum")),
            );
            (
                {
                    let mut c = QueueOptions::default();
                    c.durable = true;
                    c
                },
                args,
            )
        }
        QueueKind::Classic => (QueueOptions::default(), FieldTable::default()),
    };
    admin_request(uri, |conn, ch| {
        conn.declare_queue(ch, name, options, arguments)
    })?
    .map(|_| ())
    .map_err(|e| format!("declaring {name}: {e}"))
}

/// Deletes `name` (a missing queue is fine).
pub fn delete_queue(name: &str) -> Result<(), String> {
    Node::main().delete_queue(name)
}

/// Messages and consumers of `name`, or `None` when it does not exist.
pub fn queue_status(name: &str) -> Result<Option<QueueStatus>, String> {
    Node::main().queue_status(name)
}

/// Connects, opens a channel, runs one synchronous request and closes (see [`drive`]). The
/// outer error is a connection failure, the inner one the request's (its channel closed).
fn admin_request(
    uri: &str,
    command: impl FnOnce(&mut Connection, ChannelId) -> Result<RequestId, UsageError>,
) -> Result<Result<Reply, String>, String> {
    drive(uri, command, |request, event| match event {
        Event::Completed {
            request: r, reply, ..
        } if r == request => Some(Ok(reply.clone())),
        Event::Failed { request: r, error } if r == request => Some(Err(error.to_string())),
        _ => None,
    })
}

/// A blocking driver of the core's [`Connection`] over a `std` socket, within 10 seconds in
/// all: connects, opens a channel, runs `start` on it, then hands every later event to `settle`
/// with what `start` returned until `settle` gives the outcome, and closes. Fails when the
/// connection fails or closes before an outcome.
fn drive<S, T>(
    uri: &str,
    start: impl FnOnce(&mut Connection, ChannelId) -> Result<S, UsageError>,
    mut settle: impl FnMut(&S, &Event) -> Option<T>,
) -> Result<T, String> {
    const LIMIT: Duration = Duration::from_secs(10);
    let options = ConnectOptions::from_uri(uri).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + LIMIT;
    let address = (options.host.as_str(), options.port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("broker address does not resolve")?;
    let mut stream = TcpStream::connect_timeout(&address, LIMIT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut conn = Connection::new(options.connection, Instant::now());
    let mut start = Some(start);
    let mut started: Option<S> = None;
    let mut result: Option<T> = None;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        out.clear();
        conn.poll_transmit(now, &mut out);
        stream.write_all(&out).map_err(|e| e.to_string())?;
        while let Some(event) = conn.poll_event() {
            match (&event, &started) {
                (Event::Closed(error), _) => return result.ok_or_else(|| error.to_string()),
                (Event::Connected, _) => {
                    let run = start.take().ok_or("connected twice")?;
                    let channel = conn.open_channel().map_err(|e| e.to_string())?;
                    started = Some(run(&mut conn, channel).map_err(|e| e.to_string())?);
                }
                (_, Some(started)) if result.is_none() => {
                    result = settle(started, &event);
                    if result.is_some() {
                        let _ = conn.close(now);
                    }
                }
                _ => {}
            }
        }
        if conn.is_closed() {
            return result.ok_or_else(|| {
                conn.error()
                    .cloned()
                    .unwrap_or(ConnectionError::ConnectionLost)
                    .to_string()
            });
        }
        if Instant::now() >= deadline {
            return Err(format!("admin connection took more than {LIMIT:?}"));
        }
        // Write what the events produced before reading again.
        out.clear();
        if conn.poll_transmit(Instant::now(), &mut out) > 0 {
            stream.write_all(&out).map_err(|e| e.to_string())?;
        }
        match stream.read(&mut buf) {
            Ok(0) => conn.handle_eof(Instant::now()),
            Ok(n) => conn.handle_input(Instant::now(), &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                conn.handle_timeout(Instant::now())
            }
            Err(_) => conn.handle_eof(Instant::now()),
        }
    }
}

/// Runs `rabbitmqctl args…` (at most 30 s): its stdout, or an error with its stderr.
pub fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let output = Command::new("timeout")
        .arg("30")
        .arg("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Erlang pids of the connections whose client properties carry `connection_name` = `name`
/// (set through [`amqp_rpc_core::ConnectionConfig::connection_name`]).
pub fn connection_pids(name: &str) -> Result<Vec<String>, String> {
    Node::main().connection_pids(name)
}

/// Has the broker close the connection named `name` (as an operator would with
/// `rabbitmqctl close_connection`). Fails when no such connection is found within 5 s.
pub fn close_connection_named(name: &str) -> Result<(), String> {
    Node::main().close_connection_named(name)
}
