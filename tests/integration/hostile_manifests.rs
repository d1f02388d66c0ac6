//! Hostile manifests through the real `driftless serve`: a commit whose YAML expands without
//! bound (an alias bomb) fails that commit, naming the file, while the process stays within a
//! bounded memory (read from /proc) and goes on applying the next commit.

use std::time::{Duration, Instant};

use crate::reconcile::Env;
use crate::support::serve::{Serve, ServeConfig};

const REPO: &str = "acme/deploy";

/// The pod's memory limit in deploy/ (deployment.yaml, knative-service.yaml, cronjob.yaml).
const POD_MEMORY_LIMIT_MIB: u64 = 384;

/// `VmRSS` (resident now) and `VmHWM` (the most ever resident) of a process, in MiB.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix(" kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The last commit status of `sha` once it is terminal (success, failure or error).
async fn terminal_status(
    env: &Env,
    serve: &Serve,
    sha: &str,
) -> driftless::simulator::RecordedStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(s) = env
            .sim
            .statuses(REPO, sha)
            .into_iter()
            .rfind(|s| s.state != "pending")
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no terminal status on {sha}: {:?}\n{}",
            env.sim.statuses(REPO, sha),
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// 3,000 references to an anchor of 3,000 strings: about 50 KB that expand to 9 million
/// values, which took the process to 1,151 MiB before parsing was bounded.
fn alias_bomb() -> String {
    let items: Vec<String> = (0..3_000).map(|i| format!("value-{i:05}")).collect();
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bomb\nanchor: &a [{}]\nrefs: [{}]\n",
        items.join(", "),
        vec!["*a"; 3_000].join(", ")
    )
}

#[tokio::test]
async fn an_alias_bomb_fails_its_commit_and_serve_stays_small_and_alive() {
    let env = Env::new("github", "").await;
    let cfg = ServeConfig::new(&env.config_file, "", "");
    let base = &cfg.base;
    env.repo.write("app/a.yaml", &env.cm("a", "0"));
    let c0 = env.repo.commit("start");
    let serve = Serve::start(&cfg.path, base, cfg.log("serve.log")).await;
    // The start-up catch-up applies the branch head.
    assert_eq!(terminal_status(&env, &serve, &c0).await.state, "success");
    let (rss_before, _) = memory_mib(serve.pid());

    let bomb = alias_bomb();
    assert!(bomb.len() < 60 << 10, "{} bytes", bomb.len());
    env.repo.write("app/bomb.yaml", &bomb);
    env.repo.write("app/a.yaml", &env.cm("a", "1"));
    let c1 = env.repo.commit("an alias bomb");
    let code = serve.github_push(&env.sim, base, REPO, &c0, &c1).await;
    assert_eq!(code, 202, "{}", serve.log());
    let status = terminal_status(&env, &serve, &c1).await;
    let (rss_after, peak) = memory_mib(serve.pid());
    eprintln!(
        "serve RSS: {rss_before} MiB before the bomb, peak {peak} MiB, {rss_after} MiB after"
    );
    assert_eq!(status.state, "failure", "{status:?}");
    let description = status.description.clone().unwrap_or_default();
    assert!(
        description.starts_with("bomb.yaml (document 1): "),
        "{description}"
    );
    // Bounded: the most the process ever held stays well inside the pod's limit (the bomb
    // unbounded took 1,151 MiB, three times it), and the refused tree is given back.
    assert!(
        peak < POD_MEMORY_LIMIT_MIB / 2,
        "serve peaked at {peak} MiB (from {rss_before} MiB) parsing the bomb"
    );
    // Nothing of the commit was applied.
    assert_eq!(env.cm_value("a").await.as_deref(), Some("0"));

    // Still alive, and the next commit applies.
    let alive = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(alive.status().as_u16(), 200);
    env.repo.remove("app/bomb.yaml");
    env.repo.write("app/a.yaml", &env.cm("a", "2"));
    let c2 = env.repo.commit("no bomb");
    let code = serve.github_push(&env.sim, base, REPO, &c1, &c2).await;
    assert_eq!(code, 202, "{}", serve.log());
    let status = terminal_status(&env, &serve, &c2).await;
    assert_eq!(status.state, "success", "{status:?}\n{}", serve.log());
    assert_eq!(env.cm_value("a").await.as_deref(), Some("2"));
    serve.sigterm();
    let (code, log) = serve.exit_code(Duration::from_secs(30)).await;
    assert_eq!(code, 0, "{log}");
    env.cleanup().await;
}
