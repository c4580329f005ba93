//! Typed JSON payloads (the `json` feature): [`Client::call_json`] and [`Server::serve_json`],
//! and the pieces they are made of, for handlers that need the whole [`Request`].
//!
//! Content types: a request or reply is JSON when its content type is `application/json` or a
//! `+json` type (`application/problem+json`), with any parameters (`; charset=utf-8`), in any
//! case. One without a content type is read as JSON too, so that callers and servers written
//! without it (RabbitMQ's tutorial in another language) interoperate; one that names another
//! type is refused. Everything this module sends says `application/json`.

use std::future::Future;
use std::sync::Arc;

use amqp_rpc_core::rpc::{CallRequest, HandlerError, Response, RpcReply};
use amqp_rpc_core::types::{BasicProperties, ShortString};
use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use amqp_rpc_core::rpc::INVALID_JSON;

use crate::client::{CallError, Client};
use crate::options::ConnectError;
use crate::server::{Request, Run, Server, ServerReport};
use crate::Runtime;

/// The content type of every JSON request and reply this module sends.
pub const CONTENT_TYPE: &str = "application/json";

/// Error code of the rejected error reply for a request whose content type names something
/// other than JSON.
pub const UNSUPPORTED_CONTENT_TYPE: &str = "unsupported_content_type";

/// Error code of the failed error reply for a handler's answer that has no JSON form.
pub const REPLY_NOT_ENCODABLE: &str = "reply_not_encodable";

impl<R: Runtime> Client<R> {
    /// Calls `queue` with `request` as JSON (content type `application/json`) and the default
    /// timeout, and decodes the reply's JSON body as `Resp`.
    ///
    /// Fails like [`Client::call`], and also with [`CallError::Encode`] when `request` has no
    /// JSON form (never sent), or [`CallError::Decode`] when the reply's content type names
    /// another format or its body is not a `Resp` (the server ran the request). Error replies
    /// come as [`crate::RpcError::Rejected`] / [`crate::RpcError::Remote`] as usual; a server
    /// run by [`Server::serve_json`] rejects a body it cannot parse with code
    /// [`INVALID_JSON`].
    pub async fn call_json<Req, Resp>(&self, queue: &str, request: &Req) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let call = request_to_call(queue, request, self.default_timeout())?;
        let reply = self.call_with(call).await?;
        decode_reply(&reply).inspect_err(|error| {
            tracing::info!(%error, "reply did not decode");
        })
    }
}

impl<R: Runtime> Server<R> {
    /// Serves requests with a typed handler: each request's body is parsed as JSON into `Req`,
    /// and the handler's `Resp` is the reply's JSON body, with content type
    /// `application/json`. Otherwise as [`Server::serve`].
    ///
    /// A request is rejected before the handler runs (the caller gets
    /// [`crate::RpcError::Rejected`]) when its content type names another format (code
    /// [`UNSUPPORTED_CONTENT_TYPE`]) or its body is not a valid `Req` (code [`INVALID_JSON`]).
    /// A request without a content type is read as JSON. A `Resp` that has no JSON form
    /// answers the failure [`REPLY_NOT_ENCODABLE`].
    ///
    /// For a handler that needs the request's properties or deadline, use [`Server::serve`]
    /// with [`parse_request`] and [`to_response`].
    pub async fn serve_json<H, F, Req, Resp>(self, handler: H) -> Result<ServerReport, ConnectError>
    where
        H: Fn(Req) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Resp, HandlerError>> + Send + 'static,
        Req: DeserializeOwned,
        Resp: Serialize,
    {
        let handler = Arc::new(handler);
        let run: Run = Arc::new(move |request| match parse_request::<Req>(&request) {
            Ok(typed) => handler(typed)
                .map(|result| result.and_then(|resp| to_response(&resp)))
                .boxed(),
            Err(error) => futures_util::future::ready(Err(error)).boxed(),
        });
        self.run(run).await
    }
}

/// Parses a request's body as JSON into `Req`, after checking its content type (see the
/// module docs). The error is the rejected error reply to answer with: code
/// [`UNSUPPORTED_CONTENT_TYPE`] or [`INVALID_JSON`].
pub fn parse_request<Req: DeserializeOwned>(request: &Request) -> Result<Req, HandlerError> {
    if let Some(other) = not_json(&request.properties) {
        return Err(HandlerError::Rejected {
            code: UNSUPPORTED_CONTENT_TYPE.into(),
            message: format!("the request's content type is {other:?}, not {CONTENT_TYPE}"),
        });
    }
    Ok(serde_json::from_slice(&request.body)?)
}

/// A reply whose body is `value` as JSON, with content type `application/json`. The error (a
/// value with no JSON form) is the failed error reply [`REPLY_NOT_ENCODABLE`].
pub fn to_response<Resp: Serialize + ?Sized>(value: &Resp) -> Result<Response, HandlerError> {
    let body = serde_json::to_vec(value).map_err(|e| HandlerError::Failed {
        code: REPLY_NOT_ENCODABLE.into(),
        message: format!("the reply has no JSON form: {e}"),
    })?;
    Ok(Response::new(body).with_content_type(ShortString::from(CONTENT_TYPE)))
}

/// Decodes a reply's JSON body as `Resp`, after checking its content type (see the module
/// docs). The error is [`CallError::Decode`].
pub fn decode_reply<Resp: DeserializeOwned>(reply: &RpcReply) -> Result<Resp, CallError> {
    let content_type = || {
        reply
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str().to_owned())
    };
    if let Some(other) = not_json(&reply.properties) {
        return Err(CallError::Decode {
            content_type: Some(other.to_owned()),
            message: format!("the reply is not {CONTENT_TYPE}"),
        });
    }
    serde_json::from_slice(&reply.body).map_err(|e| CallError::Decode {
        content_type: content_type(),
        message: e.to_string(),
    })
}

/// A call to `queue` whose body is `request` as JSON, with content type `application/json`.
fn request_to_call<Req: Serialize + ?Sized>(
    queue: &str,
    request: &Req,
    timeout: std::time::Duration,
) -> Result<CallRequest, CallError> {
    let body = serde_json::to_vec(request).map_err(|e| CallError::Encode {
        message: e.to_string(),
    })?;
    let mut call = CallRequest::new(queue, body, timeout);
    call.properties = BasicProperties::default().with_content_type(ShortString::from(CONTENT_TYPE));
    Ok(call)
}

/// The content type, when there is one and it is not JSON.
fn not_json(properties: &BasicProperties) -> Option<&str> {
    let content_type = properties.content_type().as_ref()?.as_str();
    (!is_json(content_type)).then_some(content_type)
}

/// Whether a content type names JSON: `application/json` or `application/<x>+json`, with any
/// parameters and in any case (RFC 8259 §11, RFC 6839 §3.1; media types are case-insensitive,
/// RFC 2045 §5.1).
fn is_json(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.split_once('/') {
        Some(("application", subtype)) => subtype == "json" || subtype.ends_with("+json"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=UTF-8",
            "application/problem+json",
        ] {
            assert!(is_json(yes), "{yes}");
        }
        for no in [
            "",
            "text/plain",
            "application/jsonx",
            "application/xml",
            "text/json",
            "json",
            "application",
        ] {
            assert!(!is_json(no), "{no}");
        }
    }

    fn reply(content_type: Option<&str>, body: &'static str) -> RpcReply {
        let mut properties = BasicProperties::default();
        if let Some(c) = content_type {
            properties = properties.with_content_type(ShortString::from(c));
        }
        RpcReply {
            body: body.into(),
            properties,
        }
    }

    #[test]
    fn replies_decode_or_say_why_not() {
        assert_eq!(decode_reply::<u32>(&reply(Some(CONTENT_TYPE), "7")), Ok(7));
        assert_eq!(
            decode_reply::<u32>(&reply(None, "7")),
            Ok(7),
            "absent: JSON"
        );
        match decode_reply::<u32>(&reply(Some("text/plain"), "7")) {
            Err(CallError::Decode { content_type, .. }) => {
                assert_eq!(content_type.as_deref(), Some("text/plain"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_reply::<u32>(&reply(Some(CONTENT_TYPE), "\"seven\"")),
            Err(CallError::Decode { .. })
        ));
    }

    #[test]
    fn unencodable_values_are_errors_not_panics() {
        let mut map = std::collections::HashMap::new();
        map.insert(vec![1u8], 1);
        assert!(matches!(
            request_to_call("q", &map, std::time::Duration::from_secs(1)),
            Err(CallError::Encode { .. })
        ));
        assert!(matches!(
            to_response(&map),
            Err(HandlerError::Failed { code, .. }) if code == REPLY_NOT_ENCODABLE
        ));
    }
}
