//! The profile processor's cache of profile states between batches.
//!
//! A batch reads the state of every profile it touches, parses it, and
//! writes it back; with the cache, a profile the processor wrote before is
//! taken from memory instead of parsed again, with the JSON of its view
//! (the next change's `before`) already made. Every write of a profile
//! gives its row a new `version`, unique to that write; a batch still locks
//! the rows and reads their versions, and uses a cached state only when
//! its version is the stored one. So a profile changed anywhere else (by
//! another instance after a rebalance, a merge, a deletion, a snapshot
//! restore or a replay) is read from the store again, and the cache can
//! never make a batch work on an old state.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use lru::LruCache;

use crate::metrics as metrics_names;
use crate::profile::Profile;

/// A profile as the processor last wrote it.
#[derive(Debug)]
pub(super) struct CachedState {
    /// The `version` its row was written with.
    pub version: i64,
    pub profile: Profile,
    /// The JSON of its view.
    pub view: String,
}

/// Profile id → its state, least recently written evicted first.
pub(super) struct StateCache {
    states: Option<Mutex<LruCache<String, CachedState>>>,
    /// The next write's version: a random start, so that two processes
    /// (or two runs of one) never write the same version.
    next_version: AtomicI64,
}

impl std::fmt::Debug for StateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCache")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl StateCache {
    /// A cache of up to `capacity` profiles; none kept with 0.
    pub fn new(capacity: usize) -> StateCache {
        let start = uuid::Uuid::new_v4().as_u64_pair().0 as i64;
        StateCache {
            states: NonZeroUsize::new(capacity).map(|n| Mutex::new(LruCache::new(n))),
            next_version: AtomicI64::new(start),
        }
    }

    pub fn capacity(&self) -> usize {
        self.states.as_ref().map_or(0, |s| lock(s).cap().get())
    }

    /// A version no other write has: never 0, the version of rows written
    /// without one (before versions existed, or restored from a snapshot).
    pub fn next_version(&self) -> i64 {
        loop {
            let version = self.next_version.fetch_add(1, Ordering::Relaxed);
            if version != 0 {
                return version;
            }
        }
    }

    /// Takes out the cached states of `stored` (profile id, stored
    /// version) whose version is the stored one. The others, if cached,
    /// are stale and dropped too.
    pub fn take(&self, stored: &[(String, i64)]) -> HashMap<String, CachedState> {
        let Some(states) = &self.states else {
            return HashMap::new();
        };
        let mut states = lock(states);
        let taken: HashMap<String, CachedState> = stored
            .iter()
            .filter_map(|(profile_id, version)| {
                let cached = states.pop(profile_id)?;
                (cached.version == *version).then(|| (profile_id.clone(), cached))
            })
            .collect();
        let lookups = |outcome: &'static str, n: usize| {
            metrics::counter!(metrics_names::PROFILE_CACHE_LOOKUPS, "outcome" => outcome)
                .increment(n as u64);
        };
        lookups("hit", taken.len());
        lookups("miss", stored.len() - taken.len());
        taken
    }

    /// Keeps the states a committed batch wrote.
    pub fn put(&self, written: Vec<(String, CachedState)>) {
        let Some(states) = &self.states else {
            return;
        };
        let mut states = lock(states);
        for (profile_id, state) in written {
            states.put(profile_id, state);
        }
        metrics::gauge!(metrics_names::PROFILE_CACHE_PROFILES).set(states.len() as f64);
    }

    /// Profiles cached now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.states.as_ref().map_or(0, |s| lock(s).len())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while the lock was held leaves whole entries; the cache is
    // still sound (every entry is checked against the stored version).
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(version: i64) -> CachedState {
        CachedState {
            version,
            profile: Profile::default(),
            view: String::new(),
        }
    }

    #[test]
    fn a_state_is_taken_only_at_its_stored_version_and_only_once() {
        let cache = StateCache::new(10);
        cache.put(vec![("a".into(), state(7)), ("b".into(), state(8))]);
        let taken = cache.take(&[("a".into(), 7), ("b".into(), 9), ("c".into(), 1)]);
        assert_eq!(taken.keys().collect::<Vec<_>>(), vec!["a"]);
        // Taken out, and the stale one dropped.
        assert_eq!(cache.len(), 0);
        assert!(cache.take(&[("a".into(), 7)]).is_empty());
    }

    #[test]
    fn the_least_recently_written_go_first_and_zero_keeps_nothing() {
        let cache = StateCache::new(2);
        cache.put(vec![("a".into(), state(1)), ("b".into(), state(2))]);
        cache.put(vec![("c".into(), state(3))]);
        assert_eq!(cache.len(), 2);
        assert!(cache.take(&[("a".into(), 1)]).is_empty());

        let off = StateCache::new(0);
        off.put(vec![("a".into(), state(1))]);
        assert_eq!((off.len(), off.capacity()), (0, 0));
    }

    #[test]
    fn versions_are_never_zero_and_never_repeat() {
        let cache = StateCache::new(1);
        cache.next_version.store(-2, Ordering::Relaxed);
        let versions: Vec<i64> = (0..4).map(|_| cache.next_version()).collect();
        assert_eq!(versions, vec![-2, -1, 1, 2]);
    }
}
