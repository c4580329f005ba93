//! Several broker addresses for one client or server: the nodes of a RabbitMQ cluster.
//!
//! A RabbitMQ cluster shares its users, vhosts and queue definitions, and any node routes a
//! message to a queue on any other node (<https://www.rabbitmq.com/clustering.html>), so a
//! client may connect to whichever node answers. [`Addresses`] holds one [`ConnectOptions`] per
//! node (credentials, vhost, timeouts may differ per address). A session tries them in a
//! shuffled order, so that clients started together spread over the nodes instead of all
//! landing on the first one (the Java client does the same), and moves on to the next address
//! on every recovery: the node it lost is the least likely to answer now.

use std::fmt;
use std::ops::{Deref, DerefMut};

use crate::options::{ConnectError, ConnectOptions};

/// The broker addresses of a client or server, never empty. Derefs to a slice of
/// [`ConnectOptions`], so one setting is applied to every address with
/// `for o in addresses.iter_mut() { … }`. `Debug` never shows a password.
#[derive(Debug, Clone)]
pub struct Addresses {
    list: Vec<ConnectOptions>,
    shuffle: bool,
}

impl Addresses {
    /// The addresses in `list`, tried in a shuffled order. Fails when `list` is empty.
    pub fn new(list: Vec<ConnectOptions>) -> Result<Self, ConnectError> {
        if list.is_empty() {
            return Err(ConnectError::InvalidUri("no broker address given".into()));
        }
        Ok(Self {
            list,
            shuffle: true,
        })
    }

    /// Parses a comma-separated list of `amqp://` URIs, e.g.
    /// `amqp://guest:guest@10.0.0.1:5672/%2f,amqp://guest:guest@10.0.0.2:5672/%2f` (a comma in a
    /// password must be percent-encoded as `%2C`). Spaces around each URI are ignored.
    pub fn parse(uris: &str) -> Result<Self, ConnectError> {
        Self::from_uris([uris])
    }

    /// One address per URI; each may itself be a comma-separated list (as `--uri` takes both
    /// forms). An error names the address by its position, never by its text (which may hold a
    /// password).
    pub fn from_uris<S: AsRef<str>>(
        uris: impl IntoIterator<Item = S>,
    ) -> Result<Self, ConnectError> {
        let parts: Vec<String> = uris
            .into_iter()
            .flat_map(|uri| {
                uri.as_ref()
                    .split(',')
                    .map(|part| part.trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        let count = parts.len();
        let list = parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                if part.is_empty() {
                    return Err(ConnectError::InvalidUri(format!(
                        "address {} of {count} is empty",
                        i + 1
                    )));
                }
                ConnectOptions::from_uri(part).map_err(|e| match e {
                    ConnectError::InvalidUri(why) if count > 1 => {
                        ConnectError::InvalidUri(format!("address {} of {count}: {why}", i + 1))
                    }
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(list)
    }

    /// Tries the addresses in the order given instead of a shuffled one (the first is always
    /// tried first; after that, the next in the list).
    pub fn in_given_order(mut self) -> Self {
        self.shuffle = false;
        self
    }

    /// The addresses in the order a new session tries them.
    pub(crate) fn rotation(&self) -> Rotation {
        let mut order: Vec<usize> = (0..self.list.len()).collect();
        if self.shuffle {
            shuffle(&mut order);
        }
        Rotation {
            list: self.list.clone(),
            order,
            at: 0,
        }
    }
}

impl From<ConnectOptions> for Addresses {
    fn from(options: ConnectOptions) -> Self {
        Self {
            list: vec![options],
            shuffle: true,
        }
    }
}

impl Deref for Addresses {
    type Target = [ConnectOptions];

    fn deref(&self) -> &[ConnectOptions] {
        &self.list
    }
}

/// A slice, not the `Vec`: addresses can be changed but not removed, so the list stays non-empty.
impl DerefMut for Addresses {
    fn deref_mut(&mut self) -> &mut [ConnectOptions] {
        &mut self.list
    }
}

/// Fisher–Yates, with randomness from v4 UUIDs (what the core already uses for names; no RNG
/// dependency for a handful of swaps).
fn shuffle(order: &mut [usize]) {
    for i in (1..order.len()).rev() {
        let j = (uuid::Uuid::new_v4().as_u128() % (i as u128 + 1)) as usize;
        order.swap(i, j);
    }
}

/// Where a session is in its address list: the address it uses now and the next one.
#[derive(Debug, Clone)]
pub(crate) struct Rotation {
    list: Vec<ConnectOptions>,
    order: Vec<usize>,
    at: usize,
}

impl Rotation {
    /// The address to connect to now.
    pub(crate) fn current(&self) -> &ConnectOptions {
        // `order` holds every index of `list` exactly once and `at < order.len()`: both are
        // non-empty and `advance` wraps.
        &self.list[self.order[self.at]]
    }

    /// Moves on to the next address, wrapping around.
    pub(crate) fn advance(&mut self) {
        self.at = (self.at + 1) % self.order.len();
    }

    /// How many addresses there are.
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

/// One address that could not be used, and why.
#[derive(Debug)]
pub struct AddressFailure {
    /// `host:port` (never the credentials).
    pub address: String,
    /// What went wrong there.
    pub error: ConnectError,
}

impl AddressFailure {
    /// The broker's refusal, when this failure is one (credentials, vhost access: see
    /// [`crate::options::is_refusal`]).
    pub(crate) fn refusal(&self) -> Option<&amqp_rpc_core::ConnectionError> {
        match &self.error {
            ConnectError::Connection(e) if crate::options::is_refusal(e) => Some(e),
            _ => None,
        }
    }

    /// The error a session gives up with after `round` failed: the one error as it is when there
    /// is one address (what a single-broker user expects), else every address with its reason.
    pub(crate) fn into_error(mut round: Vec<AddressFailure>) -> ConnectError {
        if round.len() == 1 {
            if let Some(only) = round.pop() {
                return only.error;
            }
        }
        ConnectError::AllFailed(round)
    }
}

impl fmt::Display for AddressFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = &self.address;
        match &self.error {
            ConnectError::Io { error, .. } => write!(f, "{address}: {error}"),
            ConnectError::TimedOut { after, .. } => {
                write!(f, "{address}: no answer within {after:?}")
            }
            ConnectError::Connection(e) => write!(f, "{address}: {e}"),
            other => write!(f, "{address}: {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: &str = "amqp://a:pa@h1:5681/%2f, amqp://b:pb@h2:5682/v2,amqp://c:pc@h3:5683/v3";

    #[test]
    fn parses_a_comma_separated_list_with_settings_per_address() {
        let a = Addresses::parse(THREE).expect("valid");
        assert_eq!(a.len(), 3);
        let got: Vec<_> = a
            .iter()
            .map(|o| {
                (
                    o.address(),
                    o.connection.credentials.username().to_owned(),
                    o.connection.vhost.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("h1:5681".into(), "a".into(), "/".into()),
                ("h2:5682".into(), "b".into(), "v2".into()),
                ("h3:5683".into(), "c".into(), "v3".into())
            ]
        );
        // Repeated flags and lists mix.
        let b = Addresses::from_uris(["amqp://h1", "amqp://h2,amqp://h3"]).expect("valid");
        assert_eq!(b.len(), 3);
        assert_eq!(
            Addresses::parse(crate::DEFAULT_URI).expect("valid").len(),
            1
        );
    }

    #[test]
    fn refuses_empty_lists_and_names_the_bad_address_without_its_password() {
        assert!(Addresses::new(Vec::new()).is_err());
        assert!(Addresses::parse("").is_err());
        let e = Addresses::parse("amqp://h1,,amqp://h2").expect_err("empty entry");
        assert!(e.to_string().contains("address 2 of 3"), "{e}");
        let e = Addresses::parse("amqp://h1,amqp://u:hunter2secret@h2:notaport/")
            .expect_err("bad port");
        assert!(e.to_string().contains("address 2 of 2"), "{e}");
        assert!(!e.to_string().contains("hunter2secret"), "{e}");
        let a =
            Addresses::parse("amqp://u:hunter2secret@h1,amqp://u:hunter2secret@h2").expect("valid");
        assert!(!format!("{a:?}").contains("hunter2secret"));
    }

    #[test]
    fn a_rotation_visits_every_address_once_per_round() {
        let a = Addresses::parse(THREE).expect("valid");
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut r = a.rotation();
            let mut seen: Vec<String> = (0..3)
                .map(|_| {
                    let address = r.current().address();
                    r.advance();
                    address
                })
                .collect();
            firsts.insert(seen[0].clone());
            // After a whole round, the first address again.
            assert_eq!(r.current().address(), seen[0]);
            seen.sort();
            assert_eq!(seen, ["h1:5681", "h2:5682", "h3:5683"]);
        }
        // Shuffled: every node is sometimes the first (missing one in 200 draws: p < 1e-35).
        assert_eq!(firsts.len(), 3, "{firsts:?}");
    }

    #[test]
    fn in_given_order_keeps_the_order() {
        let a = Addresses::parse(THREE).expect("valid").in_given_order();
        let mut r = a.rotation();
        for expected in ["h1:5681", "h2:5682", "h3:5683", "h1:5681"] {
            assert_eq!(r.current().address(), expected);
            r.advance();
        }
    }

    #[test]
    fn one_failure_is_reported_as_it_is_several_name_every_address() {
        let refused = |address: &str| AddressFailure {
            address: address.into(),
            error: ConnectError::Io {
                address: address.into(),
                error: std::io::ErrorKind::ConnectionRefused.into(),
            },
        };
        let one = AddressFailure::into_error(vec![refused("h1:1")]);
        assert!(matches!(one, ConnectError::Io { .. }), "{one:?}");
        let all = AddressFailure::into_error(vec![refused("h1:1"), refused("h2:2")]);
        let text = all.to_string();
        assert!(matches!(&all, ConnectError::AllFailed(f) if f.len() == 2));
        assert!(text.contains("h1:1") && text.contains("h2:2"), "{text}");
    }
}
