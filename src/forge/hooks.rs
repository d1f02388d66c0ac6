//! `driftless hooks register`: make sure each repo used by the apps has exactly one webhook
//! pointing at this receiver, with the configured secret and the push events. Forges never
//! report a hook's secret back, so the hook URL carries a short fingerprint of the secret
//! (`?s=<8 hex of SHA-256>`; the receiver ignores the query): a rotated secret changes the URL
//! and the hook is updated, an unchanged one is left alone. Used by the CLI and, when the
//! settings ask for it, by `serve` at start.

use std::collections::BTreeSet;
use std::fmt;

use sha2::{Digest, Sha256};

use super::{Forge, ForgeError, Hook, HookSpec};
use crate::settings::{ForgeKind, Settings, SettingsError};

/// Why the webhooks of the apps could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("server.public_url: is required to register webhooks (the URL the forge will call)")]
    NoPublicUrl,
    #[error("forges.gitlab.webhook_token_env: a webhook token is needed to register GitLab hooks (GitLab's API sets no signing token)")]
    NoGitlabToken,
    /// A forge client or a webhook secret could not be set up from the settings.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Register(#[from] ForgeError),
}

/// What register did (or would do) for one repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    Created { id: Option<u64> },
    Updated { id: u64 },
    Unchanged { id: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookResult {
    pub repo: String,
    pub url: String,
    pub action: HookAction,
    /// Other hooks pointing at this receiver (left alone, reported so a person can remove them).
    pub duplicates: Vec<u64>,
}

impl fmt::Display for HookResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.action {
            HookAction::Created { id: Some(id) } => write!(f, "{}: created hook {id}", self.repo)?,
            HookAction::Created { id: None } => write!(f, "{}: would create a hook", self.repo)?,
            HookAction::Updated { id } => write!(f, "{}: updated hook {id}", self.repo)?,
            HookAction::Unchanged { id } => write!(f, "{}: hook {id} is up to date", self.repo)?,
        }
        write!(f, " -> {}", strip_query(&self.url))?;
        if !self.duplicates.is_empty() {
            write!(
                f,
                " (also pointing here, left alone: hooks {:?})",
                self.duplicates
            )?;
        }
        Ok(())
    }
}

fn query(url: &str) -> &str {
    url.split_once('?').map_or("", |(_, q)| q)
}

fn strip_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// The hook URL for a receiver endpoint and secret.
pub fn hook_url(endpoint: &str, secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    format!("{endpoint}?s={}", &hex::encode(digest)[..8])
}

/// Ensures the hook on each repo; `endpoint` is `<public_url>/hooks/<forge>`.
pub async fn register(
    forge: &dyn Forge,
    repos: &BTreeSet<String>,
    endpoint: &str,
    secret: &str,
    pull_requests: bool,
    dry_run: bool,
) -> Result<Vec<HookResult>, ForgeError> {
    let url = hook_url(endpoint, secret);
    let spec = HookSpec {
        url: url.clone(),
        secret: secret.to_string(),
        pull_requests,
    };
    let mut out = Vec::new();
    for repo in repos {
        let hooks = forge.list_hooks(repo).await?;
        // Ours: pointing at this receiver, or carrying this secret's fingerprint (the receiver
        // moved: `server.public_url` changed).
        let fingerprint = query(&url);
        let ours: Vec<&Hook> = hooks
            .iter()
            .filter(|h| {
                strip_query(&h.url) == endpoint
                    || (!fingerprint.is_empty() && query(&h.url) == fingerprint)
            })
            .collect();
        let duplicates = ours.iter().skip(1).map(|h| h.id).collect();
        let action = match ours.first() {
            None if dry_run => HookAction::Created { id: None },
            None => HookAction::Created {
                id: Some(forge.create_hook(repo, &spec).await?.id),
            },
            Some(h)
                if h.url == url
                    && h.push_events
                    && h.pull_request_events == pull_requests
                    && h.active =>
            {
                HookAction::Unchanged { id: h.id }
            }
            Some(h) => {
                if !dry_run {
                    forge.update_hook(repo, h.id, &spec).await?;
                }
                HookAction::Updated { id: h.id }
            }
        };
        out.push(HookResult {
            repo: repo.clone(),
            url: url.clone(),
            action,
            duplicates,
        });
    }
    Ok(out)
}

/// Registers (or with `dry_run`, plans) the webhooks on the forges `kinds` of every repo the
/// apps use, or of one app's repo. Returns one line per repo.
pub async fn register_for_apps(
    settings: &Settings,
    kinds: &[ForgeKind],
    only_app: Option<&str>,
    dry_run: bool,
) -> Result<Vec<String>, RegisterError> {
    let public_url = settings
        .server
        .public_url
        .as_deref()
        .ok_or(RegisterError::NoPublicUrl)?;
    let forges = super::from_settings(settings)?;
    let mut lines = Vec::new();
    for &kind in kinds {
        let repos: BTreeSet<String> = settings
            .apps
            .iter()
            .filter(|a| a.forge == kind && only_app.is_none_or(|n| n == a.name))
            .map(|a| a.repo.clone())
            .collect();
        if repos.is_empty() {
            continue;
        }
        let secret = match kind {
            ForgeKind::Github => settings
                .forges
                .github
                .as_ref()
                .map(|g| g.webhook_secret.resolve())
                .transpose()?,
            ForgeKind::Gitlab => {
                let gl = settings.forges.gitlab.as_ref();
                match gl.and_then(|g| g.webhook_token.as_ref()) {
                    Some(t) => Some(t.resolve()?),
                    None => return Err(RegisterError::NoGitlabToken),
                }
            }
        };
        let (Some(forge), Some(secret)) = (forges.get(kind), secret) else {
            continue;
        };
        let endpoint = format!("{public_url}/hooks/{kind}");
        let previews = settings.previews.enabled;
        for r in register(
            forge.as_ref(),
            &repos,
            &endpoint,
            secret.expose(),
            previews,
            dry_run,
        )
        .await?
        {
            lines.push(format!(
                "{kind} {r}{}",
                if dry_run { " (dry run)" } else { "" }
            ));
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_fingerprints_the_secret() {
        let a = hook_url("https://d.example.com/hooks/github", "one");
        let b = hook_url("https://d.example.com/hooks/github", "two");
        assert_ne!(a, b);
        assert!(a.starts_with("https://d.example.com/hooks/github?s="));
        assert_eq!(a.len(), "https://d.example.com/hooks/github?s=".len() + 8);
        assert!(!a.contains("one"));
    }
}
