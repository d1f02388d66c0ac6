//! Shared by the benchmark examples: a real git repository driven through the `git` CLI.
//! (A directory without `main.rs`, so Cargo does not take it for an example of its own.)
//! Each example compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs `git -C dir args...` with a fixed identity and returns its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@example.com",
            "-c",
            "commit.gpgsign=false",
            "-C",
        ])
        .arg(dir)
        .args(args)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A client for the cluster whose kubeconfig the benchmark was given.
pub async fn kube_client(kubeconfig: &str) -> kube::Client {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// The `p` quantile (0 to 1) of `samples`, which it sorts.
pub fn percentile(samples: &mut [std::time::Duration], p: f64) -> std::time::Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

/// Milliseconds with one decimal, as the rows print them.
pub fn ms(d: std::time::Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Creates (or keeps) the namespace `name` by server-side apply.
pub async fn namespace(client: &kube::Client, name: &str) {
    use kube::api::{Patch, PatchParams};
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    let ns =
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    api.patch(name, &PatchParams::apply("bench"), &Patch::Apply(&ns))
        .await
        .unwrap();
}
