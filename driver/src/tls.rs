//! TLS (`amqps://`): the byte stream under the AMQP machine, never seen by the core.
//!
//! One implementation for every runtime: rustls through `futures-rustls`, over whatever TCP
//! stream the [`Runtime`](crate::Runtime) connected (the driver speaks `futures-io`, and
//! `futures-rustls` is the `futures-io` twin of `tokio-rustls`, same code and maintainers), so
//! both transports verify, fail and report alike. The crypto provider is `ring`: it builds with
//! a C compiler alone, where `aws-lc-rs` also needs cmake.
//!
//! Verification is on unless `verify_none` is spelt out: the server's chain must lead to a
//! trusted root and name the host we dialled (SNI carries that host; an IP-address host is
//! checked against the certificate's IP SANs). Trust roots are the platform's store
//! (`rustls-native-certs`: the system's PEM bundle on Linux, the keychain on macOS, the
//! Windows store) unless a CA file is given. We chose it over `rustls-platform-verifier`
//! because it feeds rustls's own WebPKI verifier, whose errors say precisely what is wrong
//! (unknown issuer, expired, wrong name) on every platform, and a CA file and the platform
//! store then go through one verifier.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_io::{AsyncRead, AsyncWrite};
use futures_rustls::TlsConnector;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, SignatureScheme};

/// How `amqps://` connects. `Debug` shows file names, never key material.
#[derive(Clone)]
pub struct TlsConfig {
    /// PEM file of the CA certificates to trust (URI `cacertfile`); `None` trusts the
    /// platform's store.
    pub ca_file: Option<PathBuf>,
    /// PEM file of our certificate chain, for brokers that ask for one (URI `certfile`;
    /// needed by SASL EXTERNAL).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the private key of [`TlsConfig::cert_file`] (URI `keyfile`).
    pub key_file: Option<PathBuf>,
    /// Whether the server's certificate is checked (URI `verify`).
    pub verify: Verify,
    /// The name to send in SNI and to find in the server's certificate, when it is not the
    /// host dialled (URI `server_name_indication`).
    pub server_name: Option<String>,
    /// Whether SNI is sent (URI `server_name_indication=disable` turns it off; the name is
    /// still verified).
    pub send_sni: bool,
    /// A rustls configuration built by the caller. When set, it is used as it is and the
    /// fields above but [`TlsConfig::server_name`] are ignored.
    pub client_config: Option<Arc<rustls::ClientConfig>>,
}

impl Default for TlsConfig {
    /// Platform roots, no client certificate, full verification, SNI from the host.
    fn default() -> Self {
        Self {
            ca_file: None,
            cert_file: None,
            key_file: None,
            verify: Verify::Peer,
            server_name: None,
            send_sni: true,
            client_config: None,
        }
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("verify", &self.verify)
            .field("server_name", &self.server_name)
            .field("send_sni", &self.send_sni)
            .field(
                "client_config",
                &self.client_config.as_ref().map(|_| "<caller-built>"),
            )
            .finish()
    }
}

/// Whether the server's certificate is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Chain to a trusted root, validity dates and host name (`verify=verify_peer`).
    #[default]
    Peer,
    /// Nothing: anyone on the path can read and change the traffic. Only for tests; a warning
    /// is logged at every connect (`verify=verify_none`).
    None,
}

/// Why TLS failed. Messages name files and names, never key material or passwords.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsError {
    /// The server's certificate does not chain to a trusted CA (wrong `cacertfile`, or a
    /// private CA missing from the platform's store).
    UnknownCa,
    /// The server's certificate is valid but not for the name we verified.
    HostnameMismatch {
        /// The name we expected (the URI's host or `server_name_indication`).
        expected: String,
    },
    /// The server's certificate has expired (or is not valid yet: check the clock).
    CertificateExpired,
    /// Another problem with the server's certificate.
    BadServerCertificate {
        /// rustls's description.
        reason: String,
    },
    /// The server wants a client certificate and we sent none (`certfile`, `keyfile`).
    ClientCertificateRequired,
    /// The server refused our certificate because it has expired.
    ClientCertificateExpired,
    /// The server refused our certificate for another reason (unknown CA, bad certificate).
    ClientCertificateRefused {
        /// The TLS alert the server sent.
        alert: String,
    },
    /// We sent a client certificate and the server hung up right after the handshake, before
    /// sending a byte: it refused the certificate, but its TLS 1.3 alert was lost to the TCP
    /// reset that our first bytes, arriving at its closed socket, provoked.
    ClosedAfterClientCertificate,
    /// The server did not answer in TLS: a plain AMQP port?
    NotTls,
    /// The server speaks TLS on this port and we did not: use `amqps://`.
    ServerSpeaksTls,
    /// The TLS settings cannot be used: unreadable file, no certificate or key in it...
    Config {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// Another handshake failure.
    Handshake {
        /// rustls's description.
        reason: String,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::UnknownCa => f.write_str(
                "the server's certificate is not signed by a trusted CA (set cacertfile?)",
            ),
            TlsError::HostnameMismatch { expected } => write!(
                f,
                "the server's certificate is not valid for {expected} (hostname mismatch)"
            ),
            TlsError::CertificateExpired => {
                f.write_str("the server's certificate has expired or is not valid yet")
            }
            TlsError::BadServerCertificate { reason } => {
                write!(f, "bad server certificate: {reason}")
            }
            TlsError::ClientCertificateRequired => f.write_str(
                "the server requires a client certificate and none was given (certfile, keyfile)",
            ),
            TlsError::ClientCertificateExpired => {
                f.write_str("the server refused our client certificate: it has expired")
            }
            TlsError::ClientCertificateRefused { alert } => {
                write!(f, "the server refused our client certificate ({alert})")
            }
            TlsError::ClosedAfterClientCertificate => f.write_str(
                "the server closed the connection right after the TLS handshake: it most likely \
                 refused our client certificate (expired, unknown CA?)",
            ),
            TlsError::NotTls => f.write_str(
                "the server does not speak TLS on this port (a plain AMQP port? use amqp://)",
            ),
            TlsError::ServerSpeaksTls => f.write_str(
                "the server speaks TLS on this port and we sent plain AMQP (use amqps://)",
            ),
            TlsError::Config { reason } => write!(f, "TLS settings: {reason}"),
            TlsError::Handshake { reason } => write!(f, "TLS handshake failed: {reason}"),
        }
    }
}

impl std::error::Error for TlsError {}

impl TlsError {
    /// Classifies an error of the TLS handshake or of a TLS read. `expected` is the verified
    /// name.
    fn from_io(error: &io::Error, expected: &str) -> Option<Self> {
        let rustls_error = error.get_ref()?.downcast_ref::<rustls::Error>()?;
        Some(Self::from_rustls(rustls_error, expected))
    }

    fn from_rustls(error: &rustls::Error, expected: &str) -> Self {
        use rustls::Error as E;
        match error {
            E::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    TlsError::UnknownCa
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => TlsError::HostnameMismatch {
                    expected: expected.to_owned(),
                },
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => TlsError::CertificateExpired,
                other => TlsError::BadServerCertificate {
                    reason: format!("{other:?}"),
                },
            },
            E::AlertReceived(AlertDescription::CertificateRequired) => {
                TlsError::ClientCertificateRequired
            }
            E::AlertReceived(AlertDescription::CertificateExpired) => {
                TlsError::ClientCertificateExpired
            }
            E::AlertReceived(
                alert @ (AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied),
            ) => TlsError::ClientCertificateRefused {
                alert: format!("{alert:?}"),
            },
            E::InvalidMessage(_) => TlsError::NotTls,
            other => TlsError::Handshake {
                reason: other.to_string(),
            },
        }
    }
}

/// What the driver loop reads and writes: a TCP stream, plain or under TLS. A transport names
/// it as its [`Runtime::Stream`](crate::Runtime::Stream).
pub struct Stream<T> {
    inner: Inner<T>,
    /// Whether a read has returned bytes yet (the first bytes of a plain stream are checked).
    read_any: bool,
    /// The TLS failure that ended the stream, kept for the connect error.
    failure: Option<TlsError>,
    /// The name verified, for messages.
    expected: String,
    /// Whether we offered a client certificate in the handshake.
    sent_certificate: bool,
}

enum Inner<T> {
    Plain(T),
    Tls(Box<futures_rustls::client::TlsStream<T>>),
}

impl<T> fmt::Debug for Stream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            Inner::Plain(_) => "plain",
            Inner::Tls(_) => "tls",
        };
        f.debug_struct("Stream").field("kind", &kind).finish()
    }
}

impl<T> Stream<T> {
    /// A plain TCP stream.
    pub fn plain(tcp: T) -> Self {
        Self {
            inner: Inner::Plain(tcp),
            read_any: false,
            failure: None,
            expected: String::new(),
            sent_certificate: false,
        }
    }

    /// Keeps the first TLS failure: a TLS error (an alert), or a hang-up right after a
    /// handshake in which we offered a certificate, seen on a read or on a write.
    fn note_failure(&mut self, e: &io::Error) {
        if self.failure.is_some() || matches!(self.inner, Inner::Plain(_)) {
            return;
        }
        self.failure = TlsError::from_io(e, &self.expected).or_else(|| {
            let hung_up = matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            );
            (hung_up && self.sent_certificate && !self.read_any)
                .then_some(TlsError::ClosedAfterClientCertificate)
        });
    }

    /// The TLS failure that ended this stream, if one did (an alert after the handshake, as a
    /// TLS 1.3 server sends when it refuses our certificate; or TLS bytes on a plain stream).
    pub fn take_failure(&mut self) -> Option<TlsError> {
        self.failure.take()
    }
}

impl<T> AsMut<Stream<T>> for Stream<T> {
    fn as_mut(&mut self) -> &mut Stream<T> {
        self
    }
}

/// A TLS alert record (content type 21) or handshake record (22), version 3.x: what a TLS
/// server sends to a client that spoke plain AMQP to it (RFC 8446 §5.1).
fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes, [0x15 | 0x16, 0x03, ..])
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        match (&this.inner, result) {
            (Inner::Plain(_), Poll::Ready(Ok(n))) if !this.read_any && n > 0 => {
                this.read_any = true;
                if looks_like_tls(&buf[..n]) {
                    this.failure = Some(TlsError::ServerSpeaksTls);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        TlsError::ServerSpeaksTls,
                    )));
                }
                Poll::Ready(Ok(n))
            }
            (Inner::Tls(_), Poll::Ready(Ok(n))) => {
                this.read_any |= n > 0;
                Poll::Ready(Ok(n))
            }
            (Inner::Tls(_), Poll::Ready(Err(e))) => {
                this.note_failure(&e);
                Poll::Ready(Err(e))
            }
            (_, result) => result,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = match &mut this.inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        if let Poll::Ready(Err(e)) = &result {
            this.note_failure(e);
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_close(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

/// A ready-to-use connector: the rustls configuration and the name to verify.
pub(crate) struct Connector {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    expected: String,
}

impl Connector {
    /// Builds the rustls configuration for connecting to `host` (reads the files now, so that
    /// renewed certificates are picked up at the next reconnect).
    pub(crate) fn new(tls: &TlsConfig, host: &str) -> Result<Self, TlsError> {
        let expected = tls.server_name.clone().unwrap_or_else(|| host.to_owned());
        // An IP address becomes ServerName::IpAddress, verified against IP SANs, and is never
        // sent as SNI (RFC 6066 §3 allows host names only; rustls omits it).
        let name = ServerName::try_from(expected.clone()).map_err(|_| TlsError::Config {
            reason: "the server name is neither a DNS name nor an IP address".into(),
        })?;
        let config = match &tls.client_config {
            Some(config) => config.clone(),
            None => Arc::new(build_config(tls)?),
        };
        Ok(Self {
            config,
            name,
            expected,
        })
    }

    /// Runs the TLS handshake over `tcp`.
    pub(crate) async fn handshake<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        tcp: T,
    ) -> Result<Stream<T>, TlsError> {
        let connector = TlsConnector::from(self.config.clone());
        match connector.connect(self.name.clone(), tcp).await {
            Ok(tls) => Ok(Stream {
                inner: Inner::Tls(Box::new(tls)),
                read_any: false,
                failure: None,
                expected: self.expected.clone(),
                sent_certificate: self.config.client_auth_cert_resolver.has_certs(),
            }),
            Err(e) => Err(TlsError::from_io(&e, &self.expected).unwrap_or_else(|| {
                // The server hung up in the middle: what a plain AMQP port does after it
                // answers our ClientHello with its protocol header.
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) {
                    TlsError::NotTls
                } else {
                    TlsError::Handshake {
                        reason: e.to_string(),
                    }
                }
            })),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build_config(tls: &TlsConfig) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            reason: e.to_string(),
        })?;
    let builder = match tls.verify {
        Verify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider()))),
        Verify::Peer => builder.with_root_certificates(roots(tls.ca_file.as_deref())?),
    };
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Config {
                // The error names the file and what went wrong, never the key's bytes.
                reason: format!("no private key read from {}: {e}", key.display()),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config {
                    reason: format!("client certificate and key: {e}"),
                })?
        }
        _ => {
            return Err(TlsError::Config {
                reason: "certfile and keyfile go together".into(),
            })
        }
    };
    config.enable_sni = tls.send_sni;
    Ok(config)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Config {
            reason: format!("cannot read certificates from {}: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Config {
            reason: format!("no PEM certificate in {}", path.display()),
        });
    }
    Ok(certs)
}

/// The CA file's certificates, or the platform's store.
fn roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    let certs = match ca_file {
        Some(path) => read_certs(path)?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::debug!(%error, "skipped part of the platform's certificate store");
            }
            found.certs
        }
    };
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::Config {
            reason: match ca_file {
                Some(path) => format!("no usable CA certificate in {}", path.display()),
                None => "no trusted CA certificate in the platform's store (set cacertfile)".into(),
            },
        });
    }
    Ok(store)
}

/// `verify_none`: accepts any certificate, but still checks that the server holds the key of
/// the certificate it sent (handshake signatures), as Erlang's `verify_none` does.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_a_tls_record() {
        assert!(looks_like_tls(b"\x15\x03\x01\x00\x02\x02\x0a"));
        assert!(!looks_like_tls(b"\x01\x00\x00"));
        assert!(!looks_like_tls(b"AMQP"));
    }

    #[test]
    fn classifies_certificate_errors() {
        let e = |c| TlsError::from_rustls(&rustls::Error::InvalidCertificate(c), "h");
        assert_eq!(e(CertificateError::UnknownIssuer), TlsError::UnknownCa);
        assert_eq!(e(CertificateError::Expired), TlsError::CertificateExpired);
        assert_eq!(
            e(CertificateError::NotValidForName),
            TlsError::HostnameMismatch {
                expected: "h".into()
            }
        );
        assert_eq!(
            TlsError::from_rustls(
                &rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                "h"
            ),
            TlsError::ClientCertificateRequired
        );
    }

    #[test]
    fn unreadable_files_are_config_errors() {
        let tls = TlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsConfig::default()
        };
        assert!(matches!(
            Connector::new(&tls, "localhost"),
            Err(TlsError::Config { .. })
        ));
        let tls = TlsConfig {
            cert_file: Some("/nonexistent/c.pem".into()),
            ..TlsConfig::default()
        };
        assert!(matches!(
            Connector::new(&tls, "localhost"),
            Err(TlsError::Config { .. })
        ));
    }
}
