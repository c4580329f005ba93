//! End-to-end test support: everything the suites in `tests/tests/` share.
//!
//! - [`rt`]: the [`rt::TestRuntime`] trait that lets one generic test case run on tokio and on
//!   smol, runtime-neutral timers and tasks, and the [`e2e_tests!`] macro that emits one
//!   `#[test]` per case per transport;
//! - [`broker`]: unique queue names, queue cleanup, a blocking admin connection (declare, delete,
//!   count consumers) and `rabbitmqctl`;
//! - [`calls`]: connecting clients and making calls with bounds and checks;
//! - [`servers`]: in-process RPC servers with test handlers (slow, counting);
//! - [`process`]: child processes (our `e2e-server` bin, the tutorial's pika programs) that are
//!   killed when their guard drops;
//! - [`proxy`]: a fault-injecting TCP proxy, and [`faults`] to run it beside any runtime;
//! - [`ledger`]: the fault suite's "nothing lost" checker and the load that feeds it;
//! - [`cluster`]: the 3-node cluster of `scripts/cluster.sh`, killing and restarting its nodes;
//! - [`memory`]: RSS sampled over time, and growth checks that can fail;
//! - [`node`]: the second RabbitMQ node for faults that would disturb other tests (stopping
//!   the broker, memory alarms);
//! - [`states`]: recording a client's connection state changes;
//! - [`rig`]: a queue, server, client, ledger and state log for one fault case.

pub mod broker;
pub mod calls;
pub mod cluster;
pub mod faults;
pub mod ledger;
pub mod memory;
pub mod node;
pub mod process;
pub mod proxy;
pub mod rig;
pub mod rt;
pub mod servers;
pub mod states;

pub use rt::{Smol, TestRuntime, Tokio};
