//! Pull request events waiting for the preview worker: one entry per request, the newest
//! event replacing an older one still waiting (a preview of a head already superseded would
//! be wasted), and a bound on how many requests can wait.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::webhook::PullRequestEvent;

/// Requests that may wait at once. A preview takes about a second; a thousand requests
/// waiting means the forge is sending faster than any cluster could answer.
const CAPACITY: usize = 1024;

/// Why an event was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("{CAPACITY} pull requests are already waiting for a preview")]
    Full,
}

#[derive(Default)]
pub struct PreviewQueue {
    waiting: Mutex<Waiting>,
    ready: Notify,
}

#[derive(Default)]
struct Waiting {
    order: VecDeque<String>,
    events: HashMap<String, PullRequestEvent>,
}

impl PreviewQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `event`, replacing the request's waiting one. Returns whether it replaced one.
    pub fn push(&self, event: PullRequestEvent) -> Result<bool, QueueError> {
        let key = super::report::key(event.forge, &event.repo, event.number);
        let mut w = self.waiting.lock().expect("preview queue");
        let replaced = w.events.contains_key(&key);
        if !replaced {
            if w.order.len() >= CAPACITY {
                return Err(QueueError::Full);
            }
            w.order.push_back(key.clone());
        }
        w.events.insert(key, event);
        drop(w);
        self.ready.notify_one();
        Ok(replaced)
    }

    /// The next event, waiting for one.
    pub async fn next(&self) -> PullRequestEvent {
        loop {
            let notified = self.ready.notified();
            {
                let mut w = self.waiting.lock().expect("preview queue");
                if let Some(key) = w.order.pop_front() {
                    return w.events.remove(&key).expect("queued keys have events");
                }
            }
            notified.await;
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.lock().expect("preview queue").order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::ForgeKind;
    use crate::webhook::PullRequestAction;

    fn ev(number: u64, head: char) -> PullRequestEvent {
        PullRequestEvent {
            forge: ForgeKind::Github,
            repo: "acme/deploy".into(),
            number,
            action: PullRequestAction::Updated,
            base_branch: "main".into(),
            head_sha: head.to_string().repeat(40),
            from_fork: false,
        }
    }

    #[tokio::test]
    async fn the_newest_event_of_a_request_replaces_the_waiting_one() {
        let q = PreviewQueue::new();
        assert_eq!(q.push(ev(1, 'a')), Ok(false));
        assert_eq!(q.push(ev(2, 'b')), Ok(false));
        assert_eq!(q.push(ev(1, 'c')), Ok(true));
        assert_eq!(q.len(), 2);
        assert_eq!(q.next().await.head_sha, "c".repeat(40));
        assert_eq!(q.next().await.number, 2);
        assert!(q.is_empty());
    }
}
