//! The request policy both forge clients share: classify a response (success, not modified,
//! rate limited, unauthorized, not found, transient) and retry, wait out a rate limit (up to
//! `fetch.max_rate_limit_wait`) or fail with a typed [`ForgeError`]; and reading every page
//! of a listing by following its `Link: rel="next"` header.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::header::HeaderMap;
use tracing::warn;

use super::{backoff, ForgeError};
use crate::settings::ForgeKind;

/// A response reduced to what the policy and the parsers need.
pub(crate) struct RawResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The forge's `message` field, or the start of the body.
    pub fn message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("message").map(|m| m.to_string()))
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned()
            })
    }

    pub fn json<T: serde::de::DeserializeOwned>(
        &self,
        forge: ForgeKind,
        request: &str,
    ) -> Result<T, ForgeError> {
        let de = &mut serde_json::Deserializer::from_slice(&self.body);
        serde_path_to_error::deserialize(de).map_err(|e| ForgeError::InvalidResponse {
            forge,
            request: request.to_string(),
            message: e.to_string(),
        })
    }
}

/// Transient faults retried before giving up.
const MAX_TRANSIENT_RETRIES: u32 = 3;
/// Rate-limit waits before giving up (each bounded by `max_wait`).
const MAX_RATE_LIMIT_WAITS: u32 = 3;

pub(crate) struct Policy {
    pub forge: ForgeKind,
    pub max_wait: Duration,
    /// Requests left in the current rate-limit window, as the forge last reported (-1: unknown).
    pub remaining: AtomicI64,
}

impl Policy {
    pub fn new(forge: ForgeKind, max_wait: Duration) -> Self {
        Self {
            forge,
            max_wait,
            remaining: AtomicI64::new(-1),
        }
    }

    fn count(&self, outcome: &'static str) {
        crate::metrics::FORGE_REQUESTS
            .get_or_create(&crate::metrics::ForgeRequestLabels {
                forge: self.forge.as_str(),
                outcome,
            })
            .inc();
    }

    /// Sends a request built by `send` under the policy. `request` names it in errors.
    /// Returns 2xx and 304 responses; everything else becomes an error.
    pub async fn run<F, Fut>(&self, request: &str, mut send: F) -> Result<RawResponse, ForgeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<RawResponse, String>>,
    {
        let forge = self.forge;
        let mut transient = 0;
        let mut waits = 0;
        loop {
            let resp = match send().await {
                Ok(r) => r,
                Err(message) => {
                    self.count("network_error");
                    transient += 1;
                    if transient > MAX_TRANSIENT_RETRIES {
                        return Err(ForgeError::Transient { forge, message });
                    }
                    warn!(%forge, request, error = %message, attempt = transient, "forge request failed; retrying");
                    tokio::time::sleep(backoff(transient)).await;
                    continue;
                }
            };
            if let Some(rem) = resp
                .header("x-ratelimit-remaining")
                .or_else(|| resp.header("ratelimit-remaining"))
                .and_then(|v| v.parse::<i64>().ok())
            {
                self.remaining.store(rem, Ordering::Relaxed);
                crate::metrics::FORGE_RATE_LIMIT_REMAINING
                    .get_or_create(&crate::metrics::ForgeLabels {
                        forge: forge.as_str(),
                    })
                    .set(rem);
            }
            self.count(match resp.status {
                200..=299 => "ok",
                // Answered from what the client knew: spends no rate limit on GitHub.
                304 => "not_modified",
                401 => "unauthorized",
                403 | 429 => "rate_limited",
                404 => "not_found",
                500..=599 => "server_error",
                _ => "client_error",
            });
            match resp.status {
                200..=299 | 304 => return Ok(resp),
                401 => {
                    return Err(ForgeError::Unauthorized {
                        forge,
                        status: 401,
                        message: resp.message(),
                    })
                }
                403 | 429 => {
                    let Some(wait) = rate_limit_wait(&resp) else {
                        return Err(ForgeError::Unauthorized {
                            forge,
                            status: resp.status,
                            message: resp.message(),
                        });
                    };
                    let until = SystemTime::now() + wait;
                    waits += 1;
                    if wait > self.max_wait || waits > MAX_RATE_LIMIT_WAITS {
                        return Err(ForgeError::RateLimited { forge, until });
                    }
                    warn!(%forge, request, wait_secs = wait.as_secs_f64(), "rate limited; waiting for the reset");
                    tokio::time::sleep(wait).await;
                }
                404 => {
                    return Err(ForgeError::NotFound {
                        forge,
                        what: request.to_string(),
                    })
                }
                408 | 500..=599 => {
                    transient += 1;
                    if transient > MAX_TRANSIENT_RETRIES {
                        return Err(ForgeError::Transient {
                            forge,
                            message: format!("{request}: HTTP {}: {}", resp.status, resp.message()),
                        });
                    }
                    warn!(%forge, request, status = resp.status, attempt = transient, "forge answered with a server error; retrying");
                    tokio::time::sleep(backoff(transient)).await;
                }
                status => {
                    return Err(ForgeError::InvalidResponse {
                        forge,
                        request: request.to_string(),
                        message: format!("HTTP {status}: {}", resp.message()),
                    })
                }
            }
        }
    }
}

/// How long a 403/429 asks us to wait: `Retry-After` (seconds), else the reset time of an
/// exhausted window (`x-ratelimit-reset` / `ratelimit-reset`, Unix seconds). `None` when the
/// response is not about rate limits (a plain 403 is a permission problem).
fn rate_limit_wait(resp: &RawResponse) -> Option<Duration> {
    if let Some(secs) = resp
        .header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(Duration::from_secs(secs));
    }
    let exhausted = resp
        .header("x-ratelimit-remaining")
        .or_else(|| resp.header("ratelimit-remaining"))
        .is_some_and(|v| v.trim() == "0");
    if exhausted || resp.status == 429 {
        let reset = resp
            .header("x-ratelimit-reset")
            .or_else(|| resp.header("ratelimit-reset"))
            .and_then(|v| v.trim().parse::<u64>().ok());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // A reset already passed (clock skew) still waits a second before retrying.
        return Some(Duration::from_secs(
            reset.map_or(60, |r| r.saturating_sub(now).max(1)),
        ));
    }
    None
}

/// The `rel="next"` URL of a `Link` header (RFC 8288, as GitHub and GitLab send it).
pub(crate) fn next_link(link: Option<&str>) -> Option<String> {
    link?.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

/// Pages of one listing read at most: at 100 entries a page, 10,000 entries.
pub(crate) const MAX_PAGES: usize = 100;

/// Reads every page of a JSON array listing, starting at `first` and following each
/// response's `Link: rel="next"`, at most [`MAX_PAGES`] pages. A next link outside `api_root`
/// is refused: the client's credentials go only to the configured API.
pub(crate) async fn all_pages<T, F, Fut>(
    forge: ForgeKind,
    request: &str,
    api_root: &str,
    first: String,
    mut get: F,
) -> Result<Vec<T>, ForgeError>
where
    T: serde::de::DeserializeOwned,
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<RawResponse, ForgeError>>,
{
    let invalid = |message: String| ForgeError::InvalidResponse {
        forge,
        request: request.to_string(),
        message,
    };
    let mut all = Vec::new();
    let mut url = first;
    for _ in 0..MAX_PAGES {
        let resp = get(url).await?;
        let page: Vec<T> = resp.json(forge, request)?;
        all.extend(page);
        match next_link(resp.header("link")) {
            None => return Ok(all),
            Some(next) if next.starts_with(api_root) => url = next,
            Some(next) => {
                return Err(invalid(format!(
                    "the next page is outside {api_root}: {next}"
                )))
            }
        }
    }
    Err(invalid(format!(
        "more than {MAX_PAGES} pages; driftless reads at most {MAX_PAGES}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_next() {
        let h = r#"<https://gitlab.example.com/api/v4/projects/1/repository/tree?page_token=abc&per_page=100>; rel="next", <https://x/first>; rel="first""#;
        assert_eq!(
            next_link(Some(h)).as_deref(),
            Some("https://gitlab.example.com/api/v4/projects/1/repository/tree?page_token=abc&per_page=100")
        );
        let gh = r#"<https://api.github.com/repositories/1/hooks?page=1>; rel="prev", <https://api.github.com/repositories/1/hooks?page=3>; rel="next", <https://api.github.com/repositories/1/hooks?page=5>; rel="last""#;
        assert_eq!(
            next_link(Some(gh)).as_deref(),
            Some("https://api.github.com/repositories/1/hooks?page=3")
        );
        assert_eq!(next_link(Some(r#"<https://x>; rel="first""#)), None);
        assert_eq!(next_link(None), None);
    }
}
