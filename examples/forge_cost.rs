//! Benchmark: what one push costs on each forge. A repository of 1,000 files holds a
//! 100-manifest app; after a warm fetch, one manifest changes and the app is fetched again.
//! Requests and response bytes are counted by the forge simulator and compared with the floor:
//! one recursive tree read of the app's own subtree plus one read of the changed blob.
//! Prints Markdown table rows (used by scripts/bench).

mod support;

use support::git;

use driftless::forge::github::GithubForge;
use driftless::forge::gitlab::GitlabForge;
use driftless::forge::{fetch_app, BlobCache, Fetched, Forge};
use driftless::settings::Settings;
use driftless::simulator::{ForgeSimulator, SimConfig};

fn write(dir: &std::path::Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn manifest(i: usize, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i}\ndata:\n  value: \"{value}\"\n  padding: \"{}\"\n", "x".repeat(400))
}

#[tokio::main]
async fn main() {
    let repo = tempfile::tempdir().unwrap();
    let dir = repo.path();
    git(dir, &["init", "-q", "-b", "main"]);
    for i in 0..100 {
        write(dir, &format!("apps/web/cm-{i:03}.yaml"), &manifest(i, "v1"));
    }
    for i in 0..900 {
        write(
            dir,
            &format!("other/part-{}/file-{i}.yaml", i % 30),
            &manifest(i, "other"),
        );
    }
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "initial"]);
    let c1 = git(dir, &["rev-parse", "HEAD"]);

    let sim = ForgeSimulator::start(SimConfig {
        github_token: "t".into(),
        gitlab_token: "t".into(),
    })
    .await
    .unwrap();
    sim.add_repo("acme/deploy", dir);
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("t");
    std::fs::write(&token, "t").unwrap();
    let settings = Settings::from_toml_str(&format!(
        "[forges.github]\napi_url = \"{}\"\ntoken_file = \"{t}\"\nwebhook_secret_file = \"{t}\"\n[forges.gitlab]\napi_url = \"{}\"\ntoken_file = \"{t}\"\nwebhook_token_file = \"{t}\"\n",
        sim.github_api_url(),
        sim.gitlab_api_url(),
        t = token.display()
    ))
    .unwrap();
    let github =
        GithubForge::new(settings.forges.github.as_ref().unwrap(), &settings.fetch).unwrap();
    let gitlab =
        GitlabForge::new(settings.forges.gitlab.as_ref().unwrap(), &settings.fetch).unwrap();

    // Warm fetches at c1, then the one-file push.
    let mut known = Vec::new();
    for forge in [&github as &dyn Forge, &gitlab as &dyn Forge] {
        let cache = BlobCache::new(64 << 20);
        let f = fetch_app(
            forge,
            &cache,
            &settings.fetch,
            "acme/deploy",
            &c1,
            "apps/web",
            None,
        )
        .await
        .unwrap();
        let Fetched::Changed { tree_sha, .. } = f else {
            unreachable!()
        };
        known.push((cache, tree_sha));
    }
    write(dir, "apps/web/cm-042.yaml", &manifest(42, "v2"));
    git(dir, &["commit", "-q", "-am", "one file"]);
    let c2 = git(dir, &["rev-parse", "HEAD"]);

    let http = reqwest::Client::new();
    for (i, (name, forge)) in [
        ("GitHub", &github as &dyn Forge),
        ("GitLab", &gitlab as &dyn Forge),
    ]
    .into_iter()
    .enumerate()
    {
        sim.clear_requests();
        let (cache, tree_sha) = &known[i];
        let f = fetch_app(
            forge,
            cache,
            &settings.fetch,
            "acme/deploy",
            &c2,
            "apps/web",
            Some(tree_sha),
        )
        .await
        .unwrap();
        let Fetched::Changed {
            files,
            tree_sha: new_sha,
        } = f
        else {
            panic!("no change seen")
        };
        assert_eq!(files.len(), 100);
        let reqs = sim.requests();
        let ours_n = reqs.len();
        let ours_bytes: usize = reqs.iter().map(|r| r.response_bytes).sum();

        // The floor: the app's own subtree listing plus the changed blob, nothing else.
        sim.clear_requests();
        let blob_sha = git(dir, &["rev-parse", &format!("{c2}:apps/web/cm-042.yaml")]);
        let (tree_url, blob_url, auth) = if name == "GitHub" {
            (
                format!(
                    "{}/repos/acme/deploy/git/trees/{new_sha}?recursive=1",
                    sim.github_api_url()
                ),
                format!(
                    "{}/repos/acme/deploy/git/blobs/{blob_sha}",
                    sim.github_api_url()
                ),
                ("Authorization", "Bearer t"),
            )
        } else {
            (
                format!("{}/projects/acme%2Fdeploy/repository/tree?ref={c2}&path=apps%2Fweb&recursive=true&per_page=100&pagination=keyset", sim.gitlab_api_url()),
                format!("{}/projects/acme%2Fdeploy/repository/blobs/{blob_sha}/raw", sim.gitlab_api_url()),
                ("PRIVATE-TOKEN", "t"),
            )
        };
        for url in [&tree_url, &blob_url] {
            let r = http.get(url).header(auth.0, auth.1).send().await.unwrap();
            assert!(r.status().is_success(), "{url}: {}", r.status());
        }
        let floor = sim.requests();
        let floor_n = floor.len();
        let floor_bytes: usize = floor.iter().map(|r| r.response_bytes).sum();
        let routes: Vec<String> = reqs
            .iter()
            .map(|r| format!("{} {}", r.method, r.route))
            .collect();
        let budget = if name == "GitHub" {
            format!(
                "{} such pushes fit in GitHub's 5,000 requests/hour; ",
                5000 / ours_n.max(1)
            )
        } else {
            String::new()
        };
        println!(
            "| forge: requests / response KiB per 1-file push, 100-file app in a 1,000-file repo, {name} | {ours_n} req / {:.1} KiB | floor (app subtree listing + changed blob): {floor_n} req / {:.1} KiB | {:.2}× req, {:.2}× bytes | {budget}calls: {} |",
            ours_bytes as f64 / 1024.0,
            floor_bytes as f64 / 1024.0,
            ours_n as f64 / floor_n as f64,
            ours_bytes as f64 / floor_bytes as f64,
            routes.join(", "),
        );
    }
    sim.stop().await;
}
