//! The second RabbitMQ node (`rabbit-fault@localhost` on port 5673, `scripts/second-node.sh`)
//! for faults that would disturb every other test on the main broker: `stop_app`/`start_app`
//! and memory alarms.
//!
//! [`second_node`] starts it once per process (about 12 s) unless it is already up, and leaves a
//! watchdog behind that stops it when the process exits, however it exits, if this process
//! started it. [`exclusive`] serializes the tests that use it: a test that stops the node or
//! raises an alarm must not run beside another one on the same node.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::broker::Node;

/// The second node's Erlang name.
pub const NODE_NAME: &str = "rabbit-fault@localhost";
/// Its AMQP port (`RABBIT_FAULT_PORT` of the script).
pub const PORT: u16 = 5673;
/// Its AMQP URI.
pub const URI: &str = "amqp://guest:guest@127.0.0.1:5673/%2f";

/// Serializes starting and stopping across processes (a test binary whose watchdog is still
/// stopping the node, and the next one starting it).
const LOCK_FILE: &str = "/tmp/rabbit-fault.lock";

/// `scripts/second-node.sh`.
pub fn script() -> String {
    format!("{}/../scripts/second-node.sh", env!("CARGO_MANIFEST_DIR"))
}

/// Whether something answers on the second node's AMQP port.
pub fn is_up() -> bool {
    let address = SocketAddr::from(([127, 0, 0, 1], PORT));
    match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
        Ok(_) => true,
        Err(e) => {
            if e.kind() != ErrorKind::ConnectionRefused {
                eprintln!("e2e: second node on port {PORT}: {e}");
            }
            false
        }
    }
}

/// The second node, started on first use (at most 2 minutes). Panics with the script's output
/// when it cannot be started.
pub fn second_node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let started = Instant::now();
        // Always through the script under the lock, even when the port answers: a previous
        // test binary's watchdog may be stopping the node right now, and then we must wait for
        // it and start the node again. (`-o`: the node must not inherit the lock.)
        let output = Command::new("flock")
            .args(["-o", LOCK_FILE, "bash", &script(), "start"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script()));
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the second node did not start:\n{said}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        if !said.contains("already up") {
            eprintln!(
                "e2e: started the second node {NODE_NAME} in {:.1?}",
                started.elapsed()
            );
            crate::process::stop_at_exit(
                "the second node",
                &script(),
                LOCK_FILE,
                "E2E_KEEP_SECOND_NODE",
            );
        }
        Node::new(URI, NODE_NAME)
    })
}

/// Exclusive use of the second node for one test: held for the whole test, so that tests which
/// stop the node or raise an alarm run one at a time. Also starts the node if needed. Take it
/// in the `#[test]` function, before the test's runtime starts (it blocks).
pub fn exclusive() -> (Lease, &'static Node) {
    static LOCK: Mutex<()> = Mutex::new(());
    // A test that failed while holding it leaves nothing behind that the next must undo (each
    // case restores the node in its own clean-up), so a poisoned lock is still usable.
    let guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let node = second_node();
    // Across processes too: two test binaries (or two checkouts' suites run side by side) must
    // not stop the node or change its settings under each other. The lock goes with the file
    // handle, so a process that dies releases it.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(USE_LOCK_FILE)
        .and_then(|file| file.lock().map(|()| file))
        .map_err(|e| eprintln!("e2e: cannot lock {USE_LOCK_FILE}: {e}"))
        .ok();
    (
        Lease {
            _file: file,
            _guard: guard,
        },
        node,
    )
}

/// Held while a test uses the second node ([`exclusive`]): the in-process lock and the
/// cross-process file lock.
#[derive(Debug)]
pub struct Lease {
    // Dropped first: the file lock is released before the in-process one.
    _file: Option<std::fs::File>,
    _guard: MutexGuard<'static, ()>,
}

/// Serializes the tests that use the second node across processes (see [`exclusive`]).
const USE_LOCK_FILE: &str = "/tmp/rabbit-fault.use.lock";

/// A memory alarm on a node (`set_vm_memory_high_watermark` far below what it uses): the
/// broker blocks every publishing connection. Cleared by [`MemoryAlarm::clear`], or when the guard
/// drops (a failed test leaves no alarm behind).
#[derive(Debug)]
pub struct MemoryAlarm {
    node: Node,
    raised: bool,
}

impl MemoryAlarm {
    /// Raises the alarm (blocking: run it off the runtime's threads).
    pub fn raise(node: &Node) -> Result<Self, String> {
        let mut alarm = Self {
            node: node.clone(),
            raised: true,
        };
        if let Err(e) = alarm
            .node
            .rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"])
        {
            alarm.raised = false;
            return Err(e);
        }
        Ok(alarm)
    }

    /// Clears the alarm (the RabbitMQ default watermark, 0.4).
    pub fn clear(mut self) -> Result<(), String> {
        self.raised = false;
        self.node
            .rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"])
            .map(|_| ())
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        if self.raised {
            if let Err(e) = self
                .node
                .rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"])
            {
                eprintln!("e2e: could not clear the memory alarm: {e}");
            }
        }
    }
}

/// The RabbitMQ application of a node stopped (`rabbitmqctl stop_app`): every connection is
/// closed and nothing listens on its AMQP port. Started again by [`AppStopped::start`], or when
/// the guard drops.
#[derive(Debug)]
pub struct AppStopped {
    node: Node,
    stopped: bool,
}

impl AppStopped {
    /// Stops the application (blocking, about 2 s: run it off the runtime's threads).
    pub fn stop(node: &Node) -> Result<Self, String> {
        // Armed before the command: if it fails half-way, the drop starts the application
        // again, which is harmless when it is running.
        let guard = Self {
            node: node.clone(),
            stopped: true,
        };
        guard.node.rabbitmqctl(&["stop_app"])?;
        Ok(guard)
    }

    /// Starts the application again (blocking, about 3 s).
    pub fn start(mut self) -> Result<(), String> {
        self.stopped = false;
        self.node.rabbitmqctl(&["start_app"]).map(|_| ())
    }
}

impl Drop for AppStopped {
    fn drop(&mut self) {
        if self.stopped {
            if let Err(e) = self.node.rabbitmqctl(&["start_app"]) {
                eprintln!("e2e: could not start the node's application again: {e}");
            }
        }
    }
}
