//! What the status pages cost the API server, counted request by request through a recording
//! client (never timed): an app's page reads the state once and lists each kind and namespace
//! once, however many objects the app has; requests within the sharing window cost one read
//! between them; and the live health shown is capped, saying so.

use std::time::Duration;

use actix_web::{test, web, App};
use driftless::reconcile::Outcome;
use driftless::status_pages::StateSource;
use serde_json::Value;

use crate::reconcile::Env;
use crate::support::api_calls::counting_client;

/// Objects of the app: Ingresses report health (none a condition, so all healthy), ConfigMaps
/// report none.
const INGRESSES: usize = 40;
const CONFIGMAPS: usize = 20;

fn manifests() -> String {
    let mut docs = Vec::new();
    for i in 0..INGRESSES {
        docs.push(format!(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: web-{i:02}\nspec:\n  defaultBackend:\n    service: {{name: web, port: {{number: 80}}}}\n"
        ));
    }
    for i in 0..CONFIGMAPS {
        docs.push(format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i:02}\ndata: {{n: \"{i}\"}}\n"
        ));
    }
    docs.join("---\n")
}

/// Each object's health on `/apps/demo`, by name, and the page's health note.
fn health_of(page: &Value) -> (Vec<(String, String)>, Option<String>) {
    let objects = page["objects"]
        .as_array()
        .unwrap_or_else(|| panic!("no objects on the page: {page}"));
    let health = objects
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap().to_string(),
                o["health"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (health, page["health_note"].as_str().map(str::to_string))
}

/// The pages' routes over a receiver reading app state through `source`, as `serve` builds
/// it (a macro: the test service's type cannot be named).
macro_rules! pages {
    ($env:expr, $source:expr) => {{
        let mut rx = driftless::server::Receiver::new(
            &$env.settings,
            std::sync::Arc::new(driftless::queue::JobQueue::new()),
            std::sync::Arc::new(driftless::metrics::Metrics::new()),
        )
        .unwrap();
        rx.state_source = Some($source);
        test::init_service(
            App::new()
                .app_data(web::Data::new(rx))
                .configure(driftless::server::routes),
        )
        .await
    }};
}

fn page_request() -> test::TestRequest {
    test::TestRequest::get()
        .uri("/apps/demo")
        .insert_header(("Accept", "application/json"))
}

#[actix_web::test]
async fn an_app_page_costs_a_read_per_kind_and_namespace_not_per_object() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    env.repo.write("app/all.yaml", &manifests());
    let c1 = env.repo.commit("an app of 60 objects");
    let report = env.push(&engine, &c1).await.unwrap();
    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(report.objects, INGRESSES + CONFIGMAPS);

    // No sharing: every request reads the cluster. The first resolves the Ingress kind
    // through discovery; after that a page is the state and one LIST of the app's Ingresses.
    let (client, calls) = counting_client().await;
    let source = StateSource::with_ttl(client, env.state_ns.name.clone(), Duration::ZERO);
    let app = pages!(&env, source);
    let page: Value = test::call_and_read_body_json(&app, page_request().to_request()).await;
    let (health, note) = health_of(&page);
    assert_eq!(health.len(), INGRESSES + CONFIGMAPS);
    assert!(
        health.iter().all(|(n, h)| h
            == if n.starts_with("web-") {
                "healthy"
            } else {
                "no health to report"
            }),
        "{health:?}"
    );
    assert_eq!(note, None);
    let first = calls.take();
    assert!(
        first.len() <= 4,
        "the first page cost {} calls: {first:#?}",
        first.len()
    );
    for _ in 0..3 {
        let _: Value = test::call_and_read_body_json(&app, page_request().to_request()).await;
        let each = calls.take();
        let state = format!(
            "GET /api/v1/namespaces/{}/configmaps/driftless-app-demo",
            env.state_ns.name
        );
        let list = format!(
            "GET /apis/networking.k8s.io/v1/namespaces/{}/ingresses?&labelSelector=driftless.dev%2Fapp%3Ddemo",
            env.ns.name
        );
        assert_eq!(each, [state, list], "one page of {INGRESSES} Ingresses");
    }

    // A deleted object shows as missing, read from the same LIST.
    let ingresses: kube::Api<k8s_openapi::api::networking::v1::Ingress> =
        kube::Api::namespaced(env.ns.client.clone(), &env.ns.name);
    ingresses
        .delete("web-07", &Default::default())
        .await
        .unwrap();
    let page: Value = test::call_and_read_body_json(&app, page_request().to_request()).await;
    let (health, _) = health_of(&page);
    let web07 = health.iter().find(|(n, _)| n == "web-07").unwrap();
    assert_eq!(
        web07.1,
        "missing (no such object labelled driftless.dev/app=demo)"
    );
    assert_eq!(calls.take().len(), 2);

    // Shared: any number of requests within the window, at once or one after another, cost
    // one read between them.
    let (client, calls) = counting_client().await;
    let source =
        StateSource::with_ttl(client, env.state_ns.name.clone(), Duration::from_secs(3600));
    let app = pages!(&env, source);
    let pages = futures::future::join_all((0..20).map(|_| {
        let app = &app;
        async move {
            let page: Value = test::call_and_read_body_json(app, page_request().to_request()).await;
            page
        }
    }))
    .await;
    for _ in 0..5 {
        let _: Value = test::call_and_read_body_json(&app, page_request().to_request()).await;
    }
    assert!(pages.iter().all(|p| p == &pages[0]));
    let shared = calls.take();
    assert!(
        shared.len() <= 4,
        "25 requests cost {} calls: {shared:#?}",
        shared.len()
    );
    // The list of apps is shared the same way.
    for _ in 0..10 {
        let req = test::TestRequest::get()
            .uri("/apps")
            .insert_header(("Accept", "application/json"))
            .to_request();
        let list: Value = test::call_and_read_body_json(&app, req).await;
        assert_eq!(list["apps"][0]["objects_count"], INGRESSES + CONFIGMAPS);
    }
    assert_eq!(calls.take().len(), 1);

    // Capped: past the limit, objects are listed without live health, and the page says so.
    let (client, _) = counting_client().await;
    let source = StateSource::with_ttl(client, env.state_ns.name.clone(), Duration::ZERO)
        .with_health_limit(10);
    let app = pages!(&env, source);
    let page: Value = test::call_and_read_body_json(&app, page_request().to_request()).await;
    let (health, note) = health_of(&page);
    assert_eq!(
        note.as_deref(),
        Some("live health shown for the first 10 of the 40 objects that report one")
    );
    let not_read = health
        .iter()
        .filter(|(_, h)| h.starts_with("not read"))
        .count();
    assert_eq!(not_read, INGRESSES - 10, "{health:?}");
    let req = test::TestRequest::get().uri("/apps/demo").to_request();
    let html = String::from_utf8(test::call_and_read_body(&app, req).await.to_vec()).unwrap();
    assert!(
        html.contains("live health shown for the first 10 of the 40"),
        "{html}"
    );
    env.cleanup().await;
}
