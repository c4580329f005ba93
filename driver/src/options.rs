//! Where to connect and how: parsed from an `amqp://` URI.

use std::fmt;
use std::time::Duration;

use amq_protocol::uri::{AMQPScheme, AMQPUri};
use amqp_rpc_core::{ConnectionConfig, ConnectionError, Credentials};

/// The URI the bins use when neither `--uri` nor `AMQP_URL` is given.
pub const DEFAULT_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Broker address and connection settings. `Debug` never shows the password.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Handshake settings, credentials included.
    pub connection: ConnectionConfig,
    /// Bound on TCP connect plus the AMQP handshake.
    pub connect_timeout: Duration,
}

impl ConnectOptions {
    /// Parses `amqp://user:pass@host:port/vhost?heartbeat=10&connection_timeout=5000&frame_max=..&channel_max=..`.
    /// Percent-encoded parts are decoded (`%2f` is the vhost `/`). `amqps` is refused: this
    /// crate does not do TLS.
    pub fn from_uri(uri: &str) -> Result<Self, ConnectError> {
        // The parser's messages never quote the input, so the password cannot leak through them.
        let parsed: AMQPUri = uri
            .parse()
            .map_err(|e: String| ConnectError::InvalidUri(e))?;
        if parsed.scheme == AMQPScheme::AMQPS {
            return Err(ConnectError::InvalidUri(
                "amqps (TLS) is not supported".into(),
            ));
        }
        let mut connection = ConnectionConfig {
            credentials: Credentials::new(
                parsed.authority.userinfo.username,
                parsed.authority.userinfo.password,
            ),
            vhost: parsed.vhost,
            ..ConnectionConfig::default()
        };
        if let Some(h) = parsed.query.heartbeat {
            connection.heartbeat = Duration::from_secs(u64::from(h));
        }
        if let Some(f) = parsed.query.frame_max {
            connection.frame_max = f;
        }
        if let Some(c) = parsed.query.channel_max {
            connection.channel_max = c;
        }
        let connect_timeout = parsed
            .query
            .connection_timeout
            .map_or(Duration::from_secs(10), Duration::from_millis);
        connection.handshake_timeout = connect_timeout;
        Ok(Self {
            host: parsed.authority.host,
            port: parsed.authority.port,
            connection,
            connect_timeout,
        })
    }

    /// Reads `--uri`'s fallback: `AMQP_URL`, else [`DEFAULT_URI`].
    pub fn from_env() -> Result<Self, ConnectError> {
        Self::from_uri(&std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_URI.to_owned()))
    }

    /// `host:port`, for messages.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Why connecting failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URI does not parse.
    InvalidUri(String),
    /// TCP connect failed (refused, unreachable...).
    Io {
        /// `host:port`.
        address: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// TCP connect plus handshake took longer than the connect timeout.
    TimedOut {
        /// `host:port`.
        address: String,
        /// The timeout.
        after: Duration,
    },
    /// The broker refused us: wrong credentials, unknown vhost, protocol error...
    Connection(ConnectionError),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::InvalidUri(e) => write!(f, "invalid AMQP URI: {e}"),
            ConnectError::Io { address, error } => {
                write!(f, "cannot connect to RabbitMQ at {address}: {error}")
            }
            ConnectError::TimedOut { address, after } => {
                write!(f, "no answer from RabbitMQ at {address} within {after:?}")
            }
            ConnectError::Connection(e) => write!(f, "RabbitMQ refused the connection: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Io { error, .. } => Some(error),
            ConnectError::Connection(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default_uri() {
        let o = ConnectOptions::from_uri(DEFAULT_URI).expect("valid");
        assert_eq!((o.host.as_str(), o.port), ("127.0.0.1", 5672));
        assert_eq!(o.connection.vhost, "/");
        assert_eq!(o.connection.credentials.username(), "guest");
    }

    #[test]
    fn query_sets_heartbeat_and_timeout() {
        let o = ConnectOptions::from_uri("amqp://u:p@h:1234/v?heartbeat=2&connection_timeout=1500")
            .expect("valid");
        assert_eq!(o.connection.heartbeat, Duration::from_secs(2));
        assert_eq!(o.connect_timeout, Duration::from_millis(1500));
        assert_eq!(o.connection.vhost, "v");
    }

    #[test]
    fn password_never_shows() {
        let o = ConnectOptions::from_uri("amqp://u:hunter2secret@h/").expect("valid");
        assert!(!format!("{o:?}").contains("hunter2secret"));
        let e =
            ConnectOptions::from_uri("amqp://u:hunter2secret@h:notaport/").expect_err("invalid");
        assert!(!e.to_string().contains("hunter2secret"));
        let e = ConnectOptions::from_uri("amqps://u:hunter2secret@h/").expect_err("tls");
        assert!(!e.to_string().contains("hunter2secret"));
    }
}
