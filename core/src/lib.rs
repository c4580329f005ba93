//! Sans-IO AMQP 0-9-1 client and RPC machines.
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod codec;
pub mod connection;
pub mod error;
pub mod ids;
pub mod machine;
pub mod rpc;
mod timers;

pub use connection::{
    BasicProperties, Connection, ConnectionConfig, ConsumeOptions, Credentials, Delivery, Event,
    QueueOptions, Reply, Returned, SaslMechanism, Tune,
};
pub use error::{ChannelError, ConnectionError, FrameError, Initiator, RpcError, UsageError};
pub use ids::{ChannelId, DeliveryTag, ReplyCode, RequestId};
pub use machine::Machine;

/// Re-exported protocol types that appear in this crate's API.
pub mod types {
    pub use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
}
