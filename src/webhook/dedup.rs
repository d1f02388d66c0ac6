//! Deliveries already seen: a forge retries, and a user presses "Redeliver", with the same
//! delivery id. Remembered for a window (one hour) in bounded memory: when full, the oldest
//! entries are forgotten first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest delivery id kept; longer ids are cut (they are opaque and GitHub's are 36 bytes).
const MAX_ID_LEN: usize = 128;

pub struct DeliveryCache {
    window: Duration,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl DeliveryCache {
    /// `capacity` bounds memory at about `capacity * (2 * MAX_ID_LEN + 64)` bytes.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Records `id` and says whether it was already seen within the window.
    pub fn check_and_insert(&self, id: &str, now: Instant) -> bool {
        let id = cut(id);
        let mut inner = self.inner.lock().expect("delivery cache lock poisoned");
        while let Some((at, old)) = inner.order.front() {
            if now.duration_since(*at) < self.window && inner.order.len() < self.capacity {
                break;
            }
            let old = old.clone();
            let at = *at;
            inner.order.pop_front();
            if inner.seen.get(&old) == Some(&at) {
                inner.seen.remove(&old);
            }
        }
        if let Some(at) = inner.seen.get(id) {
            if now.duration_since(*at) < self.window {
                return true;
            }
        }
        inner.seen.insert(id.to_string(), now);
        inner.order.push_back((now, id.to_string()));
        false
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("delivery cache lock poisoned")
            .seen
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn cut(id: &str) -> &str {
    if id.len() <= MAX_ID_LEN {
        return id;
    }
    let mut end = MAX_ID_LEN;
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_the_window() {
        let cache = DeliveryCache::new(Duration::from_secs(3600), 10);
        let t0 = Instant::now();
        assert!(!cache.check_and_insert("a", t0));
        assert!(cache.check_and_insert("a", t0 + Duration::from_secs(10)));
        assert!(!cache.check_and_insert("b", t0));
        // After the window the id counts as new again.
        assert!(!cache.check_and_insert("a", t0 + Duration::from_secs(3601)));
    }

    #[test]
    fn memory_is_bounded() {
        let cache = DeliveryCache::new(Duration::from_secs(3600), 100);
        let t0 = Instant::now();
        for i in 0..10_000 {
            cache.check_and_insert(&format!("id-{i}"), t0);
        }
        assert!(cache.len() <= 100, "{}", cache.len());
        // The newest are remembered, the oldest forgotten.
        assert!(cache.check_and_insert("id-9999", t0));
        assert!(!cache.check_and_insert("id-0", t0));
        let long = "x".repeat(10_000);
        assert!(!cache.check_and_insert(&long, t0));
        assert!(cache.check_and_insert(&long, t0));
    }
}
