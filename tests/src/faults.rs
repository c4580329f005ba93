//! The fault-injecting [`FaultProxy`] for tests on any runtime: it runs on a tokio runtime of
//! its own, so a smol test can use it as well as a tokio one.

use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Deref;

use amqp_rpc_driver::{ClientOptions, ConnectOptions, ReplyMode};

use crate::broker::uri;
use crate::proxy::FaultProxy;
use crate::servers::client_options;

/// A [`FaultProxy`] in front of the test broker, on a private tokio runtime.
#[derive(Debug)]
pub struct Proxy {
    proxy: Option<FaultProxy>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Starts a proxy to the broker of [`uri`], in [`crate::proxy::FaultMode::Pass`].
    pub fn start() -> Self {
        Self::start_to(&uri())
    }

    /// Starts a proxy to the broker at `broker_uri`, in [`crate::proxy::FaultMode::Pass`].
    pub fn start_to(broker_uri: &str) -> Self {
        let options = ConnectOptions::from_uri(broker_uri).expect("the broker URI does not parse");
        let upstream: SocketAddr = (options.host.as_str(), options.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .expect("broker address does not resolve");
        // A thread of its own: `block_on` may not run inside the test's own runtime.
        let (runtime, proxy) = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("cannot build the proxy's runtime");
            let proxy = runtime
                .block_on(FaultProxy::start(upstream))
                .expect("cannot start the proxy");
            (runtime, proxy)
        })
        .join()
        .expect("proxy start panicked");
        Self {
            proxy: Some(proxy),
            runtime: Some(runtime),
        }
    }

    /// Client options that connect through the proxy.
    pub fn client_options(&self, mode: ReplyMode) -> ClientOptions {
        self.redirect(client_options(mode))
    }

    /// `options` with the broker's address replaced by the proxy's.
    pub fn redirect(&self, mut options: ClientOptions) -> ClientOptions {
        let addr = self.local_addr();
        for address in options.connect.iter_mut() {
            address.host = addr.ip().to_string();
            address.port = addr.port();
        }
        options
    }
}

impl Deref for Proxy {
    type Target = FaultProxy;

    fn deref(&self) -> &FaultProxy {
        self.proxy.as_ref().expect("present until dropped")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Stops accepting and ends every proxied connection.
        drop(self.proxy.take());
        if let Some(runtime) = self.runtime.take() {
            // Never blocks, so it is allowed inside the test's own runtime.
            runtime.shutdown_background();
        }
    }
}
