//! Rendering, the stage between the forge and the manifest parser: an app's directory at a
//! commit in, manifest files out. A plain app's `*.yaml`, `*.yml` and `*.json` files pass
//! through as written; a Kustomize app has every directory its render reads fetched (see
//! [`inputs`]) and built by the real `kustomize build` (see [`kustomize`]). Either way the
//! engine gets files to parse and a [`SourceVersion`] to record, and never knows which
//! renderer ran.

pub mod inputs;
pub mod kustomization;
pub mod kustomize;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::forge::{self, AppFile, BlobCache, Forge, ForgeError};
use crate::manifest::ManifestError;
use crate::settings::{AppSettings, FetchSettings, RenderMode, RenderSettings};

/// Why an app could not be rendered. Every variant names the file or directory at fault.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Forge(#[from] ForgeError),
    /// A kustomization that is not valid YAML, or crosses the parser's limits.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{kustomization}: {field} {reference:?} {reason}")]
    Reference {
        kustomization: String,
        field: &'static str,
        reference: String,
        reason: String,
    },
    #[error("{kustomization}: {field}: Helm charts are not supported (driftless has no Helm yet)")]
    Helm {
        kustomization: String,
        field: &'static str,
    },
    #[error("{dir}: no kustomization.yaml, kustomization.yml or Kustomization{}", by.as_ref().map(|b| format!(" (needed by {b})")).unwrap_or_default())]
    NoKustomization { dir: String, by: Option<String> },
    #[error("{app_path}: reaches more than {limit} kustomizations")]
    TooManyKustomizations { app_path: String, limit: usize },
    #[error("kustomize build {app_path}: {message}")]
    Build { app_path: String, message: String },
    #[error("kustomize build {app_path}: still running after render.timeout = {}; killed", humantime::format_duration(*timeout))]
    Timeout { app_path: String, timeout: Duration },
    #[error(
        "kustomize build {app_path}: printed more than render.max_output_bytes = {limit} bytes"
    )]
    TooLarge { app_path: String, limit: usize },
    #[error("cannot run render.kustomize_command {command:?}: {message}")]
    Spawn {
        command: Vec<String>,
        message: String,
    },
    #[error("rendering: {0}")]
    Io(String),
}

impl RenderError {
    /// A fault of the moment or of the machine (the forge, a missing program, a full disk),
    /// not a verdict on the commit: worth trying again later.
    pub fn is_passing(&self) -> bool {
        match self {
            RenderError::Forge(e) => e.is_transient(),
            RenderError::Spawn { .. } | RenderError::Io(_) => true,
            _ => false,
        }
    }
}

/// What an app's manifests were made from at a revision: the subtree SHA of its path and, for
/// a Kustomize app, every directory the render read with its subtree SHA. Two revisions with
/// the same version render the same objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceVersion {
    pub tree_sha: String,
    /// Empty for a plain app (its only input is its path).
    pub inputs: BTreeMap<String, String>,
}

/// The result of [`Renderer::plan`].
#[derive(Debug)]
pub enum Plan {
    /// Every input has the SHA it had when last applied: nothing fetched, nothing rendered.
    Unchanged(SourceVersion),
    Changed {
        version: SourceVersion,
        /// Manifest files to parse, sorted by path: a plain app's files, or one stream
        /// named `<path> (kustomize build)`.
        files: Vec<AppFile>,
    },
}

/// Kustomize outputs kept, newest last, by the hash of what they were built from.
#[derive(Default)]
struct RenderCache {
    outputs: HashMap<String, Bytes>,
    order: VecDeque<String>,
    bytes: usize,
}

/// Bytes of rendered output kept in memory (a render is re-run when its output was dropped).
const RENDER_CACHE_BYTES: usize = 64 << 20;

impl RenderCache {
    fn get(&self, key: &str) -> Option<Bytes> {
        self.outputs.get(key).cloned()
    }

    fn insert(&mut self, key: String, out: Bytes) {
        if out.len() > RENDER_CACHE_BYTES || self.outputs.contains_key(&key) {
            return;
        }
        self.bytes += out.len();
        self.outputs.insert(key.clone(), out);
        self.order.push_back(key);
        while self.bytes > RENDER_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.outputs.remove(&old) {
                self.bytes -= b.len();
            }
        }
    }
}

/// Turns apps at commits into manifest files; shared by every run of a process.
pub struct Renderer {
    settings: RenderSettings,
    fetch: FetchSettings,
    cache: Mutex<RenderCache>,
    builds: AtomicU64,
    /// How long the last builds took, newest last (at most [`BUILD_TIMES_KEPT`]).
    build_times: Mutex<VecDeque<Duration>>,
}

/// Build durations kept for [`Renderer::build_times`].
const BUILD_TIMES_KEPT: usize = 1024;

impl Renderer {
    pub fn new(settings: RenderSettings, fetch: FetchSettings) -> Self {
        Self {
            settings,
            fetch,
            cache: Mutex::new(RenderCache::default()),
            builds: AtomicU64::new(0),
            build_times: Mutex::new(VecDeque::new()),
        }
    }

    /// How many times this process ran `kustomize build` (renders served from the cache or
    /// skipped because nothing changed are not counted).
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// How long this process's last `kustomize build` runs took (fetching excluded).
    pub fn build_times(&self) -> Vec<Duration> {
        self.build_times
            .lock()
            .expect("build times")
            .iter()
            .copied()
            .collect()
    }

    /// The app's manifests at `commit`, or [`Plan::Unchanged`] when every input of `known`
    /// (the version last applied) still has its SHA: then nothing is fetched or rendered.
    pub async fn plan(
        &self,
        forge: &dyn Forge,
        blobs: &BlobCache,
        app: &AppSettings,
        commit: &str,
        known: Option<&SourceVersion>,
    ) -> Result<Plan, RenderError> {
        let repo = app.repo.as_str();
        let tree_sha = forge.subtree_sha(repo, commit, &app.path).await?;
        if let Some(known) = known {
            if self.unchanged(forge, app, commit, &tree_sha, known).await? {
                return Ok(Plan::Unchanged(known.clone()));
            }
        }
        let entries = forge::list_entries(forge, repo, commit, &app.path).await?;
        let kustomize = match app.render {
            RenderMode::Plain => false,
            RenderMode::Kustomize => true,
            RenderMode::Auto => inputs::kustomization_file(&entries).is_some(),
        };
        if !kustomize {
            let files =
                forge::fetch_manifests(forge, blobs, &self.fetch, repo, &app.path, &entries)
                    .await?;
            let version = SourceVersion {
                tree_sha,
                inputs: BTreeMap::new(),
            };
            return Ok(Plan::Changed { version, files });
        }
        let found = inputs::resolve(forge, blobs, repo, commit, &app.path, entries).await?;
        let key = self.key(app, &found.dirs);
        let cached = self.cache.lock().expect("render cache").get(&key);
        let output = match cached {
            Some(out) => out,
            None => {
                let wanted = found.files.values().collect();
                let files =
                    forge::fetch_files(forge, blobs, &self.fetch, repo, "", "input", wanted)
                        .await?;
                self.builds.fetch_add(1, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let out = kustomize::build(&self.settings, &app.path, &files).await?;
                let mut times = self.build_times.lock().expect("build times");
                if times.len() == BUILD_TIMES_KEPT {
                    times.pop_front();
                }
                times.push_back(started.elapsed());
                drop(times);
                self.cache
                    .lock()
                    .expect("render cache")
                    .insert(key.clone(), out.clone());
                out
            }
        };
        let file = AppFile {
            path: format!("{} (kustomize build)", display_path(&app.path)),
            sha: key,
            content: output,
        };
        let version = SourceVersion {
            tree_sha,
            inputs: found.dirs,
        };
        Ok(Plan::Changed {
            version,
            files: vec![file],
        })
    }

    /// Whether `known` still describes the app at `commit` (whose path has `tree_sha`): the
    /// same renderer would run over inputs with the same SHAs.
    async fn unchanged(
        &self,
        forge: &dyn Forge,
        app: &AppSettings,
        commit: &str,
        tree_sha: &str,
        known: &SourceVersion,
    ) -> Result<bool, RenderError> {
        let was_kustomize = !known.inputs.is_empty();
        let mode_holds = match app.render {
            RenderMode::Plain => !was_kustomize,
            RenderMode::Kustomize => was_kustomize,
            RenderMode::Auto => true,
        };
        if !mode_holds || known.tree_sha != tree_sha {
            return Ok(false);
        }
        Ok(!changed_inputs(forge, app, commit, &known.inputs).await?)
    }

    /// The render cache key: the command, the app's path and every input with its SHA.
    fn key(&self, app: &AppSettings, dirs: &BTreeMap<String, String>) -> String {
        let mut h = Sha256::new();
        for part in self
            .settings
            .kustomize_command
            .iter()
            .map(String::as_str)
            .chain(kustomize::SAFE_FLAGS)
        {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.update(app.path.as_bytes());
        for (dir, sha) in dirs {
            h.update([1]);
            h.update(dir.as_bytes());
            h.update([0]);
            h.update(sha.as_bytes());
        }
        format!("render:{:x}", h.finalize())
    }
}

/// Whether any of `inputs` (directory → subtree SHA) other than the app's own path (which
/// the callers have compared already) differs at `commit`; a directory that is gone counts as
/// changed.
async fn changed_inputs(
    forge: &dyn Forge,
    app: &AppSettings,
    commit: &str,
    inputs: &BTreeMap<String, String>,
) -> Result<bool, ForgeError> {
    for (dir, sha) in inputs.iter().filter(|(dir, _)| **dir != app.path) {
        match forge.subtree_sha(&app.repo, commit, dir).await {
            Ok(now) if now == *sha => {}
            Ok(_) | Err(ForgeError::NotFound { .. }) => return Ok(true),
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Whether the app's render could differ between `commit` and the version `v`: its path's
/// subtree, or (for a Kustomize app) any of its inputs, has another SHA there.
pub async fn changed_since(
    forge: &dyn Forge,
    app: &AppSettings,
    commit: &str,
    v: &SourceVersion,
) -> Result<bool, ForgeError> {
    match forge.subtree_sha(&app.repo, commit, &app.path).await {
        Ok(sha) if sha == v.tree_sha => changed_inputs(forge, app, commit, &v.inputs).await,
        Ok(_) | Err(ForgeError::NotFound { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "."
    } else {
        path
    }
}
