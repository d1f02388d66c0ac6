//! Benchmark: a fleet of 1,000 apps of 20 objects each (FLEET_APPS changes the count), cold
//! reconciled by the real `driftless drift --once` as a child process, against the floor: a
//! minimal client, also a child process, that only server-side applies the same 20,000 objects
//! with driftless's overall parallelism in flight. Both are timed and their peak RSS is taken
//! the same way (getrusage of a waiting parent that has no other child). Further
//! `drift --once` runs (nothing changed; FLEET_REPEATS of them, 5 unless set) are each set
//! beside the floor of reading every object once, and the medians compared; so are sweeps
//! after a commit to one app (FLEET_COMMITS of them, 3 unless set, each to another app).
//! A floor dry-run (the same objects server-side dry-run, each as a creation) and the control
//! plane's CPU time and request count around each step say where a cold reconcile's time goes.
//! Each measured child starts once the controller-manager has caught up with the objects
//! written before it (a token Secret for each ServiceAccount, Endpoints and an EndpointSlice
//! for each Service) and the machine is quiet.
//! The floor apply runs again after the cold reconcile (into a third copy of the namespaces)
//! and the cold reconcile is set against the mean of the two, as the machine's speed drifts.
//! Further cold rounds (FLEET_COLD_ROUNDS in all, 3 unless set) each reconcile every app into
//! namespaces of their own and are followed by a floor apply of their own; the row gives the
//! round of the median ratio and lists every round.
//! FLEET_STEADY_ONLY=1 leaves the floor apply, the floor dry-run and the further rounds out:
//! the cold reconcile then only sets up the sweeps, for a fleet whose floors would leave the
//! controller-manager longer to catch up with than a run can wait (5,000 apps).
//! Every object is counted in the cluster afterwards; a missing one fails the benchmark. The
//! GitHub requests of each sweep are counted too: the simulator enforces a token's 5,000 an
//! hour, as GitHub does.
//! Needs the test control plane (DRIFTLESS_TEST_KUBECONFIG) and the release binary next to
//! this example (`cargo build --release --bins --examples`). Prints Markdown table rows.
//!
//! Modes (all but the first are how the example runs its own children):
//!   fleet                                    the benchmark
//!   fleet --measure OUT -- PROGRAM ARGS...   run PROGRAM, write "<wall µs> <peak RSS KiB> <CPU µs>" to OUT
//!   fleet --floor-apply REPO NS_PREFIX APPS  apply every object of REPO's apps
//!   fleet --floor-dry-run REPO NS_PREFIX APPS  server-side dry-run every object of REPO's apps
//!   fleet --floor-list NS_PREFIX APPS        LIST every app object, one request per kind and namespace

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures::StreamExt;
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, Client, Config};
use serde::Deserialize;
use serde_json::{json, Value};
use support::git;

use driftless::reconcile::{LABEL_APP, LABEL_MANAGED_BY};
use driftless::simulator::{ForgeSimulator, SimConfig};

/// Apps that share one namespace (the drift sweep benchmark's density: 2,000 objects each).
const APPS_PER_NAMESPACE: usize = 100;
/// The phases of runs `drift --once` logs: name, field.
const RUN_PHASES: [(&str, &str); 5] = [
    ("fetch", "fetch_s"),
    ("dry-run", "dry_run_s"),
    ("apply", "apply_s"),
    ("state writes", "state_s"),
    ("statuses", "status_s"),
];
/// The steps of a sweep's drift checks `drift --once` logs: name, field.
const CHECK_PHASES: [(&str, &str); 4] = [
    ("bulk state read", "states_s"),
    (
        "LISTs, summed (each batch's beside the checks of the batch before)",
        "check_list_s",
    ),
    (
        "checks (desired objects made and compared, 4 at a time)",
        "check_compare_s",
    ),
    (
        "of which making the desired objects from the kept manifests, summed",
        "check_desired_s",
    ),
];
/// The steps of a sweep after a commit to one app: name, field.
const ONE_COMMIT_PHASES: [(&str, &str); 4] = [
    (
        "catch-ups (every head asked, the one app's run: its fetch, dry-run, apply, state, statuses)",
        "catch_up_s",
    ),
    ("bulk state read", "states_s"),
    ("LISTs, summed", "check_list_s"),
    ("checks", "check_compare_s"),
];
/// A GitHub token's requests an hour, as the simulator enforces them.
const RATE_LIMIT: u64 = 5_000;
/// Counted GitHub requests a cold start spends per app: its file, a pending and a final status.
const COLD_REQUESTS_PER_APP: u64 = 3;
/// Objects per app: 12 ConfigMaps, 4 Secrets, 2 headless Services, 2 ServiceAccounts.
const OBJECTS_PER_APP: usize = 20;
/// Applies the floor keeps in flight: driftless's own bound, `drift --once` checking
/// `worker::WORKERS` (4) apps at a time, each applying 8 objects at a time (reconcile's
/// APPLY_CONCURRENCY, private to the engine).
const FLOOR_IN_FLIGHT: usize = driftless::worker::WORKERS * 8;

/// The kinds an app holds: kind, resource plural, objects of it per app.
const KINDS: [(&str, &str, usize); 4] = [
    ("ConfigMap", "configmaps", 12),
    ("Secret", "secrets", 4),
    ("Service", "services", 2),
    ("ServiceAccount", "serviceaccounts", 2),
];

fn kind_resource(kind: &str) -> ApiResource {
    let plural = KINDS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, p, _)| *p)
        .unwrap_or_else(|| panic!("no resource for kind {kind}"));
    ApiResource {
        group: String::new(),
        version: "v1".into(),
        api_version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The app's 20 objects, all in one file (as in the drift sweep benchmark): a cold start
/// then costs the forge one blob request per app, and 1,000 apps fit in one GitHub token's
/// 5,000 requests an hour (a file per kind would not: see the row's notes).
fn app_manifests(a: usize) -> String {
    let mut docs = Vec::new();
    for &(kind, _, count) in &KINDS {
        for i in 0..count {
            docs.push(match kind {
                "ConfigMap" => format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a{a}-cm{i}\n  labels: {{tier: backend}}\ndata:\n  key: \"value-{i}\"\n  endpoint: \"http://a{a}-svc0:80/v{i}\"\n"),
                "Secret" => format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: a{a}-secret{i}\ntype: Opaque\ndata:\n  token: c2VjcmV0LXRva2Vu\n"),
                "Service" => format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: a{a}-svc{i}\n  annotations: {{owner: team-{a}}}\nspec:\n  clusterIP: None\n  selector: {{app: a{a}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n"),
                _ => format!("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a{a}-sa{i}\n"),
            });
        }
    }
    docs.join("---\n")
}

fn namespaces(prefix: &str, apps: usize) -> Vec<String> {
    (0..apps.div_ceil(APPS_PER_NAMESPACE))
        .map(|n| format!("{prefix}-{n}"))
        .collect()
}

fn app_namespace(prefix: &str, a: usize) -> String {
    format!("{prefix}-{}", a / APPS_PER_NAMESPACE)
}

/// 1000 -> "1,000".
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["--measure", out, "--", program, rest @ ..] => measure(Path::new(out), program, rest),
        ["--floor-apply", repo, prefix, apps] => {
            runtime()?.block_on(floor_apply(Path::new(repo), prefix, apps.parse()?, false))
        }
        ["--floor-dry-run", repo, prefix, apps] => {
            runtime()?.block_on(floor_apply(Path::new(repo), prefix, apps.parse()?, true))
        }
        ["--floor-list", prefix, apps] => runtime()?.block_on(floor_list(prefix, apps.parse()?)),
        [] => runtime()?.block_on(bench()),
        _ => bail!("usage: see the top of examples/fleet.rs"),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Runs a program and records its wall time and peak RSS. This process has no other child, so
/// RUSAGE_CHILDREN's ru_maxrss (the largest of the waited-for children) is the program's own.
fn measure(out: &Path, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let started = Instant::now();
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    let wall = started.elapsed();
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    let cpu = |t: nix::sys::time::TimeVal| t.tv_sec() * 1_000_000 + t.tv_usec();
    let cpu_us = cpu(usage.user_time()) + cpu(usage.system_time());
    std::fs::write(
        out,
        format!("{} {} {cpu_us}", wall.as_micros(), usage.max_rss()),
    )?;
    std::process::exit(status.code().unwrap_or(128));
}

/// Cold reconciles taken, each into namespaces of its own between two floor applies
/// (FLEET_COLD_ROUNDS changes it): one ratio moves by about ±20% with this machine's speed.
const COLD_ROUNDS: usize = 3;
/// Steady sweeps taken, each beside a floor read (FLEET_REPEATS changes it).
const REPEATS: usize = 5;
/// Sweeps taken after a commit to one app, each to another app (FLEET_COMMITS changes it).
const COMMITS: usize = 3;

/// A count from the environment variable `name`, at least 1, or `default`.
fn count_from_env(name: &str, default: usize) -> anyhow::Result<usize> {
    let n = match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}: {v:?} is not a count"))?,
        Err(_) => default,
    };
    ensure!(n >= 1, "{name}: at least one run is needed");
    Ok(n)
}

fn cold_rounds() -> anyhow::Result<usize> {
    count_from_env("FLEET_COLD_ROUNDS", COLD_ROUNDS)
}

/// FLEET_STEADY_ONLY=1: no floor apply, floor dry-run or further cold round; the cold
/// reconcile only sets up the steady sweeps (for fleets too large for the floors' follow-up).
fn steady_only() -> anyhow::Result<bool> {
    match std::env::var("FLEET_STEADY_ONLY").as_deref() {
        Err(_) | Ok("" | "0") => Ok(false),
        Ok("1") => Ok(true),
        Ok(other) => bail!("FLEET_STEADY_ONLY: {other:?} is neither 0 nor 1"),
    }
}

fn repeats() -> anyhow::Result<usize> {
    count_from_env("FLEET_REPEATS", REPEATS)
}

fn commits_count() -> anyhow::Result<usize> {
    count_from_env("FLEET_COMMITS", COMMITS)
}

/// The index of the median of `v` (of the lower middle one for an even count).
fn median_index(v: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|a, b| v[*a].total_cmp(&v[*b]));
    order[(v.len() - 1) / 2]
}

fn median(v: &[f64]) -> f64 {
    v[median_index(v)]
}

/// "1.23–4.56" (or one figure when all are equal at that precision).
fn range(v: &[f64], digits: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = (format!("{lo:.digits$}"), format!("{hi:.digits$}"));
    if lo == hi {
        lo
    } else {
        format!("{lo}–{hi}")
    }
}

/// The GitHub requests the simulator answered since it was last cleared, and how many of
/// them counted against the token's rate limit (a 304 does not).
#[derive(PartialEq)]
struct ForgeUse {
    requests: usize,
    spent: usize,
}

impl ForgeUse {
    fn take(sim: &ForgeSimulator) -> ForgeUse {
        let requests = sim.requests();
        let github = requests.iter().filter(|r| r.forge == "github");
        ForgeUse {
            requests: github.clone().count(),
            spent: github.filter(|r| r.status != 304).count(),
        }
    }

    /// Keeps this as `first` when there is none yet; else fails unless it equals it (`what`
    /// spent it).
    fn same_as(self, first: &mut Option<ForgeUse>, what: &str) -> anyhow::Result<()> {
        match first {
            Some(first) => ensure!(*first == self, "{what} spent {self}, the first {first}"),
            None => *first = Some(self),
        }
        Ok(())
    }
}

impl std::fmt::Display for ForgeUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} GitHub requests, {} counted by the rate limit",
            thousands(self.requests),
            thousands(self.spent)
        )
    }
}

/// The simulator's GitHub rate limit for a fleet of `apps`: a token's, unless a cold start
/// (3 counted requests per app: its file, 2 statuses) would not fit in it (past ~1,600 apps),
/// which driftless would wait out for an hour. The cold row says which.
fn rate_limit_for(apps: usize) -> u64 {
    RATE_LIMIT.max(COLD_REQUESTS_PER_APP * apps as u64 + 100)
}

/// The cold rounds: each round's reconcile set against the mean of the floor apply just
/// before it and the one just after it.
struct ColdRounds {
    /// Per round: the reconcile's, the floor before's and the floor after's seconds.
    secs: Vec<(f64, f64, f64)>,
    /// The largest peak RSS of the rounds' reconciles, MiB.
    peak_mib: f64,
}

impl ColdRounds {
    /// `floors` holds one more run than `colds`: the floor before each round, then the last
    /// round's floor after.
    fn new(colds: &[Measured], floors: &[Measured]) -> ColdRounds {
        ColdRounds {
            secs: colds
                .iter()
                .zip(floors.windows(2))
                .map(|(c, f)| (c.secs(), f[0].secs(), f[1].secs()))
                .collect(),
            peak_mib: peak_mib(colds),
        }
    }

    fn ratios(&self) -> Vec<f64> {
        self.secs
            .iter()
            .map(|(c, a, b)| c / ((a + b) / 2.0))
            .collect()
    }

    /// The round of the median ratio: its reconcile's, floor before's and after's seconds.
    fn median(&self) -> (f64, f64, f64) {
        self.secs[median_index(&self.ratios())]
    }

    /// "64.3 s against 27.2 s and 31.2 s (2.20×), ..." in the rounds' order.
    fn describe(&self) -> String {
        self.secs
            .iter()
            .zip(self.ratios())
            .map(|((c, a, b), r)| format!("{c:.1} s against {a:.1} s and {b:.1} s ({r:.2}×)"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The cold part of a run: its rows, and the peak RSS of its reconciles and of the floor
/// apply's client (none when no floor ran).
struct ColdPart {
    rows: Vec<String>,
    peak_mib: f64,
    floor_mib: Option<f64>,
}

/// The first cold reconcile (into `ours`): the child, the control plane's work around it,
/// the forge requests it spent and its time by phase.
struct FirstCold {
    cold: Measured,
    before: ServerWork,
    after: ServerWork,
    forge: ForgeUse,
    phases: String,
}

/// The namespaces of a further cold round (see [`Fleet::round_names`]).
struct RoundNames {
    ours: String,
    state_ns: String,
    floor_after: String,
}

/// The largest peak RSS of `runs`, MiB.
fn peak_mib(runs: &[Measured]) -> f64 {
    runs.iter().map(Measured::mib).fold(0.0, f64::max)
}

/// What `--measure` recorded about one child.
struct Measured {
    wall: Duration,
    peak_rss_kib: u64,
    /// User and system CPU time of the child.
    cpu: Duration,
    stdout: String,
}

impl Measured {
    fn secs(&self) -> f64 {
        self.wall.as_secs_f64()
    }
    fn mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }
}

/// Runs `program args` under `--measure`, stdout captured, stderr to `log`; fails when the
/// program does (showing the end of its log).
async fn run_measured(
    program: &Path,
    args: &[&str],
    kubeconfig: &str,
    log: &Path,
) -> anyhow::Result<Measured> {
    let out = log.with_extension("rusage");
    let this = std::env::current_exe()?;
    let output = tokio::process::Command::new(this)
        .arg("--measure")
        .arg(&out)
        .arg("--")
        .arg(program)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("DRIFTLESS_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        // (not `output()`: tokio's pipes stderr too, over the file given here)
        .spawn()?
        .wait_with_output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    std::fs::write(log.with_extension("out"), &stdout)?;
    if !output.status.success() {
        let log_text = String::from_utf8_lossy(&std::fs::read(log)?).into_owned();
        let tail: Vec<&str> = log_text.lines().rev().take(20).collect();
        let failed: Vec<&str> = stdout
            .lines()
            .filter(|l| !l.ends_with(": in sync"))
            .take(20)
            .collect();
        bail!(
            "{} {:?} failed ({}):\n{}\n--- end of its log:\n{}",
            program.display(),
            args,
            output.status,
            failed.join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let text = std::fs::read_to_string(&out)?;
    let mut figures = text.split(' ');
    let mut next = || figures.next().context("--measure wrote too few figures");
    Ok(Measured {
        wall: Duration::from_micros(next()?.parse()?),
        peak_rss_kib: next()?.parse()?,
        cpu: Duration::from_micros(next()?.parse()?),
        stdout,
    })
}

/// The floor of a cold reconcile: every object of every app, read from the checkout, given
/// its namespace and driftless's two labels, and server-side applied; nothing else. With
/// `dry_run`, server-side dry-run instead (into namespaces where none of them exists yet, so
/// each is the dry-run of a creation, as in a cold reconcile).
async fn floor_apply(repo: &Path, prefix: &str, apps: usize, dry_run: bool) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let mut params = PatchParams::apply("fleet-floor").force();
    params.dry_run = dry_run;
    let objects = futures::stream::iter(0..apps).flat_map(|a| {
        let path = repo.join(format!("apps/a{a}/all.yaml"));
        let text = std::fs::read_to_string(&path).expect("reading the app's file");
        let mut objects = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut obj = Value::deserialize(doc).expect("a YAML document");
            obj["metadata"]["namespace"] = json!(app_namespace(prefix, a));
            obj["metadata"]["labels"][LABEL_MANAGED_BY] = json!("driftless");
            obj["metadata"]["labels"][LABEL_APP] = json!(format!("a{a}"));
            objects.push(obj);
        }
        futures::stream::iter(objects)
    });
    let results: Vec<anyhow::Result<()>> = objects
        .map(|obj| {
            let client = client.clone();
            let params = params.clone();
            async move {
                let kind = obj["kind"].as_str().unwrap_or_default();
                let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
                let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client, ns, &kind_resource(kind));
                api.patch(name, &params, &Patch::Apply(&obj))
                    .await
                    .with_context(|| format!("applying {kind} {ns}/{name}"))?;
                Ok(())
            }
        })
        .buffer_unordered(FLOOR_IN_FLIGHT)
        .collect()
        .await;
    let applied = results.iter().filter(|r| r.is_ok()).count();
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        bail!("floor: {applied} applied; {e:#}");
    }
    println!("{applied}");
    Ok(())
}

/// CPU time the control plane has spent (the API server's and etcd's, when they run on this
/// machine) and the requests the API server has served (its `apiserver_request_total`, every
/// client's, the controllers' included), at one moment.
struct ServerWork {
    apiserver_cpu: Option<f64>,
    etcd_cpu: Option<f64>,
    controllers_cpu: Option<f64>,
    /// CPU time every process of the machine has spent (all but idle and I/O wait).
    machine_cpu: Option<f64>,
    /// This process's CPU: the forge simulator's, serving driftless.
    own_cpu: Option<f64>,
    requests: f64,
    at: Instant,
    /// Requests by verb and resource (`PATCH configmaps dry-run`).
    by_kind: BTreeMap<String, f64>,
}

impl ServerWork {
    async fn now(client: &Client) -> anyhow::Result<Self> {
        let req = http::Request::get("/metrics").body(Vec::new())?;
        let metrics = client.request_text(req).await?;
        let mut by_kind = BTreeMap::new();
        for line in metrics.lines() {
            let Some(labels) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some(n) = line.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split_once(&format!("{name}=\""))
                    .and_then(|(_, rest)| rest.split_once('"'))
                    .map_or("", |(value, _)| value)
                    .to_string()
            };
            let dry = if label("dry_run").is_empty() {
                ""
            } else {
                " dry-run"
            };
            let kind = format!("{} {}{dry}", label("verb"), label("resource"));
            *by_kind.entry(kind).or_insert(0.0) += n;
        }
        let requests = by_kind.values().sum();
        Ok(Self {
            apiserver_cpu: process_cpu("kube-apiserver"),
            etcd_cpu: process_cpu("etcd"),
            controllers_cpu: process_cpu("kube-controller"),
            machine_cpu: machine_cpu(),
            own_cpu: process_cpu_of(Path::new("/proc/self")),
            requests,
            at: Instant::now(),
            by_kind,
        })
    }

    /// What was spent from `self` to `later` by the control plane and by `client` (the
    /// measured child), as "API server CPU 12.3 s, etcd CPU 4.5 s, ..., 20,000 API requests".
    fn spent(&self, later: &Self, client: &Measured) -> (Option<f64>, String) {
        let cpu = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
        let api = cpu(self.apiserver_cpu, later.apiserver_cpu);
        let show = |v: Option<f64>| {
            v.map_or("not measured (not on this machine)".into(), |v| {
                format!("{v:.1} s")
            })
        };
        let text = format!(
            "API server CPU {}, etcd CPU {}, controller-manager CPU {}, the client's own CPU {:.1} s, the benchmark's (the forge simulator's) {}, the whole machine's CPU {} of the 2 cores' {:.1} s from the quiet before to the quiet after, {} API requests",
            show(api),
            show(cpu(self.etcd_cpu, later.etcd_cpu)),
            show(cpu(self.controllers_cpu, later.controllers_cpu)),
            client.cpu.as_secs_f64(),
            show(cpu(self.own_cpu, later.own_cpu)),
            show(cpu(self.machine_cpu, later.machine_cpu)),
            2.0 * (later.at - self.at).as_secs_f64(),
            thousands((later.requests - self.requests).round() as usize)
        );
        (api, text)
    }

    /// The kinds of API request made from `self` to `later`, most first, as "PATCH
    /// configmaps 12,000".
    fn requests_by_kind(&self, later: &Self) -> String {
        let mut spent: Vec<(&String, f64)> = later
            .by_kind
            .iter()
            .map(|(k, n)| (k, n - self.by_kind.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, n)| *n >= 1.0)
            .collect();
        spent.sort_by(|a, b| b.1.total_cmp(&a.1));
        let shown: Vec<String> = spent
            .iter()
            .map(|(k, n)| format!("{k} {}", thousands(n.round() as usize)))
            .collect();
        shown.join(", ")
    }
}

/// User and system CPU seconds of the process named `comm` on this machine, if there is one.
fn process_cpu(comm: &str) -> Option<f64> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let dir = entry.path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == comm) {
            return process_cpu_of(&dir);
        }
    }
    None
}

/// User and system CPU seconds of the process whose /proc directory is `dir`.
fn process_cpu_of(dir: &Path) -> Option<f64> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // After the parenthesised name: state is field 3; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / CLOCK_TICKS)
}

/// Waits (up to a minute) until the machine is quiet: under a quarter of a core busy over one
/// second (after [`caught_up`], so that no measured run pays for the controllers' follow-up
/// work of the one before it). `what` names the run in a line saying how long that took.
async fn quiet(what: &str) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let before = machine_cpu();
        tokio::time::sleep(Duration::from_secs(1)).await;
        match before.zip(machine_cpu()) {
            Some((a, b)) if b - a < 0.25 => break,
            None => return,
            _ => {}
        }
    }
    eprintln!(
        "fleet: quiet before or after {what} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// The controllers' follow-up work not done yet, cluster-wide: Services without their
/// Endpoints or EndpointSlice, ServiceAccounts without their token Secret. The test control
/// plane's controller-manager writes them at its client's default 20 requests a second, so
/// after 2,000 ServiceAccounts and 2,000 Services it lags by minutes: the machine looks quiet
/// (20 requests a second keep it under a quarter of a core) while the work of one measured
/// step would still land in the next one's window.
#[derive(Debug, Default, PartialEq)]
struct Backlog {
    endpoints: usize,
    slices: usize,
    tokens: usize,
}

impl Backlog {
    async fn now(client: &Client) -> anyhow::Result<Self> {
        use k8s_openapi::api::core::v1::{Endpoints, Secret, Service, ServiceAccount};
        async fn count(client: &Client, ar: ApiResource, p: &ListParams) -> anyhow::Result<usize> {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            Ok(api.list_metadata(p).await?.items.len())
        }
        // Served as v1beta1 by the test control plane (1.20), which k8s-openapi has no type for.
        let slice = GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
        let slice = ApiResource::from_gvk_with_plural(&slice, "endpointslices");
        // The benchmark's Services only: the `kubernetes` one has no Endpoints here.
        let ours = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}=driftless"));
        let all = ListParams::default();
        let token = ListParams::default().fields("type=kubernetes.io/service-account-token");
        let services = count(client, ApiResource::erase::<Service>(&()), &ours).await?;
        let endpoints = count(client, ApiResource::erase::<Endpoints>(&()), &all).await?;
        let slices = count(client, slice, &all).await?;
        let accounts = count(client, ApiResource::erase::<ServiceAccount>(&()), &all).await?;
        let tokens = count(client, ApiResource::erase::<Secret>(&()), &token).await?;
        Ok(Backlog {
            endpoints: services.saturating_sub(endpoints),
            slices: services.saturating_sub(slices),
            tokens: accounts.saturating_sub(tokens),
        })
    }
}

/// Waits (up to fifteen minutes, polling every five seconds) until the controller-manager has
/// caught up (see [`Backlog`]); `what` names the step in a line saying how long that took.
async fn caught_up(client: &Client, what: &str) {
    let started = Instant::now();
    let mut left = None;
    while started.elapsed() < Duration::from_secs(900) {
        match Backlog::now(client).await {
            Ok(b) if b == Backlog::default() => {
                let secs = started.elapsed().as_secs_f64();
                eprintln!("fleet: controllers caught up by {what} in {secs:.0} s");
                return;
            }
            Ok(b) => left = Some(b),
            Err(e) => eprintln!("fleet: controllers' backlog unknown: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    eprintln!(
        "fleet: controllers still behind by {what} after {:.0} s, measuring anyway: {left:?}",
        started.elapsed().as_secs_f64()
    );
}

/// CPU seconds the whole machine has spent since boot: the first line of /proc/stat, all but
/// idle and I/O wait.
fn machine_cpu() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let waiting = ticks.get(3)? + ticks.get(4)?;
    Some((ticks.iter().take(8).sum::<f64>() - waiting) / CLOCK_TICKS)
}

/// The kernel's clock ticks per second (USER_HZ), which /proc reports CPU time in: 100 on
/// every Linux architecture this runs on.
const CLOCK_TICKS: f64 = 100.0;

/// Counts the app objects in the namespaces: one LIST per kind and namespace.
async fn count_objects(client: &Client, prefix: &str, apps: usize) -> anyhow::Result<usize> {
    let selector = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}=driftless"));
    let mut total = 0;
    for ns in namespaces(prefix, apps) {
        for (kind, _, _) in KINDS {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &ns, &kind_resource(kind));
            total += api
                .list(&selector)
                .await
                .with_context(|| format!("listing {kind} in {ns}"))?
                .items
                .len();
        }
    }
    Ok(total)
}

/// The floor of a drift check: read every object once.
async fn floor_list(prefix: &str, apps: usize) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    println!("{}", count_objects(&client, prefix, apps).await?);
    Ok(())
}

async fn apply_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    api.patch(name, &PatchParams::apply("bench"), &Patch::Apply(&ns))
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// Waits until the namespaces of earlier runs are gone: the controller manager empties them in
/// the background after a run, tens of seconds of CPU that would otherwise land on this run's
/// floor or reconcile.
async fn earlier_runs_gone(client: &Client) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let started = Instant::now();
    loop {
        let left = api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|ns| {
                ns.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("fleet-"))
            })
            .count();
        if left == 0 {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "{left} namespaces of earlier fleet runs still there after 15 minutes"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!(
        "fleet: earlier runs' namespaces gone after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn bench() -> anyhow::Result<()> {
    let kubeconfig = std::env::var("DRIFTLESS_TEST_KUBECONFIG")
        .context("DRIFTLESS_TEST_KUBECONFIG: start the test control plane (scripts/bench does)")?;
    let apps: usize = match std::env::var("FLEET_APPS") {
        Ok(v) => v.parse().context("FLEET_APPS")?,
        Err(_) => 1000,
    };
    let driftless_bin = support::driftless_binary();
    let kc = Kubeconfig::read_from(&kubeconfig)?;
    let client =
        Client::try_from(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)?;

    earlier_runs_gone(&client).await?;
    let id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let work = tempfile::tempdir()?;
    let sim = ForgeSimulator::start(SimConfig {
        github_token: "t".into(),
        gitlab_token: "t".into(),
    })
    .await?;
    let steady_only = steady_only()?;
    let cold_rounds = if steady_only { 1 } else { cold_rounds()? };
    sim.set_github_rate_limit(rate_limit_for(apps * cold_rounds));
    let fleet = Fleet {
        client: client.clone(),
        work: work.path().to_path_buf(),
        driftless_bin,
        kubeconfig,
        apps,
        ours: format!("fleet-{id}-d"),
        floor: format!("fleet-{id}-f"),
        floor_after: format!("fleet-{id}-g"),
        state_ns: format!("fleet-{id}-state"),
        cold_rounds,
        steady_only,
    };
    let result = fleet.run(&sim).await;
    // Namespaces finish deleting in the background (the controller manager empties them).
    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    for ns in fleet.all_namespaces() {
        let _ = nsapi.delete(&ns, &Default::default()).await;
    }
    sim.stop().await;
    if result.is_err() {
        eprintln!(
            "fleet: the children's logs are kept in {}",
            work.keep().display()
        );
    }
    for row in result? {
        println!("{row}");
    }
    Ok(())
}

/// One run of the benchmark: where it works and what it names.
struct Fleet {
    client: Client,
    /// Holds the repository, the settings, the token file and the children's logs.
    work: PathBuf,
    driftless_bin: PathBuf,
    kubeconfig: String,
    apps: usize,
    /// Namespace prefixes: driftless's apps, the floor's copy of them.
    ours: String,
    floor: String,
    /// The floor's second copy, applied after the cold reconcile (see
    /// [`Fleet::cold_against_floors`]).
    floor_after: String,
    state_ns: String,
    /// Cold reconciles taken: the first into `ours`, each further one `k` into copies of
    /// its own (see [`Fleet::round_names`]).
    cold_rounds: usize,
    /// No floor apply or floor dry-run: the cold reconcile only sets up the steady sweeps
    /// (see [`steady_only`]).
    steady_only: bool,
}

impl Fleet {
    fn all_namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = (2..=self.cold_rounds)
            .map(|k| self.round_names(k).state_ns)
            .collect();
        all.push(self.state_ns.clone());
        all.extend(self.app_namespaces());
        all
    }

    /// The namespaces of the apps' copies: driftless's, the floor's and the floor's second,
    /// and those of the further cold rounds.
    fn app_namespaces(&self) -> Vec<String> {
        if self.steady_only {
            return namespaces(&self.ours, self.apps);
        }
        let rounds = (2..=self.cold_rounds).flat_map(|k| {
            let names = self.round_names(k);
            [names.ours, names.floor_after]
        });
        [&self.ours, &self.floor, &self.floor_after]
            .into_iter()
            .cloned()
            .chain(rounds)
            .flat_map(|prefix| namespaces(&prefix, self.apps))
            .collect()
    }

    /// Where cold round `k` (from 2) works: driftless's copy of the apps, its state namespace
    /// and the floor's copy applied after it.
    fn round_names(&self, k: usize) -> RoundNames {
        RoundNames {
            ours: format!("{}{k}", self.ours),
            state_ns: format!("{}{k}", self.state_ns),
            floor_after: format!("{}{k}", self.floor_after),
        }
    }

    /// driftless's settings for the apps in namespaces `ours`, state kept in `state_ns`.
    fn settings(&self, sim: &ForgeSimulator, ours: &str, state_ns: &str) -> String {
        let token = self.work.join("token");
        let mut settings = format!(
            "[kubernetes]\nstate_namespace = \"{state_ns}\"\n[forges.github]\napi_url = \"{}\"\ntoken_file = \"{t}\"\nwebhook_secret_file = \"{t}\"\n",
            sim.github_api_url(),
            t = token.display()
        );
        for a in 0..self.apps {
            settings.push_str(&format!(
                "[[apps]]\nname = \"a{a}\"\nforge = \"github\"\nrepo = \"bench/fleet\"\npath = \"apps/a{a}\"\nnamespace = \"{}\"\n",
                app_namespace(ours, a)
            ));
        }
        settings
    }

    /// Cold round `k` (from 2): a cold reconcile of every app into fresh namespaces (`drift
    /// --once` with a state namespace of its own), then a floor apply into a fresh copy.
    async fn cold_round(
        &self,
        sim: &ForgeSimulator,
        k: usize,
        repo: &str,
    ) -> anyhow::Result<(Measured, Measured)> {
        let names = self.round_names(k);
        let config = self.work.join(format!("driftless-{k}.toml"));
        std::fs::write(&config, self.settings(sim, &names.ours, &names.state_ns))?;
        let config = config.to_str().context("temporary path")?;
        let cold = self
            .run_measured(
                &self.driftless_bin,
                &["drift", "--once", "--config", config],
                &format!("cold-{k}.log"),
            )
            .await?;
        self.ensure_reconciled(&cold, &names.ours, &format!("cold round {k}"))
            .await?;
        let floor = self
            .floor_after_round(repo, &names.floor_after, &format!("floor-apply-{k}.log"))
            .await?;
        eprintln!(
            "fleet: cold round {k}: driftless {:.1} s, floor after it {:.1} s",
            cold.secs(),
            floor.secs()
        );
        Ok((cold, floor))
    }

    /// The floor apply that closes a cold round, into the fresh copy `prefix` (its log `log`);
    /// every object is counted after it.
    async fn floor_after_round(
        &self,
        repo: &str,
        prefix: &str,
        log: &str,
    ) -> anyhow::Result<Measured> {
        let floor = self
            .run_measured(
                &std::env::current_exe()?,
                &["--floor-apply", repo, prefix, &self.apps.to_string()],
                log,
            )
            .await?;
        self.ensure_all_objects(prefix, &format!("floor apply into {prefix}"))
            .await?;
        Ok(floor)
    }

    /// Runs a child as [`run_measured`] does, once the cluster has settled (see
    /// [`Self::settle`]).
    async fn run_measured(
        &self,
        program: &Path,
        args: &[&str],
        log: &str,
    ) -> anyhow::Result<Measured> {
        self.settle(log).await;
        run_measured(program, args, &self.kubeconfig, &self.work.join(log)).await
    }

    /// Fails unless every object of the apps is in the cluster under the namespaces of
    /// `prefix` (`what` names that copy in the error).
    async fn ensure_all_objects(&self, prefix: &str, what: &str) -> anyhow::Result<()> {
        let expected = self.apps * OBJECTS_PER_APP;
        let found = count_objects(&self.client, prefix, self.apps).await?;
        ensure!(
            found == expected,
            "{what}: {found} of {expected} objects in the cluster"
        );
        Ok(())
    }

    /// Fails unless a cold reconcile (`what`) into the namespaces `prefix` left every object
    /// there and found every app in sync.
    async fn ensure_reconciled(
        &self,
        cold: &Measured,
        prefix: &str,
        what: &str,
    ) -> anyhow::Result<()> {
        self.ensure_all_objects(prefix, &format!("driftless after {what}"))
            .await?;
        ensure!(
            in_sync_count(cold) == self.apps,
            "driftless: {} of {} apps in sync after {what}",
            in_sync_count(cold),
            self.apps
        );
        Ok(())
    }

    /// Waits until the controller-manager has caught up with the objects written so far
    /// (see [`caught_up`]), then until the machine is quiet (see [`quiet`]).
    async fn settle(&self, log: &str) {
        caught_up(&self.client, log).await;
        quiet(log).await;
    }

    /// Runs a child as [`Self::run_measured`] does, with the control plane's work from the
    /// quiet before it to the machine's first quiet after it: what the child's requests cost,
    /// with the share of the controllers' follow-up work (Endpoints of its Services, tokens of
    /// its ServiceAccounts) done by then. The rest follows at the controller-manager's pace,
    /// minutes later, outside any window: the next child waits for it (see [`caught_up`]).
    async fn run_with_work(
        &self,
        program: &Path,
        args: &[&str],
        log: &str,
    ) -> anyhow::Result<(Measured, ServerWork, ServerWork)> {
        self.settle(log).await;
        let before = ServerWork::now(&self.client).await?;
        let measured = run_measured(program, args, &self.kubeconfig, &self.work.join(log)).await?;
        quiet(log).await;
        let after = ServerWork::now(&self.client).await?;
        Ok((measured, before, after))
    }

    async fn run(&self, sim: &ForgeSimulator) -> anyhow::Result<Vec<String>> {
        let setup = Instant::now();
        let repo = self.work.join("repo");
        for a in 0..self.apps {
            let dir = repo.join(format!("apps/a{a}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("all.yaml"), app_manifests(a))?;
        }
        git(&repo, &["init", "-q", "-b", "main"]);
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", "fleet"]);
        sim.add_repo("bench/fleet", &repo);

        std::fs::write(self.work.join("token"), "t")?;
        let settings = self.settings(sim, &self.ours, &self.state_ns);
        let config = self.work.join("driftless.toml");
        std::fs::write(&config, &settings)?;
        let config = config.to_str().context("temporary path")?.to_string();
        // The app namespaces exist beforehand, as they would in a cluster driftless is given;
        // the state namespace is driftless's to create.
        for ns in self.app_namespaces() {
            apply_namespace(&self.client, &ns).await?;
        }
        eprintln!(
            "fleet: {} apps, {} objects per side, set up in {:.1} s",
            self.apps,
            self.apps * OBJECTS_PER_APP,
            setup.elapsed().as_secs_f64()
        );

        let drift_args = ["drift", "--once", "--config", &config];
        let this = std::env::current_exe()?;
        let size = self.size();
        let cold = if self.steady_only {
            self.cold_alone(sim, &drift_args, &size).await?
        } else {
            let repo_arg = repo.to_str().context("temporary path")?;
            self.cold_against_floors(sim, &drift_args, &this, repo_arg, &size)
                .await?
        };
        let sweeps = self.steady_sweeps(sim, &drift_args, &this).await?;
        let commits = self.one_commit_sweeps(sim, &repo, &drift_args).await?;
        sim.clear_requests();
        let restart = self.restart(&settings).await?;
        let restart_forge = ForgeUse::take(sim);
        eprintln!(
            "fleet: serve restart caught up in {:.2} s, objects written: {:?}; forge requests: {:?}",
            restart.caught_up.as_secs_f64(),
            restart.writers,
            sim.request_counts()
        );

        let mut rows = cold.rows;
        rows.push(match cold.floor_mib {
            Some(floor_mib) => format!(
                "| fleet: peak RSS, cold reconcile of {size} | {:.0} MiB | floor client above: {floor_mib:.0} MiB | {:.2}× floor | ru_maxrss of each child process, the largest of the {} cold rounds; steady-state sweep: {:.0} MiB (the largest of its {} runs) |",
                cold.peak_mib,
                cold.peak_mib / floor_mib,
                self.cold_rounds,
                sweeps.peak_mib(),
                sweeps.steady.len(),
            ),
            None => format!(
                "| fleet: peak RSS, cold reconcile of {size} | {:.0} MiB | floor read client (no floor apply in this run): {:.0} MiB | {:.2}× the read client | ru_maxrss of each child process; steady-state sweep: {:.0} MiB (the largest of its {} runs) |",
                cold.peak_mib,
                sweeps.floor_peak_mib(),
                cold.peak_mib / sweeps.floor_peak_mib(),
                sweeps.peak_mib(),
                sweeps.steady.len(),
            ),
        });
        rows.push(sweeps.row(&size)?);
        rows.push(commits.row(&size, &sweeps, self.apps));
        rows.push(format!(
            "| fleet: `driftless serve` restart with {size} in sync | {:.2} s | floor read above (median): {:.2} s | {:.2}× floor | from the process start to its log line that the start-up catch-up found {} of {} apps at their branch head; {} of the {} objects in the app and state namespaces written by driftless (resourceVersions compared, each write put to the field manager of its latest managedFields entry; {} meanwhile); {restart_forge} |",
            restart.caught_up.as_secs_f64(),
            sweeps.floor_secs(),
            restart.caught_up.as_secs_f64() / sweeps.floor_secs(),
            thousands(restart.in_sync),
            thousands(self.apps),
            restart.written_by_driftless(),
            thousands(restart.objects),
            restart.others(),
        ));
        Ok(rows)
    }

    /// "1,000 apps × 20 objects (20,000 objects)".
    fn size(&self) -> String {
        format!(
            "{} apps × {OBJECTS_PER_APP} objects ({} objects)",
            thousands(self.apps),
            thousands(self.apps * OBJECTS_PER_APP)
        )
    }

    /// How the apps are laid out, for the cold rows.
    fn layout(&self) -> String {
        let ns_count = self.apps.div_ceil(APPS_PER_NAMESPACE);
        format!(
            "up to {APPS_PER_NAMESPACE} apps to a namespace ({ns_count} namespace{} per side), one file per app (12 ConfigMaps, 4 Secrets, 2 headless Services, 2 ServiceAccounts)",
            if ns_count == 1 { "" } else { "s" }
        )
    }

    /// The simulator's rate limit for this run's cold starts, as the cold row states it.
    fn budget(&self, cold_starts: usize) -> String {
        let rate_limit = rate_limit_for(self.apps * cold_starts);
        if rate_limit > RATE_LIMIT {
            format!(
                "the simulator's rate limit raised to {}/h for this run: one token's 5,000 do not hold {cold_starts} cold start{} of this many apps",
                thousands(rate_limit as usize),
                if cold_starts == 1 { "" } else { "s" }
            )
        } else {
            "a token's 5,000/h rate limit".to_string()
        }
    }

    /// The first cold reconcile (into `ours`): checks every object and app, and returns it
    /// with the forge requests it spent and its time by phase.
    async fn first_cold(
        &self,
        sim: &ForgeSimulator,
        drift_args: &[&str],
    ) -> anyhow::Result<FirstCold> {
        sim.clear_requests();
        let (cold, before, after) = self
            .run_with_work(&self.driftless_bin, drift_args, "cold.log")
            .await?;
        eprintln!(
            "fleet: driftless cold reconcile in {:.1} s, peak RSS {:.0} MiB",
            cold.secs(),
            cold.mib()
        );
        self.ensure_reconciled(&cold, &self.ours, "the cold reconcile")
            .await?;
        let forge = ForgeUse::take(sim);
        eprintln!(
            "fleet: cold reconcile forge requests: {:?}",
            sim.request_counts()
        );
        let phases = phase_times(
            &std::fs::read_to_string(self.work.join("cold.log"))?,
            &RUN_PHASES,
        )
        .context("the cold reconcile logged no time by phase")?;
        Ok(FirstCold {
            cold,
            before,
            after,
            forge,
            phases,
        })
    }

    /// A run with FLEET_STEADY_ONLY set: the cold reconcile only sets up the steady sweeps, with
    /// no floor beside it (at 5,000 apps each floor apply leaves the controller-manager tens
    /// of minutes of tokens and Endpoints to write, which every later step waits for).
    async fn cold_alone(
        &self,
        sim: &ForgeSimulator,
        drift_args: &[&str],
        size: &str,
    ) -> anyhow::Result<ColdPart> {
        let FirstCold {
            cold,
            before,
            after,
            forge,
            phases,
        } = self.first_cold(sim, drift_args).await?;
        let (_, work) = before.spent(&after, &cold);
        let row = format!(
            "| fleet: cold reconcile, {size}, `driftless drift --once`, setting up the steady sweeps | {:.1} s | no floor in this run (FLEET_STEADY_ONLY) | not measured | {}; driftless fetches from the forge simulator ({forge}; {}), dry-runs then applies each app, records state and posts 2 statuses per app; {work}; time by phase, summed over the runs ({} at a time): {phases} |",
            cold.secs(),
            self.layout(),
            self.budget(1),
            driftless::worker::WORKERS,
        );
        Ok(ColdPart {
            rows: vec![row],
            peak_mib: cold.mib(),
            floor_mib: None,
        })
    }

    /// The cold reconcile against its floors: the floor apply, the floor dry-run, the first
    /// cold round and the floor apply after it, then the further cold rounds (see
    /// [`Self::cold_round`]). Returns the rows of the API server's CPU and of the cold rounds.
    async fn cold_against_floors(
        &self,
        sim: &ForgeSimulator,
        drift_args: &[&str],
        this: &Path,
        repo_arg: &str,
        size: &str,
    ) -> anyhow::Result<ColdPart> {
        let (apps, ours, floor) = (self.apps, self.ours.as_str(), self.floor.as_str());
        let apps_arg = apps.to_string();
        // The floor first, into its own namespaces, so both write fresh objects.
        let (floor_apply, before_floor, after_floor) = self
            .run_with_work(
                this,
                &["--floor-apply", repo_arg, floor, &apps_arg],
                "floor-apply.log",
            )
            .await?;
        eprintln!(
            "fleet: floor applied in {:.1} s, peak RSS {:.0} MiB",
            floor_apply.secs(),
            floor_apply.mib()
        );
        self.ensure_all_objects(floor, "floor").await?;

        // The dry-run half of a cold reconcile's floor: the same objects dry-run into
        // driftless's namespaces, empty still, so each is the dry-run of a creation.
        let (floor_dry_run, before_dry_run, after_dry_run) = self
            .run_with_work(
                this,
                &["--floor-dry-run", repo_arg, ours, &apps_arg],
                "floor-dry-run.log",
            )
            .await?;
        eprintln!("fleet: floor dry-run in {:.1} s", floor_dry_run.secs());
        ensure!(
            count_objects(&self.client, ours, apps).await? == 0,
            "the floor's dry-run wrote objects"
        );

        let FirstCold {
            cold,
            before: before_cold,
            after: after_cold,
            forge: cold_forge,
            phases: cold_phases,
        } = self.first_cold(sim, drift_args).await?;
        eprintln!(
            "fleet: API requests of the floor apply: {}; of the floor dry-run: {}; of the cold reconcile: {}",
            before_floor.requests_by_kind(&after_floor),
            before_dry_run.requests_by_kind(&after_dry_run),
            before_cold.requests_by_kind(&after_cold)
        );

        // The floor again, into a third copy of the namespaces, once the cold reconcile's
        // follow-up work is done. This machine's speed drifts over minutes (the same client
        // work took up to a third more CPU time in one window than in another), so the cold
        // reconcile is set against the mean of a floor apply before it and one after it.
        let floor_again = self
            .floor_after_round(repo_arg, &self.floor_after, "floor-apply-after.log")
            .await?;
        eprintln!("fleet: floor applied again in {:.1} s", floor_again.secs());
        // Further cold rounds, each set against the floor apply before it and the one after.
        let floor_mib = floor_apply.mib();
        let mut colds = vec![cold];
        let mut floors = vec![floor_apply, floor_again];
        for k in 2..=self.cold_rounds {
            let (cold, floor) = self.cold_round(sim, k, repo_arg).await?;
            colds.push(cold);
            floors.push(floor);
        }
        let cold_rounds = ColdRounds::new(&colds, &floors);
        let (cold, floor_apply) = (&colds[0], &floors[0]);

        let (floor_api, floor_work) = before_floor.spent(&after_floor, floor_apply);
        let (dry_api, dry_work) = before_dry_run.spent(&after_dry_run, &floor_dry_run);
        let (cold_api, cold_work) = before_cold.spent(&after_cold, cold);
        let secs = |v: Option<f64>| v.map_or("not measured".into(), |v| format!("{v:.1} s"));
        let ratio = |v: Option<f64>| match (v, floor_api) {
            (Some(v), Some(f)) => format!("{:.2}× floor", v / f),
            _ => "not measured".into(),
        };
        let both_floors = floor_apply.secs() + floor_dry_run.secs();
        let (median_cold, median_before, median_after) = cold_rounds.median();
        let rows = vec![
            format!(
                "| fleet: API server CPU of a cold reconcile, {size} | {} | floor apply (its run before the cold reconcile): {} | {} | where the cold reconcile's time goes (its first round): the control plane shares this machine's 2 cores, and the API server works through every request. Driftless cold: {:.1} s wall, {cold_work}. Floor apply: {:.1} s wall, {floor_work}. Floor dry-run (the floor's objects server-side dry-run into driftless's still empty namespaces, each a creation, {FLOOR_IN_FLIGHT} in flight): {:.1} s wall ({:.2}× the floor apply), {dry_work} ({}). A reconcile that dry-runs every object before it applies any cannot take less than the two floors together: {both_floors:.1} s, {:.2}× the floor apply |",
                secs(cold_api),
                secs(floor_api),
                ratio(cold_api),
                cold.secs(),
                floor_apply.secs(),
                floor_dry_run.secs(),
                floor_dry_run.secs() / floor_apply.secs(),
                ratio(dry_api),
                both_floors / floor_apply.secs(),
            ),
            format!(
                "| fleet: cold reconcile, {size}, `driftless drift --once`, the median of {} rounds | {:.1} s | floor (server-side apply of each object, {FLOOR_IN_FLIGHT} in flight, no fetch, no state), mean of the run just before that round and the one just after it: {:.1} s ({:.1} s and {:.1} s) | {:.2}× floor | each round reconciles every app into namespaces of its own, with a state namespace of its own: {} (ratios {}); {}; driftless fetches from the forge simulator (first round: {cold_forge}; {}), dry-runs then applies each app, records state and posts 2 statuses per app; the first round's time by phase, summed over the runs ({} at a time): {cold_phases}; all {} objects counted after each round |",
                self.cold_rounds,
                median_cold,
                (median_before + median_after) / 2.0,
                median_before,
                median_after,
                median(&cold_rounds.ratios()),
                cold_rounds.describe(),
                range(&cold_rounds.ratios(), 2),
                self.layout(),
                self.budget(self.cold_rounds),
                driftless::worker::WORKERS,
                thousands(apps * OBJECTS_PER_APP),
            ),
        ];
        Ok(ColdPart {
            rows,
            peak_mib: cold_rounds.peak_mib,
            floor_mib: Some(floor_mib),
        })
    }

    /// The steady sweep, nothing changed, [`repeats`] times, each beside a floor read (the
    /// floor first every other time, so neither always follows the other). Every sweep must
    /// find every app in sync and spend the same forge requests.
    async fn steady_sweeps(
        &self,
        sim: &ForgeSimulator,
        drift_args: &[&str],
        this: &Path,
    ) -> anyhow::Result<Sweeps> {
        let (apps, expected) = (self.apps, self.apps * OBJECTS_PER_APP);
        let apps_arg = apps.to_string();
        let floor_args = ["--floor-list", self.ours.as_str(), &apps_arg];
        let mut sweeps = Sweeps::default();
        for i in 0..repeats()? {
            let floor_log = format!("floor-list-{i}.log");
            let floor_first = i % 2 == 1;
            let mut floor = None;
            if floor_first {
                floor = Some(self.run_measured(this, &floor_args, &floor_log).await?);
            }
            sim.clear_requests();
            let log = format!("steady-{i}.log");
            let steady = self
                .run_measured(&self.driftless_bin, drift_args, &log)
                .await?;
            ensure!(
                in_sync_count(&steady) == apps,
                "driftless: {} of {apps} apps in sync in steady sweep {i}",
                in_sync_count(&steady)
            );
            ForgeUse::take(sim).same_as(&mut sweeps.forge, &format!("steady sweep {i}"))?;
            let floor = match floor {
                Some(floor) => floor,
                None => self.run_measured(this, &floor_args, &floor_log).await?,
            };
            ensure!(
                floor.stdout.trim() == expected.to_string(),
                "floor read {i}: {} objects listed, {expected} expected",
                floor.stdout.trim()
            );
            let steps = std::fs::read_to_string(self.work.join(&log))?;
            let steps = phase_times(&steps, &CHECK_PHASES)
                .with_context(|| format!("steady sweep {i} logged no time by phase"))?;
            eprintln!(
                "fleet: steady sweep {i}: {:.2} s (peak RSS {:.0} MiB), floor read {:.2} s{}: {:.2}×; forge requests: {:?}; time by step: {steps}",
                steady.secs(),
                steady.mib(),
                floor.secs(),
                if floor_first { " (taken first)" } else { "" },
                steady.secs() / floor.secs(),
                sim.request_counts()
            );
            sweeps.steps.push(steps);
            sweeps.steady.push(steady);
            sweeps.floor.push(floor);
        }
        Ok(sweeps)
    }

    /// [`commits`] sweeps, each after a commit changing one value of another app (a0, a1,
    /// ...): each must apply it and find every app in sync.
    async fn one_commit_sweeps(
        &self,
        sim: &ForgeSimulator,
        repo: &Path,
        drift_args: &[&str],
    ) -> anyhow::Result<Commits> {
        let mut commits = Commits::default();
        for a in 0..commits_count()?.min(self.apps) {
            let log = format!("one-commit-{a}.log");
            let m = self
                .one_commit_sweep(sim, repo, drift_args, a, &log)
                .await?;
            eprintln!(
                "fleet: sweep after a commit to app a{a}: {:.2} s; forge requests: {:?}",
                m.secs(),
                sim.request_counts()
            );
            let text = std::fs::read_to_string(self.work.join(&log))?;
            commits.steps.push(
                phase_times(&text, &ONE_COMMIT_PHASES)
                    .with_context(|| format!("{log}: no time by phase"))?,
            );
            commits.catch_up.push(
                phase_secs(&text, "catch_up_s")
                    .with_context(|| format!("{log}: no catch-up time"))?,
            );
            ForgeUse::take(sim).same_as(
                &mut commits.forge,
                &format!("the sweep after a commit to a{a}"),
            )?;
            commits.runs.push(m);
        }
        Ok(commits)
    }

    /// A commit changing one value of app `a`, then a `drift --once` logging to `log`: it
    /// must apply it and find every app in sync.
    async fn one_commit_sweep(
        &self,
        sim: &ForgeSimulator,
        repo: &Path,
        drift_args: &[&str],
        a: usize,
        log: &str,
    ) -> anyhow::Result<Measured> {
        let file = repo.join(format!("apps/a{a}/all.yaml"));
        let text = std::fs::read_to_string(&file)?;
        let changed = text.replacen("key: \"value-0\"", "key: \"value-0-changed\"", 1);
        ensure!(changed != text, "app a{a} has no value to change");
        std::fs::write(&file, changed)?;
        git(
            repo,
            &["commit", "-q", "-am", &format!("a{a} changes one value")],
        );
        sim.clear_requests();
        let m = self
            .run_measured(&self.driftless_bin, drift_args, log)
            .await?;
        let in_sync = in_sync_count(&m);
        ensure!(
            in_sync == self.apps,
            "{in_sync} of {} apps in sync after the sweep after a commit to a{a}",
            self.apps
        );
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &app_namespace(&self.ours, a),
            &kind_resource("ConfigMap"),
        );
        let cm = api.get(&format!("a{a}-cm0")).await?;
        ensure!(
            cm.data["data"]["key"] == "value-0-changed",
            "the sweep did not apply the commit to a{a}: {:?}",
            cm.data["data"]
        );
        Ok(m)
    }

    /// `driftless serve` started with every app in sync, until its start-up catch-up says how
    /// many apps are at their branch head; then stopped (SIGTERM). What it wrote is found by
    /// comparing every resourceVersion in the app and state namespaces before and after.
    async fn restart(&self, settings: &str) -> anyhow::Result<Restart> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = self.work.join("serve.toml");
        std::fs::write(
            &config,
            format!(
                "{settings}[server]\nlisten = \"127.0.0.1:{port}\"\n[drift]\ninterval = \"0s\"\n"
            ),
        )?;
        self.settle("serve restart").await;
        let before = self.versions().await?;
        let log = self.work.join("serve.log");
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&self.driftless_bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("DRIFTLESS_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let found = loop {
            if let Some(in_sync) = caught_up_in_sync(&std::fs::read_to_string(&log)?) {
                break Ok((started.elapsed(), in_sync));
            }
            if let Some(status) = child.try_wait()? {
                break Err(anyhow::anyhow!(
                    "serve exited early ({status}); see {}",
                    log.display()
                ));
            }
            if started.elapsed() > Duration::from_secs(600) {
                break Err(anyhow::anyhow!(
                    "serve did not finish its catch-up in 600 s; see {}",
                    log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        let _ = child.kill().await;
        let (caught_up, in_sync) = found?;
        let after = self.versions().await?;
        let mut writers = std::collections::BTreeMap::<String, usize>::new();
        for (key, (rv, writer)) in &after {
            if before.get(key).map(|(rv, _)| rv) != Some(rv) {
                *writers.entry(writer.clone()).or_default() += 1;
            }
        }
        let gone = before.keys().filter(|k| !after.contains_key(*k)).count();
        if gone > 0 {
            writers.insert("(deleted)".into(), gone);
        }
        Ok(Restart {
            caught_up,
            in_sync,
            writers,
            objects: after.len(),
        })
    }

    /// The resourceVersion of every app object and every ConfigMap and Lease of the state
    /// namespace, and the field manager of its latest write (see [`last_writer`]), by kind,
    /// namespace and name.
    async fn versions(
        &self,
    ) -> anyhow::Result<std::collections::BTreeMap<String, (String, String)>> {
        let mut all = std::collections::BTreeMap::new();
        let mut lists: Vec<(String, &str)> = namespaces(&self.ours, self.apps)
            .into_iter()
            .flat_map(|ns| KINDS.iter().map(move |(kind, _, _)| (ns.clone(), *kind)))
            .collect();
        lists.push((self.state_ns.clone(), "ConfigMap"));
        let leases = ApiResource::erase::<k8s_openapi::api::coordination::v1::Lease>(&());
        for (ns, kind) in lists {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &ns, &kind_resource(kind));
            for o in api.list(&ListParams::default()).await?.items {
                let (name, version) = version_of(o);
                all.insert(format!("{kind} {ns}/{name}"), version);
            }
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.state_ns, &leases);
        for o in api.list(&ListParams::default()).await?.items {
            let (name, version) = version_of(o);
            all.insert(format!("Lease {name}"), version);
        }
        Ok(all)
    }
}

/// What a `serve` restart did.
struct Restart {
    /// From the process start to the end of its start-up catch-up.
    caught_up: Duration,
    /// Apps the catch-up found at their branch head.
    in_sync: usize,
    /// Objects whose resourceVersion moved (or that came), by the field manager of the
    /// latest write; `(deleted)`: objects that went.
    writers: std::collections::BTreeMap<String, usize>,
    /// Objects compared.
    objects: usize,
}

impl Restart {
    /// Whether a writer of [`Self::writers`] is driftless: one of its field managers, or a
    /// deletion (driftless is the only one deleting in these namespaces).
    fn is_driftless(writer: &str) -> bool {
        writer.starts_with("driftless") || writer == "(deleted)"
    }

    /// Objects driftless wrote.
    fn written_by_driftless(&self) -> usize {
        self.writers
            .iter()
            .filter(|(w, _)| Self::is_driftless(w))
            .map(|(_, n)| n)
            .sum()
    }

    /// Writes of the others (the controller manager finishing its work on the objects), by
    /// field manager.
    fn others(&self) -> String {
        let others: Vec<String> = self
            .writers
            .iter()
            .filter(|(w, _)| !Self::is_driftless(w))
            .map(|(w, n)| format!("{n} by {w}"))
            .collect();
        if others.is_empty() {
            "none by anyone else".into()
        } else {
            others.join(", ")
        }
    }
}

/// The steady sweeps and the floor read beside each.
#[derive(Default)]
struct Sweeps {
    steady: Vec<Measured>,
    floor: Vec<Measured>,
    /// Each sweep's time by step.
    steps: Vec<String>,
    /// What each sweep spent (all the same).
    forge: Option<ForgeUse>,
}

impl Sweeps {
    fn steady_secs(&self) -> Vec<f64> {
        self.steady.iter().map(Measured::secs).collect()
    }
    fn floor_secs_each(&self) -> Vec<f64> {
        self.floor.iter().map(Measured::secs).collect()
    }
    /// The median floor read.
    fn floor_secs(&self) -> f64 {
        median(&self.floor_secs_each())
    }
    fn peak_mib(&self) -> f64 {
        peak_mib(&self.steady)
    }
    /// The floor read client's largest peak RSS.
    fn floor_peak_mib(&self) -> f64 {
        peak_mib(&self.floor)
    }

    fn row(&self, size: &str) -> anyhow::Result<String> {
        let steady = self.steady_secs();
        let floor = self.floor_secs_each();
        let ratios: Vec<f64> = steady.iter().zip(&floor).map(|(s, f)| s / f).collect();
        let met = ratios.iter().filter(|r| **r <= 2.0).count();
        let forge = self.forge.as_ref().context("no steady sweep")?;
        Ok(format!(
            "| fleet: steady-state drift sweep, {size}, nothing changed | {:.2} s (median of {n}) | floor (read every object once: one LIST per kind and namespace), median: {:.2} s | {:.2}× floor | `drift --once` again, a new process each time, {n} times, each beside a floor read (the floor first every other time): sweeps {} s, floor reads {} s, ratio of each pair {}× (≤ 2× in {met} of {n}); each sweep: every app state in one paged LIST, one conditional branch-head request ({forge}), the desired objects from the copies kept in the cluster (no file read), one LIST per kind and namespace; peak RSS {:.0} MiB at most; CPU of the process (medians): the sweep's {:.2} s, the floor read's {:.2} s; time by step of the median sweep: {} |",
            median(&steady),
            median(&floor),
            median(&steady) / median(&floor),
            range(&steady, 2),
            range(&floor, 2),
            range(&ratios, 2),
            self.peak_mib(),
            median(&cpu(&self.steady)),
            median(&cpu(&self.floor)),
            self.steps[median_index(&steady)],
            n = steady.len(),
        ))
    }
}

/// The user and system CPU seconds of each child.
fn cpu(runs: &[Measured]) -> Vec<f64> {
    runs.iter().map(|m| m.cpu.as_secs_f64()).collect()
}

/// The sweeps after a commit to one app.
#[derive(Default)]
struct Commits {
    runs: Vec<Measured>,
    /// Each sweep's time by step, and its catch-ups' time (the one app's run among them).
    steps: Vec<String>,
    catch_up: Vec<f64>,
    /// What each sweep spent (all the same).
    forge: Option<ForgeUse>,
}

impl Commits {
    fn row(&self, size: &str, sweeps: &Sweeps, apps: usize) -> String {
        let floor = sweeps.floor_secs();
        let secs: Vec<f64> = self.runs.iter().map(Measured::secs).collect();
        let goals: Vec<f64> = self.catch_up.iter().map(|c| 2.0 * floor + c).collect();
        let met = secs.iter().zip(&goals).filter(|(s, g)| s <= g).count();
        let each: Vec<String> = secs
            .iter()
            .zip(&goals)
            .map(|(s, g)| format!("{s:.2} s against {g:.2} s"))
            .collect();
        let forge = self
            .forge
            .as_ref()
            .map_or("no sweep".into(), |f| f.to_string());
        let m = median_index(&secs);
        format!(
            "| fleet: drift sweep after a commit changing one value of one app, {size} | {:.2} s (median of {n}) | floor read above (median): {floor:.2} s | {:.2}× floor | `drift --once`, a new process, after each of {n} commits, each to another app: the head moved, so one compare of the head before with it, added to what changed up to the head before (kept beside the head), tells the {} other apps they are untouched; the one app is reconciled (its file read, its 20 objects dry-run, 1 applied, its state written, 2 statuses) and then checked alone; {forge}; goal ≤ 2× the floor read plus that sweep's catch-ups, met in {met} of {n} ({}); time by step of the median sweep: {} |",
            secs[m],
            secs[m] / floor,
            thousands(apps - 1),
            each.join(", "),
            self.steps[m],
            n = secs.len(),
        )
    }
}

/// An object's name, and its resourceVersion with the field manager of its latest write.
fn version_of(o: DynamicObject) -> (String, (String, String)) {
    let writer = last_writer(&o.metadata);
    let (name, rv) = (o.metadata.name, o.metadata.resource_version);
    (name.unwrap_or_default(), (rv.unwrap_or_default(), writer))
}

/// The field manager of an object's latest write: the managedFields entry with the newest
/// time (the last listed of equals), or `(unknown)`.
fn last_writer(meta: &kube::api::ObjectMeta) -> String {
    meta.managed_fields
        .iter()
        .flatten()
        .max_by(|a, b| {
            a.time
                .as_ref()
                .map(|t| t.0)
                .cmp(&b.time.as_ref().map(|t| t.0))
        })
        .and_then(|m| m.manager.clone())
        .unwrap_or_else(|| "(unknown)".into())
}

/// The apps a `drift --once` reported in sync.
fn in_sync_count(m: &Measured) -> usize {
    m.stdout
        .lines()
        .filter(|l| l.ends_with(": in sync"))
        .count()
}

/// The `in_sync` count of the start-up catch-up's JSON log line, once it is written.
fn caught_up_in_sync(log: &str) -> Option<usize> {
    log.lines()
        .filter(|l| l.contains("apps already at their branch head"))
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .and_then(|v| v["fields"]["in_sync"].as_u64())
        .map(|n| n as usize)
}

/// The time by phase a `drift --once` logged (JSON), as "fetch 1.2 s, dry-run 3.4 s, ...".
fn phase_times(log: &str, phases: &[(&str, &str)]) -> Option<String> {
    let fields = phase_fields(log)?;
    let parts: Vec<String> = phases
        .iter()
        .map(|(name, key)| Some(format!("{name} {:.2} s", fields[*key].as_f64()?)))
        .collect::<Option<_>>()?;
    Some(parts.join(", "))
}

/// One field of the time by phase a `drift --once` logged (JSON).
fn phase_secs(log: &str, key: &str) -> Option<f64> {
    phase_fields(log)?[key].as_f64()
}

/// The fields of the "time by phase" line a `drift --once` logged (JSON).
fn phase_fields(log: &str) -> Option<Value> {
    let line = log
        .lines()
        .filter(|l| l.contains("time by phase"))
        .find_map(|l| serde_json::from_str::<Value>(l).ok())?;
    Some(line["fields"].clone())
}
