//! What the two amqprs comparison programs share: flags, the broker address, fib and the CPU
//! clock. Written for this repository's bench (scripts/bench.sh); not a library for users.

use amqprs::connection::OpenConnectionArguments;

/// `--name value` flags and bare `--name` switches, in any order.
pub struct Args {
    pairs: Vec<(String, Option<String>)>,
}

impl Args {
    /// Parses `std::env::args`; the names in `switches` take no value.
    pub fn parse(switches: &[&str]) -> Result<Self, String> {
        let mut pairs = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let name = arg
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {arg}"))?
                .to_owned();
            if switches.contains(&name.as_str()) {
                pairs.push((name, None));
            } else {
                let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                pairs.push((name, Some(value)));
            }
        }
        Ok(Self { pairs })
    }

    /// Refuses a flag not in `known`.
    pub fn check(&self, known: &[&str]) -> Result<(), String> {
        match self
            .pairs
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((k, _)) => Err(format!("unknown flag --{k}")),
            None => Ok(()),
        }
    }

    /// Whether switch `--name` was given.
    pub fn has(&self, name: &str) -> bool {
        self.pairs.iter().any(|(k, _)| k == name)
    }

    /// The value of `--name`, the last one wins.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// `--name` as a number, `default` when absent.
    pub fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: not a number: {v}")),
        }
    }

    /// The broker to talk to: `--host` (127.0.0.1), `--port` (5672), guest/guest.
    pub fn connection(&self, name: &str) -> Result<OpenConnectionArguments, String> {
        let host = self.value("host").unwrap_or("127.0.0.1");
        let port: u16 = self.number("port", 5672)?;
        Ok(OpenConnectionArguments::new(host, port, "guest", "guest")
            .connection_name(name)
            // As ours: 60 s heartbeats, none of them during a few seconds of bench.
            .heartbeat(60)
            .finish())
    }
}

/// The workload and the measurements are ours, shared, so that both sides compute the same
/// fib and are measured the same way: fib(n) as our server computes it, process CPU time from
/// `/proc/<pid>/stat`, resident memory from `/proc/self/status`.
pub use amqp_rpc_cli::cpu::process_cpu_time;
pub use amqp_rpc_cli::fib;
pub use amqp_rpc_cli::payload::resident_kib;

/// A tokio runtime: current-thread (as our programs use) with `--current-thread`, else the
/// multi-thread one amqprs's own examples use.
pub fn runtime(current_thread: bool) -> tokio::runtime::Runtime {
    let mut builder = if current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // A runtime that cannot start leaves nothing to measure.
    #[allow(clippy::expect_used)]
    builder.enable_all().build().expect("tokio runtime")
}
