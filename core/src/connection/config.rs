//! What the application chooses before connecting.

use std::fmt;
use std::time::{Duration, Instant};

/// User name and password. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    /// Credentials for SASL PLAIN or AMQPLAIN.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }

    /// The user name.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The password. Keep it out of logs.
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl Default for Credentials {
    /// RabbitMQ's default user, which may log in from localhost only.
    fn default() -> Self {
        Self::new("guest", "guest")
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A SASL mechanism for `connection.start-ok` (RabbitMQ "Authentication, Authorisation, Access
/// Control" guide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SaslMechanism {
    /// RFC 4616: user name and password in the clear (safe over TLS or loopback only).
    Plain,
    /// RabbitMQ's older variant of PLAIN: the same secrets, as an AMQP field table.
    AmqPlain,
    /// RFC 4422 appendix A: the identity the transport established, i.e. the TLS client
    /// certificate (RabbitMQ's `rabbitmq_auth_mechanism_ssl` plugin; the user is the
    /// certificate's CN or DN per `ssl_cert_login_from`). No password is sent.
    External,
}

impl SaslMechanism {
    /// The mechanism's name on the wire, as in `connection.start`'s `mechanisms`.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::AmqPlain => "AMQPLAIN",
            SaslMechanism::External => "EXTERNAL",
        }
    }

    /// Parses a name, ignoring ASCII case (`external`, as in RabbitMQ's URI query
    /// parameter `auth_mechanism`).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            SaslMechanism::Plain,
            SaslMechanism::AmqPlain,
            SaslMechanism::External,
        ]
        .into_iter()
        .find(|m| m.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Connection settings. The tune values are the client's proposals; the negotiated values are
/// in [`crate::Connection::tune`] once connected.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionConfig {
    /// User name and password (unused by [`SaslMechanism::External`]).
    pub credentials: Credentials,
    /// The SASL mechanisms we may use, in order of preference; the first one the server offers
    /// is used. Empty (the default) means PLAIN, else AMQPLAIN: never EXTERNAL unless asked
    /// for, since it needs a client certificate.
    pub auth_mechanisms: Vec<SaslMechanism>,
    /// Virtual host to open (`/` by default).
    pub vhost: String,
    /// Proposed heartbeat interval; `Duration::ZERO` accepts the server's proposal
    /// (RabbitMQ's default is 60 s; its docs advise 5 to 20 s at the lowest in production).
    pub heartbeat: Duration,
    /// Largest frame we accept and send, header and end octet included (at least 4096).
    pub frame_max: u32,
    /// Most channels we will open; 0 means "whatever the server allows".
    pub channel_max: u16,
    /// How long the protocol handshake may take, from construction to `connection.open-ok`.
    pub handshake_timeout: Duration,
    /// How long to wait for `connection.close-ok` before giving up on a clean close.
    pub close_timeout: Duration,
    /// Largest message body we accept; a larger delivery is skipped without being buffered and
    /// reported as [`crate::Event::ContentTooLarge`].
    pub max_body_size: u64,
    /// Largest message body the broker accepts (RabbitMQ's `max_message_size`, 128 MiB by
    /// default since 3.8). [`crate::Connection::publish`] refuses a larger body with
    /// [`crate::UsageError::MessageTooLarge`] instead of sending it: the broker would close the
    /// whole channel with 406 PRECONDITION_FAILED, taking every other publish on it along.
    /// Set it to the broker's value where that is lower (RabbitMQ 4.x defaults to 16 MiB); the
    /// driver's URI query key `max_message_size` sets it.
    pub max_message_size: u64,
    /// Shown in the RabbitMQ management UI and `rabbitmqctl list_connections name`.
    pub connection_name: Option<String>,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            credentials: Credentials::default(),
            auth_mechanisms: Vec::new(),
            vhost: "/".to_owned(),
            heartbeat: Duration::from_secs(60),
            frame_max: 131_072,
            channel_max: 2047,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            max_body_size: 16 * 1024 * 1024,
            max_message_size: 128 * 1024 * 1024,
            connection_name: None,
        }
    }
}

/// `now + after`, for a deadline from a user-given duration: a duration too large for an
/// `Instant` (`Duration::MAX`) means "never" and is cut to about a century instead of
/// overflowing. (Falling back to `now` is unreachable on real clocks, which start near zero.)
pub(crate) fn deadline_after(now: Instant, after: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(after.min(CENTURY)).unwrap_or(now)
}

/// The values both peers agreed on in `connection.tune` / `tune-ok` (spec §1.4.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tune {
    /// Highest channel number usable.
    pub channel_max: u16,
    /// Largest frame, header and end octet included.
    pub frame_max: u32,
    /// Heartbeat interval; zero when heartbeats are off.
    pub heartbeat: Duration,
}

impl Tune {
    /// Negotiates the client's proposal against the server's, with the rule RabbitMQ's own
    /// clients use: when either side says 0 ("no limit", or for heartbeats "no preference") the
    /// other side's value wins, otherwise the lower one does.
    pub(crate) fn negotiate(
        client: &ConnectionConfig,
        server_channel_max: u16,
        server_frame_max: u32,
        server_heartbeat: u16,
    ) -> Tune {
        fn pick(client: u64, server: u64) -> u64 {
            if client == 0 || server == 0 {
                client.max(server)
            } else {
                client.min(server)
            }
        }
        let channel_max = match pick(u64::from(client.channel_max), u64::from(server_channel_max)) {
            0 => u16::MAX,
            n => u16::try_from(n).unwrap_or(u16::MAX),
        };
        let frame_max = match pick(u64::from(client.frame_max), u64::from(server_frame_max)) {
            0 => u32::MAX,
            n => u32::try_from(n).unwrap_or(u32::MAX),
        };
        // The heartbeat field is whole seconds in a u16 (spec §1.4.2.6).
        let client_heartbeat = client.heartbeat.as_secs().min(u64::from(u16::MAX));
        let heartbeat = Duration::from_secs(pick(client_heartbeat, u64::from(server_heartbeat)));
        Tune {
            channel_max,
            frame_max,
            heartbeat,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(channel_max: u16, frame_max: u32, heartbeat: u64) -> ConnectionConfig {
        ConnectionConfig {
            channel_max,
            frame_max,
            heartbeat: Duration::from_secs(heartbeat),
            ..ConnectionConfig::default()
        }
    }

    #[test]
    fn lower_non_zero_value_wins() {
        let t = Tune::negotiate(&client(100, 131_072, 30), 2047, 65_536, 60);
        assert_eq!(
            t,
            Tune {
                channel_max: 100,
                frame_max: 65_536,
                heartbeat: Duration::from_secs(30)
            }
        );
    }

    #[test]
    fn zero_means_the_other_side_decides() {
        let t = Tune::negotiate(&client(0, 131_072, 0), 2047, 0, 60);
        assert_eq!(
            t,
            Tune {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: Duration::from_secs(60)
            }
        );
        let t = Tune::negotiate(&client(0, 131_072, 10), 0, 131_072, 0);
        assert_eq!(t.channel_max, u16::MAX);
        assert_eq!(t.heartbeat, Duration::from_secs(10));
    }

    #[test]
    fn both_zero_disables_heartbeats() {
        let t = Tune::negotiate(&client(0, 131_072, 0), 0, 0, 0);
        assert_eq!(t.heartbeat, Duration::ZERO);
    }

    #[test]
    fn credentials_debug_hides_password() {
        let c = Credentials::new("alice", "s3cret-pw");
        assert!(!format!("{c:?}").contains("s3cret-pw"));
    }
}
