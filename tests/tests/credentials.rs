//! Credentials, vhost access and connect errors against the real broker, on tokio and on smol
//! (issue 21 cases 5 to 7): one policy for refusals during recovery (a rotated password, revoked
//! permissions, a deleted vhost), credentials from a provider, and connect errors that say what
//! was seen and never quote a password.
//!
//! Each case makes a user (and a vhost) of its own with `rabbitmqctl` and deletes it when done,
//! panic or not; each `rabbitmqctl` is bounded to 30 s.

use std::net::TcpListener;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use amqp_rpc_cli::fib_handler;
use amqp_rpc_core::ReplyCode;
use amqp_rpc_driver::{
    Backoff, CallError, Client, ClientOptions, ConnectError, ConnectionError, ConnectionState,
    Credentials, HandshakeStage, ReplyMode,
};
use e2e_tests::broker::{rabbitmqctl, unique_name, Node, QueueGuard};
use e2e_tests::calls::{call, connect_with, expect_fib, CALL_TIMEOUT};
use e2e_tests::e2e_tests;
use e2e_tests::rt::{blocking, within, TestRuntime};
use e2e_tests::servers::{fault_client_options, fault_server_options, TestServer};
use e2e_tests::states::StateLog;

e2e_tests! {
    rotated_password_waits_and_comes_back,
    credentials_provider_gives_the_new_password,
    revoked_permissions_end_with_the_refusal_after_the_budget,
    deleted_vhost_is_a_refusal_until_it_is_back,
    silent_listener_is_no_reply_to_the_protocol_header,
    long_credentials_are_refused_before_connecting,
}

/// How long a refusal is retried in these cases.
const REFUSAL_BUDGET: Duration = Duration::from_secs(4);

/// A user of the case's own, with every permission on `vhost`; deleted on drop.
struct TestUser {
    name: String,
}

impl TestUser {
    fn new(password: &str, vhost: &str) -> Self {
        let name = unique_name("user");
        rabbitmqctl(&["add_user", &name, password]).expect("add_user");
        let user = Self { name };
        user.permit(vhost);
        user
    }

    fn permit(&self, vhost: &str) {
        rabbitmqctl(&["set_permissions", "-p", vhost, &self.name, ".*", ".*", ".*"])
            .expect("set_permissions");
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_user", &self.name]);
    }
}

/// A vhost of the case's own; deleted on drop.
struct TestVhost {
    name: String,
}

impl TestVhost {
    fn new() -> Self {
        let name = unique_name("vhost");
        rabbitmqctl(&["add_vhost", &name]).expect("add_vhost");
        Self { name }
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.name]);
    }
}

/// Fault-suite options (1 s heartbeat, quick backoff, a connection name of their own) for
/// `user` on `vhost`, with [`REFUSAL_BUDGET`].
fn options_for(user: &str, password: &str, vhost: &str) -> (ClientOptions, String) {
    let name = unique_name("client");
    let mut options = fault_client_options(Node::main().uri(), ReplyMode::default(), &name);
    options.connect[0].connection.credentials = Credentials::new(user, password);
    options.connect[0].connection.vhost = vhost.to_owned();
    options.backoff.refusal_budget = Some(REFUSAL_BUDGET);
    (options, name)
}

fn is_refused(state: &ConnectionState) -> bool {
    matches!(state, ConnectionState::Refused { .. })
}

fn is_connected(state: &ConnectionState) -> bool {
    *state == ConnectionState::Connected
}

/// Whether `error` is RabbitMQ's answer to a wrong password.
fn is_bad_password(error: &ConnectionError) -> bool {
    matches!(error, ConnectionError::AuthenticationFailed { reason } if reason.contains("ACCESS_REFUSED"))
}

/// Issue 21 case 5: a password changed while connected, then the connection closed. The client
/// used to close for good at the first 403 and fail every later call at once with a bare
/// `Closed`. Now it retries within its refusal budget, its state says the broker's words, a
/// call meanwhile waits its deadline and ends never-ran with the refusal, and once the
/// password is back the client is too.
async fn rotated_password_waits_and_comes_back<R: TestRuntime>() {
    let node = Node::main();
    let queue = QueueGuard::new("rotated");
    let server_options = fault_server_options(node.uri(), queue.name(), &unique_name("s"), 1);
    let server = TestServer::start::<R, _, _>(server_options, fib_handler).await;
    let user = TestUser::new("first-secret", "/");
    let (mut options, name) = options_for(&user.name, "first-secret", "/");
    options.backoff.refusal_budget = Some(Duration::from_secs(60));
    let client = connect_with::<R>(options).await;
    expect_fib(call(&client, queue.name(), "20", CALL_TIMEOUT).await, 20);
    let states = StateLog::watch(&client);

    let (u, n) = (user.name.clone(), name.clone());
    blocking(move || {
        rabbitmqctl(&["change_password", &u, "second-secret"])?;
        Node::main().close_connection_named(&n)
    })
    .await
    .expect("change the password and close the connection");
    let cut = Instant::now();
    let (_, refused) = states
        .wait_for::<R>(cut, "Refused", is_refused, Duration::from_secs(10))
        .await;
    let ConnectionState::Refused { error, .. } = refused else {
        unreachable!("matched by is_refused")
    };
    assert!(is_bad_password(&error), "{error:?}");
    assert!(!error.to_string().contains("secret"), "{error}");

    // A call while refused waits out its deadline, then ends never-ran with the refusal.
    let started = Instant::now();
    let result = call(&client, queue.name(), "21", Duration::from_secs(1)).await;
    let waited = started.elapsed();
    match &result {
        Err(e @ CallError::Unavailable { error }) => {
            assert!(is_bad_password(error), "{e:?}");
            assert!(!e.may_have_run());
        }
        other => panic!("{other:?}"),
    }
    assert!(waited >= Duration::from_millis(900), "{waited:?}");

    let u = user.name.clone();
    blocking(move || rabbitmqctl(&["change_password", &u, "first-secret"]))
        .await
        .expect("change the password back");
    let back = Instant::now();
    states
        .wait_for::<R>(back, "Connected", is_connected, Duration::from_secs(10))
        .await;
    expect_fib(call(&client, queue.name(), "22", CALL_TIMEOUT).await, 22);
    client.close().await;
    server.stop::<R>().await;
}

/// Issue 21 case 5, rotating secrets: the provider is asked before every attempt, so the
/// client that was refused with the old password logs in with the new one as soon as the
/// provider gives it, without a restart.
async fn credentials_provider_gives_the_new_password<R: TestRuntime>() {
    let node = Node::main();
    let queue = QueueGuard::new("provider");
    let server_options = fault_server_options(node.uri(), queue.name(), &unique_name("s"), 1);
    let server = TestServer::start::<R, _, _>(server_options, fib_handler).await;
    let user = TestUser::new("old-secret", "/");
    let (mut options, name) = options_for(&user.name, "unused", "/");
    options.backoff.refusal_budget = Some(Duration::from_secs(60));
    let vault = Arc::new(Mutex::new(Credentials::new(&user.name, "old-secret")));
    let asked = Arc::new(Mutex::new(0_usize));
    let provider = {
        let (vault, asked) = (vault.clone(), asked.clone());
        move || {
            *asked.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            vault.lock().unwrap_or_else(PoisonError::into_inner).clone()
        }
    };
    options.connect[0] = options.connect[0]
        .clone()
        .with_credentials_provider(provider);
    let client = connect_with::<R>(options).await;
    expect_fib(call(&client, queue.name(), "20", CALL_TIMEOUT).await, 20);
    assert_eq!(*asked.lock().unwrap_or_else(PoisonError::into_inner), 1);
    let states = StateLog::watch(&client);

    let (u, n) = (user.name.clone(), name.clone());
    blocking(move || {
        rabbitmqctl(&["change_password", &u, "new-secret"])?;
        Node::main().close_connection_named(&n)
    })
    .await
    .expect("rotate the password and close the connection");
    let cut = Instant::now();
    states
        .wait_for::<R>(cut, "Refused", is_refused, Duration::from_secs(10))
        .await;
    *vault.lock().unwrap_or_else(PoisonError::into_inner) =
        Credentials::new(&user.name, "new-secret");
    let rotated = Instant::now();
    states
        .wait_for::<R>(rotated, "Connected", is_connected, Duration::from_secs(10))
        .await;
    assert!(*asked.lock().unwrap_or_else(PoisonError::into_inner) >= 3);
    expect_fib(call(&client, queue.name(), "21", CALL_TIMEOUT).await, 21);
    client.close().await;
    server.stop::<R>().await;
}

/// Issue 21 case 5: access to the vhost revoked (530 on `connection.open`) used to be retried
/// forever. Now the client and the server retry for their refusal budget and then give up with
/// the broker's 530 and words: the client's state is `Failed` with it, a call waiting then ends
/// with it at once, and so does every later call; the server's `serve` returns it.
async fn revoked_permissions_end_with_the_refusal_after_the_budget<R: TestRuntime>() {
    let vhost = TestVhost::new();
    let user = TestUser::new("a-secret", &vhost.name);
    let (options, name) = options_for(&user.name, "a-secret", &vhost.name);
    let mut server_options = fault_server_options(
        Node::main().uri(),
        &unique_name("revoked"),
        &unique_name("s"),
        1,
    );
    server_options.connect[0].connection.credentials = Credentials::new(&user.name, "a-secret");
    server_options.connect[0].connection.vhost = vhost.name.clone();
    server_options.backoff.refusal_budget = Some(REFUSAL_BUDGET);
    let server_name = server_options.connect[0]
        .connection
        .connection_name
        .clone()
        .expect("named");
    let queue = server_options.rpc.queue.clone();
    let server = TestServer::start::<R, _, _>(server_options, fib_handler).await;
    let client = connect_with::<R>(options).await;
    expect_fib(call(&client, &queue, "20", CALL_TIMEOUT).await, 20);
    let states = StateLog::watch(&client);

    let (u, v, n, s) = (
        user.name.clone(),
        vhost.name.clone(),
        name.clone(),
        server_name,
    );
    // Before the revocation: the refusals, and the budget, begin later.
    let revoking = Instant::now();
    blocking(move || {
        rabbitmqctl(&["clear_permissions", "-p", &v, &u])?;
        Node::main().close_connection_named(&n)?;
        Node::main().close_connection_named(&s)
    })
    .await
    .expect("revoke the permissions and close the connections");
    let cut = Instant::now();
    let (_, refused) = states
        .wait_for::<R>(cut, "Refused", is_refused, Duration::from_secs(10))
        .await;
    assert!(
        matches!(&refused, ConnectionState::Refused { error: ConnectionError::ClosedByServer { code, .. }, .. } if *code == ReplyCode::NOT_ALLOWED),
        "{refused:?}"
    );
    // A call made now waits, and ends with the 530 when the client gives up (its deadline is
    // later than the budget).
    let waiting = call(&client, &queue, "21", Duration::from_secs(20)).await;
    let gave_up = revoking.elapsed();
    let is_530 = |e: &ConnectionError| matches!(e, ConnectionError::ClosedByServer { code, text } if *code == ReplyCode::NOT_ALLOWED && text.contains("access to vhost"));
    match &waiting {
        Err(CallError::Unavailable { error }) => assert!(is_530(error), "{error:?}"),
        other => panic!("{other:?}"),
    }
    assert!(
        gave_up >= REFUSAL_BUDGET && gave_up < REFUSAL_BUDGET + Duration::from_secs(8),
        "gave up after {gave_up:?}"
    );
    match client.state() {
        ConnectionState::Failed { error } => assert!(is_530(&error), "{error:?}"),
        other => panic!("{other:?}"),
    }
    // Every later call ends at once with the same error, never a bare `Closed`.
    let started = Instant::now();
    for _ in 0..100 {
        match call(&client, &queue, "22", CALL_TIMEOUT).await {
            Err(CallError::Unavailable { error }) => assert!(is_530(&error), "{error:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    let served = server
        .wait_stopped::<R>(REFUSAL_BUDGET + Duration::from_secs(10))
        .await;
    match served {
        Err(ConnectError::Connection(error)) => assert!(is_530(&error), "{error:?}"),
        other => panic!("{other:?}"),
    }
}

/// Issue 21 case 5: a deleted vhost (RabbitMQ closes its connections, then answers 530 "vhost
/// not found") is a refusal like the others: `Refused` with the broker's words while it lasts,
/// and connected again once the vhost and the permissions are back.
async fn deleted_vhost_is_a_refusal_until_it_is_back<R: TestRuntime>() {
    let vhost = TestVhost::new();
    let user = TestUser::new("a-secret", &vhost.name);
    let (mut options, _name) = options_for(&user.name, "a-secret", &vhost.name);
    options.backoff.refusal_budget = Some(Duration::from_secs(60));
    let client = connect_with::<R>(options).await;
    let states = StateLog::watch(&client);
    let v = vhost.name.clone();
    blocking(move || rabbitmqctl(&["delete_vhost", &v]))
        .await
        .expect("delete the vhost");
    let cut = Instant::now();
    let (_, refused) = states
        .wait_for::<R>(cut, "Refused", is_refused, Duration::from_secs(10))
        .await;
    assert!(
        matches!(&refused, ConnectionState::Refused { error: ConnectionError::ClosedByServer { code, .. }, .. } if *code == ReplyCode::NOT_ALLOWED),
        "{refused:?}"
    );
    let v = vhost.name.clone();
    blocking(move || rabbitmqctl(&["add_vhost", &v]))
        .await
        .expect("add the vhost again");
    user.permit(&vhost.name);
    let back = Instant::now();
    states
        .wait_for::<R>(back, "Connected", is_connected, Duration::from_secs(10))
        .await;
    client.close().await;
}

/// Issue 21 case 7: a broker out of sockets lets the kernel accept the TCP connection and never
/// reads it. The error says so (no reply to the protocol header within the timeout, and what
/// that may mean) instead of "RabbitMQ refused the connection: AMQP handshake timed out".
async fn silent_listener_is_no_reply_to_the_protocol_header<R: TestRuntime>() {
    // Never accepted: connections wait in the kernel's backlog, as at a full broker.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let uri = format!("amqp://guest:guest@127.0.0.1:{port}/%2f?connection_timeout=1000");
    let started = Instant::now();
    let result = within::<R, _>(
        Duration::from_secs(5),
        "connect to a silent listener",
        Client::<R>::connect(&uri),
    )
    .await;
    let error = result.expect_err("nothing answers");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        matches!(
            error,
            ConnectError::Connection(ConnectionError::HandshakeTimedOut {
                stage: HandshakeStage::NoReply,
                ..
            })
        ),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains("no reply to the AMQP protocol header within 1s")
            && text.contains("file descriptors")
            && !text.contains("refused"),
        "{text}"
    );
    drop(listener);
}

/// Issue 21 case 6: a 70 KB credential was sent and blamed on the server ("server violated the
/// protocol (501)"). Now it is refused before a socket is opened, in a URI or in options, with
/// the lengths and the limit; and 6 KB, which fits the pre-tune frame, reaches the broker,
/// which says 403 (so the limit is the broker's too).
async fn long_credentials_are_refused_before_connecting<R: TestRuntime>() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("address").port();
    let long = "x".repeat(70_000);
    let uri = format!("amqp://guest:{long}@127.0.0.1:{port}/%2f");
    let error = Client::<R>::connect(&uri).await.expect_err("too long");
    assert!(matches!(error, ConnectError::InvalidUri(_)), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("70000") && !text.contains("xxxx"), "{text}");

    let mut options = ClientOptions::from_uri(&format!("amqp://127.0.0.1:{port}/")).expect("uri");
    options.connect[0].connection.credentials = Credentials::new("guest", long);
    let error = Client::<R>::connect_with(options)
        .await
        .expect_err("too long");
    assert!(
        matches!(
            error,
            ConnectError::Connection(ConnectionError::CredentialsTooLong {
                password: 70_000,
                ..
            })
        ),
        "{error:?}"
    );
    assert!(!error.to_string().contains("xxxx"), "{error}");
    assert!(
        listener.accept().is_err(),
        "a socket was opened for credentials that cannot be sent"
    );

    // RabbitMQ answers a start-ok of up to 4096 bytes (here: the wrong password)...
    let attempt = |password: String| {
        let mut options = fault_client_options(Node::main().uri(), ReplyMode::default(), "long");
        options.connect[0].connection.credentials = Credentials::new("guest", password);
        options.backoff = Backoff::never();
        Client::<R>::connect_with(options)
    };
    let error = attempt("y".repeat(3_500))
        .await
        .expect_err("wrong password");
    assert!(
        matches!(&error, ConnectError::Connection(e) if is_bad_password(e)),
        "{error:?}"
    );
    // ...and never answers a larger one (measured: 6 KB timed the handshake out), so such
    // credentials are ours to refuse.
    let error = attempt("y".repeat(6_000)).await.expect_err("too long");
    assert!(
        matches!(
            &error,
            ConnectError::Connection(ConnectionError::CredentialsTooLong { limit: 4096, .. })
        ),
        "{error:?}"
    );
}
