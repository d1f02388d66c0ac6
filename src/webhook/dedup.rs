//! Deliveries already seen: a forge retries, and a user presses "Redeliver", with the same
//! delivery id. Remembered for a window (one hour) in bounded memory: when full, the oldest
//! entries are forgotten first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest delivery id kept; longer ids are cut (they are opaque and GitHub's are 36 bytes).
const MAX_ID_LEN: usize = 128;

/// Delivery ids acted on within the window, bounded in number.
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

    /// Whether `id` was recorded within the window. Only asks: a delivery is recorded with
    /// [`DeliveryCache::record`] once it has been acted on, so one refused (a 503 while
    /// shutting down) is not taken for a duplicate when the forge or a person sends it again.
    pub fn seen(&self, id: &str, now: Instant) -> bool {
        let inner = self.inner.lock().expect("delivery cache lock poisoned");
        inner
            .seen
            .get(cut(id))
            .is_some_and(|at| now.duration_since(*at) < self.window)
    }

    /// Records `id` as acted on at `now`, forgetting the oldest entries past the window or
    /// the capacity.
    pub fn record(&self, id: &str, now: Instant) {
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
        inner.seen.insert(id.to_string(), now);
        inner.order.push_back((now, id.to_string()));
    }

    /// Delivery ids remembered now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("delivery cache lock poisoned")
            .seen
            .len()
    }

    /// Whether no delivery id is remembered.
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
        assert!(!cache.seen("a", t0));
        // Asking records nothing.
        assert!(!cache.seen("a", t0));
        cache.record("a", t0);
        assert!(cache.seen("a", t0 + Duration::from_secs(10)));
        assert!(!cache.seen("b", t0));
        // After the window the id counts as new again.
        assert!(!cache.seen("a", t0 + Duration::from_secs(3601)));
    }

    #[test]
    fn memory_is_bounded() {
        let cache = DeliveryCache::new(Duration::from_secs(3600), 100);
        let t0 = Instant::now();
        for i in 0..10_000 {
            cache.record(&format!("id-{i}"), t0);
        }
        assert!(cache.len() <= 100, "{}", cache.len());
        // The newest are remembered, the oldest forgotten.
        assert!(cache.seen("id-9999", t0));
        assert!(!cache.seen("id-0", t0));
        let long = "x".repeat(10_000);
        assert!(!cache.seen(&long, t0));
        cache.record(&long, t0);
        assert!(cache.seen(&long, t0));
    }
}
