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

/// The `driftless` binary the benchmark runs: `DRIFTLESS_BIN`, or `target/<profile>/driftless`
/// beside the running example (`cargo build --release --bins --examples` builds both).
pub fn driftless_binary() -> std::path::PathBuf {
    let bin = match std::env::var_os("DRIFTLESS_BIN") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::env::current_exe()
            .expect("own path")
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/examples")
            .join("driftless"),
    };
    assert!(
        bin.is_file(),
        "{} not found: build it with `cargo build --release --bins --examples` (or set DRIFTLESS_BIN)",
        bin.display()
    );
    bin
}

/// Starts `driftless serve --config <config>` against the cluster of `kubeconfig`, its log
/// appended to `log`, and waits until `<base>/healthz` answers.
pub async fn serve(
    config: &Path,
    kubeconfig: &str,
    log: &Path,
    base: &str,
) -> tokio::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = tokio::process::Command::new(driftless_binary())
        .args(["serve", "--config"])
        .arg(config)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .env("DRIFTLESS_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("starting driftless serve");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("driftless serve exited at start: {status}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "driftless serve did not answer {base}/healthz within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    child
}

/// A free port on loopback, for a `serve` to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `kubectl diff --server-side --force-conflicts -n <ns> -f <path>`: its exit code (0 no
/// difference, 1 differences, above 1 an error such as a rejected dry-run).
pub fn kubectl_diff(kubeconfig: &str, ns: &str, path: &Path) -> i32 {
    Command::new("kubectl")
        .args(["--kubeconfig", kubeconfig, "diff", "--server-side"])
        .args(["--force-conflicts", "-n", ns, "-f"])
        .arg(path)
        .output()
        .expect("running kubectl")
        .status
        .code()
        .unwrap_or(-1)
}
