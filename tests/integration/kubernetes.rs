//! The test control plane itself: server-side apply with our field manager, managedFields, and
//! namespace deletion finishing (which needs kube-controller-manager).

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::support::cluster::{delete_namespace_and_wait, TestNamespace};

#[tokio::test]
async fn server_side_apply_records_driftless_as_field_manager() {
    let ns = TestNamespace::new("it-ssa").await;
    let params = PatchParams::apply("driftless").force();

    let cms: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings", "labels": {"app.kubernetes.io/managed-by": "driftless"}},
        "data": {"greeting": "hello"}
    });
    cms.patch("settings", &params, &Patch::Apply(&cm))
        .await
        .unwrap();

    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let deploy = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}
            }
        }
    });
    deployments
        .patch("web", &params, &Patch::Apply(&deploy))
        .await
        .unwrap();

    let cm = cms.get("settings").await.unwrap();
    assert_eq!(cm.data.unwrap()["greeting"], "hello");
    let managers = cm.metadata.managed_fields.unwrap();
    let ours = managers
        .iter()
        .find(|m| m.manager.as_deref() == Some("driftless"))
        .expect("driftless is a field manager of the ConfigMap");
    assert_eq!(ours.operation.as_deref(), Some("Apply"));
    let fields = serde_json::to_string(&ours.fields_v1).unwrap();
    assert!(fields.contains("f:greeting"), "{fields}");

    let d = deployments.get("web").await.unwrap();
    assert_eq!(d.spec.unwrap().replicas, Some(2));
    let managers = d.metadata.managed_fields.unwrap();
    assert!(managers
        .iter()
        .any(|m| m.manager.as_deref() == Some("driftless")
            && serde_json::to_string(&m.fields_v1)
                .unwrap()
                .contains("f:replicas")));

    // Applying the same object again changes nothing (no new resourceVersion).
    let before = cms.get("settings").await.unwrap().metadata.resource_version;
    let cm_again = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings", "labels": {"app.kubernetes.io/managed-by": "driftless"}},
        "data": {"greeting": "hello"}
    });
    let after = cms
        .patch("settings", &params, &Patch::Apply(&cm_again))
        .await
        .unwrap()
        .metadata
        .resource_version;
    assert_eq!(before, after, "an identical apply must not write");

    // Deleting the namespace finishes (the namespace controller empties it) within a minute.
    let (client, name) = ns.take();
    delete_namespace_and_wait(&client, &name, Duration::from_secs(60)).await;
    let gone: Api<Deployment> = Api::namespaced(client, &name);
    assert!(gone.get_opt("web").await.unwrap().is_none());
}

#[tokio::test]
async fn server_side_dry_run_writes_nothing() {
    let ns = TestNamespace::new("it-dryrun").await;
    let cms: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dry"}, "data": {"a": "b"}});
    let mut params = PatchParams::apply("driftless").force();
    params.dry_run = true;
    let returned = cms.patch("dry", &params, &Patch::Apply(&cm)).await.unwrap();
    assert_eq!(returned.data.unwrap()["a"], "b");
    assert!(cms.get_opt("dry").await.unwrap().is_none());
    ns.cleanup().await;
}
