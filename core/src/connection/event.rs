//! What a [`Connection`] reports: its events and the payloads they carry.

use bytes::Bytes;

use crate::error::{ChannelError, ConnectionError};
use crate::ids::{ChannelId, DeliveryTag, ReplyCode, RequestId};
use crate::types::BasicProperties;

#[cfg(doc)]
use super::{Connection, ConnectionConfig};

/// Something that happened on the connection. Drain them with [`Connection::poll_event`] after
/// every input or command.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The handshake finished; commands are accepted from now on.
    Connected,
    /// `channel.open-ok` arrived.
    ChannelOpened(ChannelId),
    /// A channel closed. `error.code` is 200 and `error.initiator` is `Client` after a normal
    /// [`Connection::close_channel`]; anything else is a soft error.
    ChannelClosed(ChannelError),
    /// A synchronous request finished.
    Completed {
        /// The request, as returned by the command.
        request: RequestId,
        /// The channel it ran on.
        channel: ChannelId,
        /// The server's answer.
        reply: Reply,
    },
    /// A synchronous request failed because its channel closed first.
    Failed {
        /// The request, as returned by the command.
        request: RequestId,
        /// Why its channel closed.
        error: ChannelError,
    },
    /// A message from a consumer (`basic.deliver` with its content).
    Delivery(Delivery),
    /// A mandatory publish that no queue took (`basic.return` with its content).
    Returned(Returned),
    /// The broker settled a publish on a channel in confirm mode. A `basic.ack` or `basic.nack`
    /// with `multiple` set yields one event per publish it settles.
    PublishConfirmed {
        /// The channel in confirm mode.
        channel: ChannelId,
        /// The publish sequence number [`Connection::publish`] returned.
        seq: DeliveryTag,
        /// `true` for `basic.ack`, `false` for `basic.nack` (the broker lost it).
        acked: bool,
    },
    /// The broker cancelled a consumer (its queue was deleted, or it failed over).
    ConsumerCancelled {
        /// The consumer's channel.
        channel: ChannelId,
        /// The consumer's tag.
        consumer_tag: String,
    },
    /// A delivery or return whose body exceeds [`ConnectionConfig::max_body_size`]. Its body
    /// is skipped as it arrives, never buffered; reject the delivery if it needs settling.
    ContentTooLarge {
        /// The channel it arrived on.
        channel: ChannelId,
        /// The delivery tag, for a delivery (returns have none).
        delivery_tag: Option<DeliveryTag>,
        /// The size the header announced.
        body_size: u64,
        /// The message's properties (they arrived; only the body is skipped), so that an RPC
        /// server can still answer the caller.
        properties: Box<BasicProperties>,
    },
    /// The broker asked to pause (`false`) or resume (`true`) publishing on a channel.
    Flow {
        /// The channel.
        channel: ChannelId,
        /// Whether publishing may go on.
        active: bool,
    },
    /// The broker stopped reading from this connection (a resource alarm, RabbitMQ
    /// "Blocked Connection Notifications"). Publishes will wait in the socket.
    Blocked {
        /// The broker's reason, e.g. "low on memory".
        reason: String,
    },
    /// The resource alarm cleared.
    Unblocked,
    /// The connection is closed; always the last event. [`ConnectionError::ClosedByApplication`]
    /// after [`Connection::close`].
    Closed(ConnectionError),
}

/// The answer to a synchronous request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// `basic.qos-ok`.
    QosOk,
    /// `queue.declare-ok`.
    QueueDeclared {
        /// The queue's name (server-generated when the request named none).
        queue: String,
        /// Messages ready in the queue.
        message_count: u32,
        /// Consumers on the queue.
        consumer_count: u32,
    },
    /// `exchange.declare-ok` to a passive declare: the exchange exists.
    ExchangeExists,
    /// `queue.delete-ok`.
    QueueDeleted {
        /// Messages deleted with the queue.
        message_count: u32,
    },
    /// `basic.consume-ok`.
    ConsumeOk {
        /// The consumer's tag (server-generated when the request named none).
        consumer_tag: String,
    },
    /// `basic.cancel-ok`.
    CancelOk {
        /// The cancelled consumer's tag.
        consumer_tag: String,
    },
    /// `confirm.select-ok`: publishes on the channel are now confirmed.
    ConfirmSelected,
}

/// A message delivered to a consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The channel it arrived on; acks go back on the same channel.
    pub channel: ChannelId,
    /// The consumer it is for.
    pub consumer_tag: String,
    /// Its tag, for ack/nack/reject.
    pub delivery_tag: DeliveryTag,
    /// Whether the broker delivered it before (to this or another consumer).
    pub redelivered: bool,
    /// The exchange it was published to (empty for the default exchange).
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Bytes,
}

/// A mandatory message that could not be routed.
#[derive(Debug, Clone, PartialEq)]
pub struct Returned {
    /// The channel it was published on.
    pub channel: ChannelId,
    /// Why (312 NO_ROUTE when no queue is bound).
    pub reply_code: ReplyCode,
    /// The broker's text.
    pub reply_text: String,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Bytes,
}
