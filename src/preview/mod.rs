//! Previews of pull and merge requests: what merging would do to the cluster, posted on the
//! request before it is merged. A request event names the apps of its base repository and
//! branch; one compare of the head with its merge base picks the affected ones (an input of
//! theirs changed); each is rendered at the head and server-side dry-run against the live
//! cluster by the engine ([`crate::reconcile::dry_run`]); the result goes back as a commit
//! status per app, one comment edited in place, and a page. Nothing is ever written to the
//! cluster.

pub mod comment;
pub mod diff;
pub mod queue;
pub mod report;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::forge::{CommitStatus, Forge, ForgeError, Forges, StatusState};
use crate::reconcile::{dry_run, state, Engine};
use crate::settings::{AppSettings, ForgeKind, Settings};
use crate::webhook::{match_pull_request, PullRequestAction, PullRequestEvent};
use queue::PreviewQueue;
use report::{AppOutcome, AppPreview, PullRequestPreview, RequestState};
use store::PreviewStore;

/// App states a preview reads at once to find the apps a request affects.
const STATE_READS_IN_FLIGHT: usize = 8;
/// Apps of one request previewed at once: each mostly waits on the forge and the API server.
const APP_CONCURRENCY: usize = 4;

/// Why a request could not be previewed (an app that cannot be is part of the preview).
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("forge {0} is not configured")]
    ForgeNotConfigured(ForgeKind),
    #[error("comparing {head} with its merge base on {base} in {repo}: {source}")]
    Compare {
        repo: String,
        base: String,
        head: String,
        #[source]
        source: ForgeError,
    },
    #[error("reading the state of app {app}: {source}")]
    State {
        app: String,
        #[source]
        source: state::StateError,
    },
    #[error("listing the app states' recorded inputs: {source}")]
    States {
        #[source]
        source: state::StateError,
    },
    #[error("commenting on {repo} #{number}: {source}")]
    Comment {
        repo: String,
        number: u64,
        #[source]
        source: ForgeError,
    },
}

/// Where one preview's time went, logged once it is posted ("preview steps").
#[derive(Debug, Default)]
pub struct Steps {
    /// The compare and the candidate apps' states.
    affected: Duration,
    /// Fetching, rendering and dry-running the affected apps.
    dry_run: Duration,
    /// Keeping the preview for its page.
    store: Duration,
    /// Posting the statuses.
    statuses: Duration,
    /// Finding and writing the comment.
    comment: Duration,
}

impl Steps {
    fn log(&self, ev: &PullRequestEvent) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        info!(forge = %ev.forge, repo = %ev.repo, number = ev.number,
            affected_ms = ms(self.affected), dry_run_ms = ms(self.dry_run), store_ms = ms(self.store),
            statuses_ms = ms(self.statuses), comment_ms = ms(self.comment), "preview steps");
    }
}

/// Makes and posts previews; one per process, fed by [`run`].
pub struct Previewer {
    engine: Arc<Engine>,
    forges: Forges,
    settings: Arc<Settings>,
    store: Arc<PreviewStore>,
    /// The comment id of each request this process commented on, so an edit needs no listing.
    comments: Mutex<HashMap<String, u64>>,
}

impl Previewer {
    pub fn new(
        engine: Arc<Engine>,
        forges: Forges,
        settings: Arc<Settings>,
        store: Arc<PreviewStore>,
    ) -> Self {
        Self {
            engine,
            forges,
            settings,
            store,
            comments: Mutex::new(HashMap::new()),
        }
    }

    /// Acts on one request event: a preview of its head, or for a closed or merged request,
    /// the comment marked so and the stored preview dropped.
    pub async fn handle(&self, ev: &PullRequestEvent) -> Result<(), PreviewError> {
        let forge = self
            .forges
            .get(ev.forge)
            .cloned()
            .ok_or(PreviewError::ForgeNotConfigured(ev.forge))?;
        let key = report::key(ev.forge, &ev.repo, ev.number);
        if ev.action != PullRequestAction::Updated {
            self.store.remove(&key).await;
            let state = if ev.action == PullRequestAction::Merged {
                RequestState::Merged
            } else {
                RequestState::Closed
            };
            let mut p = self.empty(ev);
            p.state = state;
            // Only a request that has a preview comment gets told.
            if let Some(id) = self.find_comment(forge.as_ref(), ev, &key).await? {
                let body = comment::render(&p, forge.comment_limit());
                self.comment_call(ev, forge.update_comment(&ev.repo, ev.number, id, &body))
                    .await?;
            }
            self.comments.lock().expect("comments").remove(&key);
            return Ok(());
        }
        let mut steps = Steps::default();
        let preview = self.preview(forge.as_ref(), ev, &mut steps).await?;
        // Stored first: the statuses and the comment link to its page.
        let at = Instant::now();
        self.store.put(key.clone(), preview.clone()).await;
        steps.store = at.elapsed();
        let at = Instant::now();
        self.post_statuses(forge.as_ref(), ev, &preview).await;
        steps.statuses = at.elapsed();
        let at = Instant::now();
        let had_comment = self.find_comment(forge.as_ref(), ev, &key).await?;
        if !preview.apps.is_empty() || had_comment.is_some() {
            self.upsert_comment(forge.as_ref(), ev, &key, had_comment, &preview)
                .await?;
        }
        steps.comment = at.elapsed();
        steps.log(ev);
        Ok(())
    }

    fn empty(&self, ev: &PullRequestEvent) -> PullRequestPreview {
        PullRequestPreview {
            forge: ev.forge,
            repo: ev.repo.clone(),
            number: ev.number,
            head_sha: ev.head_sha.clone(),
            state: RequestState::Open,
            apps: Vec::new(),
            not_previewed: Vec::new(),
            max_apps: self.settings.previews.max_apps,
            page_url: self
                .settings
                .server
                .public_url
                .as_ref()
                .map(|u| format!("{u}{}", report::page_path(ev.forge, &ev.repo, ev.number))),
        }
    }

    /// The affected apps' previews at the request's head.
    pub async fn preview(
        &self,
        forge: &dyn Forge,
        ev: &PullRequestEvent,
        steps: &mut Steps,
    ) -> Result<PullRequestPreview, PreviewError> {
        let mut p = self.empty(ev);
        let at = Instant::now();
        let mut affected = self.affected(forge, ev).await?;
        steps.affected = at.elapsed();
        let at = Instant::now();
        let max = self.settings.previews.max_apps;
        if affected.len() > max {
            p.not_previewed = affected
                .split_off(max)
                .into_iter()
                .map(|a| a.name.clone())
                .collect();
        }
        // The futures are built first and boxed, so the stream's type names no closure over
        // a borrowed app (which would defeat the Send proof of the spawned worker).
        let calls: Vec<_> = affected
            .into_iter()
            .map(|app| {
                let (engine, head) = (self.engine.clone(), ev.head_sha.clone());
                let name = app.name.clone();
                async move {
                    match engine
                        .dry_run_revision(&name, &head, dry_run::Scope::PushWrites)
                        .await
                    {
                        Ok(set) => AppPreview::from_dry_run(&set),
                        Err(e) => AppPreview::failed(&name, &head, e.to_string()),
                    }
                }
                .boxed()
            })
            .collect();
        p.apps = futures::stream::iter(calls)
            .buffered(APP_CONCURRENCY)
            .collect()
            .await;
        steps.dry_run = at.elapsed();
        info!(forge = %ev.forge, repo = %ev.repo, number = ev.number, head = %ev.head_sha,
            apps = p.apps.len(), not_previewed = p.not_previewed.len(), "pull request previewed");
        Ok(p)
    }

    /// The request's apps (by base repository and branch) with an input that the head changes
    /// against its merge base, by name: one compare, and the inputs each app's last run
    /// recorded (a plain app's only input is its path; a Kustomize app's are every directory
    /// its render read). When the forge cut the list of changed files short, every app of the
    /// branch counts as affected.
    async fn affected(
        &self,
        forge: &dyn Forge,
        ev: &PullRequestEvent,
    ) -> Result<Vec<&AppSettings>, PreviewError> {
        let mut candidates = match_pull_request(&self.settings.apps, ev);
        if candidates.is_empty() {
            return Ok(candidates);
        }
        candidates.sort_by(|a, b| a.name.cmp(&b.name));
        let changed = forge
            .changed_paths(&ev.repo, &ev.base_branch, &ev.head_sha)
            .await
            .map_err(|source| PreviewError::Compare {
                repo: ev.repo.clone(),
                base: ev.base_branch.clone(),
                head: ev.head_sha.clone(),
                source,
            })?;
        if !changed.complete {
            return Ok(candidates);
        }
        // An app whose own path changed needs no state; the others' recorded inputs come from
        // one metadata-only LIST of the states, and a state written before its inputs were
        // annotated is read whole, a few at a time.
        let paths = &changed.paths;
        let (mut touched, rest): (Vec<&AppSettings>, Vec<&AppSettings>) = candidates
            .into_iter()
            .partition(|app| state::touches(paths, &app.path));
        if rest.is_empty() {
            return Ok(touched);
        }
        let ns = self.settings.kubernetes.state_namespace.as_str();
        let client = self.engine.client();
        let recorded = state::recorded_inputs(client, ns)
            .await
            .map_err(|source| PreviewError::States { source })?;
        let mut unannotated = Vec::new();
        for app in rest {
            match recorded.get(&app.name) {
                // No state: never applied, its only input is its path.
                None => {}
                Some(Some(dirs)) if dirs.iter().any(|d| state::touches(paths, d)) => {
                    touched.push(app)
                }
                Some(Some(_)) => {}
                Some(None) => unannotated.push(app),
            }
        }
        // Boxed before they are streamed: a closure in the stream would make the task's
        // future not `Send` for every lifetime (the compiler's higher-ranked limitation).
        let reads: Vec<futures::future::BoxFuture<'_, _>> = unannotated
            .into_iter()
            .map(|app| touched_app(client, ns, app, paths).boxed())
            .collect();
        let read: Vec<Result<Option<&AppSettings>, PreviewError>> = futures::stream::iter(reads)
            .buffered(STATE_READS_IN_FLIGHT)
            .collect()
            .await;
        for app in read {
            touched.extend(app?);
        }
        touched.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(touched)
    }

    /// A status per previewed app on the head, context `driftless/preview/<app>`.
    async fn post_statuses(
        &self,
        forge: &dyn Forge,
        ev: &PullRequestEvent,
        p: &PullRequestPreview,
    ) {
        for a in &p.apps {
            let state = match a.outcome {
                AppOutcome::Previewed => StatusState::Success,
                AppOutcome::Rejected { .. } | AppOutcome::Failed { .. } => StatusState::Failure,
            };
            let status = CommitStatus {
                context: format!("driftless/preview/{}", a.app),
                state,
                description: a.summary(),
                target_url: p.page_url.clone(),
            };
            if let Err(e) = forge.set_status(&ev.repo, &ev.head_sha, &status).await {
                warn!(app = %a.app, repo = %ev.repo, number = ev.number, error = %e, "cannot post the preview status");
            }
        }
    }

    /// The request's preview comment: the one this process remembers, else the first of the
    /// request's comments that starts with the marker (one made before a restart, or by
    /// another replica).
    async fn find_comment(
        &self,
        forge: &dyn Forge,
        ev: &PullRequestEvent,
        key: &str,
    ) -> Result<Option<u64>, PreviewError> {
        if let Some(id) = self.comments.lock().expect("comments").get(key) {
            return Ok(Some(*id));
        }
        let all = self
            .comment_call(ev, forge.list_comments(&ev.repo, ev.number))
            .await?;
        Ok(all
            .into_iter()
            .find(|c| c.body.starts_with(comment::MARKER))
            .map(|c| c.id))
    }

    /// Edits the preview comment, or creates it when there is none (or it was deleted).
    async fn upsert_comment(
        &self,
        forge: &dyn Forge,
        ev: &PullRequestEvent,
        key: &str,
        existing: Option<u64>,
        p: &PullRequestPreview,
    ) -> Result<(), PreviewError> {
        let body = comment::render(p, forge.comment_limit());
        if let Some(id) = existing {
            match forge.update_comment(&ev.repo, ev.number, id, &body).await {
                Ok(_) => return Ok(()),
                Err(ForgeError::NotFound { .. }) => {}
                Err(source) => return Err(self.comment_error(ev, source)),
            }
        }
        let c = self
            .comment_call(ev, forge.create_comment(&ev.repo, ev.number, &body))
            .await?;
        self.comments
            .lock()
            .expect("comments")
            .insert(key.to_string(), c.id);
        Ok(())
    }

    async fn comment_call<T>(
        &self,
        ev: &PullRequestEvent,
        call: impl std::future::Future<Output = Result<T, ForgeError>>,
    ) -> Result<T, PreviewError> {
        call.await.map_err(|source| self.comment_error(ev, source))
    }

    fn comment_error(&self, ev: &PullRequestEvent, source: ForgeError) -> PreviewError {
        PreviewError::Comment {
            repo: ev.repo.clone(),
            number: ev.number,
            source,
        }
    }
}

/// `Some(app)` when a path of `paths` lies in one of the inputs its last run recorded, read
/// from its state.
async fn touched_app<'a>(
    client: &kube::Client,
    ns: &str,
    app: &'a AppSettings,
    paths: &[String],
) -> Result<Option<&'a AppSettings>, PreviewError> {
    let st = state::load(client, ns, &app.name)
        .await
        .map_err(|source| PreviewError::State {
            app: app.name.clone(),
            source,
        })?;
    Ok(st.inputs_touched(&app.path, paths).then_some(app))
}

/// The preview worker: takes request events from `queue` until `shutdown`, one at a time.
pub async fn run(queue: Arc<PreviewQueue>, previewer: Arc<Previewer>, shutdown: CancellationToken) {
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = queue.next() => ev,
        };
        if let Err(e) = previewer.handle(&ev).await {
            warn!(forge = %ev.forge, repo = %ev.repo, number = ev.number, error = %e, "preview failed");
        }
    }
}
