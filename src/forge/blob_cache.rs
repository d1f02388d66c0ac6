//! Content-addressed cache of file contents, keyed by git blob SHA and bounded in bytes: a
//! file unchanged between two commits has the same SHA, so it is downloaded once. When full,
//! the least recently used blobs are dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;

pub struct BlobCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    bytes: usize,
    tick: u64,
    entries: HashMap<String, (Bytes, u64)>,
    by_use: BTreeMap<u64, String>,
}

impl BlobCache {
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity: capacity_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Drops every blob.
    pub fn clear(&self) {
        *self.inner.lock().expect("blob cache lock poisoned") = Inner::default();
    }

    pub fn get(&self, sha: &str) -> Option<Bytes> {
        let mut inner = self.inner.lock().expect("blob cache lock poisoned");
        inner.tick += 1;
        let tick = inner.tick;
        let (content, used) = inner.entries.get_mut(sha)?;
        let content = content.clone();
        let old = std::mem::replace(used, tick);
        inner.by_use.remove(&old);
        inner.by_use.insert(tick, sha.to_string());
        Some(content)
    }

    /// Stores a blob unless it alone is larger than the whole cache.
    pub fn insert(&self, sha: &str, content: Bytes) {
        if content.len() > self.capacity {
            return;
        }
        let mut inner = self.inner.lock().expect("blob cache lock poisoned");
        if inner.entries.contains_key(sha) {
            return;
        }
        while inner.bytes + content.len() > self.capacity {
            let Some((_, oldest)) = inner.by_use.pop_first() else {
                break;
            };
            if let Some((c, _)) = inner.entries.remove(&oldest) {
                inner.bytes -= c.len();
            }
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.bytes += content.len();
        inner.by_use.insert(tick, sha.to_string());
        inner.entries.insert(sha.to_string(), (content, tick));
    }

    /// Bytes held.
    pub fn size(&self) -> usize {
        self.inner.lock().expect("blob cache lock poisoned").bytes
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("blob cache lock poisoned")
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_drops_every_blob_and_the_cache_fills_again() {
        let cache = BlobCache::new(10);
        cache.insert("a", Bytes::from_static(b"1234"));
        cache.clear();
        assert!(cache.get("a").is_none());
        assert_eq!((cache.size(), cache.len()), (0, 0));
        cache.insert("b", Bytes::from_static(b"1234567890"));
        assert!(cache.get("b").is_some(), "the whole capacity is free again");
    }

    #[test]
    fn bounded_and_least_recently_used_goes_first() {
        let cache = BlobCache::new(10);
        cache.insert("a", Bytes::from_static(b"1234"));
        cache.insert("b", Bytes::from_static(b"1234"));
        assert!(cache.get("a").is_some()); // a is now more recent than b
        cache.insert("c", Bytes::from_static(b"1234"));
        assert!(cache.size() <= 10);
        assert!(cache.get("b").is_none());
        assert!(cache.get("a").is_some());
        assert!(cache.get("c").is_some());
        cache.insert("huge", Bytes::from(vec![0u8; 11]));
        assert!(cache.get("huge").is_none());
    }
}
