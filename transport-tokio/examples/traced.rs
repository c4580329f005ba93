//! One call traced end to end, exported to stdout by OpenTelemetry: the caller's span, the
//! client's `rpc.call` span, and the server's `rpc.request` span, all in one trace, the server's
//! span a child of the call's through the `traceparent` header the request carried.
//!
//! Needs a RabbitMQ (`AMQP_URI`, by default the local one):
//! `cargo run -p transport-tokio --example traced`. Swap `opentelemetry_stdout` for an OTLP
//! exporter to send the same spans to a collector.

use std::time::Duration;

use amqp_rpc_cli::fib_handler;
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use transport_tokio::{Client, Server, ServerOptions, DEFAULT_URI};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The application picks the exporter; the driver only emits `tracing` spans.
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(opentelemetry_stdout::SpanExporter::default())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("traced-example"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))?;

    let uri = std::env::var("AMQP_URI").unwrap_or_else(|_| DEFAULT_URI.to_owned());
    // One fixed queue, so that running the example again leaves nothing new behind.
    let queue = "traced-example";
    let server = Server::new(ServerOptions::from_uri(&uri, queue)?);
    let handle = server.handle();
    let serving = tokio::spawn(server.serve(fib_handler));
    if !tokio::time::timeout(Duration::from_secs(10), handle.ready()).await? {
        return Err("the server could not start".into());
    }

    let client = Client::connect(&uri).await?;
    let reply = client
        .call(queue, "20")
        .instrument(tracing::info_span!("checkout"))
        .await?;
    println!("fib(20) = {}", String::from_utf8_lossy(&reply));

    client.close().await;
    handle.shutdown().await;
    serving.await??;
    provider.shutdown()?;
    Ok(())
}
