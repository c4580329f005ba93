//! Making calls in tests: connect, call with a bound, check the answer, many calls at once.

use std::time::Duration;

use amqp_rpc_cli::fib;
use amqp_rpc_driver::{CallError, CallRequest, Client, ClientOptions, ReplyMode};
use bytes::Bytes;

use crate::rt::{spawn, within, TestRuntime};
use crate::servers::client_options;

/// Bound on connecting a client.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Timeout of calls that should be answered at once.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the test broker with `mode`; panics when it cannot connect in time.
pub async fn connect<R: TestRuntime>(mode: ReplyMode) -> Client<R> {
    connect_with::<R>(client_options(mode)).await
}

/// A client with `options`; panics when it cannot connect in time.
pub async fn connect_with<R: TestRuntime>(options: ClientOptions) -> Client<R> {
    let what = format!("client connecting on {}", R::NAME);
    within::<R, _>(CONNECT_LIMIT, &what, Client::<R>::connect_with(options))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// One call with `timeout`, which must end within it (plus 2 s of slack for a loaded machine).
pub async fn call<R: TestRuntime>(
    client: &Client<R>,
    queue: &str,
    body: impl Into<Bytes>,
    timeout: Duration,
) -> Result<Bytes, CallError> {
    let request = CallRequest::new(queue, body, timeout);
    let what = format!("call to {queue} with timeout {timeout:?}");
    within::<R, _>(
        timeout + Duration::from_secs(2),
        &what,
        client.call_with(request),
    )
    .await
    .map(|reply| reply.body)
}

/// Checks that `reply` is fib(`n`).
pub fn expect_fib(reply: Result<Bytes, CallError>, n: u32) {
    let expected = fib(n).expect("n <= 186").to_string();
    match reply {
        Ok(body) => assert_eq!(
            String::from_utf8_lossy(&body),
            expected,
            "wrong answer for fib({n})"
        ),
        Err(e) => panic!("fib({n}) failed: {e:?}"),
    }
}

/// Makes `count` calls at once, from tasks of their own, through clones of one client; call i
/// asks for fib(i mod 187) and must get it. At most 60 s in all.
pub async fn concurrent_calls<R: TestRuntime>(client: &Client<R>, queue: &str, count: u32) {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let (client, queue) = (client.clone(), queue.to_owned());
            let n = i % 187;
            spawn::<R, _>(async move {
                let request = CallRequest::new(queue, n.to_string(), Duration::from_secs(60));
                (n, client.call_with(request).await.map(|r| r.body))
            })
        })
        .collect();
    let what = format!("{count} concurrent calls on {}", R::NAME);
    within::<R, _>(Duration::from_secs(60), &what, async {
        for task in tasks {
            let (n, reply) = task.join().await;
            expect_fib(reply, n);
        }
    })
    .await;
}
