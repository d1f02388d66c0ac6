//! The binary as a user runs it: `check-config` on good and bad settings, environment
//! overrides, and commands that do not exist yet saying so.

use std::process::{Command, Output};

fn driftless(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_driftless"));
    cmd.args(args).env_remove("DRIFTLESS_CONFIG");
    for (k, _) in std::env::vars() {
        if k.starts_with("DRIFTLESS__") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running the driftless binary")
}

fn example() -> String {
    format!(
        "{}/config/driftless.example.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn check_config_accepts_the_example_and_lists_its_apps() {
    let out = driftless(&["check-config", "--config", &example()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("settings OK: 2 apps"), "{text}");
    assert!(
        text.contains("app web: github acme/deploy branch main path apps/web namespace web"),
        "{text}"
    );
    assert!(
        text.contains("app payments: gitlab acme/platform/deploy branch production"),
        "{text}"
    );
}

#[test]
fn the_contract_example_from_the_foundation_issue_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "0.0.0.0:8080"
public_url = "https://driftless.example.com"
body_limit = "25MiB"

[kubernetes]
state_namespace = "driftless"   # where per-app state and Leases live

[forges.github]
api_url = "https://api.github.com"
token_env = "GITHUB_TOKEN"
webhook_secret_env = "GITHUB_WEBHOOK_SECRET"

[forges.gitlab]
api_url = "https://gitlab.com/api/v4"
token_env = "GITLAB_TOKEN"
webhook_token_env = "GITLAB_WEBHOOK_TOKEN"

[drift]
interval = "10m"

[[apps]]
name = "web"
forge = "github"
repo = "acme/deploy"
branch = "main"
path = "apps/web"
namespace = "web"
prune = true
drift = "heal"
health_timeout = "5m"
"#,
    )
    .unwrap();
    let out = driftless(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("settings OK: 1 app,"));
}

/// Each bad settings file exits non-zero with a message naming the key at fault.
#[test]
fn bad_settings_name_the_key() {
    let example = std::fs::read_to_string(example()).unwrap();
    let cases: &[(&str, String, &str)] = &[
        (
            "missing field",
            example.replacen("repo = \"acme/deploy\"\n", "", 1),
            "apps[0].repo: is required but missing",
        ),
        (
            "unknown key",
            example.replacen("prune = true", "prune = true\nprunee = false", 1),
            "apps[0].prunee: unknown key",
        ),
        (
            "absolute path",
            example.replacen("path = \"apps/web\"", "path = \"/etc\"", 1),
            "apps[0].path: must be a relative path inside the repo, got \"/etc\"",
        ),
        (
            "path escaping the repo",
            example.replacen("path = \"apps/web\"", "path = \"apps/../../x\"", 1),
            "apps[0].path: must be a relative path inside the repo",
        ),
        (
            "unknown forge",
            example.replacen("forge = \"gitlab\"", "forge = \"gitea\"", 1),
            "apps[1].forge: must be \"github\" or \"gitlab\", got \"gitea\"",
        ),
        (
            "duplicate app name",
            example.replacen("name = \"payments\"", "name = \"web\"", 1),
            "apps[1].name: duplicate app name \"web\"",
        ),
        (
            "secret written inline",
            example.replacen(
                "token_env = \"GITHUB_TOKEN\"",
                "token = \"ghp_0123456789\"",
                1,
            ),
            "forges.github.token: secrets are never written inline",
        ),
        (
            "bad duration",
            example.replacen("interval = \"10m\"", "interval = \"often\"", 1),
            "drift.interval: must be a duration",
        ),
        (
            "bad app name",
            example.replacen("name = \"web\"", "name = \"Web_App\"", 1),
            "apps[0].name: must be a DNS label",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (what, text, expected) in cases {
        assert_ne!(text, &example, "case {what} did not change the example");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = driftless(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert!(!out.status.success(), "{what}: accepted");
        let err = stderr(&out);
        assert!(
            err.contains(expected),
            "{what}: expected {expected:?} in:\n{err}"
        );
        assert!(
            !err.contains("ghp_0123456789"),
            "{what}: secret echoed:\n{err}"
        );
    }
}

#[test]
fn environment_overrides_the_file() {
    let out = driftless(
        &["check-config", "--config", &example()],
        &[("DRIFTLESS__SERVER__LISTEN", "127.0.0.1:9191")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("listening on 127.0.0.1:9191"),
        "{}",
        stdout(&out)
    );

    let out = driftless(
        &["check-config", "--config", &example()],
        &[("DRIFTLESS__SERVER__LISTEN", "nowhere")],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("server.listen"), "{}", stderr(&out));
}

#[test]
fn missing_settings_file_is_named() {
    let out = driftless(&["check-config", "--config", "/nonexistent/d.toml"], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/d.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn serve_refuses_to_start_without_a_webhook_secret() {
    let out = driftless(
        &["serve", "--config", &example()],
        &[("DRIFTLESS__SERVER__LISTEN", "127.0.0.1:0")],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("forges.github.webhook_secret_env: environment variable GITHUB_WEBHOOK_SECRET is not set"),
        "{err}"
    );
}

#[test]
fn drift_without_once_says_what_to_do() {
    let out = driftless(&["drift", "--config", &example()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--once"), "{}", stderr(&out));
}

#[test]
fn unknown_app_is_named() {
    for cmd in ["sync", "diff"] {
        let out = driftless(&[cmd, "nope", "--config", &example()], &[]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("no app named \"nope\" in the settings (apps: web, payments)"),
            "{}",
            stderr(&out)
        );
    }
}
