//! The 3-node RabbitMQ cluster of the cluster suite (`scripts/cluster.sh`): nodes
//! `rabbit-c1@localhost`, `rabbit-c2@localhost`, `rabbit-c3@localhost` on ports 5681–5683.
//!
//! [`exclusive`] starts it once per process (about a minute from nothing; at once when it is
//! already up) and serializes the tests that use it: a test kills nodes, and no other may run
//! beside it. A watchdog stops the cluster when the process exits, if this process started it
//! (`E2E_KEEP_CLUSTER=1` leaves it running for the next run). [`Killed`] kills a node with
//! `kill -9` and starts it again when dropped, so that a failed test leaves the cluster whole.

use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use amqp_rpc_driver::Addresses;

use crate::broker::Node;

/// How many nodes the cluster has.
pub const SIZE: usize = 3;

/// Serializes starting and stopping across processes.
const LOCK_FILE: &str = "/tmp/rabbit-cluster.lock";

/// `scripts/cluster.sh`.
pub fn script() -> String {
    format!("{}/../scripts/cluster.sh", env!("CARGO_MANIFEST_DIR"))
}

/// The short name of node `i` (0-based): `c1`, `c2`, `c3`.
pub fn short(i: usize) -> String {
    format!("c{}", i + 1)
}

/// The Erlang name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("rabbit-c{}@localhost", i + 1)
}

/// The AMQP URI of node `i`.
pub fn uri(i: usize) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5681 + i)
}

/// Node `i`, for administration (`rabbitmqctl -n`, declares, queue status).
pub fn node(i: usize) -> Node {
    Node::new(uri(i), node_name(i))
}

/// Every node's address, node `first` first and then the others in turn, in that order (not
/// shuffled): a test decides where each client and server connects and where it goes next.
pub fn addresses_from(first: usize) -> Addresses {
    let uris: Vec<String> = (0..SIZE).map(|k| uri((first + k) % SIZE)).collect();
    Addresses::from_uris(&uris)
        .expect("cluster URIs parse")
        .in_given_order()
}

/// Runs `scripts/cluster.sh args…` under the lock; its output, or an error with it.
pub fn run_script(args: &[&str]) -> Result<String, String> {
    let script = script();
    let mut all = vec!["-o", LOCK_FILE, "bash", script.as_str()];
    all.extend_from_slice(args);
    let output = Command::new("flock")
        .args(&all)
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(said)
    } else {
        Err(format!("cluster.sh {}: {said}", args.join(" ")))
    }
}

/// Starts the cluster on first use (the script's own waits are bounded). Panics with the
/// script's output when it cannot.
fn cluster() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let started = Instant::now();
        let said = run_script(&["start"]).unwrap_or_else(|e| panic!("{e}"));
        if !said.contains("already up") {
            eprintln!("e2e: started the cluster in {:.1?}", started.elapsed());
            crate::process::stop_at_exit("the cluster", &script(), LOCK_FILE, "E2E_KEEP_CLUSTER");
        }
    });
}

/// Exclusive use of the cluster for one test, started if needed. Take it in the `#[test]`
/// function, before the test's runtime starts (it blocks).
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test restores the cluster in its own clean-up ([`Killed`] drops), so a poisoned
    // lock is still usable.
    let guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    cluster();
    guard
}

/// The node (0-based) each connection named in `names` is on, as node `via` (which must be
/// running) lists them: from the node part of the connection's Erlang pid
/// (`<rabbit-c2@localhost.1.2.3>`). One `rabbitmqctl` call (about 2 s on this machine).
/// Blocking.
pub fn connection_nodes(via: usize, names: &[String]) -> Result<Vec<Option<usize>>, String> {
    let listing = node(via).rabbitmqctl(&[
        "-q",
        "list_connections",
        "--no-table-headers",
        "pid",
        "client_properties",
    ])?;
    Ok(names
        .iter()
        .map(|name| {
            // rabbitmqctl prints the property as `{"connection_name","<name>"}`.
            let needle = format!("{{\"connection_name\",\"{name}\"}}");
            listing
                .lines()
                .find(|line| line.contains(&needle))
                .and_then(|line| line.split_whitespace().next())
                .and_then(node_in)
        })
        .collect())
}

/// The quorum queue `queue`'s leader (0-based), as node `via` (running) sees it. Blocking.
pub fn leader_of(via: usize, queue: &str) -> Result<Option<usize>, String> {
    let listing =
        node(via).rabbitmqctl(&["-q", "list_queues", "--no-table-headers", "name", "leader"])?;
    Ok(listing.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(queue))
            .then(|| fields.next().and_then(node_in))
            .flatten()
    }))
}

/// Which node's name `text` mentions.
fn node_in(text: &str) -> Option<usize> {
    (0..SIZE).find(|&i| text.contains(&node_name(i)))
}

/// A node killed with `kill -9` (no clean shutdown: its connections drop, its queue replicas
/// vanish). Started again, and back as a running member, by [`Killed::restart`] or on drop.
#[derive(Debug)]
pub struct Killed {
    node: usize,
    down: bool,
}

impl Killed {
    /// Kills node `i` (blocking; about a second).
    pub fn kill(i: usize) -> Result<Self, String> {
        // Armed before the kill: if the script fails half-way, the drop starts the node.
        let guard = Self {
            node: i,
            down: true,
        };
        run_script(&["kill", &short(i)])?;
        Ok(guard)
    }

    /// The node killed.
    pub fn node(&self) -> usize {
        self.node
    }

    /// Starts the node again and waits until all three nodes are running members (blocking;
    /// about 20 s; the script bounds it).
    pub fn restart(mut self) -> Result<(), String> {
        self.down = false;
        run_script(&["start", &short(self.node)]).map(|_| ())
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if self.down {
            if let Err(e) = run_script(&["start", &short(self.node)]) {
                eprintln!("e2e: could not start {} again: {e}", node_name(self.node));
            }
        }
    }
}
