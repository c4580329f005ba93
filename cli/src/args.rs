//! What the programs' command lines share: the broker and queue flags, the seconds flags, and
//! turning clap's verdict into an exit code.
//!
//! Every flag that takes a number accepts a leading `-`, so that `--timeout -1` is refused as
//! a bad value of `--timeout` rather than as an unknown flag `-1`.

use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use amqp_rpc_driver::DEFAULT_URI;
use clap::Parser;

/// The queue the tutorial's programs use.
pub const DEFAULT_QUEUE: &str = "rpc_queue";

/// Where the broker and the request queue are: `--uri` (or `AMQP_URL`) and `--queue`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct BrokerArgs {
    /// The broker's URI; repeat the flag or give a comma-separated list for the nodes of a
    /// cluster. `amqps://` for TLS (see the README for its query parameters).
    // `hide_env_values`: `--help` would otherwise print AMQP_URL's value, password included.
    #[arg(
        long = "uri",
        value_name = "URI",
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = DEFAULT_URI,
        action = clap::ArgAction::Append
    )]
    pub uris: Vec<String>,
    /// The request queue.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_QUEUE)]
    pub queue: String,
}

/// The runtime a program runs on: `--threads` (or `AMQP_RPC_THREADS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct RuntimeArgs {
    /// Worker threads. 0: tokio's current-thread runtime, everything on the main thread (the
    /// default: the fastest here, see the README's Performance section); N: a multi-thread
    /// tokio runtime with N workers. On smol: N executor threads for the spawned tasks (smol's
    /// `SMOL_THREADS`; 0 keeps smol's default of one).
    #[arg(
        long,
        value_name = "N",
        env = "AMQP_RPC_THREADS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub threads: usize,
}

/// Parses a seconds flag (`--timeout 2.5`): a positive, finite number of seconds that a
/// [`Duration`] holds. clap puts the flag's name in front of the message.
pub fn seconds(value: &str) -> Result<Duration, String> {
    let refused = || format!("a positive number of seconds, not {value}");
    let secs: f64 = value.trim().parse().map_err(|_| refused())?;
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(refused()),
    }
}

/// Parses a `HOST:PORT` flag (`--metrics-addr 127.0.0.1:9100`, `localhost:0`) to the first
/// address it resolves to. clap puts the flag's name in front of the message.
pub fn host_port(value: &str) -> Result<SocketAddr, String> {
    let refused = |why: String| format!("HOST:PORT, not {value}: {why}");
    value
        .to_socket_addrs()
        .map_err(|e| refused(e.to_string()))?
        .next()
        .ok_or_else(|| refused("no address".to_owned()))
}

/// Parses `T` from this process's arguments. On `--help` and `--version` prints them and
/// returns exit code 0; on a bad command line prints clap's message (which names the flag) and
/// returns exit code 2, as the programs always have.
pub fn parse_or_exit_code<T: Parser>() -> Result<T, ExitCode> {
    parse_from(std::env::args_os()).map_err(|e| {
        // If stdout or stderr is gone there is nobody to tell.
        let _ = e.print();
        ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
    })
}

/// Parses the program's arguments and runs `program` with them; on `--help`, `--version` or a
/// bad command line, the exit code of [`parse_or_exit_code`]. A program parses before its
/// runtime exists, since `--threads` says which runtime to build.
pub fn with_args<T: Parser>(program: impl FnOnce(T) -> ExitCode) -> ExitCode {
    parse_or_exit_code().map_or_else(|code| code, program)
}

/// Parses `T` from `argv` (the program's path first). The program calls itself by its file's
/// name (`smol-server --version` prints `smol-server 0.1.0`): one argument struct serves the
/// bins of every transport.
pub fn parse_from<T: Parser>(
    argv: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<T, clap::Error> {
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut command = T::command();
    if let Some(name) = argv
        .first()
        .and_then(|program| Path::new(program).file_name())
        .and_then(|name| name.to_str())
    {
        command = command.name(name.to_owned());
    }
    let matches = command.try_get_matches_from(argv)?;
    T::from_arg_matches(&matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_refuse_what_a_duration_cannot_hold() {
        for bad in ["-1", "0", "NaN", "inf", "-inf", "1e30", "soon", ""] {
            let e = seconds(bad).expect_err(bad);
            assert!(e.contains("positive number of seconds"), "{e}");
        }
        assert_eq!(seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(seconds("10"), Ok(Duration::from_secs(10)));
    }

    #[test]
    fn host_port_resolves_or_names_the_problem() {
        assert_eq!(
            host_port("127.0.0.1:9100"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 9100)))
        );
        assert_eq!(host_port("[::1]:0").map(|a| a.port()), Ok(0));
        for bad in ["9100", "127.0.0.1", "127.0.0.1:99999", ""] {
            let e = host_port(bad).expect_err(bad);
            assert!(e.starts_with("HOST:PORT"), "{e}");
        }
    }

    #[test]
    fn the_program_calls_itself_by_its_name() {
        let e = parse_from::<crate::ServerArgs>(["/x/target/debug/smol-server", "--version"])
            .expect_err("version");
        assert_eq!(e.exit_code(), 0);
        assert_eq!(
            e.to_string(),
            format!("smol-server {}\n", env!("CARGO_PKG_VERSION"))
        );
        let e = parse_from::<crate::BenchArgs>(["bench", "--help"]).expect_err("help");
        assert!(e.to_string().contains("Usage: bench [OPTIONS]"), "{e}");
    }

    /// `AMQP_URL` stands in for a missing `--uri`, never shows in `--help` (it may hold a
    /// password), and without either the tutorial's broker is the default. The only test that
    /// touches the environment: the others never look at the URIs they did not give.
    #[test]
    fn amqp_url_is_the_fallback_for_uri() {
        let parse = |args: &[&str]| {
            crate::ServerArgs::try_parse_from(std::iter::once("server").chain(args.iter().copied()))
        };
        std::env::set_var("AMQP_URL", "amqp://user:s3cret@broker:5672/%2f");
        let args = parse(&[]).expect("parses");
        assert_eq!(args.broker.uris, ["amqp://user:s3cret@broker:5672/%2f"]);
        let args = parse(&["--uri", "amqp://other"]).expect("parses");
        assert_eq!(args.broker.uris, ["amqp://other"]);
        let help = parse(&["--help"]).expect_err("help").to_string();
        assert!(help.contains("AMQP_URL"), "{help}");
        assert!(!help.contains("s3cret"), "{help}");
        std::env::remove_var("AMQP_URL");
        let args = parse(&[]).expect("parses");
        assert_eq!(args.broker.uris, [DEFAULT_URI]);
    }
}
