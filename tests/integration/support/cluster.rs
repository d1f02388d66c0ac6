//! The real test control plane: a client for it and a namespace per test.
//!
//! `scripts/test` starts etcd + kube-apiserver + kube-controller-manager (tests/cluster/up.sh)
//! and exports DRIFTLESS_TEST_KUBECONFIG. Without it every cluster test fails with a message
//! saying how to start one: a missing control plane is never a silent skip.
//!
//! It also starts the node cluster (tests/cluster/up.sh --with-node: a control plane of its
//! own with every controller, and one node running pods from the local registry) and exports
//! DRIFTLESS_TEST_NODE_KUBECONFIG and DRIFTLESS_TEST_REGISTRY. It is a separate cluster
//! because the tests on the first one play the workload controllers.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub const KUBECONFIG_ENV: &str = "DRIFTLESS_TEST_KUBECONFIG";
/// The node cluster's kubeconfig.
pub const NODE_KUBECONFIG_ENV: &str = "DRIFTLESS_TEST_NODE_KUBECONFIG";
/// `host:port` of the node cluster's local registry, holding tests/cluster/images.sh's images.
pub const REGISTRY_ENV: &str = "DRIFTLESS_TEST_REGISTRY";

/// Which test cluster a client or namespace belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// The control plane alone; tests play the workload controllers.
    ControlPlane,
    /// The control plane with every controller and one node: pods run.
    WithNode,
}

impl Cluster {
    fn kubeconfig_env(self) -> &'static str {
        match self {
            Cluster::ControlPlane => KUBECONFIG_ENV,
            Cluster::WithNode => NODE_KUBECONFIG_ENV,
        }
    }

    fn start_command(self) -> &'static str {
        match self {
            Cluster::ControlPlane => "tests/cluster/up.sh",
            Cluster::WithNode => "tests/cluster/up.sh --with-node",
        }
    }
}

/// The node cluster's kubeconfig path; panics with instructions when there is none.
pub fn node_kubeconfig() -> String {
    env_or_instructions(Cluster::WithNode)
}

/// The local registry of the node cluster; panics with instructions when it is not set.
pub fn registry() -> String {
    std::env::var(REGISTRY_ENV).unwrap_or_else(|_| {
        panic!(
            "{REGISTRY_ENV} is not set: run the suite with scripts/test, or start the node \
             cluster with tests/cluster/up.sh --with-node and export {REGISTRY_ENV}=127.0.0.1:25000"
        )
    })
}

fn env_or_instructions(cluster: Cluster) -> String {
    let env = cluster.kubeconfig_env();
    std::env::var(env).unwrap_or_else(|_| {
        panic!(
            "no test cluster: {env} is not set. Run the whole suite with scripts/test, or start \
             one with {} and export {env} to the kubeconfig path it prints",
            cluster.start_command()
        )
    })
}

/// A client for the test control plane; panics with instructions when there is none.
pub async fn client() -> Client {
    client_of(Cluster::ControlPlane).await
}

/// A client for `cluster`; panics with instructions when there is none.
pub async fn client_of(cluster: Cluster) -> Client {
    let (path, config) = config_of(cluster).await;
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
    config_of(Cluster::ControlPlane).await
}

async fn config_of(cluster: Cluster) -> (String, Config) {
    let path = env_or_instructions(cluster);
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
    cluster: Cluster,
    cleaned: bool,
}

impl TestNamespace {
    pub async fn new(prefix: &str) -> Self {
        Self::new_in(Cluster::ControlPlane, prefix).await
    }

    /// A namespace of its own in `cluster`.
    pub async fn new_in(cluster: Cluster, prefix: &str) -> Self {
        let client = client_of(cluster).await;
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
            cluster,
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
        delete_namespace_and_wait(&self.client, &self.name, NAMESPACE_GONE_WITHIN).await;
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
        let cluster = self.cluster;
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    let _ = Api::<Namespace>::all(client_of(cluster).await)
                        .delete(&name, &DeleteParams::background())
                        .await;
                });
            }
        })
        .join();
    }
}

/// How long a test namespace may take to go. On the node cluster a loaded kubelet has taken
/// over 60 s to stop a pod's containers.
const NAMESPACE_GONE_WITHIN: Duration = Duration::from_secs(180);

/// Deletes a namespace and polls until it is gone; panics after `timeout`.
///
/// Its pods are then deleted with no grace period (again every few seconds while it goes):
/// the namespace controller otherwise waits for the kubelet to stop every container, 30 s of
/// grace for a process that ignores SIGTERM and more on a loaded machine. Test pods hold
/// nothing worth a graceful stop. The namespace goes first so no controller can make new pods.
pub async fn delete_namespace_and_wait(client: &Client, name: &str, timeout: Duration) {
    let api = Api::<Namespace>::all(client.clone());
    match api.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return,
        Err(e) => panic!("deleting namespace {name}: {e}"),
    }
    let started = Instant::now();
    let mut forced = None::<Instant>;
    loop {
        if forced.is_none_or(|at| at.elapsed() > Duration::from_secs(5)) {
            force_delete_pods(client, name).await;
            forced = Some(Instant::now());
        }
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

/// Deletes every pod of a namespace at once, without waiting for its containers to stop.
async fn force_delete_pods(client: &Client, namespace: &str) {
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::background()
    };
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    match pods.delete_collection(&now, &ListParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("deleting the pods of namespace {namespace}: {e}"),
    }
}
