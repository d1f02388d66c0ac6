//! `driftless serve` as a child process: the real binary, started with a settings file and
//! the test cluster's kubeconfig, its log kept in a file for failure messages.

use std::process::Stdio;
use std::time::{Duration, Instant};

/// A settings file for `serve` listening on a free loopback port, in a directory of its own
/// that also holds the logs.
pub struct ServeConfig {
    pub dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
}

impl ServeConfig {
    /// `config` with `sections` added before its `[server]` table and `server_lines` (with
    /// `listen`) at the top of it.
    pub fn new(config: &std::path::Path, sections: &str, server_lines: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let text = std::fs::read_to_string(config).unwrap().replacen(
            "[server]\n",
            &format!("{sections}[server]\nlisten = \"127.0.0.1:{port}\"\n{server_lines}"),
            1,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("driftless.toml");
        std::fs::write(&path, text).unwrap();
        Self {
            dir,
            path,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A log file in the directory.
    pub fn log(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A running `driftless serve`.
pub struct Serve {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl Serve {
    pub async fn start(config: &std::path::Path, base: &str, log: std::path::PathBuf) -> Serve {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_driftless"))
            .args(["serve", "--config"])
            .arg(config)
            .env(
                "KUBECONFIG",
                std::env::var(crate::support::cluster::KUBECONFIG_ENV).unwrap(),
            )
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting driftless serve");
        let serve = Serve { child, log };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/healthz")).send().await.is_err() {
            assert!(
                Instant::now() < deadline,
                "serve did not start: {}",
                serve.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        serve
    }

    /// Sends the simulator's signed GitHub push `before..after` on `main` of `repo` (secret
    /// `s`, as the tests configure it) to this server; the HTTP status it answered.
    pub async fn github_push(
        &self,
        sim: &driftless::simulator::ForgeSimulator,
        base: &str,
        repo: &str,
        before: &str,
        after: &str,
    ) -> u16 {
        sim.send_github_push(base, repo, "main", before, after, "s")
            .await
            .unwrap()
            .as_u16()
    }

    /// The process id, to read its memory from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("serve is running")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid}");
    }

    /// `kill -9`: the process dies at once, holding whatever it held. Returns its log.
    pub async fn kill(mut self) -> String {
        self.child.kill().await.expect("kill -9 serve");
        self.log()
    }

    pub async fn exit_code(mut self, within: Duration) -> (i32, String) {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("serve did not exit within {within:?}: {}", self.log()))
            .unwrap();
        (status.code().unwrap_or(-1), self.log())
    }
}
