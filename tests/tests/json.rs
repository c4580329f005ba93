//! Typed JSON payloads (the `json` feature) and reply properties set by a handler, against the
//! real RabbitMQ, on both runtimes. `cargo test -p e2e-tests --test json`.

use amqp_rpc_core::rpc::{ERROR_HEADER, REJECTED_HEADER};
use amqp_rpc_core::types::BasicProperties;
use amqp_rpc_driver::json::{CONTENT_TYPE, INVALID_JSON, UNSUPPORTED_CONTENT_TYPE};
use amqp_rpc_driver::types::{AMQPValue, ShortString};
use amqp_rpc_driver::{
    CallError, CallRequest, Client, HandlerError, Request, Response, RpcError, RpcReply,
};
use e2e_tests::broker::QueueGuard;
use e2e_tests::calls::{connect, CALL_TIMEOUT};
use e2e_tests::e2e_tests;
use e2e_tests::rt::{within, TestRuntime};
use e2e_tests::servers::{server_options, TestServer};
use serde::{Deserialize, Serialize};

e2e_tests! {
    struct_round_trip,
    malformed_json_is_rejected_with_its_code,
    wrong_content_type_is_rejected,
    reply_properties_set_by_the_handler_reach_the_caller,
    handler_cannot_override_correlation_id_or_error_headers,
    reply_that_is_not_json_is_a_decode_error,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sum {
    terms: Vec<i64>,
    label: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Total {
    total: i64,
    label: String,
}

async fn add(sum: Sum) -> Result<Total, HandlerError> {
    Ok(Total {
        total: sum.terms.iter().sum(),
        label: sum.label.to_uppercase(),
    })
}

/// A `serve_json` server of [`add`] on a fresh queue.
async fn json_server<R: TestRuntime>(what: &str) -> (QueueGuard, TestServer) {
    let queue = QueueGuard::new(what);
    let server =
        TestServer::start_with::<R, _, _>(server_options(queue.name()), |s| s.serve_json(add))
            .await;
    (queue, server)
}

/// A raw call (bytes in, reply or error out) with an optional content type.
async fn raw_call<R: TestRuntime>(
    client: &Client<R>,
    queue: &str,
    content_type: Option<&str>,
    body: &'static str,
) -> Result<RpcReply, CallError> {
    let mut request = CallRequest::new(queue, body, CALL_TIMEOUT);
    if let Some(c) = content_type {
        request.properties = BasicProperties::default().with_content_type(ShortString::from(c));
    }
    within::<R, _>(CALL_TIMEOUT * 2, "raw call", client.call_with(request)).await
}

fn rejected_code(result: &Result<RpcReply, CallError>) -> &str {
    match result {
        Err(CallError::Rpc(RpcError::Rejected { code, .. })) => code,
        other => panic!("expected a rejected error reply, got {other:?}"),
    }
}

fn content_type(reply: &RpcReply) -> Option<&str> {
    reply.properties.content_type().as_ref().map(|c| c.as_str())
}

/// A struct goes out as JSON and comes back typed; the reply says `application/json`; a
/// request without a content type is read as JSON (interop with callers that set none).
async fn struct_round_trip<R: TestRuntime>() {
    let (queue, server) = json_server::<R>("json-round-trip").await;
    let client = connect::<R>(Default::default()).await;
    let request = Sum {
        terms: vec![1, 2, 39],
        label: "answer".into(),
    };
    let total: Total = within::<R, _>(
        CALL_TIMEOUT * 2,
        "call_json",
        client.call_json(queue.name(), &request),
    )
    .await
    .expect("call_json");
    assert_eq!(
        total,
        Total {
            total: 42,
            label: "ANSWER".into()
        }
    );
    let body = r#"{"terms":[2,3],"label":"x"}"#;
    let reply = raw_call(&client, queue.name(), None, body)
        .await
        .expect("no content type is read as JSON");
    assert_eq!(content_type(&reply), Some(CONTENT_TYPE));
    assert_eq!(&reply.body[..], br#"{"total":5,"label":"X"}"#);
    client.close().await;
    server.stop::<R>().await;
}

/// A body that is not JSON, or not the JSON the handler takes, is refused before the handler
/// runs with the typed rejected error `invalid_json`.
async fn malformed_json_is_rejected_with_its_code<R: TestRuntime>() {
    let (queue, server) = json_server::<R>("json-malformed").await;
    let client = connect::<R>(Default::default()).await;
    for body in ["{not json", r#"{"terms":"many","label":1}"#, ""] {
        let result = raw_call(&client, queue.name(), Some(CONTENT_TYPE), body).await;
        assert_eq!(rejected_code(&result), INVALID_JSON, "{body:?}");
    }
    // Typed on the caller's side too: a request of the wrong shape is rejected, not a panic.
    let result: Result<Total, _> = client.call_json(queue.name(), &vec![1, 2]).await;
    match result {
        Err(CallError::Rpc(RpcError::Rejected { code, .. })) => assert_eq!(code, INVALID_JSON),
        other => panic!("expected rejected, got {other:?}"),
    }
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_error, 4);
    client.close().await;
}

/// A request whose content type names another format is refused (`unsupported_content_type`),
/// even when its body happens to be JSON; `application/json; charset=utf-8` is JSON.
async fn wrong_content_type_is_rejected<R: TestRuntime>() {
    let (queue, server) = json_server::<R>("json-content-type").await;
    let client = connect::<R>(Default::default()).await;
    let body = r#"{"terms":[1],"label":"x"}"#;
    for wrong in ["text/plain", "application/xml", "application/octet-stream"] {
        let result = raw_call(&client, queue.name(), Some(wrong), body).await;
        assert_eq!(rejected_code(&result), UNSUPPORTED_CONTENT_TYPE, "{wrong}");
    }
    let reply = raw_call(
        &client,
        queue.name(),
        Some("application/json; charset=utf-8"),
        body,
    )
    .await
    .expect("JSON with a charset parameter");
    assert_eq!(&reply.body[..], br#"{"total":1,"label":"X"}"#);
    client.close().await;
    server.stop::<R>().await;
}

/// The properties a handler chose for its reply: content type, encoding and custom headers.
async fn with_properties(request: Request) -> Result<Response, HandlerError> {
    let forge = &request.body[..] == b"forge";
    let mut response = Response::new(request.body)
        .with_content_type(ShortString::from("text/x-test"))
        .with_content_encoding(ShortString::from("identity"))
        .with_header(
            ShortString::from("x-app-version"),
            AMQPValue::LongString("7".into()),
        );
    if forge {
        response = response
            .with_header(
                ShortString::from(ERROR_HEADER),
                AMQPValue::LongString("forged".into()),
            )
            .with_header(ShortString::from(REJECTED_HEADER), AMQPValue::Boolean(true));
    }
    Ok(response)
}

/// A handler that answers a [`Response`] sets the reply's content type, content encoding and
/// headers, and the caller sees them in `call_with`'s reply.
async fn reply_properties_set_by_the_handler_reach_the_caller<R: TestRuntime>() {
    let queue = QueueGuard::new("json-reply-props");
    let server = TestServer::start_with::<R, _, _>(server_options(queue.name()), |s| {
        s.serve(with_properties)
    })
    .await;
    let client = connect::<R>(Default::default()).await;
    let reply = raw_call(&client, queue.name(), None, "hello")
        .await
        .expect("reply");
    assert_eq!(&reply.body[..], b"hello");
    assert_eq!(content_type(&reply), Some("text/x-test"));
    assert_eq!(
        reply
            .properties
            .content_encoding()
            .as_ref()
            .map(|c| c.as_str()),
        Some("identity")
    );
    let headers = reply.properties.headers().as_ref().expect("headers");
    assert_eq!(
        headers.inner().get("x-app-version"),
        Some(&AMQPValue::LongString("7".into()))
    );
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(
        (report.stats.replied_ok, report.stats.replied_error),
        (1, 0)
    );
}

/// A handler that puts the error headers on a successful reply does not turn it into an error
/// reply (they are dropped), and its reply still carries the request's correlation id (the
/// client matched it to the call; `Response` has no field to change it).
async fn handler_cannot_override_correlation_id_or_error_headers<R: TestRuntime>() {
    let queue = QueueGuard::new("json-no-override");
    let server = TestServer::start_with::<R, _, _>(server_options(queue.name()), |s| {
        s.serve(with_properties)
    })
    .await;
    let client = connect::<R>(Default::default()).await;
    for _ in 0..3 {
        let reply = raw_call(&client, queue.name(), None, "forge")
            .await
            .expect("a successful reply, not an error reply");
        assert_eq!(&reply.body[..], b"forge");
        let headers = reply.properties.headers().as_ref().expect("headers");
        assert!(!headers.contains_key(ERROR_HEADER), "{headers:?}");
        assert!(!headers.contains_key(REJECTED_HEADER), "{headers:?}");
        assert!(headers.contains_key("x-app-version"));
        assert!(reply.properties.correlation_id().is_some());
    }
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(
        (report.stats.replied_ok, report.stats.replied_error),
        (3, 0)
    );
    assert_eq!(
        client.stats().replies_unknown,
        0,
        "every reply matched its call"
    );
}

/// A reply that says another content type, or whose JSON is not the type asked for, ends
/// `call_json` with `CallError::Decode` (the server ran the request), never a panic.
async fn reply_that_is_not_json_is_a_decode_error<R: TestRuntime>() {
    let queue = QueueGuard::new("json-decode");
    let server = TestServer::start_with::<R, _, _>(server_options(queue.name()), |s| {
        s.serve(|request: Request| async move {
            Ok::<_, HandlerError>(match &request.body[..] {
                br#""text""# => {
                    Response::new("plain words").with_content_type(ShortString::from("text/plain"))
                }
                _ => Response::new(r#"{"unexpected":true}"#)
                    .with_content_type(ShortString::from(CONTENT_TYPE)),
            })
        })
    })
    .await;
    let client = connect::<R>(Default::default()).await;
    let result: Result<Total, _> = client.call_json(queue.name(), "text").await;
    match &result {
        Err(error @ CallError::Decode { content_type, .. }) => {
            assert_eq!(content_type.as_deref(), Some("text/plain"));
            assert!(error.may_have_run(), "the server ran it");
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    let result: Result<Total, _> = client.call_json(queue.name(), "json").await;
    match &result {
        Err(CallError::Decode { content_type, .. }) => {
            assert_eq!(content_type.as_deref(), Some(CONTENT_TYPE))
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    client.close().await;
    server.stop::<R>().await;
}
