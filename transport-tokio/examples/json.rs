//! Typed JSON calls (the `json` feature): a server whose handler takes and returns structs, and
//! a client that calls it with `call_json`, in one process. A request that is not JSON is
//! refused with the typed error `invalid_json`, and a handler may set the reply's properties.
//!
//! Needs a RabbitMQ (`AMQP_URI`, by default the local one):
//! `cargo run -p transport-tokio --features json --example json`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use transport_tokio::json::INVALID_JSON;
use transport_tokio::{
    CallError, Client, HandlerError, RpcError, Server, ServerOptions, DEFAULT_URI,
};

#[derive(Debug, Serialize, Deserialize)]
struct Quote {
    item: String,
    quantity: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Price {
    item: String,
    cents: u64,
}

/// The typed handler: a `Quote` in, a `Price` out, or an error reply.
async fn price(quote: Quote) -> Result<Price, HandlerError> {
    let unit = match quote.item.as_str() {
        "apple" => 40,
        "pear" => 55,
        other => {
            return Err(HandlerError::Rejected {
                code: "unknown_item".into(),
                message: format!("no price for {other:?}"),
            })
        }
    };
    Ok(Price {
        item: quote.item,
        cents: unit * u64::from(quote.quantity),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let uri = std::env::var("AMQP_URI").unwrap_or_else(|_| DEFAULT_URI.to_owned());
    // One fixed queue, so that running the example again leaves nothing new behind.
    let queue = "json-example";
    let server = Server::new(ServerOptions::from_uri(&uri, queue)?);
    let handle = server.handle();
    let serving = tokio::spawn(server.serve_json(price));
    if !tokio::time::timeout(Duration::from_secs(10), handle.ready()).await? {
        return Err("the server could not start".into());
    }

    let client = Client::connect(&uri).await?;
    let quote = Quote {
        item: "pear".into(),
        quantity: 3,
    };
    let price: Price = client.call_json(queue, &quote).await?;
    println!("{quote:?} -> {price:?}");

    // The handler's own error reply, typed.
    let unknown = Quote {
        item: "durian".into(),
        quantity: 1,
    };
    match client.call_json::<_, Price>(queue, &unknown).await {
        Err(CallError::Rpc(RpcError::Rejected { code, message })) => {
            println!("{unknown:?} -> rejected ({code}): {message}")
        }
        other => println!("{unknown:?} -> {other:?}"),
    }

    // Not the JSON the server takes: refused before the handler runs.
    match client.call(queue, "{\"item\": 7}").await {
        Err(CallError::Rpc(RpcError::Rejected { code, .. })) if code == INVALID_JSON => {
            println!("a malformed request -> rejected ({code})")
        }
        other => println!("a malformed request -> {other:?}"),
    }

    client.close().await;
    handle.shutdown().await;
    serving.await??;
    Ok(())
}
