//! Sans-IO AMQP 0-9-1 client and RPC machines.
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

// The frame codec is internal. It stays reachable, hidden from the docs, only because the sim
// crate's fuzz targets and the codec property tests (core/tests) drive it directly; it is not
// part of the API and may change in any release.
#[doc(hidden)]
pub mod codec;
pub mod connection;
pub mod error;
pub mod ids;
pub mod machine;
pub mod rpc;
mod timers;
pub mod types;

pub use connection::{
    Connection, ConnectionConfig, ConsumeOptions, Credentials, Delivery, Event, QueueOptions,
    Reply, Returned, SaslMechanism, Tune,
};
pub use error::{
    ChannelError, ConnectionError, FrameError, HandshakeStage, Initiator, RpcError, UsageError,
};
pub use ids::{ChannelId, DeliveryTag, ReplyCode, RequestId};
pub use machine::Machine;
