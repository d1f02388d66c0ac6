//! The command line: parsed by clap, then each command runs against validated settings.
//! `main.rs` only calls [`run`]; everything here is testable without a process.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use std::sync::Arc;

use crate::queue::{Job, JobReason};
use crate::reconcile::dry_run::Scope;
use crate::reconcile::{Engine, Outcome, RunOptions};
use crate::settings::{AppSettings, ForgeKind, Settings, SettingsError};

/// driftless: webhook-first GitOps reconciler for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "driftless", version, about, long_about = None)]
pub struct Cli {
    /// Settings file (TOML). Environment variables DRIFTLESS__SECTION__KEY override it.
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "DRIFTLESS_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the webhook receiver, the workers and the drift timer.
    Serve,
    /// Reconcile one app now, against every object (not only the changed ones).
    Sync {
        /// App name from the settings.
        app: String,
        /// Apply this commit instead of the branch head (may go back: an explicit request).
        #[arg(long, value_name = "SHA")]
        revision: Option<String>,
        /// Validate with a server-side dry-run and print what would be written; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show how the cluster differs from the app's last applied revision.
    Diff {
        /// App name from the settings.
        app: String,
    },
    /// Print the objects an app renders to (plain files or `kustomize build`), as applied.
    Render {
        /// App name from the settings.
        app: String,
        /// Render this commit instead of the branch head.
        #[arg(long, value_name = "SHA")]
        revision: Option<String>,
    },
    /// Show what applying a revision would change in the cluster, like `kubectl diff`: every
    /// object server-side dry-run against the live cluster, nothing written. Exit 0 no change,
    /// 1 changes, 2 rejected (or the revision cannot be rendered).
    Preview {
        /// App name from the settings.
        app: String,
        /// Preview this commit instead of the branch head.
        #[arg(long, value_name = "SHA")]
        revision: Option<String>,
    },
    /// Check every app for drift and missed pushes.
    Drift {
        /// Run one sweep, carry out what it finds and exit (for a CronJob).
        #[arg(long)]
        once: bool,
    },
    /// Manage the forge webhooks that point at this receiver.
    Hooks {
        #[command(subcommand)]
        command: HooksCommand,
    },
    /// Validate the settings and list the apps they define.
    CheckConfig,
}

#[derive(Debug, Subcommand)]
pub enum HooksCommand {
    /// Make sure exactly one webhook per repo points at <public_url>/hooks/<forge>.
    Register {
        /// Only this app's repo.
        #[arg(long)]
        app: Option<String>,
        /// Print what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Loads the settings named on the command line.
pub fn load_settings(cli: &Cli) -> anyhow::Result<Settings> {
    Settings::load(cli.config.as_deref()).map_err(anyhow::Error::from)
}

/// The async runtime a command runs on. `serve` takes a thread per core: the receiver, the
/// workers and the timer run side by side. Every other command is one-shot and mostly waits
/// on the API server and the forge, so it runs on the main thread alone: its allocations then
/// come from one heap (glibc gives each thread that allocates an arena of its own: a steady
/// `drift --once` sweep of 1,000 apps on two worker threads peaked at 33–35 MiB, on the main
/// thread at 28 MiB), and no reply has to wake a second thread.
pub fn runtime_for(command: &Command) -> tokio::runtime::Builder {
    match command {
        Command::Serve => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    }
}

/// Runs a parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = load_settings(&cli)?;
    crate::telemetry::init(settings.log.format);
    match cli.command {
        Command::CheckConfig => {
            print!("{}", check_config_report(&settings));
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve => crate::server::serve(settings)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Sync {
            app,
            revision,
            dry_run,
        } => sync(settings, &app, revision, dry_run).await,
        Command::Diff { app } => {
            require_app(&settings, &app)?;
            let engine = engine(settings).await?;
            let report = engine.check_drift(&app, false).await?;
            let Some(rev) = &report.revision else {
                println!("{app}: never applied; run `driftless sync {app}`");
                return Ok(ExitCode::from(1));
            };
            println!(
                "{app}: {} objects at revision {rev}: {}",
                report.checked,
                report.summary()
            );
            for d in &report.drifted {
                if d.missing {
                    println!("  {}: missing", d.id);
                } else {
                    println!("  {}: {}", d.id, d.fields.join(", "));
                }
            }
            Ok(if report.drifted.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Render { app, revision } => {
            print!("{}", render(&settings, &app, revision).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Preview { app, revision } => preview(settings, &app, revision).await,
        Command::Drift { once: false } => {
            eprintln!(
                "driftless drift: pass --once for a single sweep; `driftless serve` runs the timer"
            );
            Ok(ExitCode::from(2))
        }
        Command::Drift { once: true } => {
            let names: Vec<String> = settings.apps.iter().map(|a| a.name.clone()).collect();
            let engine = engine(settings).await?;
            let metrics = crate::metrics::Metrics::new();
            let mut failed = false;
            // Catch-ups run a few at a time: each mostly waits on the API server.
            let results =
                crate::worker::sweep(&engine, &metrics, names, crate::worker::WORKERS).await;
            engine.settle().await;
            log_phase_times(engine.phase_times());
            for (app, result) in results {
                match result {
                    Ok(false) => println!("{app}: in sync"),
                    Ok(true) => {
                        println!("{app}: drift remains (drift = \"alert\")");
                        failed = true;
                    }
                    Err(e) => {
                        eprintln!("{app}: {e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Hooks {
            command: HooksCommand::Register { app, dry_run },
        } => {
            if let Some(name) = &app {
                require_app(&settings, name)?;
            }
            for line in crate::forge::hooks::register_for_apps(
                &settings,
                &[ForgeKind::Github, ForgeKind::Gitlab],
                app.as_deref(),
                dry_run,
            )
            .await?
            {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn require_app<'a>(settings: &'a Settings, name: &str) -> anyhow::Result<&'a AppSettings> {
    settings.app(name).ok_or_else(|| {
        let known: Vec<&str> = settings.apps.iter().map(|a| a.name.as_str()).collect();
        anyhow::anyhow!(
            "no app named {name:?} in the settings (apps: {})",
            known.join(", ")
        )
    })
}

/// The objects `app` renders to at `revision` (the branch head when `None`), as YAML
/// documents, each headed by the file it came from. Needs the forge, not the cluster.
pub async fn render(
    settings: &Settings,
    app: &str,
    revision: Option<String>,
) -> anyhow::Result<String> {
    use crate::render::{Plan, Renderer};
    let app = require_app(settings, app)?;
    let forges = crate::forge::from_settings(settings)?;
    let forge = forges
        .get(app.forge)
        .ok_or_else(|| anyhow::anyhow!("forge {} is not configured", app.forge))?;
    let revision = match revision {
        Some(r) => r,
        None => forge.branch_head(&app.repo, &app.branch).await?,
    };
    let renderer = Renderer::new(settings.render.clone(), settings.fetch.clone());
    let blobs = crate::forge::BlobCache::new(settings.fetch.blob_cache_bytes);
    let Plan::Changed { files, .. } = renderer
        .plan(forge.as_ref(), &blobs, app, &revision, None)
        .await?
    else {
        unreachable!("a plan without a known version always renders");
    };
    let objects =
        crate::manifest::parse_files(files.iter().map(|f| (f.path.as_str(), f.content.as_ref())))?;
    let mut out = String::new();
    for obj in &objects {
        out.push_str(&format!("---\n# Source: {}\n", obj.source));
        out.push_str(&serde_yaml::to_string(&obj.body)?);
    }
    Ok(out)
}

/// `driftless preview`: the app's revision dry-run against the cluster, printed as a diff.
async fn preview(
    settings: Settings,
    app: &str,
    revision: Option<String>,
) -> anyhow::Result<ExitCode> {
    use crate::preview::report::{AppOutcome, AppPreview};
    let app_settings = require_app(&settings, app)?.clone();
    let revision = match revision {
        Some(r) => r,
        None => {
            let forges = crate::forge::from_settings(&settings)?;
            let forge = forges
                .get(app_settings.forge)
                .ok_or_else(|| anyhow::anyhow!("forge {} is not configured", app_settings.forge))?;
            forge
                .branch_head(&app_settings.repo, &app_settings.branch)
                .await?
        }
    };
    let engine = engine(settings).await?;
    let preview = match engine
        .dry_run_revision(app, &revision, Scope::EveryObject)
        .await
    {
        Ok(set) => AppPreview::from_dry_run(&set),
        Err(e) => {
            eprintln!("{app}: revision {revision}: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    print!("{}", preview.diff_text());
    println!(
        "{app}: revision {revision}: {} ({} unchanged)",
        preview.summary(),
        preview.unchanged
    );
    Ok(match preview.outcome {
        AppOutcome::Rejected { .. } | AppOutcome::Failed { .. } => ExitCode::from(2),
        AppOutcome::Previewed if preview.has_changes() => ExitCode::from(1),
        AppOutcome::Previewed => ExitCode::SUCCESS,
    })
}

/// Builds the reconcile engine from the settings and the local Kubernetes credentials.
pub async fn engine(settings: Settings) -> anyhow::Result<Engine> {
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("kubernetes: no usable credentials from KUBECONFIG, ~/.kube/config or the in-cluster service account: {e}")
    })?;
    let forges = crate::forge::from_settings(&settings)?;
    Ok(Engine::new(client, forges, Arc::new(settings)))
}

async fn sync(
    settings: Settings,
    app: &str,
    revision: Option<String>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    require_app(&settings, app)?;
    let engine = engine(settings).await?;
    let job = Job::new(app, revision, JobReason::Manual);
    let result = engine.run(&job, RunOptions { dry_run }).await;
    // The lease goes back before the process exits, or other replicas wait for it to expire.
    engine.settle().await;
    match result {
        Ok(report) => {
            let rev = report.revision.as_deref().unwrap_or("?");
            match &report.outcome {
                Outcome::Applied if dry_run => {
                    println!("{app}: revision {rev}: {} objects, {} would be written (dry run, nothing changed)", report.objects, report.applied.len());
                    for id in &report.applied {
                        println!("  would apply {id}");
                    }
                }
                Outcome::Applied => {
                    println!("{app}: applied revision {rev}: {} objects, {} written, {} pruned in {:.1}s", report.objects, report.applied.len(), report.pruned.len(), report.duration.as_secs_f64());
                    for id in &report.applied {
                        println!("  applied {id}");
                    }
                    for id in &report.pruned {
                        println!("  pruned {id}");
                    }
                    for kept in &report.kept {
                        println!("  kept {}: {}", kept.id, kept.reason);
                    }
                }
                Outcome::Unchanged => println!("{app}: revision {rev}: unchanged"),
                Outcome::Skipped(why) => println!("{app}: skipped: {why}"),
                Outcome::Failed(e) => {
                    eprintln!("{app}: failed: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("driftless sync {app}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What `check-config` prints: the apps understood and where each secret comes from.
pub fn check_config_report(settings: &Settings) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let n = settings.apps.len();
    let _ = writeln!(
        out,
        "settings OK: {n} app{}, listening on {}",
        if n == 1 { "" } else { "s" },
        settings.server.listen
    );
    for app in &settings.apps {
        let path = if app.path.is_empty() { "." } else { &app.path };
        let _ = writeln!(
            out,
            "app {name}: {forge} {repo} branch {branch} path {path} namespace {ns} prune={prune} drift={drift} health_timeout={ht}",
            name = app.name,
            forge = app.forge,
            repo = app.repo,
            branch = app.branch,
            ns = app.namespace.as_deref().unwrap_or("(from manifests)"),
            prune = app.prune,
            drift = app.drift,
            ht = humantime::format_duration(app.health_timeout),
        );
    }
    for secret in settings.secret_refs() {
        let state = match secret.resolve() {
            Ok(_) => "available".to_string(),
            Err(SettingsError { message, .. }) => format!("NOT AVAILABLE here: {message}"),
        };
        let _ = writeln!(out, "secret {secret}: {state}");
    }
    out
}

/// Logs where the runs of a sweep spent their time, summed over runs (they overlap).
fn log_phase_times(t: &crate::reconcile::phases::PhaseTimes) {
    use crate::reconcile::phases::Phase;
    let s = |p: Phase| t.get(p).as_secs_f64();
    tracing::info!(
        fetch_s = s(Phase::Fetch),
        dry_run_s = s(Phase::DryRun),
        apply_s = s(Phase::Apply),
        state_s = s(Phase::State),
        status_s = s(Phase::Status),
        states_s = s(Phase::States),
        check_desired_s = s(Phase::CheckDesired),
        check_list_s = s(Phase::CheckList),
        check_compare_s = s(Phase::CheckCompare),
        catch_up_s = s(Phase::CatchUp),
        "time by phase, summed over the runs"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::runtime::RuntimeFlavor;

    fn flavor(args: &[&str]) -> RuntimeFlavor {
        let cli = Cli::try_parse_from(args).expect("valid command line");
        let runtime = runtime_for(&cli.command).build().expect("runtime");
        runtime.handle().runtime_flavor()
    }

    #[test]
    fn serve_runs_on_every_core_and_one_shot_commands_on_the_main_thread() {
        assert_eq!(flavor(&["driftless", "serve"]), RuntimeFlavor::MultiThread);
        for one_shot in [
            &["driftless", "drift", "--once"][..],
            &["driftless", "sync", "web"],
            &["driftless", "diff", "web"],
            &["driftless", "render", "web"],
            &["driftless", "preview", "web"],
            &["driftless", "hooks", "register"],
            &["driftless", "check-config"],
        ] {
            assert_eq!(
                flavor(one_shot),
                RuntimeFlavor::CurrentThread,
                "{one_shot:?}"
            );
        }
    }
}
