//! One reconcile at a time per app across replicas: a `coordination.k8s.io/v1` Lease
//! `driftless-app-<app>` in the state namespace. Taken with optimistic concurrency
//! (resourceVersion), so two processes can never both hold it; an expired lease (its holder
//! died mid-run) is taken over.

use std::sync::{Arc, Mutex};
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
    /// The lease changed since this replica last wrote it (the quick path only).
    #[error("lease of app {app} changed since this replica released it")]
    Moved { app: String },
}

/// A held lease, renewed in the background while held; [`LeaseGuard::release`] hands it back.
pub struct LeaseGuard {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The lease as last written by us (its resourceVersion makes the next write conditional).
    current: Arc<Mutex<Lease>>,
    renewer: tokio::task::JoinHandle<()>,
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

/// Takes the app's lease with a single write, from the copy this replica wrote when it last
/// released it. Fails with [`LeaseError::Moved`] when anyone has written the lease since; the
/// caller then takes the ordinary path ([`acquire`]).
pub async fn take_released(
    client: &Client,
    namespace: &str,
    app: &str,
    identity: &str,
    released: Lease,
) -> Result<LeaseGuard, LeaseError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let name = object_name(app);
    let body = lease_body(&name, identity, released.metadata.resource_version.clone());
    match api.replace(&name, &PostParams::default(), &body).await {
        Ok(lease) => Ok(LeaseGuard::hold(api, name, identity, lease)),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Err(LeaseError::Moved {
            app: app.to_string(),
        }),
        Err(e) => Err(LeaseError::Api {
            app: app.to_string(),
            message: e.to_string(),
        }),
    }
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
            None => {
                api.create(&PostParams::default(), &lease_body(&name, identity, None))
                    .await
            }
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
            Ok(lease) => return Ok(LeaseGuard::hold(api, name, identity, lease)),
            // Someone else won the race (409 conflict or 409 already exists): look again.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(api_err(e)),
        }
    }
}

impl LeaseGuard {
    /// Starts renewing `lease` (just written by us) every third of its duration, so a run
    /// longer than the lease (a long health wait) keeps it.
    fn hold(api: Api<Lease>, name: String, identity: &str, lease: Lease) -> Self {
        let current = Arc::new(Mutex::new(lease));
        let renewer = {
            let (api, name, current) = (api.clone(), name.clone(), current.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS as u64 / 3)).await;
                    let mut lease = current.lock().expect("lease").clone();
                    if let Some(spec) = lease.spec.as_mut() {
                        spec.renew_time = Some(MicroTime(Timestamp::now()));
                    }
                    match api.replace(&name, &PostParams::default(), &lease).await {
                        Ok(renewed) => *current.lock().expect("lease") = renewed,
                        Err(e) => {
                            tracing::warn!(lease = %name, error = %e, "cannot renew the lease")
                        }
                    }
                }
            })
        };
        Self {
            api,
            name,
            identity: identity.to_string(),
            current,
            renewer,
        }
    }

    /// Hands the lease back so the next holder does not wait for it to expire. Returns the
    /// released lease as written, for [`take_released`].
    pub async fn release(self) -> Option<Lease> {
        // A renewal cut off mid-flight leaves `current` stale; the replace below then meets a
        // conflict and looks again.
        self.renewer.abort();
        let mut lease = self.current.lock().expect("lease").clone();
        loop {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
            }
            match self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
            {
                Ok(released) => return Some(released),
                // Changed under us (a renewal racing the release): look again, and hand it
                // back only if it is still ours.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let Ok(Some(fresh)) = self.api.get_opt(&self.name).await else {
                        return None;
                    };
                    let ours = fresh
                        .spec
                        .as_ref()
                        .and_then(|s| s.holder_identity.as_deref())
                        == Some(&self.identity);
                    if !ours {
                        return None;
                    }
                    lease = fresh;
                }
                Err(_) => return None,
            }
        }
    }
}
