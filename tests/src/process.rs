//! Child processes for the tests: our `e2e-server` bin, the tutorial's pika programs. Each is
//! killed when its guard drops, its stdout is read line by line, and every wait is bounded.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use amqp_rpc_driver::Runtime;
use futures_channel::mpsc;
use futures_util::StreamExt;

use crate::rt::{sleep, timeout};

/// The `cli-program` bin (`tests/src/bin/cli-program.rs`, path from the test's
/// `env!("CARGO_BIN_EXE_cli-program")`) set up to run the server or bench program (`which`) on
/// `transport` ("tokio" or "smol"), logging warnings only.
pub fn cli_program(bin: &str, which: &str, transport: &str) -> Command {
    let mut command = Command::new(bin);
    command
        .env("E2E_PROGRAM", which)
        .env("E2E_TRANSPORT", transport)
        .env("RUST_LOG", "warn");
    command
}

/// A running child process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl ChildProcess {
    /// Starts `command` with piped stdio. Its stdin stays open until the guard drops, so a
    /// child that exits on EOF (like `e2e-server`) also goes away if the test process dies.
    pub fn spawn(name: &str, mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let (tx, lines) = mpsc::unbounded();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            let all = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut all) = all.lock() {
                        all.push_str(&line);
                        all.push('\n');
                    }
                    let _ = tx.unbounded_send(line);
                }
            });
        }
        if let Some(mut err) = child.stderr.take() {
            let all = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut all) = all.lock() {
                        all.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        Self {
            name: name.to_owned(),
            child,
            lines,
            stdout,
            stderr,
        }
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// What the child printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Everything the child printed so far, for failure messages.
    pub fn output(&self) -> String {
        let out = self.stdout.lock().map(|s| s.clone()).unwrap_or_default();
        let err = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        format!(
            "--- {} stdout ---\n{out}--- {} stderr ---\n{err}",
            self.name, self.name
        )
    }

    /// Waits for a stdout line that contains `needle`, at most `limit`; returns it.
    pub async fn wait_line<R: Runtime>(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout::<R, _>(left, self.lines.next()).await {
                Some(Some(line)) if line.contains(needle) => return line,
                Some(Some(_)) => {}
                Some(None) => {
                    // stdout closed: the child exited. Give stderr's reader a moment.
                    sleep::<R>(Duration::from_millis(100)).await;
                    panic!(
                        "{} exited before printing {needle:?}\n{}",
                        self.name,
                        self.output()
                    );
                }
                None => panic!(
                    "{} did not print {needle:?} within {limit:?}\n{}",
                    self.name,
                    self.output()
                ),
            }
        }
    }

    /// Waits for the child to exit by itself, at most `limit`.
    pub async fn wait_exit<R: Runtime>(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    // Let the readers collect the last output.
                    sleep::<R>(Duration::from_millis(50)).await;
                    return status;
                }
                Ok(None) if Instant::now() < deadline => {
                    sleep::<R>(Duration::from_millis(20)).await
                }
                Ok(None) => panic!(
                    "{} did not exit within {limit:?}\n{}",
                    self.name,
                    self.output()
                ),
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
        }
    }

    /// Kills the child with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Leaves a watchdog that runs `bash <script> stop` (under `flock -o <lock_file>`, so never
/// beside a test holding the node) once this process is gone: it waits for EOF on a pipe whose
/// write end only this process holds, which the kernel closes at exit (even after a panic or a
/// kill). `setsid` keeps it out of the test's process group, so a Ctrl-C that ends the tests
/// does not end the watchdog too. `keep_var=1` in the environment leaves the node running
/// (handy when running its tests again and again); `what` names it in messages.
pub fn stop_at_exit(what: &str, script: &str, lock_file: &str, keep_var: &str) {
    static WATCHDOGS: Mutex<Vec<Child>> = Mutex::new(Vec::new());
    if std::env::var_os(keep_var).is_some_and(|v| v == "1") {
        return;
    }
    let command =
        format!("cat >/dev/null; exec flock -o {lock_file} bash '{script}' stop >/dev/null 2>&1");
    match Command::new("setsid")
        .args(["sh", "-c", &command])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        // Kept for the life of the process: dropping it would close the pipe now.
        Ok(child) => WATCHDOGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child),
        Err(e) => eprintln!("e2e: no watchdog to stop {what} at exit: {e}"),
    }
}

/// A Python 3 interpreter that can `import pika` (1.x): `python3`, else `/usr/bin/python3`
/// (Debian's python3-pika reaches only that one). Panics with the fix when there is none.
pub fn python() -> &'static str {
    static PYTHON: OnceLock<Option<&'static str>> = OnceLock::new();
    let found = PYTHON.get_or_init(|| {
        ["python3", "/usr/bin/python3"].into_iter().find(|p| {
            Command::new(p)
                .args([
                    "-c",
                    "import sys, pika; sys.exit(0 if pika.__version__.startswith('1.') else 1)",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "the interop tests need python3 with pika 1.x, and `import pika` fails: \
             run scripts/ensure-rabbitmq.sh (it installs pika) and try again"
        )
    })
}

/// Path of one of the tutorial programs in `tests/interop/`.
pub fn interop_script(name: &str) -> String {
    format!("{}/interop/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// For a child process of a test: exits the process as soon as its stdin closes, which happens
/// when the test that spawned it ends, however it ends.
pub fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}
