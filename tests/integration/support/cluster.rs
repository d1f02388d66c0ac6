//! The real test control plane: a client for it and a namespace per test.
//!
//! `scripts/test` starts etcd + kube-apiserver + kube-controller-manager (tests/cluster/up.sh)
//! and exports DRIFTLESS_TEST_KUBECONFIG. Without it every cluster test fails with a message
//! saying how to start one: a missing control plane is never a silent skip.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub const KUBECONFIG_ENV: &str = "DRIFTLESS_TEST_KUBECONFIG";

/// A client for the test control plane; panics with instructions when there is none.
pub async fn client() -> Client {
    let (path, config) = config().await;
    let client = Client::try_from(config).expect("building a client for the test control plane");
    client
        .apiserver_version()
        .await
        .unwrap_or_else(|e| panic!("test control plane from {path} is not answering: {e}"));
    client
}

/// The test control plane's kubeconfig path and client configuration; panics with
/// instructions when there is none.
pub async fn config() -> (String, Config) {
    let path = std::env::var(KUBECONFIG_ENV).unwrap_or_else(|_| {
        panic!(
            "no test control plane: {KUBECONFIG_ENV} is not set. Run the whole suite with \
             scripts/test, or start one with tests/cluster/up.sh and export \
             {KUBECONFIG_ENV}=/tmp/driftless-cluster/kubeconfig"
        )
    });
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("reading test kubeconfig {path}: {e}"));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("test kubeconfig {path}: {e}"));
    (path, config)
}

/// A namespace of its own for one test, named `<prefix>-<random>`; deleted by [`cleanup`]
/// (which waits until it is gone) or, if the test panics first, when dropped.
///
/// [`cleanup`]: TestNamespace::cleanup
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
    cleaned: bool,
}

impl TestNamespace {
    pub async fn new(prefix: &str) -> Self {
        let client = client().await;
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating test namespace {name}: {e}"));
        Self {
            client,
            name,
            cleaned: false,
        }
    }

    /// Hands the namespace over to the caller, who deletes it (for tests of deletion itself).
    pub fn take(mut self) -> (Client, String) {
        self.cleaned = true;
        (self.client.clone(), std::mem::take(&mut self.name))
    }

    /// Deletes the namespace and waits until the API server no longer has it.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        delete_namespace_and_wait(&self.client, &self.name, Duration::from_secs(60)).await;
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // A panicking test still removes its namespace, without waiting for it. The delete
        // runs on a runtime of its own with a client of its own: the test's client is driven by
        // the test's runtime, which is blocked here.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    let _ = Api::<Namespace>::all(client().await)
                        .delete(&name, &DeleteParams::background())
                        .await;
                });
            }
        })
        .join();
    }
}

/// Deletes a namespace and polls until it is gone; panics after `timeout`.
pub async fn delete_namespace_and_wait(client: &Client, name: &str, timeout: Duration) {
    let api = Api::<Namespace>::all(client.clone());
    match api.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return,
        Err(e) => panic!("deleting namespace {name}: {e}"),
    }
    let started = Instant::now();
    loop {
        match api.get_opt(name).await {
            Ok(None) => return,
            Ok(Some(ns)) => {
                if started.elapsed() > timeout {
                    panic!(
                        "namespace {name} still present after {timeout:?}: {:?}",
                        ns.status
                    );
                }
            }
            Err(e) => panic!("reading namespace {name}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
