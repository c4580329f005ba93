//! Where to connect and how: parsed from an `amqp://` or `amqps://` URI.
//!
//! The parser is ours rather than amq-protocol's so that no error can quote the URI (which
//! holds the password) and so that the TLS query parameters are understood. It follows
//! RabbitMQ's "URI Specification" and "URI Query Parameters" documents:
//!
//! ```text
//! amqp[s]://[user[:password]@]host[:port][/vhost][?key=value&...]
//! ```
//!
//! User, password, host, vhost and values are percent-decoded (`%2f` is the vhost `/`); an
//! IPv6 host is written in brackets (`[::1]`).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use amqp_rpc_core::{ConnectionConfig, ConnectionError, Credentials, ReplyCode, SaslMechanism};

use crate::tls::{TlsConfig, TlsError, Verify};

/// The URI the bins use when neither `--uri` nor `AMQP_URL` is given.
pub const DEFAULT_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The IANA port of AMQP (RabbitMQ "Networking" guide).
pub const AMQP_PORT: u16 = 5672;
/// The IANA port of AMQP over TLS.
pub const AMQPS_PORT: u16 = 5671;

/// Gives the credentials for each connection attempt: for secrets that rotate (a password
/// vault, a token service), so that a client or server recovering after a password change
/// logs in with the new one. Called before every attempt (the first connect, each reconnect,
/// each address of a list), on the driver task: it should return at once (read a value that
/// another task refreshes) rather than block. `Debug` shows nothing of it.
#[derive(Clone)]
pub struct CredentialsProvider(Arc<dyn Fn() -> Credentials + Send + Sync>);

impl CredentialsProvider {
    /// A provider that calls `f`.
    pub fn new(f: impl Fn() -> Credentials + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// The credentials for the attempt about to be made.
    pub fn credentials(&self) -> Credentials {
        (self.0)()
    }
}

impl fmt::Debug for CredentialsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CredentialsProvider(..)")
    }
}

/// Broker address and connection settings. `Debug` never shows the password.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Broker host name or address (an IPv6 address without brackets).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Handshake settings, credentials and SASL mechanisms included.
    pub connection: ConnectionConfig,
    /// Bound on name resolution, TCP connect, the TLS handshake and the AMQP handshake.
    pub connect_timeout: Duration,
    /// TLS (`amqps://`); `None` is plain TCP.
    pub tls: Option<TlsConfig>,
    /// Where each attempt's credentials come from instead of `connection.credentials`
    /// ([`ConnectOptions::with_credentials_provider`]).
    pub credentials_provider: Option<CredentialsProvider>,
}

impl ConnectOptions {
    /// Parses `amqp[s]://user:pass@host:port/vhost?query`. Known query parameters
    /// (RabbitMQ's): `heartbeat` (seconds), `connection_timeout` (milliseconds), `channel_max`,
    /// `frame_max`, `auth_mechanism` (`plain`, `amqplain`, `external`; may repeat, in order of
    /// preference), ours: `max_message_size` (bytes, 1 to 536870912: the broker's limit on a
    /// message body, [`ConnectionConfig::max_message_size`]; set it to the broker's, e.g.
    /// `16777216` for RabbitMQ 4.x's default, so that a larger request or reply is refused
    /// before it is sent), and with `amqps` only `cacertfile`, `certfile`, `keyfile`,
    /// `verify` (`verify_peer`, the default, or `verify_none`) and `server_name_indication`
    /// (a host name, or `disable`). Anything else is an error: a misspelt `verify=verify_peer`
    /// must not silently connect without it. No error quotes the URI.
    pub fn from_uri(uri: &str) -> Result<Self, ConnectError> {
        parse(uri).map_err(ConnectError::InvalidUri)
    }

    /// Reads `--uri`'s fallback: `AMQP_URL`, else [`DEFAULT_URI`].
    pub fn from_env() -> Result<Self, ConnectError> {
        Self::from_uri(&std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_URI.to_owned()))
    }

    /// These options with their credentials taken from `provider` before each connection
    /// attempt (see [`CredentialsProvider`]). For every address of a list:
    /// `for o in addresses.iter_mut() { o.credentials_provider = Some(provider.clone()) }`.
    pub fn with_credentials_provider(
        mut self,
        provider: impl Fn() -> Credentials + Send + Sync + 'static,
    ) -> Self {
        self.credentials_provider = Some(CredentialsProvider::new(provider));
        self
    }

    /// The settings of the next connection attempt: `connection`, with the provider's
    /// credentials when there is one.
    pub(crate) fn connection_config(&self) -> ConnectionConfig {
        let mut config = self.connection.clone();
        if let Some(provider) = &self.credentials_provider {
            config.credentials = provider.credentials();
        }
        config
    }

    /// `host:port` (`[v6]:port` for an IPv6 address), for messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why connecting failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URI does not parse. The text says which part is wrong and never quotes it.
    InvalidUri(String),
    /// Name resolution or TCP connect failed (refused, unreachable...). With several addresses,
    /// the error of the last one tried.
    Io {
        /// `host:port`.
        address: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// Connecting plus the handshakes took longer than the connect timeout.
    TimedOut {
        /// `host:port`.
        address: String,
        /// The timeout.
        after: Duration,
    },
    /// The TLS handshake failed, or the TLS settings cannot be used.
    Tls {
        /// `host:port`.
        address: String,
        /// Which failure.
        error: TlsError,
    },
    /// The broker refused us: wrong credentials, unknown vhost, protocol error...
    Connection(ConnectionError),
    /// Every address of a list of several failed: each with its reason, in the order tried.
    AllFailed(Vec<crate::addresses::AddressFailure>),
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
            ConnectError::Tls { address, error } => {
                write!(f, "TLS with RabbitMQ at {address} failed: {error}")
            }
            ConnectError::Connection(e) if is_refusal(e) => {
                write!(f, "RabbitMQ refused the connection: {e}")
            }
            // A handshake that stalled or a socket that dropped is no refusal: say what was seen.
            ConnectError::Connection(e) => write!(f, "connecting to RabbitMQ failed: {e}"),
            ConnectError::AllFailed(failures) => {
                write!(
                    f,
                    "none of the {} RabbitMQ addresses could be used",
                    failures.len()
                )?;
                for (i, failure) in failures.iter().enumerate() {
                    write!(f, "{} {failure}", if i == 0 { ":" } else { ";" })?;
                }
                Ok(())
            }
        }
    }
}

impl ConnectError {
    /// The [`ConnectionError`] in this error, for [`crate::ConnectionState::Failed`]: the
    /// broker's own (for a list of addresses, the last address's), and
    /// failures below AMQP (name resolution, TCP, TLS, a bad URI) as `ConnectionLost`.
    pub(crate) fn connection_error(&self) -> ConnectionError {
        match self {
            ConnectError::Connection(e) => e.clone(),
            ConnectError::AllFailed(failures) => failures
                .last()
                .map_or(ConnectionError::ConnectionLost, |f| {
                    f.error.connection_error()
                }),
            _ => ConnectionError::ConnectionLost,
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Io { error, .. } => Some(error),
            ConnectError::Tls { error, .. } => Some(error),
            ConnectError::Connection(e) => Some(e),
            _ => None,
        }
    }
}

/// Whether the broker said no to this client (credentials, vhost access, the SASL mechanism,
/// credentials too long to send): what a change of settings or credentials cures, as opposed
/// to a broker that is down or slow. RabbitMQ answers a wrong password with 403
/// ACCESS_REFUSED and a vhost it has not, or that the user may not use, with 530 NOT_ALLOWED on
/// `connection.open` ("Access Control" guide).
pub(crate) fn is_refusal(error: &ConnectionError) -> bool {
    match error {
        ConnectionError::AuthenticationFailed { .. }
        | ConnectionError::NoCommonMechanism { .. }
        | ConnectionError::CredentialsTooLong { .. }
        | ConnectionError::ReplyPathRefused { .. } => true,
        ConnectionError::ClosedByServer { code, .. } => {
            *code == ReplyCode::ACCESS_REFUSED || *code == ReplyCode::NOT_ALLOWED
        }
        _ => false,
    }
}

/// The parser. Every error is a fixed text plus, at most, a query parameter's name or a
/// number: never a piece of the input that could be (or contain) the password.
fn parse(uri: &str) -> Result<ConnectOptions, String> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or("expected amqp://... or amqps://...")?;
    let tls = if scheme.eq_ignore_ascii_case("amqp") {
        false
    } else if scheme.eq_ignore_ascii_case("amqps") {
        true
    } else {
        return Err("the scheme must be amqp or amqps".into());
    };
    // A fragment has no meaning in an AMQP URI; refuse it rather than guess.
    if rest.contains('#') {
        return Err("unexpected '#' (escape it as %23)".into());
    }
    // RFC 3986 §3.2: the authority ends at the first '/' or '?', so an unescaped one in the
    // user name or password cuts it short and what is left of it looks like `host:port`: a
    // connect error would quote it. An '@' after that point means exactly this (a vhost or a
    // query value with an '@' must escape it as %40).
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    if rest[authority_end..].contains('@') {
        return Err(
            "an '@' after the host: write '/' as %2F, '?' as %3F and '@' as %40 in a \
                    user name, password, vhost or query value"
                .into(),
        );
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    // The last '@' ends the user info: an unescaped '@' in a password still parses.
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let credentials = match userinfo {
        None => Credentials::default(),
        Some(u) => {
            let (user, password) = u.split_once(':').unwrap_or((u, ""));
            Credentials::new(
                decode(user).map_err(|e| format!("user name: {e}"))?,
                // Never say more than "the password": its text is the secret.
                decode(password).map_err(|e| format!("password: {e}"))?,
            )
        }
    };
    let (host, port) = parse_host_port(hostport, if tls { AMQPS_PORT } else { AMQP_PORT })?;
    let vhost = match path {
        // RabbitMQ's spec makes `host/` the vhost "" which no broker has; clients (and this
        // crate before) take it as the default vhost.
        None | Some("") => "/".to_owned(),
        Some(p) if p.contains('/') => {
            return Err("the vhost must be one path segment (write / as %2f)".into())
        }
        Some(p) => decode(p).map_err(|e| format!("vhost: {e}"))?,
    };
    let mut connection = ConnectionConfig::default();
    connection.credentials = credentials;
    connection.vhost = vhost;
    let mut options = ConnectOptions {
        host,
        port,
        connection,
        connect_timeout: Duration::from_secs(10),
        tls: tls.then(TlsConfig::default),
        credentials_provider: None,
    };
    if let Some(query) = query {
        for (index, pair) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
            apply_query(&mut options, pair)
                .map_err(|e| format!("query parameter {}: {e}", index + 1))?;
        }
    }
    options.connection.handshake_timeout = options.connect_timeout;
    // Refused here rather than by the handshake: a URI error is found before connecting.
    options
        .connection
        .check_credentials_fit()
        .map_err(|e| e.to_string())?;
    Ok(options)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn parse_host_port(hostport: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address needs its closing ']'")?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("the host in [...] is not an IPv6 address".into());
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("expected ':port' after ']'")?),
        };
        (v6.to_owned(), port)
    } else {
        let (host, port) = match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        };
        (decode(host).map_err(|e| format!("host: {e}"))?, port)
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if host.contains(|c: char| c.is_whitespace() || c.is_control() || "@/?#[]".contains(c)) {
        return Err("the host contains characters a host name cannot have".into());
    }
    let port = match port {
        None | Some("") => default_port,
        // Digits only: `parse` would also take a sign.
        Some(p) => Some(p)
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|&p| p != 0)
            .ok_or("the port is not a number from 1 to 65535")?,
    };
    Ok((host, port))
}

/// One `key=value` of the query.
fn apply_query(options: &mut ConnectOptions, pair: &str) -> Result<(), String> {
    let (key, value) = pair.split_once('=').ok_or("expected key=value")?;
    let value = decode(value)?;
    let number = |max: u64| -> Result<u64, String> {
        value
            .parse::<u64>()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| format!("{key} must be a whole number up to {max}"))
    };
    let connection = &mut options.connection;
    match key {
        "heartbeat" => connection.heartbeat = Duration::from_secs(number(u64::from(u16::MAX))?),
        "connection_timeout" => {
            // Zero would fail every connect at once: refused as RabbitMQ's clients do.
            let ms = number(u64::from(u32::MAX))?;
            if ms == 0 {
                return Err("connection_timeout must be at least 1 ms".into());
            }
            options.connect_timeout = Duration::from_millis(ms);
        }
        "channel_max" => connection.channel_max = number(u64::from(u16::MAX))? as u16,
        "frame_max" => connection.frame_max = number(u64::from(u32::MAX))? as u32,
        "max_message_size" => {
            // The broker's limit, so that a larger body is refused before it is sent (the
            // broker would close the channel with 406). RabbitMQ caps the setting at 512 MiB
            // ("Configuration" guide, `max_message_size`); zero would refuse every body.
            let bytes = number(MAX_MESSAGE_SIZE_CAP)?;
            if bytes == 0 {
                return Err("max_message_size must be at least 1 byte".into());
            }
            connection.max_message_size = bytes;
        }
        "auth_mechanism" => {
            let mechanism = SaslMechanism::from_name(&value)
                .ok_or("auth_mechanism must be plain, amqplain or external")?;
            if !connection.auth_mechanisms.contains(&mechanism) {
                connection.auth_mechanisms.push(mechanism);
            }
        }
        _ if options.tls.is_none() && TLS_KEYS.contains(&key) => {
            return Err(format!("{key} needs an amqps:// URI"));
        }
        "cacertfile" => tls_only(&mut options.tls, key)?.ca_file = Some(PathBuf::from(value)),
        "certfile" => tls_only(&mut options.tls, key)?.cert_file = Some(PathBuf::from(value)),
        "keyfile" => tls_only(&mut options.tls, key)?.key_file = Some(PathBuf::from(value)),
        "verify" => {
            tls_only(&mut options.tls, key)?.verify = match value.as_str() {
                "verify_peer" => Verify::Peer,
                "verify_none" => Verify::None,
                _ => return Err("verify must be verify_peer or verify_none".into()),
            }
        }
        "server_name_indication" => {
            let tls = tls_only(&mut options.tls, key)?;
            if value == "disable" {
                tls.send_sni = false;
            } else if value.is_empty() {
                return Err("server_name_indication must be a host name or disable".into());
            } else {
                tls.server_name = Some(value);
            }
        }
        _ => {
            // The key itself is not quoted: in a mangled URI it may be part of the password.
            return Err(
                "unknown parameter (known: heartbeat, connection_timeout, channel_max, \
                 frame_max, max_message_size, auth_mechanism, cacertfile, certfile, keyfile, \
                 verify, server_name_indication)"
                    .into(),
            );
        }
    }
    Ok(())
}

/// The highest `max_message_size` RabbitMQ accepts (512 MiB, since 3.8).
const MAX_MESSAGE_SIZE_CAP: u64 = 512 * 1024 * 1024;

/// The query parameters that only mean something with TLS.
const TLS_KEYS: [&str; 5] = [
    "cacertfile",
    "certfile",
    "keyfile",
    "verify",
    "server_name_indication",
];

fn tls_only<'a>(tls: &'a mut Option<TlsConfig>, key: &str) -> Result<&'a mut TlsConfig, String> {
    tls.as_mut()
        .ok_or_else(|| format!("{key} needs an amqps:// URI"))
}

/// Percent-decodes one component (RFC 3986 §2.1) into UTF-8.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("bad percent-encoding (expected % and two hex digits)")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding that is not UTF-8".to_owned())
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
        assert_eq!(o.connection.credentials.password(), "guest");
        assert!(o.tls.is_none());
    }

    #[test]
    fn query_sets_heartbeat_and_timeout() {
        let o = ConnectOptions::from_uri(
            "amqp://u:p@h:1234/v?heartbeat=2&connection_timeout=1500&channel_max=9&frame_max=8192\
             &max_message_size=16777216",
        )
        .expect("valid");
        assert_eq!(o.connection.max_message_size, 16 * 1024 * 1024);
        assert_eq!(o.connection.heartbeat, Duration::from_secs(2));
        assert_eq!(o.connect_timeout, Duration::from_millis(1500));
        assert_eq!(o.connection.handshake_timeout, Duration::from_millis(1500));
        assert_eq!(o.connection.channel_max, 9);
        assert_eq!(o.connection.frame_max, 8192);
        assert_eq!(o.connection.vhost, "v");
        assert_eq!(o.port, 1234);
    }

    #[test]
    fn decodes_percent_escapes_and_defaults() {
        let o = ConnectOptions::from_uri("amqp://us%40er:p%3Aw%2F@my-host/a%2fb").expect("valid");
        assert_eq!(o.connection.credentials.username(), "us@er");
        assert_eq!(o.connection.credentials.password(), "p:w/");
        assert_eq!(o.connection.vhost, "a/b");
        assert_eq!((o.host.as_str(), o.port), ("my-host", 5672));
        let o = ConnectOptions::from_uri("AMQP://h").expect("valid");
        assert_eq!(o.connection.vhost, "/");
        assert_eq!(o.connection.credentials.username(), "guest");
        // An unescaped '@' in the password: the last '@' ends the user info.
        let o = ConnectOptions::from_uri("amqp://u:p@ss@h/").expect("valid");
        assert_eq!(o.connection.credentials.password(), "p@ss");
        assert_eq!(o.host, "h");
    }

    #[test]
    fn ipv6_literals_lose_their_brackets() {
        let o = ConnectOptions::from_uri("amqp://guest:guest@[::1]:5674/").expect("valid");
        assert_eq!((o.host.as_str(), o.port), ("::1", 5674));
        assert_eq!(o.address(), "[::1]:5674");
        let o = ConnectOptions::from_uri("amqps://[fe80::1]").expect("valid");
        assert_eq!((o.host.as_str(), o.port), ("fe80::1", 5671));
    }

    #[test]
    fn amqps_and_its_parameters() {
        let o = ConnectOptions::from_uri(
            "amqps://h?cacertfile=%2Ftmp%2Fca.pem&certfile=/c.pem&keyfile=/k.pem\
             &server_name_indication=broker.example&auth_mechanism=external\
             &auth_mechanism=plain",
        )
        .expect("valid");
        assert_eq!(o.port, 5671);
        let tls = o.tls.expect("tls");
        assert_eq!(tls.ca_file, Some(PathBuf::from("/tmp/ca.pem")));
        assert_eq!(tls.cert_file, Some(PathBuf::from("/c.pem")));
        assert_eq!(tls.key_file, Some(PathBuf::from("/k.pem")));
        assert_eq!(tls.server_name.as_deref(), Some("broker.example"));
        assert_eq!(tls.verify, Verify::Peer);
        assert!(tls.send_sni);
        assert_eq!(
            o.connection.auth_mechanisms,
            vec![SaslMechanism::External, SaslMechanism::Plain]
        );
        let tls =
            ConnectOptions::from_uri("amqps://h?verify=verify_none&server_name_indication=disable")
                .expect("valid")
                .tls
                .expect("tls");
        assert_eq!(tls.verify, Verify::None);
        assert!(!tls.send_sni);
    }

    /// Issue 10 case 5: a table of malformed URIs, each refused with a message that quotes
    /// none of the input, so the password shows neither in `Display` nor in `Debug`.
    #[test]
    fn malformed_uris_never_show_the_password() {
        const SECRET: &str = "s3cret";
        let table = [
            "amqp:guest:s3cret@host/",                              // no //
            "amqp:/guest:s3cret@host/",                             // one /
            "guest:s3cret@host",                                    // no scheme at all
            "http://guest:s3cret@host/",                            // unknown scheme
            "amqpx://guest:s3cret@host/",                           // unknown scheme
            "amqp://guest:s3cret@host:notaport/",                   // bad port
            "amqp://guest:s3cret@host:99999/",                      // port out of range
            "amqp://guest:s3cret@host:0/",                          // port 0
            "amqp://guest:s3cret@host:-1/",                         // negative port
            "amqp://guest:s3cret%zz@host/", // bad percent-encoding in the password
            "amqp://guest:s3cret%4@host/",  // truncated escape
            "amqp://guest:s3cret%ff@host/", // escape that is not UTF-8
            "amqp://gu%zzest:s3cret@host/", // bad escape in the user
            "amqp://guest:s3cret@/",        // user:pass, no host
            "amqp://guest:s3cret@",         // user:pass, nothing else
            "amqp://guest:s3cret/",         // no '@': the password looks like a port
            "amqp://guest:s3cret@host/v/x", // vhost with an unescaped /
            "amqp://guest:s3cret@host/%zz", // bad escape in the vhost
            "amqp://guest:s3cret@host/?s3cret=1", // unknown query key
            "amqp://guest:s3cret@host/?heartbeat=s3cret", // bad number
            "amqp://guest:s3cret@host/?heartbeat", // no value
            "amqp://guest:s3cret@host/?verify=verify_none", // TLS option on amqp
            "amqps://guest:s3cret@host/?verify=s3cret", // bad verify value
            "amqps://guest:s3cret@host/?auth_mechanism=s3cret", // unknown mechanism
            "amqp://guest:s3cret@host/?connection_timeout=0", // zero timeout
            "amqp://guest:s3cret@host/?max_message_size=0", // no body would fit
            "amqp://guest:s3cret@host/?max_message_size=536870913", // above RabbitMQ's cap
            "amqp://guest:s3cret@host/?max_message_size=1MiB", // not a number
            "amqp://guest:s3cret@[::1/",    // unclosed IPv6 bracket
            "amqp://guest:s3cret@[s3cret]/", // not an IPv6 address
            "amqp://guest:s3cret@[::1]x/",  // junk after ]
            "amqp://guest:s3cret@ho st/",   // space in the host
            "amqp://guest:s3cret@host/#frag", // fragment
            // Issue 21 case 6: an unescaped '/' or '?' in the password ends the authority
            // (RFC 3986 §3.2), so the text before it looked like host:port and was quoted.
            "amqp://guest:s3cret/more@host/",
            "amqp://s3cret:12/34@host/",
            "amqp://guest:s3cret?x@host/",
            "amqp://guest:s3cret?x=1@host/",
            "amqp://s3cret:99/x@h/v",
            "amqp://gu/s3cret@host/",   // in the user name
            "amqp://s3cret:12/34@host", // parsed as host s3cret, port 12, vhost 34@host
            "amqp://s3cret/x@host",
        ];
        for uri in table {
            let error = match ConnectOptions::from_uri(uri) {
                Ok(o) => panic!("{uri} parsed: {o:?}"),
                Err(e) => e,
            };
            let (display, debug) = (error.to_string(), format!("{error:?}"));
            assert!(
                !display.contains(SECRET) && !debug.contains(SECRET),
                "{uri}: {display} / {debug}"
            );
            assert!(display.starts_with("invalid AMQP URI: "), "{display}");
        }
    }

    /// Issue 21 case 6: `amqp://u:12/34@host` connected to "u:12" and said so; whatever is
    /// left of the '@', no message may show it, and none does, parsed or not.
    #[test]
    fn no_part_of_the_userinfo_reaches_a_message() {
        for (uri, secret) in [
            ("amqp://u:12/34@host/", "12"),
            ("amqp://u:12?34@host/", "12"),
            ("amqp://ab:cd/ef@host/", "cd"),
        ] {
            let e = ConnectOptions::from_uri(uri).expect_err("refused");
            let text = e.to_string();
            assert!(
                !text.contains(secret) && !text.contains("u:"),
                "{uri}: {text}"
            );
            assert!(text.contains("%2F"), "says how to write it: {text}");
        }
        // Escaped, they parse.
        let o = ConnectOptions::from_uri("amqp://u:12%2F34%3F@host/").expect("valid");
        assert_eq!(o.connection.credentials.password(), "12/34?");
        assert_eq!(o.host, "host");
    }

    /// Issue 21 case 6: a 70 KB credential was blamed on the server; it is refused while
    /// parsing, with the lengths and the limit, never the values.
    #[test]
    fn credentials_too_long_for_the_handshake_are_refused_while_parsing() {
        let uri = format!("amqp://user:{}@host/", "p".repeat(70_000));
        let e = ConnectOptions::from_uri(&uri).expect_err("too long");
        let text = e.to_string();
        assert!(matches!(e, ConnectError::InvalidUri(_)), "{e:?}");
        assert!(text.contains("70000") && text.contains("4096"), "{text}");
        assert!(!text.contains("ppp"), "{text}");
        let uri = format!("amqp://user:{}@host/", "p".repeat(3_500));
        assert!(ConnectOptions::from_uri(&uri).is_ok());
    }

    #[test]
    fn options_debug_never_shows_the_password() {
        let o =
            ConnectOptions::from_uri("amqps://u:hunter2secret@h/?keyfile=/k.pem").expect("valid");
        assert!(!format!("{o:?}").contains("hunter2secret"));
        // Nor with a provider: its credentials are asked for per attempt, never shown.
        let o = o.with_credentials_provider(|| Credentials::new("u", "rotated2secret"));
        let debug = format!("{o:?}");
        assert!(!debug.contains("secret") && debug.contains("CredentialsProvider(..)"));
        assert_eq!(
            o.connection_config().credentials.password(),
            "rotated2secret"
        );
    }
}
