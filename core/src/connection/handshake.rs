//! The opening handshake (spec §1.4.2, RabbitMQ "Connection" and "Authentication" guides):
//! protocol header → start / start-ok → (secure) → tune / tune-ok → open / open-ok.

use amq_protocol::protocol::connection::StartOk;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};

use std::time::Instant;

use amq_protocol::protocol::{connection, AMQPClass};

use super::config::{ConnectionConfig, Credentials, SaslMechanism, Tune};
use super::heartbeat::Heartbeat;
use super::{Connection, State, Timer};
use crate::codec::{self, FRAME_MIN_SIZE};
use crate::error::ConnectionError;
use crate::ids::{ChannelId, ReplyCode};

/// Where the handshake is.
// Each step awaits one server method; the names say which.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeStep {
    /// Protocol header sent; waiting for `connection.start`.
    AwaitStart,
    /// `start-ok` sent; waiting for `connection.tune` (or a close on failed authentication).
    AwaitTune,
    /// `tune-ok` and `open` sent; waiting for `connection.open-ok`.
    AwaitOpenOk,
}

/// What we may use when the application named no mechanism: the two password mechanisms,
/// PLAIN first (RabbitMQ "Authentication" guide: both are on by default; EXTERNAL needs a
/// client certificate and must be asked for).
const DEFAULT_MECHANISMS: [SaslMechanism; 2] = [SaslMechanism::Plain, SaslMechanism::AmqPlain];

/// Picks the first of `asked` (or of [`DEFAULT_MECHANISMS`] when empty) that the server lists
/// in `connection.start`'s space-separated `mechanisms` (spec §1.4.2.1: the client selects).
pub(crate) fn choose_mechanism(
    offered: &[u8],
    asked: &[SaslMechanism],
) -> Result<SaslMechanism, ConnectionError> {
    let offered = String::from_utf8_lossy(offered);
    let asked = if asked.is_empty() {
        &DEFAULT_MECHANISMS[..]
    } else {
        asked
    };
    let has = |name: &str| offered.split_ascii_whitespace().any(|m| m == name);
    match asked.iter().find(|m| has(m.name())) {
        Some(&mechanism) => Ok(mechanism),
        None => Err(ConnectionError::NoCommonMechanism {
            offered: offered.into_owned(),
            asked: asked.iter().map(|m| m.name()).collect::<Vec<_>>().join(" "),
        }),
    }
}

/// The SASL response for `mechanism`. It holds the password: it goes into a frame and nowhere
/// else.
fn auth_response(mechanism: SaslMechanism, credentials: &Credentials) -> LongString {
    match mechanism {
        // RFC 4616: authzid NUL authcid NUL passwd, with an empty authzid.
        SaslMechanism::Plain => {
            let mut r =
                Vec::with_capacity(2 + credentials.username().len() + credentials.password().len());
            r.push(0);
            r.extend_from_slice(credentials.username().as_bytes());
            r.push(0);
            r.extend_from_slice(credentials.password().as_bytes());
            r.into()
        }
        // AMQPLAIN: a field table's entries without its length prefix, LOGIN then PASSWORD.
        SaslMechanism::AmqPlain => {
            let mut r = Vec::new();
            for (key, value) in [
                ("LOGIN", credentials.username()),
                ("PASSWORD", credentials.password()),
            ] {
                r.push(key.len() as u8);
                r.extend_from_slice(key.as_bytes());
                r.push(b'S');
                r.extend_from_slice(&(value.len() as u32).to_be_bytes());
                r.extend_from_slice(value.as_bytes());
            }
            r.into()
        }
        // RFC 4422 appendix A: an empty authorization identity means "the identity the
        // certificate proves"; RabbitMQ's EXTERNAL ignores the response in any case.
        SaslMechanism::External => LongString::default(),
    }
}

/// Client properties with the capabilities RabbitMQ looks for (RabbitMQ "Connection" guide,
/// "Client Capabilities"). `authentication_failure_close` makes a failed login a
/// `connection.close` with 403 instead of a bare socket close.
fn client_properties(config: &ConnectionConfig) -> FieldTable {
    let mut capabilities = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "consumer_cancel_notify",
        "basic.nack",
        "connection.blocked",
        "authentication_failure_close",
    ] {
        capabilities.insert(ShortString::from(cap), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(s.into());
    props.insert("product".into(), text(env!("CARGO_PKG_NAME")));
    props.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
    props.insert("platform".into(), text("Rust"));
    props.insert("information".into(), text("sans-IO AMQP 0-9-1 RPC client"));
    props.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    if let Some(name) = &config.connection_name {
        props.insert("connection_name".into(), text(name));
    }
    props
}

/// [`ConnectionError::CredentialsTooLong`] when `start-ok` with `mechanism` would not fit in a
/// frame before tune: FRAME_MIN_SIZE (spec §4.2.3), the most a peer must accept before tune.
/// RabbitMQ 3.10 holds to it: a 6 KB start-ok gets no answer at all, and the handshake times
/// out (measured, `credentials.rs`). Encodes it once to measure it: the only exact measure of a
/// field table.
fn credentials_too_long(
    config: &ConnectionConfig,
    mechanism: SaslMechanism,
) -> Option<ConnectionError> {
    let method =
        AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok(config, mechanism)));
    let mut frame = Vec::new();
    // With no frame size limit, encoding fails only for a field above its type's maximum
    // (a longstr over 4 GiB): too long all the same.
    let len = match codec::encode_method(ChannelId::CONNECTION, &method, u32::MAX, &mut frame) {
        Ok(()) => frame.len(),
        Err(_) => usize::MAX,
    };
    (len > FRAME_MIN_SIZE as usize).then(|| ConnectionError::CredentialsTooLong {
        username: config.credentials.username().len(),
        password: config.credentials.password().len(),
        frame: len,
        limit: FRAME_MIN_SIZE,
    })
}

impl ConnectionConfig {
    /// Refuses credentials (or a connection name) too long for `connection.start-ok` with any
    /// of the mechanisms this config may use, with [`ConnectionError::CredentialsTooLong`]:
    /// the check the handshake makes, for a driver to make before it opens a socket.
    pub fn check_credentials_fit(&self) -> Result<(), ConnectionError> {
        let mechanisms = if self.auth_mechanisms.is_empty() {
            &DEFAULT_MECHANISMS[..]
        } else {
            &self.auth_mechanisms[..]
        };
        match mechanisms
            .iter()
            .find_map(|&m| credentials_too_long(self, m))
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Builds `connection.start-ok`. The locale is `en_US`, the one every RabbitMQ offers.
pub(crate) fn start_ok(config: &ConnectionConfig, mechanism: SaslMechanism) -> StartOk {
    StartOk {
        client_properties: client_properties(config),
        mechanism: ShortString::from(mechanism.name()),
        response: auth_response(mechanism, &config.credentials),
        locale: ShortString::from("en_US"),
    }
}

// -----------------------------------------------------------------------------------------------
// The server's side of the handshake, as the connection applies it
// -----------------------------------------------------------------------------------------------

impl Connection {
    pub(super) fn on_start(&mut self, now: Instant, start: connection::Start) {
        if (start.version_major, start.version_minor) != (0, 9) {
            return self.fail(
                now,
                ConnectionError::Protocol {
                    code: ReplyCode::FRAME_ERROR,
                    reason: format!(
                        "server speaks AMQP {}-{}",
                        start.version_major, start.version_minor
                    ),
                },
                None,
            );
        }
        // The server speaks AMQP 0-9-1 now that it sent start: from here on a failure is
        // explained to it with a connection.close.
        self.state = State::Handshake(HandshakeStep::AwaitTune);
        let mechanism =
            match choose_mechanism(start.mechanisms.as_bytes(), &self.config.auth_mechanisms) {
                Ok(m) => m,
                Err(e) => {
                    // The credentials never left.
                    let text = e.to_string();
                    return self.fail(now, e, Some((ReplyCode::ACCESS_REFUSED, text)));
                }
            };
        self.server_properties = start.server_properties;
        if let Some(e) = credentials_too_long(&self.config, mechanism) {
            // Our limit, not the server's fault: the credentials never leave.
            let text = e.to_string();
            return self.fail(now, e, Some((ReplyCode::FRAME_ERROR, text)));
        }
        let start_ok = start_ok(&self.config, mechanism);
        let method = AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok));
        // Measured above: start-ok fits the pre-tune frame.
        self.send_method_unchecked(ChannelId::CONNECTION, method);
    }

    pub(super) fn on_tune(&mut self, now: Instant, tune: connection::Tune) {
        let negotiated = Tune::negotiate(
            &self.config,
            tune.channel_max,
            tune.frame_max,
            tune.heartbeat,
        );
        if negotiated.frame_max < FRAME_MIN_SIZE {
            return self.protocol_error(
                now,
                ReplyCode::SYNTAX_ERROR,
                format!("server frame_max {} is below 4096", tune.frame_max),
            );
        }
        self.tune = negotiated;
        let heartbeat_secs = u16::try_from(negotiated.heartbeat.as_secs()).unwrap_or(u16::MAX);
        let tune_ok = connection::TuneOk {
            channel_max: negotiated.channel_max,
            frame_max: negotiated.frame_max,
            heartbeat: heartbeat_secs,
        };
        self.send_method_unchecked(
            ChannelId::CONNECTION,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
        );
        self.decoder.set_frame_max(negotiated.frame_max);
        self.heartbeat = Heartbeat::new(negotiated.heartbeat);
        if let Some(at) = self.heartbeat.send_at(now) {
            self.timers.set(Timer::SendHeartbeat, at);
        }
        if let Some(at) = self.heartbeat.dead_at(now) {
            self.timers.set(Timer::PeerDead, at);
        }
        let vhost = match ShortString::try_new(self.config.vhost.clone()) {
            Ok(v) => v,
            Err(_) => {
                let reason = format!(
                    "vhost name is {} bytes; at most 255",
                    self.config.vhost.len()
                );
                return self.fail(
                    now,
                    ConnectionError::Protocol {
                        code: ReplyCode::NOT_ALLOWED,
                        reason: reason.clone(),
                    },
                    Some((ReplyCode::NOT_ALLOWED, reason)),
                );
            }
        };
        self.send_method_unchecked(
            ChannelId::CONNECTION,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: vhost,
            })),
        );
        self.state = State::Handshake(HandshakeStep::AwaitOpenOk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_plain_then_amqplain() {
        assert_eq!(
            choose_mechanism(b"AMQPLAIN PLAIN", &[]),
            Ok(SaslMechanism::Plain)
        );
        assert_eq!(
            choose_mechanism(b"AMQPLAIN EXTERNAL", &[]),
            Ok(SaslMechanism::AmqPlain)
        );
        assert!(matches!(
            choose_mechanism(b"EXTERNAL SCRAM-SHA-256", &[]),
            Err(ConnectionError::NoCommonMechanism { offered, asked })
                if offered == "EXTERNAL SCRAM-SHA-256" && asked == "PLAIN AMQPLAIN"
        ));
        assert!(choose_mechanism(b"PLAINX", &[]).is_err());
    }

    #[test]
    fn the_applications_choice_wins_in_its_order() {
        use SaslMechanism::*;
        let offered = b"PLAIN AMQPLAIN EXTERNAL";
        assert_eq!(choose_mechanism(offered, &[External]), Ok(External));
        assert_eq!(choose_mechanism(offered, &[AmqPlain, Plain]), Ok(AmqPlain));
        assert_eq!(choose_mechanism(b"PLAIN", &[External, Plain]), Ok(Plain));
        // Asked for EXTERNAL, offered none of it: the error names both lists.
        let e = choose_mechanism(b"PLAIN AMQPLAIN", &[External]).expect_err("no EXTERNAL");
        assert_eq!(
            e,
            ConnectionError::NoCommonMechanism {
                offered: "PLAIN AMQPLAIN".into(),
                asked: "EXTERNAL".into()
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("[PLAIN AMQPLAIN]") && text.contains("[EXTERNAL]"),
            "{text}"
        );
    }

    #[test]
    fn external_sends_no_secret() {
        let r = auth_response(SaslMechanism::External, &Credentials::new("u", "s3cret"));
        assert!(r.as_bytes().is_empty());
    }

    #[test]
    fn plain_response_is_rfc4616() {
        let r = auth_response(SaslMechanism::Plain, &Credentials::new("u", "p"));
        assert_eq!(r.as_bytes(), b"\0u\0p");
    }

    #[test]
    fn amqplain_response_is_a_table_body() {
        let r = auth_response(SaslMechanism::AmqPlain, &Credentials::new("u", "pw"));
        assert_eq!(
            r.as_bytes(),
            b"\x05LOGINS\x00\x00\x00\x01u\x08PASSWORDS\x00\x00\x00\x02pw"
        );
    }

    #[test]
    fn advertises_capabilities() {
        let props = client_properties(&ConnectionConfig::default());
        let Some(AMQPValue::FieldTable(caps)) = props.inner().get("capabilities") else {
            panic!("no capabilities table");
        };
        for cap in [
            "publisher_confirms",
            "consumer_cancel_notify",
            "basic.nack",
            "connection.blocked",
            "authentication_failure_close",
        ] {
            assert_eq!(
                caps.inner().get(cap),
                Some(&AMQPValue::Boolean(true)),
                "{cap}"
            );
        }
    }
}
