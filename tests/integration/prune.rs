//! What a run may delete, and what it must never lose, against the real control plane: an
//! apiVersion change keeps the object; a Namespace or CRD that still holds anything else is
//! kept (and deleted once it holds nothing else); a delete hits only the object that was read;
//! a state too large for its ConfigMap fails the run before anything is written; a state save
//! that fails after an apply loses no object from the inventory; a rejected object inside a
//! namespace the commit creates leaves no namespace behind.

use driftless::reconcile::{prune, state, Outcome, ReconcileError};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ApiResource, DeleteParams, DynamicObject, PostParams};
use kube::Api;
use serde_json::json;

use crate::reconcile::Env;
use crate::support::cluster::delete_namespace_and_wait;

const REPO: &str = "acme/deploy";

fn ingress_resource(version: &str) -> ApiResource {
    ApiResource {
        group: "networking.k8s.io".into(),
        version: version.into(),
        api_version: format!("networking.k8s.io/{version}"),
        kind: "Ingress".into(),
        plural: "ingresses".into(),
    }
}

fn last_status(env: &Env, commit: &str) -> (String, String) {
    let s = env.sim.statuses(REPO, commit).pop().expect("a status");
    (s.state, s.description.unwrap_or_default())
}

#[tokio::test]
async fn an_api_version_change_keeps_the_object_it_applied() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    env.repo.write(
        "app/ingress.yaml",
        "apiVersion: networking.k8s.io/v1beta1\nkind: Ingress\nmetadata:\n  name: web\nspec:\n  backend:\n    serviceName: web\n    servicePort: 80\n",
    );
    let c1 = env.repo.commit("ingress in v1beta1");
    env.push(&engine, &c1).await.unwrap();
    let api: Api<DynamicObject> =
        Api::namespaced_with(env.ns.client.clone(), &env.ns.name, &ingress_resource("v1"));
    let before = api.get("web").await.unwrap().metadata.uid;

    env.repo.write(
        "app/ingress.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: web\nspec:\n  defaultBackend:\n    service:\n      name: web\n      port: {number: 80}\n",
    );
    let c2 = env.repo.commit("ingress moves to v1");
    let r = env.push(&engine, &c2).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    assert!(r.pruned.is_empty(), "pruned {:?}", r.pruned);
    let live = api
        .get_opt("web")
        .await
        .unwrap()
        .expect("the Ingress is still there");
    assert_eq!(live.metadata.uid, before, "the same object, not a new one");
    assert!(live.metadata.deletion_timestamp.is_none());
    let st = state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    let versions: Vec<&str> = st
        .inventory
        .iter()
        .map(|i| i.id.api_version.as_str())
        .collect();
    assert_eq!(versions, ["networking.k8s.io/v1"]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_namespace_is_pruned_only_once_it_holds_nothing_else() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    let extra = format!("{}-x", env.ns.name);
    env.repo.write("app/base.yaml", &env.cm("base", "v1"));
    env.repo.write(
        "app/ns.yaml",
        &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {extra}\n"),
    );
    env.repo.write(
        "app/inside.yaml",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: {extra}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n  namespace: {extra}\n  annotations:\n    driftless.dev/prune: disabled\n"
        ),
    );
    let c1 = env.repo.commit("namespace with two objects");
    env.push(&engine, &c1).await.unwrap();
    let inside: Api<ConfigMap> = Api::namespaced(env.ns.client.clone(), &extra);
    let namespaces: Api<Namespace> = Api::all(env.ns.client.clone());
    let foreign: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "someone-elses"}})).unwrap();
    inside
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();

    // The namespace leaves Git with everything in it: a is pruned, b opted out, and the
    // namespace holds b and someone else's object, so it stays, and the commit says why.
    env.repo.remove("app/ns.yaml");
    env.repo.remove("app/inside.yaml");
    let c2 = env.repo.commit("namespace leaves");
    let r = env.push(&engine, &c2).await.unwrap();
    assert_eq!(
        r.pruned
            .iter()
            .map(|id| id.name.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    let alive = |ns: Option<Namespace>| ns.is_some_and(|n| n.metadata.deletion_timestamp.is_none());
    assert!(
        alive(namespaces.get_opt(&extra).await.unwrap()),
        "the namespace was deleted"
    );
    assert!(inside.get_opt("someone-elses").await.unwrap().is_some());
    assert!(inside.get_opt("b").await.unwrap().is_some());
    let (state_, description) = last_status(&env, &c2);
    assert_eq!(state_, "success");
    assert!(description.contains("2 kept"), "{description}");
    let st = state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    let message = &st.runs[0].message;
    assert!(
        message.contains(&format!(
            "kept v1 Namespace {extra}: holds v1 ConfigMap {extra}/"
        )),
        "{message}"
    );

    // Still holding b, which opted out of pruning: still kept, on every later run.
    inside
        .delete("someone-elses", &DeleteParams::default())
        .await
        .unwrap();
    env.repo.write("app/base.yaml", &env.cm("base", "v2"));
    let c3 = env.repo.commit("base v2");
    let r = env.push(&engine, &c3).await.unwrap();
    assert!(r.pruned.is_empty(), "{:?}", r.pruned);
    assert!(alive(namespaces.get_opt(&extra).await.unwrap()));
    assert!(
        r.kept
            .iter()
            .any(|k| k.id.name == extra && k.reason.contains(&format!("v1 ConfigMap {extra}/b"))),
        "{:?}",
        r.kept
    );

    // Once it holds nothing but what the cluster puts in every namespace, it goes.
    inside.delete("b", &DeleteParams::default()).await.unwrap();
    env.repo.write("app/base.yaml", &env.cm("base", "v3"));
    let c4 = env.repo.commit("base v3");
    let r = env.push(&engine, &c4).await.unwrap();
    assert_eq!(
        r.pruned
            .iter()
            .map(|id| id.name.as_str())
            .collect::<Vec<_>>(),
        [extra.as_str()]
    );
    delete_namespace_and_wait(&env.ns.client, &extra, std::time::Duration::from_secs(60)).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_crd_is_pruned_only_once_no_one_else_has_objects_of_it() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    let group = format!("{}.example.com", env.ns.name);
    let crd_name = format!("widgets.{group}");
    env.repo.write("app/base.yaml", &env.cm("base", "v1"));
    env.repo.write(
        "app/crd.yaml",
        &format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: {crd_name}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: widgets, singular: widget, kind: Widget}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}\n"
        ),
    );
    env.repo.write(
        "app/widget.yaml",
        &format!("apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: ours\n"),
    );
    let c1 = env.repo.commit("crd and a widget");
    env.push(&engine, &c1).await.unwrap();
    let widgets: Api<DynamicObject> = Api::namespaced_with(
        env.ns.client.clone(),
        &env.ns.name,
        &ApiResource {
            group: group.clone(),
            version: "v1".into(),
            api_version: format!("{group}/v1"),
            kind: "Widget".into(),
            plural: "widgets".into(),
        },
    );
    let theirs: DynamicObject = serde_json::from_value(json!({
        "apiVersion": format!("{group}/v1"), "kind": "Widget", "metadata": {"name": "theirs"}
    }))
    .unwrap();
    widgets
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(env.ns.client.clone());

    env.repo.remove("app/crd.yaml");
    env.repo.remove("app/widget.yaml");
    let c2 = env.repo.commit("crd leaves");
    let r = env.push(&engine, &c2).await.unwrap();
    assert_eq!(
        r.pruned
            .iter()
            .map(|id| id.name.as_str())
            .collect::<Vec<_>>(),
        ["ours"]
    );
    let crd = crds
        .get_opt(&crd_name)
        .await
        .unwrap()
        .expect("the CRD was deleted");
    assert!(crd.metadata.deletion_timestamp.is_none());
    assert!(widgets.get_opt("theirs").await.unwrap().is_some());
    let (_, description) = last_status(&env, &c2);
    assert!(
        description.contains("1 kept), healthy")
            && description.contains("CustomResourceDefinition"),
        "{description}"
    );

    widgets
        .delete("theirs", &DeleteParams::default())
        .await
        .unwrap();
    env.repo.write("app/base.yaml", &env.cm("base", "v2"));
    let c3 = env.repo.commit("base v2");
    let r = env.push(&engine, &c3).await.unwrap();
    assert_eq!(
        r.pruned
            .iter()
            .map(|id| id.name.as_str())
            .collect::<Vec<_>>(),
        [crd_name.as_str()]
    );
    let _ = crds.delete(&crd_name, &DeleteParams::default()).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_delete_hits_only_the_object_that_was_read() {
    let env = Env::new("github", "").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        env.ns.client.clone(),
        &env.ns.name,
        &ApiResource::erase::<ConfigMap>(&()),
    );
    let cm = |value: &str| -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x"}, "data": {"v": value}}))
        .unwrap()
    };
    api.create(&PostParams::default(), &cm("first"))
        .await
        .unwrap();
    let seen = api.get("x").await.unwrap();
    // Replaced between the read and the delete: a new object with the same name.
    api.delete("x", &DeleteParams::default()).await.unwrap();
    api.create(&PostParams::default(), &cm("second"))
        .await
        .unwrap();
    assert!(!prune::delete_seen(&api, &seen).await.unwrap());
    let now = api.get("x").await.unwrap();
    assert_eq!(now.data["data"]["v"], "second", "the replacement survives");
    assert!(prune::delete_seen(&api, &now).await.unwrap());
    env.cleanup().await;
}

/// Names of random letters, which compress about as badly as real names do.
fn random_names(count: usize) -> Vec<String> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count)
        .map(|i| {
            let letters: String = (0..200)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (b'a' + (x % 26) as u8) as char
                })
                .collect();
            format!("{letters}-{i}")
        })
        .collect()
}

#[tokio::test]
async fn a_state_too_large_for_the_cluster_fails_before_any_write() {
    let env = Env::new("gitlab", "").await;
    let engine = env.engine();
    // About 5,000 such objects fill a ConfigMap's MiB; 8,000 in eight files overflow it.
    for (n, names) in random_names(8000).chunks(1000).enumerate() {
        let docs: Vec<String> = names.iter().map(|name| env.cm(name, "v")).collect();
        env.repo
            .write(&format!("app/many-{n}.yaml"), &docs.join("---\n"));
    }
    let c1 = env.repo.commit("too many objects to record");
    let e = env.push(&engine, &c1).await.unwrap_err();
    assert!(
        matches!(&e, ReconcileError::State(s) if s.step == "size"),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with("state of app demo (size): the state of 8000 objects would take "),
        "{msg}"
    );
    let written = env.configmaps().list(&Default::default()).await.unwrap();
    let names: Vec<String> = written
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .filter(|n| n != "kube-root-ca.crt")
        .collect();
    assert!(names.is_empty(), "{} objects were written", names.len());
    let (state_, description) = last_status(&env, &c1);
    assert_eq!(state_, "failed");
    assert!(
        description.starts_with("state of app demo (size)"),
        "{description}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_failed_save_after_an_apply_loses_no_object() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    let c1 = env.repo.commit("a");
    env.push(&engine, &c1).await.unwrap();

    env.repo.write("app/b.yaml", &env.cm("b", "v1"));
    let c2 = env.repo.commit("add b");
    state::fail_next_save(&env.state_ns.name, "demo");
    let e = env.push(&engine, &c2).await.unwrap_err();
    assert!(matches!(e, ReconcileError::State(_)), "{e}");
    assert_eq!(
        env.cm_value("b").await.as_deref(),
        Some("v1"),
        "b was applied"
    );

    // A fresh replica (nothing remembered) removes b from Git: b is known, so pruned.
    let engine = env.engine();
    env.repo.remove("app/b.yaml");
    let c3 = env.repo.commit("remove b");
    let r = env.push(&engine, &c3).await.unwrap();
    assert_eq!(r.pruned, [env.id("ConfigMap", "b")]);
    assert!(env.configmaps().get_opt("b").await.unwrap().is_none());
    env.cleanup().await;
}

/// A cold start writes its intent on the app's new Lease, not in a state: should the first
/// run apply and then fail to record, the next run (another replica, nothing remembered) finds
/// no state, reads the intent from the Lease, and prunes what left Git since.
#[tokio::test]
async fn a_first_run_that_cannot_record_leaves_its_intent_on_the_lease_and_loses_no_object() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    env.repo.write("app/b.yaml", &env.cm("b", "v1"));
    let c1 = env.repo.commit("a and b");
    assert_eq!(engine.prefetch_states().await.unwrap(), 0);
    state::fail_next_save(&env.state_ns.name, "demo");
    let e = env.push(&engine, &c1).await.unwrap_err();
    assert!(matches!(e, ReconcileError::State(_)), "{e}");
    engine.settle().await;
    assert_eq!(
        env.cm_value("b").await.as_deref(),
        Some("v1"),
        "b was applied"
    );
    let st = state::load_found(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    assert!(st.is_none(), "the first run wrote a state: {st:?}");

    // The next run also guesses the app is new; its Lease exists, so it goes the ordinary
    // way and reads the intent there.
    let engine = env.engine();
    env.repo.remove("app/b.yaml");
    let c2 = env.repo.commit("remove b");
    assert_eq!(engine.prefetch_states().await.unwrap(), 0);
    let r = env.push(&engine, &c2).await.unwrap();
    assert_eq!(r.pruned, [env.id("ConfigMap", "b")]);
    assert!(env.configmaps().get_opt("b").await.unwrap().is_none());
    assert_eq!(env.cm_value("a").await.as_deref(), Some("v1"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_rejected_object_in_a_namespace_the_commit_creates_leaves_no_namespace() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    let extra = format!("{}-new", env.ns.name);
    env.repo.write("app/base.yaml", &env.cm("base", "v1"));
    let c1 = env.repo.commit("base");
    env.push(&engine, &c1).await.unwrap();

    env.repo.write(
        "app/new.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {extra}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fine\n  namespace: {extra}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: {extra}\nspec:\n  replicas: two\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, image: nginx}}]}}\n"
        ),
    );
    let c2 = env.repo.commit("a namespace with a bad deployment");
    let e = env.push(&engine, &c2).await.unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "apps/v1 Deployment {extra}/web: rejected by the API server"
        )),
        "{e}"
    );
    let namespaces: Api<Namespace> = Api::all(env.ns.client.clone());
    let left = namespaces.get_opt(&extra).await.unwrap();
    assert!(
        left.as_ref()
            .is_none_or(|n| n.metadata.deletion_timestamp.is_some()),
        "the namespace the rejected commit created is still there"
    );
    let st = state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    assert_eq!(st.revision.as_deref(), Some(c1.as_str()));
    let (state_, _) = last_status(&env, &c2);
    assert_eq!(state_, "failure");
    if left.is_some() {
        delete_namespace_and_wait(&env.ns.client, &extra, std::time::Duration::from_secs(60)).await;
    }
    env.cleanup().await;
}
