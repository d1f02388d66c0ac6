//! Settings: built-in defaults, then a TOML file, then `DRIFTLESS__SECTION__KEY` environment
//! variables, layered by the `config` crate into raw values and converted once into validated,
//! typed [`Settings`]. Every error names the key at fault (`apps[2].path: ...`).
//!
//! The module is called `settings` rather than `config` so that it never shadows the `config`
//! crate it is built on.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// The public GitHub REST API.
pub const GITHUB_API_URL: &str = "https://api.github.com";
/// The public GitLab REST API.
pub const GITLAB_API_URL: &str = "https://gitlab.com/api/v4";

/// A settings error: the key at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SettingsError {
    /// Dotted key path, e.g. `apps[2].path` or `forges.github.token_env`.
    pub key: String,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl SettingsError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Every problem found in one settings source, so a user fixes them in one pass.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading settings from {source_name}: {message}")]
    Read {
        source_name: String,
        message: String,
    },
    #[error("invalid settings:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<SettingsError>),
}

impl LoadError {
    /// The individual key errors, if this is a validation failure.
    pub fn errors(&self) -> &[SettingsError] {
        match self {
            LoadError::Invalid(errors) => errors,
            LoadError::Read { .. } => &[],
        }
    }
}

/// Validated settings. Built only through [`Settings::load`] or [`Settings::from_toml_str`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub kubernetes: KubernetesSettings,
    pub forges: ForgeSettings,
    pub fetch: FetchSettings,
    pub render: RenderSettings,
    pub drift: DriftSettings,
    pub previews: PreviewSettings,
    pub log: LogSettings,
    pub apps: Vec<AppSettings>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address the HTTP receiver listens on.
    pub listen: SocketAddr,
    /// Public base URL, used for webhook registration and commit-status links.
    pub public_url: Option<String>,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    /// Bytes of request bodies that may be in flight at once, across all connections: each
    /// request reserves its Content-Length (or `body_limit` when it sends none) before its
    /// body is read, and one that does not fit is refused with 503.
    pub body_budget: usize,
    /// Time a client has to send its request headers (slowloris guard).
    pub header_timeout: Duration,
    /// Time a client has to send the whole request body.
    pub read_timeout: Duration,
    /// On SIGTERM, how long running reconciles may take to finish before they are
    /// interrupted (their state records it and the next start resumes them).
    pub shutdown_grace: Duration,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct KubernetesSettings {
    /// Namespace holding the per-app state objects and Leases.
    pub state_namespace: String,
    /// How long an app's Lease stays valid without renewal: a crashed replica blocks its
    /// apps for at most this long.
    pub lease_duration: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct ForgeSettings {
    pub github: Option<GithubSettings>,
    pub gitlab: Option<GitlabSettings>,
}

#[derive(Debug, Clone)]
pub struct GithubSettings {
    pub api_url: String,
    pub auth: GithubAuth,
    /// Secret GitHub signs deliveries with (`X-Hub-Signature-256`).
    pub webhook_secret: SecretRef,
    /// A second accepted secret while a new one is rolled out.
    pub previous_webhook_secret: Option<SecretRef>,
    /// Register the webhook on each repo when `serve` starts.
    pub register_webhooks: bool,
}

#[derive(Debug, Clone)]
pub enum GithubAuth {
    Token(SecretRef),
    App {
        app_id: u64,
        private_key: SecretRef,
        installation_id: u64,
    },
}

#[derive(Debug, Clone)]
pub struct GitlabSettings {
    pub api_url: String,
    pub token: SecretRef,
    /// Plain secret token, sent back in `X-Gitlab-Token`.
    pub webhook_token: Option<SecretRef>,
    /// Standard Webhooks signing token (`whsec_...`), verified from `webhook-signature`.
    pub signing_token: Option<SecretRef>,
    /// A second accepted webhook token while a new one is rolled out.
    pub previous_webhook_token: Option<SecretRef>,
    pub register_webhooks: bool,
}

/// Bounds on what one app fetch may cost, so a huge push cannot exhaust memory.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// Most files one app may hold.
    pub max_app_files: usize,
    /// Most bytes one app's files may add up to.
    pub max_app_bytes: usize,
    /// Bytes of file contents kept in the content-addressed blob cache.
    pub blob_cache_bytes: usize,
    /// Longest wait for a forge rate limit to reset before the fetch fails instead.
    pub max_rate_limit_wait: Duration,
    /// Timeout of one forge API request.
    pub request_timeout: Duration,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            max_app_files: 5_000,
            max_app_bytes: 64 << 20,
            blob_cache_bytes: 256 << 20,
            max_rate_limit_wait: Duration::from_secs(15 * 60),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// How Kustomize apps are rendered (`[render]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderSettings {
    /// The program and arguments that build a kustomization; the directory is appended.
    /// `["kustomize", "build"]` by default; `["kubectl", "kustomize"]` bundles Kustomize v5 too.
    pub kustomize_command: Vec<String>,
    /// Longest one render may take before it is killed and the run fails.
    pub timeout: Duration,
    /// Most bytes of manifests one render may print.
    pub max_output_bytes: usize,
}

impl Default for RenderSettings {
    fn default() -> Self {
        Self {
            kustomize_command: vec!["kustomize".into(), "build".into()],
            timeout: Duration::from_secs(60),
            max_output_bytes: 32 << 20,
        }
    }
}

/// Which renderer turns an app's directory into manifests (`apps[].render`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenderMode {
    /// Kustomize when the app's path holds a kustomization file, else plain.
    Auto,
    Kustomize,
    /// Every `*.yaml`, `*.yml` and `*.json` file under the path, as written.
    Plain,
}

#[derive(Debug, Clone)]
pub struct DriftSettings {
    /// How often each app is checked.
    pub interval: Duration,
    /// Largest random offset added to each app's slot in the interval.
    pub jitter: Duration,
    /// Post drift that remains after a check as `failure` on the applied commit, and
    /// `success` once it is gone (each when the finding changes).
    pub report_status: bool,
    /// Apps a sweep (`drift --once`) checks together, sharing one LIST per kind and namespace:
    /// fewer LISTs with more, less memory with fewer (two batches' live objects are held).
    pub sweep_batch: usize,
}

/// Previews of pull and merge requests (`[previews]`).
#[derive(Debug, Clone)]
pub struct PreviewSettings {
    /// Answer pull/merge request webhooks with a preview; `hooks register` subscribes to them.
    pub enabled: bool,
    /// Preview requests whose head lives in a fork. Off by default: a dry-run still runs the
    /// cluster's admission webhooks with driftless's credentials on content anyone can write.
    pub from_forks: bool,
    /// Most apps one pull request previews; the rest are named in the comment, not previewed.
    pub max_apps: usize,
}

/// Which forge an app's repository lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ForgeKind {
    Github,
    Gitlab,
}

impl serde::Serialize for ForgeKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ForgeKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "github" => Ok(ForgeKind::Github),
            "gitlab" => Ok(ForgeKind::Gitlab),
            other => Err(serde::de::Error::custom(format!(
                "unknown forge {other:?} (github or gitlab)"
            ))),
        }
    }
}

impl ForgeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ForgeKind::Github => "github",
            ForgeKind::Gitlab => "gitlab",
        }
    }
}

impl fmt::Display for ForgeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do when the cluster no longer matches Git.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftPolicy {
    /// Re-apply the drifted objects.
    Heal,
    /// Report only.
    Alert,
}

impl fmt::Display for DriftPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriftPolicy::Heal => "heal",
            DriftPolicy::Alert => "alert",
        })
    }
}

/// A field that something other than Git legitimately owns, so it is never drift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoreRule {
    /// Limit the rule to one kind (e.g. `Deployment`); `None` means every kind.
    pub kind: Option<String>,
    /// JSON pointer into the object, e.g. `/spec/replicas`.
    pub pointer: String,
}

/// One app: a path in a repo branch, reconciled into the cluster.
#[derive(Debug, Clone)]
pub struct AppSettings {
    pub name: String,
    pub forge: ForgeKind,
    /// `owner/name` on GitHub, `group/sub/project` on GitLab, as written.
    pub repo: String,
    pub branch: String,
    /// Normalised relative path inside the repo; empty means the repo root.
    pub path: String,
    /// Namespace for namespaced objects that do not name one.
    pub namespace: Option<String>,
    pub prune: bool,
    pub drift: DriftPolicy,
    pub health_timeout: Duration,
    /// Take ownership of fields another field manager holds (server-side apply `force`).
    pub force_conflicts: bool,
    /// Accept an app with no objects (and so prune everything it had).
    pub allow_empty: bool,
    pub ignore: Vec<IgnoreRule>,
    pub render: RenderMode,
}

/// A reference to a secret: never the secret itself.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env { key: String, var: String },
    File { key: String, path: PathBuf },
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env { var, .. } => write!(f, "env:{var}"),
            SecretRef::File { path, .. } => write!(f, "file:{}", path.display()),
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env { key, var } => write!(f, "{key} = {var:?}"),
            SecretRef::File { key, path } => write!(f, "{key} = {:?}", path.display()),
        }
    }
}

impl SecretRef {
    /// The settings key this reference was written under.
    pub fn key(&self) -> &str {
        match self {
            SecretRef::Env { key, .. } | SecretRef::File { key, .. } => key,
        }
    }

    /// Reads the secret. Surrounding whitespace (a trailing newline in a file) is removed.
    pub fn resolve(&self) -> Result<Secret, SettingsError> {
        let raw = match self {
            SecretRef::Env { key, var } => std::env::var(var).map_err(|_| {
                SettingsError::new(key, format!("environment variable {var} is not set"))
            })?,
            SecretRef::File { key, path } => std::fs::read_to_string(path).map_err(|e| {
                SettingsError::new(key, format!("cannot read {}: {e}", path.display()))
            })?,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(SettingsError::new(self.key(), "the secret is empty"));
        }
        Ok(Secret(trimmed.to_string()))
    }
}

/// A resolved secret. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Settings {
    /// Loads defaults, then `file` (when given), then `DRIFTLESS__*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Settings, LoadError> {
        let mut builder = ::config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(LoadError::Read {
                    source_name: path.display().to_string(),
                    message: "no such file".into(),
                });
            }
            builder = builder.add_source(
                ::config::File::from(path)
                    .format(::config::FileFormat::Toml)
                    .required(true),
            );
        }
        builder = builder.add_source(
            ::config::Environment::with_prefix("DRIFTLESS")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let source_name =
            file.map_or_else(|| "environment".to_string(), |p| p.display().to_string());
        let merged = builder.build().map_err(|e| LoadError::Read {
            source_name: source_name.clone(),
            message: e.to_string(),
        })?;
        let value: Value = merged.try_deserialize().map_err(|e| LoadError::Read {
            source_name,
            message: e.to_string(),
        })?;
        Self::from_value(value)
    }

    /// Parses and validates a TOML document (no environment layer). Used by tests and tools.
    pub fn from_toml_str(text: &str) -> Result<Settings, LoadError> {
        let merged = ::config::Config::builder()
            .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
            .build()
            .map_err(|e| LoadError::Read {
                source_name: "TOML text".into(),
                message: e.to_string(),
            })?;
        let value: Value = merged.try_deserialize().map_err(|e| LoadError::Read {
            source_name: "TOML text".into(),
            message: e.to_string(),
        })?;
        Self::from_value(value)
    }

    fn from_value(value: Value) -> Result<Settings, LoadError> {
        let raw: RawSettings = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            LoadError::Invalid(vec![shape_error(&path, &e.into_inner().to_string())])
        })?;
        raw.validate().map_err(LoadError::Invalid)
    }

    /// The app with this name.
    pub fn app(&self, name: &str) -> Option<&AppSettings> {
        self.apps.iter().find(|a| a.name == name)
    }

    /// Every secret reference, for `check-config` to report on.
    pub fn secret_refs(&self) -> Vec<&SecretRef> {
        let mut refs = Vec::new();
        if let Some(gh) = &self.forges.github {
            match &gh.auth {
                GithubAuth::Token(t) => refs.push(t),
                GithubAuth::App { private_key, .. } => refs.push(private_key),
            }
            refs.push(&gh.webhook_secret);
            refs.extend(gh.previous_webhook_secret.as_ref());
        }
        if let Some(gl) = &self.forges.gitlab {
            refs.push(&gl.token);
            refs.extend(gl.webhook_token.as_ref());
            refs.extend(gl.signing_token.as_ref());
            refs.extend(gl.previous_webhook_token.as_ref());
        }
        refs
    }
}

/// Turns a serde error at `path` into a key-naming error. `unknown field` is reported on the
/// unknown key itself.
fn shape_error(path: &str, message: &str) -> SettingsError {
    let join = |field: &str| {
        if path.is_empty() || path == "." {
            field.to_string()
        } else {
            format!("{path}.{field}")
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default();
        let expected = rest
            .split_once(", expected ")
            .map(|(_, e)| format!(" (known keys: {})", e.trim_start_matches("one of ")))
            .unwrap_or_default();
        // serde_path_to_error's path already ends with the unknown key.
        let key = if path.is_empty() || path == "." {
            field.to_string()
        } else {
            path.to_string()
        };
        return SettingsError::new(key, format!("unknown key{expected}"));
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or_default();
        return SettingsError::new(join(field), "is required but missing");
    }
    let key = if path.is_empty() || path == "." {
        "(top level)".to_string()
    } else {
        path.to_string()
    };
    SettingsError::new(key, message.to_string())
}

// ---------------------------------------------------------------------------------------------
// Raw settings: the shape of the file. Known inline-secret keys are accepted here only so that
// validation can say what to write instead.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawSettings {
    server: RawServer,
    kubernetes: RawKubernetes,
    forges: RawForges,
    fetch: RawFetch,
    render: RawRender,
    drift: RawDrift,
    previews: RawPreviews,
    log: RawLog,
    apps: Vec<RawApp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPreviews {
    enabled: bool,
    from_forks: bool,
    max_apps: usize,
}

impl Default for RawPreviews {
    fn default() -> Self {
        Self {
            enabled: false,
            from_forks: false,
            max_apps: DEFAULT_PREVIEW_MAX_APPS,
        }
    }
}

/// Apps previewed per pull request unless `previews.max_apps` says otherwise: a preview costs
/// a render and one dry-run per object of each app, so a request touching every app of a large
/// monorepo is bounded.
const DEFAULT_PREVIEW_MAX_APPS: usize = 20;
/// The largest `previews.max_apps` accepted.
const MAX_PREVIEW_MAX_APPS: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawFetch {
    max_app_files: usize,
    max_app_bytes: Value,
    blob_cache: Value,
    max_rate_limit_wait: String,
    request_timeout: String,
}

impl Default for RawFetch {
    fn default() -> Self {
        Self {
            max_app_files: 5_000,
            max_app_bytes: Value::String("64MiB".into()),
            blob_cache: Value::String("256MiB".into()),
            max_rate_limit_wait: "15m".into(),
            request_timeout: "30s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRender {
    kustomize_command: Vec<String>,
    timeout: String,
    max_output_bytes: Value,
}

impl Default for RawRender {
    fn default() -> Self {
        Self {
            kustomize_command: RenderSettings::default().kustomize_command,
            timeout: "60s".into(),
            max_output_bytes: Value::String("32MiB".into()),
        }
    }
}

/// The largest `server.body_budget`: the receiver counts reserved bytes in 32 bits.
const MAX_BODY_BUDGET: usize = 1 << 30;
/// `server.body_budget` when unset (and `body_limit` is not larger).
const DEFAULT_BODY_BUDGET: usize = 16 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    public_url: Option<String>,
    body_limit: Value,
    /// Unset: the default budget, or `body_limit` when that is larger.
    body_budget: Option<Value>,
    header_timeout: String,
    read_timeout: String,
    shutdown_grace: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            public_url: None,
            // A push delivery is a few KiB (7 KiB for one commit; GitLab lists at most 20
            // commits, GitHub each commit's paths); 1 MiB holds a push of hundreds of commits
            // or thousands of paths. A larger one is refused with 413 and applied anyway by
            // the drift timer's missed-push catch-up. GitHub's own cap, 25 MB, would let 16
            // uploads hold 400 MiB before a signature is checked.
            body_limit: Value::String("1MiB".into()),
            body_budget: None,
            header_timeout: "5s".into(),
            // GitHub and GitLab give up on a delivery after 10 s, so a body still arriving
            // later comes from no forge; the shorter the deadline, the sooner a slow upload
            // gives its reservation of the body budget back.
            read_timeout: "10s".into(),
            shutdown_grace: "25s".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawKubernetes {
    state_namespace: String,
    lease_duration: String,
}

impl Default for RawKubernetes {
    fn default() -> Self {
        Self {
            state_namespace: "driftless".into(),
            lease_duration: "15s".into(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawForges {
    github: Option<RawGithub>,
    gitlab: Option<RawGitlab>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawGithub {
    api_url: Option<String>,
    token_env: Option<String>,
    token_file: Option<String>,
    token: Option<Value>,
    app_id: Option<u64>,
    private_key_file: Option<String>,
    private_key_env: Option<String>,
    private_key: Option<Value>,
    installation_id: Option<u64>,
    webhook_secret_env: Option<String>,
    webhook_secret_file: Option<String>,
    webhook_secret: Option<Value>,
    previous_webhook_secret_env: Option<String>,
    previous_webhook_secret_file: Option<String>,
    previous_webhook_secret: Option<Value>,
    register_webhooks: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawGitlab {
    api_url: Option<String>,
    token_env: Option<String>,
    token_file: Option<String>,
    token: Option<Value>,
    webhook_token_env: Option<String>,
    webhook_token_file: Option<String>,
    webhook_token: Option<Value>,
    signing_token_env: Option<String>,
    signing_token_file: Option<String>,
    signing_token: Option<Value>,
    previous_webhook_token_env: Option<String>,
    previous_webhook_token_file: Option<String>,
    previous_webhook_token: Option<Value>,
    register_webhooks: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDrift {
    interval: String,
    jitter: String,
    report_status: bool,
    sweep_batch: usize,
}

impl Default for RawDrift {
    fn default() -> Self {
        Self {
            interval: "10m".into(),
            jitter: "1m".into(),
            report_status: false,
            sweep_batch: DEFAULT_SWEEP_BATCH,
        }
    }
}

/// Apps a sweep checks together unless `drift.sweep_batch` says otherwise: a namespace of the
/// fleet benchmark (100 apps, 2,000 objects) in one batch, its live objects about 1 MiB.
const DEFAULT_SWEEP_BATCH: usize = 100;
/// The largest `drift.sweep_batch` accepted: a LIST label-selects the batch's app names, and
/// a thousand of them make a URL of tens of kilobytes.
const MAX_SWEEP_BATCH: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: String,
    forge: String,
    repo: String,
    #[serde(default = "default_branch")]
    branch: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default = "default_true")]
    prune: bool,
    #[serde(default = "default_drift")]
    drift: String,
    #[serde(default = "default_health_timeout")]
    health_timeout: String,
    #[serde(default = "default_true")]
    force_conflicts: bool,
    #[serde(default)]
    allow_empty: bool,
    #[serde(default)]
    ignore: Vec<RawIgnore>,
    #[serde(default = "default_render")]
    render: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIgnore {
    #[serde(default)]
    kind: Option<String>,
    pointer: String,
}

fn default_branch() -> String {
    "main".into()
}
fn default_true() -> bool {
    true
}
fn default_drift() -> String {
    "heal".into()
}
fn default_render() -> String {
    "auto".into()
}
fn default_health_timeout() -> String {
    "5m".into()
}

/// Collects errors while the raw settings are converted.
#[derive(Default)]
struct Problems(Vec<SettingsError>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(SettingsError::new(key, message));
    }

    /// An error naming `key` unless `value` is between 1 and `max`.
    fn count(&mut self, key: &str, value: usize, max: usize) {
        if !(1..=max).contains(&value) {
            self.push(key, format!("must be between 1 and {max}, got {value}"));
        }
    }

    fn duration(&mut self, key: &str, text: &str) -> Duration {
        match parse_duration(text) {
            Ok(d) => d,
            Err(message) => {
                self.push(key, message);
                Duration::ZERO
            }
        }
    }

    /// Exactly one of `<base>_env` / `<base>_file`, or none when `required` is false.
    fn secret(
        &mut self,
        section: &str,
        base: &str,
        env: &Option<String>,
        file: &Option<String>,
        inline: &Option<Value>,
        required: bool,
    ) -> Option<SecretRef> {
        if inline.is_some() {
            self.push(
                format!("{section}.{base}"),
                format!(
                    "secrets are never written inline; name an environment variable with \
                     {section}.{base}_env or a file with {section}.{base}_file"
                ),
            );
            return None;
        }
        match (env, file) {
            (Some(_), Some(_)) => {
                self.push(
                    format!("{section}.{base}_env"),
                    format!("set only one of {base}_env and {base}_file"),
                );
                None
            }
            (Some(var), None) => {
                let key = format!("{section}.{base}_env");
                if !is_env_var_name(var) {
                    self.push(&key, format!("not an environment variable name: {var:?}"));
                    return None;
                }
                Some(SecretRef::Env {
                    key,
                    var: var.clone(),
                })
            }
            (None, Some(path)) => {
                let key = format!("{section}.{base}_file");
                if path.trim().is_empty() {
                    self.push(&key, "must not be empty");
                    return None;
                }
                Some(SecretRef::File {
                    key,
                    path: PathBuf::from(path),
                })
            }
            (None, None) => {
                if required {
                    self.push(
                        format!("{section}.{base}_env"),
                        format!("is required: set {base}_env or {base}_file"),
                    );
                }
                None
            }
        }
    }
}

impl RawSettings {
    fn validate(self) -> Result<Settings, Vec<SettingsError>> {
        let mut p = Problems::default();

        let listen = match self.server.listen.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                p.push(
                    "server.listen",
                    format!(
                        "must be an address and port like 0.0.0.0:8080, got {:?}",
                        self.server.listen
                    ),
                );
                SocketAddr::from(([0, 0, 0, 0], 8080))
            }
        };
        let public_url = self.server.public_url.map(|u| {
            let trimmed = u.trim_end_matches('/').to_string();
            if let Err(m) = check_http_url(&trimmed) {
                p.push("server.public_url", m);
            }
            trimmed
        });
        let body_limit = match parse_byte_size(&self.server.body_limit) {
            Ok(0) => {
                p.push("server.body_limit", "must be greater than zero");
                0
            }
            Ok(n) => n,
            Err(m) => {
                p.push("server.body_limit", m);
                0
            }
        };
        // 16 uploads of the largest body at once, or thousands of real deliveries: RSS stays
        // far below the 384 MiB limit of deploy/ whatever the senders do.
        let budget = self
            .server
            .body_budget
            .as_ref()
            .map_or_else(|| Ok(DEFAULT_BODY_BUDGET.max(body_limit)), parse_byte_size);
        let body_budget = match budget {
            Ok(n) if n > MAX_BODY_BUDGET => {
                p.push("server.body_budget", "must be at most 1GiB");
                0
            }
            Ok(n) if n < body_limit => {
                p.push(
                    "server.body_budget",
                    format!(
                        "must be at least server.body_limit ({body_limit} bytes), or no body of \
                         the largest size could ever be read"
                    ),
                );
                0
            }
            Ok(n) => n,
            Err(m) => {
                p.push("server.body_budget", m);
                0
            }
        };
        let header_timeout = p.duration("server.header_timeout", &self.server.header_timeout);
        let read_timeout = p.duration("server.read_timeout", &self.server.read_timeout);
        let shutdown_grace = p.duration("server.shutdown_grace", &self.server.shutdown_grace);
        let log_format = match self.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                p.push(
                    "log.format",
                    format!("{other:?} is not a log format; use \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };

        if let Err(m) = check_dns_label(&self.kubernetes.state_namespace) {
            p.push("kubernetes.state_namespace", m);
        }
        let lease_duration =
            p.duration("kubernetes.lease_duration", &self.kubernetes.lease_duration);
        // Renewals go out every fifth of the duration: below 2s that is a write every few
        // hundred milliseconds per running app; above 10m a crash blocks apps for too long.
        if !(Duration::from_secs(2)..=Duration::from_secs(600)).contains(&lease_duration) {
            p.push("kubernetes.lease_duration", "must be between 2s and 10m");
        }

        let github = self.forges.github.map(|g| {
            let s = "forges.github";
            let api_url = api_url(&mut p, s, g.api_url, GITHUB_API_URL);
            let token = p.secret(s, "token", &g.token_env, &g.token_file, &g.token, false);
            let private_key = p.secret(
                s,
                "private_key",
                &g.private_key_env,
                &g.private_key_file,
                &g.private_key,
                false,
            );
            let auth = match (token, g.app_id, private_key, g.installation_id) {
                (Some(t), None, None, None) => Some(GithubAuth::Token(t)),
                (None, Some(app_id), Some(private_key), Some(installation_id)) => {
                    Some(GithubAuth::App {
                        app_id,
                        private_key,
                        installation_id,
                    })
                }
                (Some(_), _, _, _) => {
                    p.push(
                        format!("{s}.token_env"),
                        "choose one way to authenticate: a token, or a GitHub App \
                         (app_id, private_key_file, installation_id), not both",
                    );
                    None
                }
                (None, None, None, None) => {
                    p.push(
                        format!("{s}.token_env"),
                        "is required: set token_env or token_file, or authenticate as a \
                         GitHub App with app_id, private_key_file and installation_id",
                    );
                    None
                }
                (None, app_id, key, inst) => {
                    let missing: Vec<&str> = [
                        app_id.is_none().then_some("app_id"),
                        key.is_none().then_some("private_key_file"),
                        inst.is_none().then_some("installation_id"),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    p.push(
                        format!("{s}.{}", missing[0]),
                        format!(
                            "GitHub App authentication needs app_id, private_key_file and \
                             installation_id; missing: {}",
                            missing.join(", ")
                        ),
                    );
                    None
                }
            };
            let webhook_secret = p.secret(
                s,
                "webhook_secret",
                &g.webhook_secret_env,
                &g.webhook_secret_file,
                &g.webhook_secret,
                true,
            );
            let previous_webhook_secret = p.secret(
                s,
                "previous_webhook_secret",
                &g.previous_webhook_secret_env,
                &g.previous_webhook_secret_file,
                &g.previous_webhook_secret,
                false,
            );
            auth.zip(webhook_secret)
                .map(|(auth, webhook_secret)| GithubSettings {
                    api_url,
                    auth,
                    webhook_secret,
                    previous_webhook_secret,
                    register_webhooks: g.register_webhooks,
                })
        });

        let gitlab = self.forges.gitlab.map(|g| {
            let s = "forges.gitlab";
            let api_url = api_url(&mut p, s, g.api_url, GITLAB_API_URL);
            let token = p.secret(s, "token", &g.token_env, &g.token_file, &g.token, true);
            let webhook_token = p.secret(
                s,
                "webhook_token",
                &g.webhook_token_env,
                &g.webhook_token_file,
                &g.webhook_token,
                false,
            );
            let signing_token = p.secret(
                s,
                "signing_token",
                &g.signing_token_env,
                &g.signing_token_file,
                &g.signing_token,
                false,
            );
            let previous_webhook_token = p.secret(
                s,
                "previous_webhook_token",
                &g.previous_webhook_token_env,
                &g.previous_webhook_token_file,
                &g.previous_webhook_token,
                false,
            );
            if webhook_token.is_none()
                && signing_token.is_none()
                && g.webhook_token.is_none()
                && g.signing_token.is_none()
            {
                p.push(
                    format!("{s}.webhook_token_env"),
                    "is required: set webhook_token_env/webhook_token_file and/or \
                     signing_token_env/signing_token_file (driftless never accepts unsigned webhooks)",
                );
            }
            token.map(|token| GitlabSettings {
                api_url,
                token,
                webhook_token,
                signing_token,
                previous_webhook_token,
                register_webhooks: g.register_webhooks,
            })
        });

        let mut size = |key: &str, v: &Value| match parse_byte_size(v) {
            Ok(n) => n,
            Err(m) => {
                p.push(key, m);
                0
            }
        };
        let max_app_bytes = size("fetch.max_app_bytes", &self.fetch.max_app_bytes);
        let blob_cache_bytes = size("fetch.blob_cache", &self.fetch.blob_cache);
        if self.fetch.max_app_files == 0 {
            p.push("fetch.max_app_files", "must be greater than zero");
        }
        let fetch = FetchSettings {
            max_app_files: self.fetch.max_app_files,
            max_app_bytes,
            blob_cache_bytes,
            max_rate_limit_wait: p
                .duration("fetch.max_rate_limit_wait", &self.fetch.max_rate_limit_wait),
            request_timeout: p.duration("fetch.request_timeout", &self.fetch.request_timeout),
        };

        let render = self.render.validate(&mut p);
        p.count(
            "previews.max_apps",
            self.previews.max_apps,
            MAX_PREVIEW_MAX_APPS,
        );
        let previews = PreviewSettings {
            enabled: self.previews.enabled,
            from_forks: self.previews.from_forks,
            max_apps: self.previews.max_apps,
        };

        p.count("drift.sweep_batch", self.drift.sweep_batch, MAX_SWEEP_BATCH);
        let interval = p.duration("drift.interval", &self.drift.interval);
        if interval < Duration::from_secs(10) && interval != Duration::ZERO {
            p.push("drift.interval", "must be at least 10s");
        }
        let jitter = p.duration("drift.jitter", &self.drift.jitter);

        let mut names = BTreeSet::new();
        let mut apps = Vec::with_capacity(self.apps.len());
        for (i, raw) in self.apps.into_iter().enumerate() {
            let k = |field: &str| format!("apps[{i}].{field}");
            if let Err(m) = check_dns_label(&raw.name) {
                p.push(k("name"), m);
            } else if !names.insert(raw.name.clone()) {
                p.push(
                    k("name"),
                    format!(
                        "duplicate app name {:?}: app names must be unique",
                        raw.name
                    ),
                );
            }
            let forge = match raw.forge.as_str() {
                "github" => Some(ForgeKind::Github),
                "gitlab" => Some(ForgeKind::Gitlab),
                other => {
                    p.push(
                        k("forge"),
                        format!("must be \"github\" or \"gitlab\", got {other:?}"),
                    );
                    None
                }
            };
            match forge {
                Some(ForgeKind::Github) if github.is_none() => p.push(
                    k("forge"),
                    "\"github\" is used but [forges.github] is not configured",
                ),
                Some(ForgeKind::Gitlab) if gitlab.is_none() => p.push(
                    k("forge"),
                    "\"gitlab\" is used but [forges.gitlab] is not configured",
                ),
                _ => {}
            }
            if let Some(f) = forge {
                if let Err(m) = check_repo(f, &raw.repo) {
                    p.push(k("repo"), m);
                }
            }
            if let Err(m) = check_branch(&raw.branch) {
                p.push(k("branch"), m);
            }
            let path = match normalize_app_path(&raw.path) {
                Ok(path) => path,
                Err(m) => {
                    p.push(k("path"), m);
                    String::new()
                }
            };
            if let Some(ns) = &raw.namespace {
                if let Err(m) = check_dns_label(ns) {
                    p.push(k("namespace"), m);
                }
            }
            let drift = match raw.drift.as_str() {
                "heal" => DriftPolicy::Heal,
                "alert" => DriftPolicy::Alert,
                other => {
                    p.push(
                        k("drift"),
                        format!("must be \"heal\" or \"alert\", got {other:?}"),
                    );
                    DriftPolicy::Heal
                }
            };
            let health_timeout = p.duration(&k("health_timeout"), &raw.health_timeout);
            let render = match raw.render.as_str() {
                "auto" => RenderMode::Auto,
                "kustomize" => RenderMode::Kustomize,
                "plain" => RenderMode::Plain,
                other => {
                    p.push(
                        k("render"),
                        format!("must be \"auto\", \"kustomize\" or \"plain\", got {other:?}"),
                    );
                    RenderMode::Auto
                }
            };
            let mut ignore = Vec::new();
            for (j, rule) in raw.ignore.into_iter().enumerate() {
                if !rule.pointer.starts_with('/') {
                    p.push(
                        format!("apps[{i}].ignore[{j}].pointer"),
                        format!(
                            "must be a JSON pointer starting with '/', e.g. \"/spec/replicas\", got {:?}",
                            rule.pointer
                        ),
                    );
                }
                ignore.push(IgnoreRule {
                    kind: rule.kind,
                    pointer: rule.pointer,
                });
            }
            apps.push(AppSettings {
                name: raw.name,
                forge: forge.unwrap_or(ForgeKind::Github),
                repo: raw.repo,
                branch: raw.branch,
                path,
                namespace: raw.namespace,
                prune: raw.prune,
                drift,
                health_timeout,
                force_conflicts: raw.force_conflicts,
                allow_empty: raw.allow_empty,
                ignore,
                render,
            });
        }

        let github = github.flatten();
        let gitlab = gitlab.flatten();
        if !p.0.is_empty() {
            return Err(p.0);
        }
        Ok(Settings {
            server: ServerSettings {
                listen,
                public_url,
                body_limit,
                body_budget,
                header_timeout,
                read_timeout,
                shutdown_grace,
            },
            log: LogSettings { format: log_format },
            kubernetes: KubernetesSettings {
                state_namespace: self.kubernetes.state_namespace,
                lease_duration,
            },
            forges: ForgeSettings { github, gitlab },
            fetch,
            render,
            drift: DriftSettings {
                interval,
                jitter,
                report_status: self.drift.report_status,
                sweep_batch: self.drift.sweep_batch,
            },
            previews,
            apps,
        })
    }
}

impl RawRender {
    fn validate(self, p: &mut Problems) -> RenderSettings {
        if self
            .kustomize_command
            .first()
            .is_none_or(|c| c.trim().is_empty())
        {
            p.push(
                "render.kustomize_command",
                "must name a program, e.g. [\"kustomize\", \"build\"]",
            );
        }
        let timeout = p.duration("render.timeout", &self.timeout);
        if timeout.is_zero() {
            p.push("render.timeout", "must be greater than zero");
        }
        let max_output_bytes = match parse_byte_size(&self.max_output_bytes) {
            Ok(0) => {
                p.push("render.max_output_bytes", "must be greater than zero");
                0
            }
            Ok(n) => n,
            Err(m) => {
                p.push("render.max_output_bytes", m);
                0
            }
        };
        RenderSettings {
            kustomize_command: self.kustomize_command,
            timeout,
            max_output_bytes,
        }
    }
}

fn api_url(p: &mut Problems, section: &str, url: Option<String>, default: &str) -> String {
    let url = url
        .unwrap_or_else(|| default.to_string())
        .trim_end_matches('/')
        .to_string();
    if let Err(m) = check_http_url(&url) {
        p.push(format!("{section}.api_url"), m);
    }
    url
}

fn check_http_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("must be an http:// or https:// URL, got {url:?}"))?;
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        return Err(format!(
            "must be an http:// or https:// URL with a host, got {url:?}"
        ));
    }
    Ok(())
}

fn is_env_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// RFC 1123 label: what Kubernetes accepts as a namespace and what we accept as an app name.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be a DNS label (lowercase letters, digits and '-', starting and ending with \
             a letter or digit, at most 63 characters), got {s:?}"
        ))
    }
}

fn check_repo(forge: ForgeKind, repo: &str) -> Result<(), String> {
    let parts: Vec<&str> = repo.split('/').collect();
    let part_ok = |s: &&str| {
        !s.is_empty()
            && *s != "."
            && *s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match forge {
        ForgeKind::Github if parts.len() == 2 && parts.iter().all(part_ok) => Ok(()),
        ForgeKind::Github => Err(format!(
            "a GitHub repo is written \"owner/name\", got {repo:?}"
        )),
        ForgeKind::Gitlab if parts.len() >= 2 && parts.iter().all(part_ok) => Ok(()),
        ForgeKind::Gitlab => Err(format!(
            "a GitLab project is written \"group/project\" or \"group/subgroup/project\", got {repo:?}"
        )),
    }
}

/// The rules of `git check-ref-format` that matter for a branch name.
fn check_branch(branch: &str) -> Result<(), String> {
    let bad = branch.is_empty()
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with('.')
        || branch.ends_with(".lock")
        || branch.starts_with("refs/")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains("@{")
        || branch
            .chars()
            .any(|c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'));
    if bad {
        Err(format!(
            "must be a branch name like \"main\" or \"release/1.2\" (without refs/heads/), got {branch:?}"
        ))
    } else {
        Ok(())
    }
}

/// Normalises an app path: relative, inside the repo, no `..`; `""` or `"."` is the root.
pub fn normalize_app_path(path: &str) -> Result<String, String> {
    let err = || format!("must be a relative path inside the repo, got {path:?}");
    if path.starts_with('/')
        || path.starts_with('\\')
        || path.contains('\\')
        || path.contains(char::is_control)
    {
        return Err(err());
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(err()),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// Parses `"10m"`, `"1h 30m"`, `"45s"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("must be a duration like \"30s\", \"5m\" or \"1h\", got {text:?} ({e})")
    })
}

/// Parses a byte size: a number of bytes, or a number with `KB`, `MB`, `GB` (powers of 1000)
/// or `KiB`, `MiB`, `GiB` (powers of 1024).
pub fn parse_byte_size(value: &Value) -> Result<usize, String> {
    let text = match value {
        Value::Number(n) => {
            return n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("must be a non-negative number of bytes, got {n}"));
        }
        Value::String(s) => s.trim(),
        other => return Err(format!("must be a size like \"25MiB\", got {other}")),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || format!("must be a size like \"25MiB\", \"10MB\" or \"1048576\", got {text:?}");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:9999"
body_limit = "1MiB"

[forges.github]
token_env = "GITHUB_TOKEN"
webhook_secret_env = "GITHUB_WEBHOOK_SECRET"

[[apps]]
name = "web"
forge = "github"
repo = "acme/deploy"
path = "apps/web/"
"#;

    fn errors(text: &str) -> Vec<SettingsError> {
        match Settings::from_toml_str(text) {
            Ok(_) => panic!("settings were accepted:\n{text}"),
            Err(e) => {
                assert!(!e.errors().is_empty(), "not a key error: {e}");
                e.errors().to_vec()
            }
        }
    }

    fn with_app_line(line: &str) -> String {
        format!("{GOOD}{line}\n")
    }

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let s = Settings::from_toml_str(GOOD).unwrap();
        assert_eq!(s.server.body_limit, 1 << 20);
        assert_eq!(s.kubernetes.state_namespace, "driftless");
        assert_eq!(s.kubernetes.lease_duration, Duration::from_secs(15));
        assert_eq!(s.drift.interval, Duration::from_secs(600));
        let app = &s.apps[0];
        assert_eq!(app.branch, "main");
        assert_eq!(app.path, "apps/web");
        assert!(app.prune);
        assert_eq!(app.drift, DriftPolicy::Heal);
        assert_eq!(app.health_timeout, Duration::from_secs(300));
        assert_eq!(s.forges.github.as_ref().unwrap().api_url, GITHUB_API_URL);
    }

    #[test]
    fn lease_duration_is_bounded() {
        for bad in ["1s", "11m", "soon"] {
            let text = format!("[kubernetes]\nlease_duration = \"{bad}\"\n{GOOD}");
            let e = errors(&text);
            assert_eq!(e[0].key, "kubernetes.lease_duration", "{bad}: {e:?}");
        }
        let text = format!("[kubernetes]\nlease_duration = \"30s\"\n{GOOD}");
        let s = Settings::from_toml_str(&text).unwrap();
        assert_eq!(s.kubernetes.lease_duration, Duration::from_secs(30));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = errors(&with_app_line("colour = \"blue\""));
        assert_eq!(e[0].key, "apps[0].colour", "{e:?}");
        assert!(e[0].message.contains("unknown key"));
        let e = errors(&format!("[serverr]\nlisten = \"x\"\n{GOOD}"));
        assert_eq!(e[0].key, "serverr");
    }

    #[test]
    fn body_limits_default_to_what_forges_send_and_are_checked() {
        let s = Settings::from_toml_str(&GOOD.replace("body_limit = \"1MiB\"\n", "")).unwrap();
        assert_eq!(s.server.body_limit, 1 << 20);
        assert_eq!(s.server.body_budget, 16 << 20);
        assert_eq!(s.server.read_timeout, Duration::from_secs(10));
        // Raising only the body limit raises the budget with it.
        let s = Settings::from_toml_str(&GOOD.replace("\"1MiB\"", "\"25MiB\"")).unwrap();
        assert_eq!(s.server.body_budget, 25 << 20);
        let e = errors(&GOOD.replace("body_limit = \"1MiB\"", "body_budget = \"512KiB\""));
        assert_eq!(e[0].key, "server.body_budget");
        assert!(e[0].message.contains("server.body_limit"), "{e:?}");
        let e = errors(&GOOD.replace("body_limit = \"1MiB\"", "body_budget = \"2GiB\""));
        assert_eq!(e[0].key, "server.body_budget");
        assert!(e[0].message.contains("at most 1GiB"), "{e:?}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = errors(
            "[forges.github]\ntoken_env = \"T\"\nwebhook_secret_env = \"S\"\n[[apps]]\nname = \"a\"\nforge = \"github\"\n",
        );
        assert_eq!(e[0].key, "apps[0].repo");
        assert!(e[0].message.contains("required"));
    }

    #[test]
    fn paths_must_stay_inside_the_repo() {
        for bad in ["/etc", "../up", "a/../../b"] {
            let text = GOOD.replace("apps/web/", bad);
            let e = errors(&text);
            assert_eq!(e[0].key, "apps[0].path");
            assert_eq!(
                e[0].to_string(),
                format!("apps[0].path: must be a relative path inside the repo, got {bad:?}")
            );
        }
        assert_eq!(normalize_app_path("./a//b/.").unwrap(), "a/b");
        assert_eq!(normalize_app_path(".").unwrap(), "");
        assert!(normalize_app_path("a\\b").is_err());
    }

    #[test]
    fn unknown_forge_and_duplicate_names_and_inline_secrets() {
        let e = errors(&GOOD.replace("forge = \"github\"", "forge = \"bitbucket\""));
        assert_eq!(e[0].key, "apps[0].forge");
        assert!(e[0].message.contains("bitbucket"));

        let dup = format!(
            "{GOOD}\n[[apps]]\nname = \"web\"\nforge = \"github\"\nrepo = \"acme/other\"\n"
        );
        let e = errors(&dup);
        assert_eq!(e[0].key, "apps[1].name");
        assert!(e[0].message.contains("duplicate"));

        let inline = GOOD.replace("token_env = \"GITHUB_TOKEN\"", "token = \"ghp_abc\"");
        let e = errors(&inline);
        assert_eq!(e[0].key, "forges.github.token");
        assert!(!e[0].to_string().contains("ghp_abc"));
    }

    #[test]
    fn several_problems_are_reported_together() {
        let text = GOOD
            .replace("127.0.0.1:9999", "nowhere")
            .replace("acme/deploy", "acme");
        let e = errors(&text);
        let keys: Vec<_> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["server.listen", "apps[0].repo"]);
    }

    #[test]
    fn app_needs_its_forge_configured() {
        let text = GOOD.replace("forge = \"github\"", "forge = \"gitlab\"");
        let e = errors(&text);
        assert_eq!(e[0].key, "apps[0].forge");
        assert!(e[0].message.contains("[forges.gitlab]"));
    }

    #[test]
    fn webhook_secret_is_required() {
        let text = GOOD.replace("webhook_secret_env = \"GITHUB_WEBHOOK_SECRET\"\n", "");
        let e = errors(&text);
        assert_eq!(e[0].key, "forges.github.webhook_secret_env");
    }

    #[test]
    fn gitlab_project_paths_may_nest() {
        assert!(check_repo(ForgeKind::Gitlab, "group/sub/project").is_ok());
        assert!(check_repo(ForgeKind::Github, "group/sub/project").is_err());
        assert!(check_repo(ForgeKind::Gitlab, "project").is_err());
    }

    #[test]
    fn byte_sizes() {
        let s = |t: &str| parse_byte_size(&Value::String(t.into()));
        assert_eq!(s("25MiB").unwrap(), 25 << 20);
        assert_eq!(s("10MB").unwrap(), 10_000_000);
        assert_eq!(s("512").unwrap(), 512);
        assert!(s("lots").is_err());
        assert!(s("5 parsecs").is_err());
        assert_eq!(parse_byte_size(&serde_json::json!(42)).unwrap(), 42);
    }

    #[test]
    fn secrets_are_redacted() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        let r = SecretRef::Env {
            key: "k".into(),
            var: "DRIFTLESS_TEST_UNSET_VAR_XYZ".into(),
        };
        let e = r.resolve().unwrap_err();
        assert_eq!(e.key, "k");
        assert!(e.message.contains("DRIFTLESS_TEST_UNSET_VAR_XYZ"));
    }
}
