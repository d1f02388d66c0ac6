//! A kube `Client` that records every request it sends to the test control plane, so a test
//! can assert what a scenario costs the API server by counting, never by timing.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use kube::client::ClientBuilder;
use kube::Client;

/// The requests a counting client sent, as `METHOD /path?query`, in order.
#[derive(Clone, Default)]
pub struct ApiCalls(Arc<Mutex<Vec<String>>>);

impl ApiCalls {
    /// GET requests of exactly `path` (any query) so far. A request is recorded when it is
    /// sent, so a read counted after a write saw that write.
    pub fn gets_of(&self, path: &str) -> usize {
        let query = format!("GET {path}?");
        let plain = format!("GET {path}");
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == plain || c.starts_with(&query))
            .count()
    }

    /// Every request so far, forgetting them.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// The tower service that records each request before passing it on.
#[derive(Clone)]
pub struct Recording<S> {
    inner: S,
    calls: ApiCalls,
}

impl<S, B> tower::Service<http::Request<B>> for Recording<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let target = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_string(), |p| p.to_string());
        self.calls
            .0
            .lock()
            .unwrap()
            .push(format!("{} {target}", req.method()));
        self.inner.call(req)
    }
}

struct RecordingLayer(ApiCalls);

impl<S> tower::Layer<S> for RecordingLayer {
    type Service = Recording<S>;

    fn layer(&self, inner: S) -> Recording<S> {
        Recording {
            inner,
            calls: self.0.clone(),
        }
    }
}

/// A client for the test control plane whose every request is recorded.
pub async fn counting_client() -> (Client, ApiCalls) {
    let (_, config) = crate::support::cluster::config().await;
    let calls = ApiCalls::default();
    let client = ClientBuilder::try_from(config)
        .expect("building a client for the test control plane")
        .with_layer(&RecordingLayer(calls.clone()))
        .build();
    (client, calls)
}
