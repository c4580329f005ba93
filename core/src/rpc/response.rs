//! What a handler answers with: the reply's body and the properties the handler may choose.

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::Bytes;

/// A successful reply as a handler gives it to [`super::RpcServer::reply`]: the body, and the
/// few properties a handler may set on the reply message.
///
/// Anything that becomes [`Bytes`] becomes a `Response` with no properties (`Bytes`,
/// `Vec<u8>`, `String`, `&'static str`), so a handler that only answers bytes needs none of
/// this.
///
/// The server owns the rest of the reply's properties, which the wire format needs (see
/// [`crate::rpc`]):
/// - `correlation_id` is always the request's: a `Response` has no field for it;
/// - the error headers [`super::ERROR_HEADER`] and [`super::REJECTED_HEADER`] are removed from
///   `headers` on a successful reply (a caller would read it as an error reply otherwise); an
///   error reply is made by returning a [`super::HandlerError`] instead.
///
/// Other properties (`user_id`, `expiration`, ...) are not offered: a wrong value makes the
/// broker close the server's channel (406 PRECONDITION_FAILED), which would requeue every
/// request in flight on it.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Response {
    /// The reply's body.
    pub body: Bytes,
    /// The reply's `content-type` property, e.g. `application/json`.
    pub content_type: Option<ShortString>,
    /// The reply's `content-encoding` property, e.g. `gzip`.
    pub content_encoding: Option<ShortString>,
    /// Headers of the reply (application headers, AMQP 0-9-1 §4.2.5.5 field table). Empty:
    /// the reply carries no headers.
    pub headers: FieldTable,
}

impl Response {
    /// A reply with this body and no properties.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    /// Sets the reply's content type.
    #[must_use]
    pub fn with_content_type(mut self, content_type: ShortString) -> Self {
        self.content_type = Some(content_type);
        self
    }

    /// Sets the reply's content encoding.
    #[must_use]
    pub fn with_content_encoding(mut self, content_encoding: ShortString) -> Self {
        self.content_encoding = Some(content_encoding);
        self
    }

    /// Adds (or replaces) one header of the reply.
    #[must_use]
    pub fn with_header(mut self, name: ShortString, value: AMQPValue) -> Self {
        self.headers.insert(name, value);
        self
    }
}

impl From<Bytes> for Response {
    fn from(body: Bytes) -> Self {
        Self::new(body)
    }
}

impl From<Vec<u8>> for Response {
    fn from(body: Vec<u8>) -> Self {
        Self::new(body)
    }
}

impl From<String> for Response {
    fn from(body: String) -> Self {
        Self::new(body)
    }
}

impl From<&'static str> for Response {
    fn from(body: &'static str) -> Self {
        Self::new(body)
    }
}

impl From<&'static [u8]> for Response {
    fn from(body: &'static [u8]) -> Self {
        Self::new(body)
    }
}
