//! The one-command demo (`scripts/demo`): runs the story of `driftless::story` — push, hand
//! edit healed, bad image reverted, invalid manifest refused, lost webhook caught by the timer
//! — with the real `driftless serve` binary against a Kubernetes control plane and the forge
//! simulator, for GitHub, GitLab or both, printing each step with its timing. Exits 1 if any
//! step does not happen.
//!
//! `scripts/demo` starts the node cluster (tests/cluster/up.sh --with-node) and builds the
//! binary first, so the pods really run; by hand: `cargo build --bin driftless && cargo run
//! --example demo -- --kubeconfig PATH --registry 127.0.0.1:25000`. Without `--registry` the
//! story plays the Deployment controller (for a control plane without a node).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use driftless::settings::ForgeKind;
use driftless::story::{self, RealNode, StoryOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Forges {
    Github,
    Gitlab,
    Both,
}

/// Runs the driftless story against a real control plane and the forge simulator.
#[derive(Debug, Parser)]
struct Args {
    /// Which forge's webhooks and commit statuses to go through.
    #[arg(long, value_enum, default_value = "both")]
    forge: Forges,
    /// Kubeconfig of the cluster to deploy to (`tests/cluster/up.sh` prints one).
    #[arg(long, env = "DRIFTLESS_TEST_KUBECONFIG")]
    kubeconfig: PathBuf,
    /// The driftless binary to run as `driftless serve`; by default the one beside this
    /// example in the target directory (`cargo build --bin driftless`).
    #[arg(long)]
    driftless: Option<PathBuf>,
    /// The node's local registry (`host:port`), when the cluster has a node: the pods then
    /// really run, from images tests/cluster/images.sh pushed there.
    #[arg(long, env = "DRIFTLESS_TEST_REGISTRY")]
    registry: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let driftless_bin = match args.driftless.clone().or_else(sibling_binary) {
        Some(p) => p,
        None => {
            eprintln!("demo: cannot locate the driftless binary; pass --driftless PATH");
            return ExitCode::FAILURE;
        }
    };
    let forges = match args.forge {
        Forges::Github => vec![ForgeKind::Github],
        Forges::Gitlab => vec![ForgeKind::Gitlab],
        Forges::Both => vec![ForgeKind::Github, ForgeKind::Gitlab],
    };
    let node = args.registry.clone().map(|registry| RealNode { registry });
    let cluster = match &node {
        Some(node) => format!(
            "a real node (pods from {}, the Deployment controller real)",
            node.registry
        ),
        None => "a control plane without a node (the Deployment controller played)".into(),
    };
    let mut failed = false;
    for forge in forges {
        println!(
            "== driftless story on {forge}: driftless serve + Kubernetes API server + {forge} simulator, on {cluster}"
        );
        let started = Instant::now();
        let opts = StoryOptions {
            forge,
            kubeconfig: args.kubeconfig.clone(),
            driftless_bin: driftless_bin.clone(),
            node: node.clone(),
        };
        match story::run(&opts, |step| println!("{step}")).await {
            Ok(steps) => println!(
                "== {forge}: all {} steps passed in {:.1}s",
                steps.len(),
                started.elapsed().as_secs_f64()
            ),
            Err(e) => {
                println!("== {forge}: FAILED");
                eprintln!("demo: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `target/<profile>/driftless`, beside `target/<profile>/examples/demo`.
fn sibling_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let bin = profile_dir.join(format!("driftless{}", std::env::consts::EXE_SUFFIX));
    bin.is_file().then_some(bin)
}
