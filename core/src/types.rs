//! The protocol types of this crate's API that come from the `amq-protocol` crate: message
//! properties and field tables. This is the one place they are re-exported; use them from here.
//!
//! The workspace pins `amq-protocol` to an exact version (`=10.6.3`): since these types are part
//! of our public API, a semver-breaking release of theirs is one of ours, and upgrading it is a
//! deliberate change with its own entry in the changelog, never a side effect of
//! `cargo update`.

pub use amq_protocol::protocol::BasicProperties;
pub use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
