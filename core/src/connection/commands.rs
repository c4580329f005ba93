//! The commands an application gives a [`Connection`]: channels, queues, consumers, publishes
//! and acknowledgements. Each checks what it can before anything is queued, so that a refused
//! command sends nothing.

use std::time::Instant;

use amq_protocol::protocol::{basic, channel as chan, confirm, exchange, queue, AMQPClass};
use amq_protocol::types::{FieldTable, ShortString};

use crate::codec;
use crate::error::{ConnectionError, UsageError};
use crate::ids::{ChannelId, DeliveryTag, ReplyCode, RequestId};
use crate::types::BasicProperties;

use super::channel::{Channel, Expect};
use super::confirms::Confirms;
use super::handshake::HandshakeStep;
use super::{Connection, Event, State};

#[cfg(doc)]
use super::{ConnectionConfig, Reply};

/// Flags of `queue.declare` (spec §1.7.2.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// Only check that the queue exists (404 on the channel when it does not).
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
    /// Used by this connection only, deleted when it closes.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
}

/// Flags of `basic.consume` (spec §1.8.3.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumeOptions {
    /// The broker considers messages acknowledged once sent.
    pub no_ack: bool,
    /// No other consumer may consume the queue.
    pub exclusive: bool,
}

impl Connection {
    /// Opens a channel. Commands may be sent on it at once (AMQP pipelines them behind
    /// `channel.open`); [`Event::ChannelOpened`] follows.
    pub fn open_channel(&mut self) -> Result<ChannelId, UsageError> {
        self.check_open()?;
        let max = self.tune.channel_max.max(1);
        // Numbers go round rather than reusing the lowest free one, so that a late frame for a
        // channel that just closed cannot land on its successor.
        for _ in 0..max {
            self.next_channel = if self.next_channel >= max {
                1
            } else {
                self.next_channel + 1
            };
            let id = ChannelId(self.next_channel);
            if !self.channels.contains_key(&id) {
                self.send_method(
                    id,
                    AMQPClass::Channel(chan::AMQPMethod::Open(chan::Open {})),
                )?;
                self.channels.insert(id, Channel::new(id));
                return Ok(id);
            }
        }
        Err(UsageError::NoFreeChannel)
    }

    /// Closes a channel normally (reply code 200). [`Event::ChannelClosed`] follows.
    pub fn close_channel(&mut self, channel: ChannelId) -> Result<(), UsageError> {
        self.channel_for_command(channel)?;
        let close = chan::Close {
            reply_code: ReplyCode::REPLY_SUCCESS.0,
            reply_text: ShortString::from("bye"),
            class_id: 0,
            method_id: 0,
        };
        self.send_method(channel, AMQPClass::Channel(chan::AMQPMethod::Close(close)))?;
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.start_close();
        }
        Ok(())
    }

    /// Sets the consumer prefetch window of `channel` (spec §1.8.3.1; RabbitMQ applies it per
    /// consumer unless `global`).
    pub fn qos(
        &mut self,
        channel: ChannelId,
        prefetch_count: u16,
        global: bool,
    ) -> Result<RequestId, UsageError> {
        let method = basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count,
            global,
        });
        self.request(channel, AMQPClass::Basic(method), Expect::QosOk)
    }

    /// Declares a queue; an empty `name` asks the server for one. Replies
    /// [`Reply::QueueDeclared`] with the message and consumer counts.
    pub fn declare_queue(
        &mut self,
        channel: ChannelId,
        name: &str,
        options: QueueOptions,
        arguments: FieldTable,
    ) -> Result<RequestId, UsageError> {
        let method = queue::AMQPMethod::Declare(queue::Declare {
            queue: short("queue name", name)?,
            passive: options.passive,
            durable: options.durable,
            exclusive: options.exclusive,
            auto_delete: options.auto_delete,
            nowait: false,
            arguments,
        });
        self.request(channel, AMQPClass::Queue(method), Expect::DeclareOk)
    }

    /// Asks whether an exchange exists (a passive `exchange.declare`, spec §1.5.2.1 `passive`).
    /// Replies [`Reply::ExchangeExists`]; a missing exchange closes the channel with 404
    /// NOT_FOUND, reported as [`Event::Failed`] and [`Event::ChannelClosed`].
    pub fn check_exchange(
        &mut self,
        channel: ChannelId,
        name: &str,
    ) -> Result<RequestId, UsageError> {
        let method = exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: short("exchange name", name)?,
            // Ignored by a passive declare; "direct" is the type every broker knows.
            kind: ShortString::from("direct"),
            passive: true,
            durable: false,
            auto_delete: false,
            internal: false,
            nowait: false,
            arguments: FieldTable::default(),
        });
        self.request(
            channel,
            AMQPClass::Exchange(method),
            Expect::ExchangeDeclareOk,
        )
    }

    /// Deletes a queue. Replies [`Reply::QueueDeleted`].
    pub fn delete_queue(
        &mut self,
        channel: ChannelId,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<RequestId, UsageError> {
        let method = queue::AMQPMethod::Delete(queue::Delete {
            queue: short("queue name", name)?,
            if_unused,
            if_empty,
            nowait: false,
        });
        self.request(channel, AMQPClass::Queue(method), Expect::DeleteOk)
    }

    /// Starts a consumer; an empty `consumer_tag` asks the server for one. Replies
    /// [`Reply::ConsumeOk`]; deliveries follow as [`Event::Delivery`].
    pub fn consume(
        &mut self,
        channel: ChannelId,
        queue: &str,
        consumer_tag: &str,
        options: ConsumeOptions,
        arguments: FieldTable,
    ) -> Result<RequestId, UsageError> {
        let method = basic::AMQPMethod::Consume(basic::Consume {
            queue: short("queue name", queue)?,
            consumer_tag: short("consumer tag", consumer_tag)?,
            no_local: false,
            no_ack: options.no_ack,
            exclusive: options.exclusive,
            nowait: false,
            arguments,
        });
        self.request(channel, AMQPClass::Basic(method), Expect::ConsumeOk)
    }

    /// Cancels a consumer. Replies [`Reply::CancelOk`]; deliveries already sent still arrive.
    pub fn cancel(
        &mut self,
        channel: ChannelId,
        consumer_tag: &str,
    ) -> Result<RequestId, UsageError> {
        let method = basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: short("consumer tag", consumer_tag)?,
            nowait: false,
        });
        self.request(channel, AMQPClass::Basic(method), Expect::CancelOk)
    }

    /// Puts `channel` in confirm mode (RabbitMQ "Publisher Confirms"). Publishes sent after this
    /// call are numbered from 1 and settled by [`Event::PublishConfirmed`].
    pub fn confirm_select(&mut self, channel: ChannelId) -> Result<RequestId, UsageError> {
        let method = confirm::AMQPMethod::Select(confirm::Select { nowait: false });
        let request = self.request(channel, AMQPClass::Confirm(method), Expect::SelectOk)?;
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.confirms.get_or_insert_with(Confirms::default);
        }
        Ok(request)
    }

    /// Publishes a message: method, header and body frames (split at frame_max − 8) go out
    /// together. On a channel in confirm mode, returns the publish's sequence number.
    pub fn publish(
        &mut self,
        channel: ChannelId,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Result<Option<DeliveryTag>, UsageError> {
        self.channel_for_command(channel)?;
        let size = u64::try_from(body.len()).unwrap_or(u64::MAX);
        if size > self.config.max_message_size {
            return Err(UsageError::MessageTooLarge {
                size,
                limit: self.config.max_message_size,
            });
        }
        let method = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: short("exchange", exchange)?,
            routing_key: short("routing key", routing_key)?,
            mandatory,
            immediate: false,
        }));
        let start = self.outbound.len();
        let frame_max = self.tune.frame_max;
        codec::encode_method(channel, &method, frame_max, &mut self.outbound)
            .and_then(|()| {
                codec::encode_content(channel, properties, body, frame_max, &mut self.outbound)
            })
            .map_err(|_| {
                self.outbound.truncate(start);
                UsageError::FrameTooLarge
            })?;
        Ok(self
            .channels
            .get_mut(&channel)
            .and_then(|ch| ch.confirms.as_mut())
            .map(Confirms::next))
    }

    /// Acknowledges a delivery (or every unacknowledged one up to it, with `multiple`).
    pub fn ack(
        &mut self,
        channel: ChannelId,
        delivery_tag: DeliveryTag,
        multiple: bool,
    ) -> Result<(), UsageError> {
        let method = basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: delivery_tag.0,
            multiple,
        });
        self.async_command(channel, AMQPClass::Basic(method))
    }

    /// Negatively acknowledges a delivery, requeueing it or not (RabbitMQ extension).
    pub fn nack(
        &mut self,
        channel: ChannelId,
        delivery_tag: DeliveryTag,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), UsageError> {
        let method = basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: delivery_tag.0,
            multiple,
            requeue,
        });
        self.async_command(channel, AMQPClass::Basic(method))
    }

    /// Rejects one delivery, requeueing it or not.
    pub fn reject(
        &mut self,
        channel: ChannelId,
        delivery_tag: DeliveryTag,
        requeue: bool,
    ) -> Result<(), UsageError> {
        let method = basic::AMQPMethod::Reject(basic::Reject {
            delivery_tag: delivery_tag.0,
            requeue,
        });
        self.async_command(channel, AMQPClass::Basic(method))
    }

    /// Starts a clean close (reply code 200). [`Event::Closed`] with
    /// [`ConnectionError::ClosedByApplication`] follows once the server answers, or after
    /// [`ConnectionConfig::close_timeout`].
    pub fn close(&mut self, now: Instant) -> Result<(), UsageError> {
        match self.state {
            State::Closed => {
                return Err(UsageError::ConnectionClosed(
                    self.error
                        .clone()
                        .unwrap_or(ConnectionError::ClosedByApplication),
                ))
            }
            State::Closing { .. } => return Err(UsageError::Closing),
            // Before `connection.start` nothing can be said: just stop.
            State::Handshake(HandshakeStep::AwaitStart) => {
                self.error = Some(ConnectionError::ClosedByApplication);
                self.channels.clear();
                self.enter_closed();
                self.events
                    .push_back(Event::Closed(ConnectionError::ClosedByApplication));
                return Ok(());
            }
            State::Handshake(_) | State::Open => {}
        }
        self.error = Some(ConnectionError::ClosedByApplication);
        self.send_connection_close(
            now,
            ReplyCode::REPLY_SUCCESS,
            "closed by application",
            false,
        );
        Ok(())
    }

    fn check_open(&self) -> Result<(), UsageError> {
        match self.state {
            State::Open => Ok(()),
            State::Handshake(_) => Err(UsageError::NotConnected),
            State::Closing { .. } | State::Closed => Err(match &self.error {
                Some(e)
                    if *e != ConnectionError::ClosedByApplication
                        || self.state == State::Closed =>
                {
                    UsageError::ConnectionClosed(e.clone())
                }
                _ => UsageError::Closing,
            }),
        }
    }

    fn channel_for_command(&self, channel: ChannelId) -> Result<(), UsageError> {
        self.check_open()?;
        if self.is_channel_usable(channel) {
            Ok(())
        } else {
            Err(UsageError::ChannelNotOpen(channel))
        }
    }

    /// Sends a synchronous method and queues its expected reply.
    fn request(
        &mut self,
        channel: ChannelId,
        method: AMQPClass,
        expect: fn(RequestId) -> Expect,
    ) -> Result<RequestId, UsageError> {
        self.channel_for_command(channel)?;
        self.send_method(channel, method)?;
        self.next_request += 1;
        let request = RequestId(self.next_request);
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.expect(expect(request));
        }
        Ok(request)
    }

    fn async_command(&mut self, channel: ChannelId, method: AMQPClass) -> Result<(), UsageError> {
        self.channel_for_command(channel)?;
        self.send_method(channel, method)
    }
}

/// A short-string field from the application: at most 255 bytes (spec §4.2.5.3).
fn short(field: &'static str, value: &str) -> Result<ShortString, UsageError> {
    ShortString::try_new(value).map_err(|_| UsageError::NameTooLong {
        field,
        len: value.len(),
    })
}
