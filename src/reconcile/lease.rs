//! One reconcile at a time per app across replicas: a `coordination.k8s.io/v1` Lease
//! `driftless-app-<app>` in the state namespace. Taken with optimistic concurrency
//! (resourceVersion), so two processes can never both hold it; an expired lease (its holder
//! died mid-run) is taken over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;

use super::state::object_name;

/// How long a lease is valid without renewal; longer than any single apply step.
pub const LEASE_SECONDS: i32 = 120;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("app {app} is being reconciled by {holder}; gave up waiting after {waited:?}")]
    Held {
        app: String,
        holder: String,
        waited: Duration,
    },
    #[error("lease of app {app}: {message}")]
    Api { app: String, message: String },
}

/// A held lease; [`LeaseGuard::release`] hands it back.
pub struct LeaseGuard {
    api: Api<Lease>,
    name: String,
    identity: String,
}

fn lease_body(name: &str, identity: &str, resource_version: Option<String>) -> Lease {
    let now = MicroTime(Timestamp::now());
    let mut lease: Lease = serde_json::from_value(serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "driftless"}},
        "spec": {"holderIdentity": identity, "leaseDurationSeconds": LEASE_SECONDS},
    }))
    .expect("a static Lease");
    lease.metadata.resource_version = resource_version;
    if let Some(spec) = lease.spec.as_mut() {
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
    }
    lease
}

fn expired(lease: &Lease) -> bool {
    let Some(spec) = &lease.spec else { return true };
    let Some(renew) = &spec.renew_time else {
        return true;
    };
    let secs = spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS) as i64;
    Timestamp::now().as_second() > renew.0.as_second() + secs
}

/// Takes the app's lease, waiting up to `wait` while another holder has it.
pub async fn acquire(
    client: &Client,
    namespace: &str,
    app: &str,
    identity: &str,
    wait: Duration,
) -> Result<LeaseGuard, LeaseError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let name = object_name(app);
    let started = Instant::now();
    let api_err = |e: kube::Error| LeaseError::Api {
        app: app.to_string(),
        message: e.to_string(),
    };
    loop {
        let current = api.get_opt(&name).await.map_err(api_err)?;
        let attempt = match &current {
            None => api
                .create(&PostParams::default(), &lease_body(&name, identity, None))
                .await
                .map(|_| ()),
            Some(lease) => {
                let holder = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.clone())
                    .unwrap_or_default();
                if holder.is_empty() || holder == identity || expired(lease) {
                    api.replace(
                        &name,
                        &PostParams::default(),
                        &lease_body(&name, identity, lease.metadata.resource_version.clone()),
                    )
                    .await
                    .map(|_| ())
                } else {
                    if started.elapsed() >= wait {
                        return Err(LeaseError::Held {
                            app: app.to_string(),
                            holder,
                            waited: started.elapsed(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        };
        match attempt {
            Ok(()) => {
                return Ok(LeaseGuard {
                    api,
                    name,
                    identity: identity.to_string(),
                })
            }
            // Someone else won the race (409 conflict or 409 already exists): look again.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(api_err(e)),
        }
    }
}

impl LeaseGuard {
    /// Hands the lease back so the next holder does not wait for it to expire.
    pub async fn release(self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(&self.identity);
        if !ours {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        let _ = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await;
    }
}
