//! The `client` program: asks the server for fib(n), as the tutorial's client does.

use std::process::ExitCode;
use std::time::Duration;

use amqp_rpc_driver::{
    CallError, CallRequest, Client, ClientOptions, ConnectError, RpcError, Runtime,
};
use clap::Parser;

use crate::args::{parse_or_exit_code, seconds, BrokerArgs};

/// Asks the Fibonacci RPC server for fib(n) and prints the answer.
///
/// Exits 1 with one line on stderr when the call fails. Logs: RUST_LOG=info.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(version, args_override_self = true)]
pub struct ClientArgs {
    /// The n to ask fib(n) for; sent as given (the server refuses what is not 0 to 186).
    #[arg(default_value = "30", allow_negative_numbers = true)]
    pub n: String,
    /// The broker and the request queue.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Seconds to wait for the reply (connecting gets at most as long).
    #[arg(
        long,
        value_name = "SECS",
        default_value = "10",
        value_parser = seconds,
        allow_negative_numbers = true
    )]
    pub timeout: Duration,
}

impl ClientArgs {
    /// The client's options: the broker the flags say, with connect and handshake timeouts no
    /// longer than `--timeout`.
    pub fn options(&self) -> Result<ClientOptions, ConnectError> {
        let mut options = ClientOptions::from_uris(&self.broker.uris)?;
        for address in options.connect.iter_mut() {
            address.connect_timeout = address.connect_timeout.min(self.timeout);
            address.connection.handshake_timeout = address.connect_timeout;
        }
        Ok(options)
    }
}

/// The `client` program on runtime `R`: parses the command line ([`ClientArgs`]), makes one
/// call and prints ` [.] Got <reply>`. Exit codes: 0 with a reply, 1 when connecting or the call
/// failed, 2 for a bad command line.
pub async fn client_main<R: Runtime>() -> ExitCode {
    crate::logging::init();
    let args: ClientArgs = match parse_or_exit_code() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let options = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("client: --uri: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match Client::<R>::connect_with(options).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (n, queue, timeout) = (&args.n, &args.broker.queue, args.timeout);
    println!(" [x] Requesting fib({n})");
    let result = client
        .call_with(CallRequest::new(queue.clone(), n.clone(), timeout))
        .await;
    client.close().await;
    match result {
        Ok(reply) => {
            println!(" [.] Got {}", String::from_utf8_lossy(&reply.body));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let line = match &e {
                CallError::Rpc(RpcError::NotRouted) => {
                    format!("no queue named {queue:?}: is the server running?")
                }
                CallError::Rpc(RpcError::NoServers) => format!("no server is consuming {queue:?}"),
                CallError::Rpc(RpcError::TimedOut) => format!("no reply within {timeout:?}"),
                CallError::Rpc(RpcError::Rejected { message, .. }) => {
                    format!("server refused the request: {message}")
                }
                CallError::Rpc(RpcError::Remote { code, message }) => {
                    format!("server error ({code}): {message}")
                }
                other => other.to_string(),
            };
            eprintln!("client: {line}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ClientArgs, clap::Error> {
        ClientArgs::try_parse_from(std::iter::once("client").chain(args.iter().copied()))
    }

    #[test]
    fn n_and_flags_in_any_order() {
        let args = parse(&[
            "--timeout",
            "2.5",
            "35",
            "--queue",
            "q",
            "--uri",
            "amqp://h",
        ])
        .expect("parses");
        assert_eq!(args.n, "35");
        assert_eq!(args.timeout, Duration::from_millis(2500));
        assert_eq!(args.broker.queue, "q");
        let options = args.options().expect("valid");
        assert!(options.connect[0].connect_timeout <= Duration::from_millis(2500));
        // The tutorial's defaults.
        let args = parse(&[]).expect("parses");
        assert_eq!(args.n, "30");
        assert_eq!(args.timeout, Duration::from_secs(10));
        assert_eq!(args.broker.queue, "rpc_queue");
    }

    /// The n goes to the server as given, negative too: refusing it is the service's business.
    #[test]
    fn n_is_sent_as_given() {
        assert_eq!(parse(&["-1"]).expect("parses").n, "-1");
        assert_eq!(parse(&["abc"]).expect("parses").n, "abc");
    }

    #[test]
    fn bad_timeouts_are_refused_by_name() {
        for bad in ["-1", "0", "nan", "inf", "1e30", "soon"] {
            let e = parse(&["--timeout", bad]).expect_err(bad);
            assert_eq!(e.exit_code(), 2, "{bad}");
            let text = e.to_string();
            assert!(text.contains("--timeout"), "{bad}: {text}");
            assert!(text.contains("positive number of seconds"), "{bad}: {text}");
        }
        let e = parse(&["--timeot", "1"]).expect_err("unknown flag");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--timeot"), "{e}");
    }
}
