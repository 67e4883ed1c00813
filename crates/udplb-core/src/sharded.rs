//! A table the workers share, split into shards behind locks of their own.
//!
//! Owns: [`Sharded`], which picks a key's shard with a randomly keyed hash (so that network
//! input cannot pile entries into one shard) and visits the shards in turn for sweeps.
//! Must not: know what the shards hold.

use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Shards of a table: workers touching different keys rarely wait on each other.
pub const SHARDS: usize = 16;

/// `SHARDS` values of `T`, each behind its own lock.
#[derive(Debug)]
pub struct Sharded<T> {
    shards: Box<[Mutex<T>]>,
    hasher: std::collections::hash_map::RandomState,
    /// The next shard a sweep visits.
    cursor: AtomicUsize,
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            cursor: AtomicUsize::new(0),
        }
    }
}

impl<T> Sharded<T> {
    /// The shard of `key`, locked.
    pub fn of(&self, key: &impl Hash) -> MutexGuard<'_, T> {
        self.lock((self.hasher.hash_one(key) as usize) % SHARDS)
    }

    /// The next shard in turn, locked (for sweeps that visit one shard at a time).
    pub fn next(&self) -> MutexGuard<'_, T> {
        self.lock(self.cursor.fetch_add(1, Ordering::Relaxed) % SHARDS)
    }

    /// Folds every shard into `init`, one lock at a time.
    pub fn fold<A>(&self, init: A, mut f: impl FnMut(A, &T) -> A) -> A {
        (0..SHARDS).fold(init, |acc, i| f(acc, &self.lock(i)))
    }

    /// The keyed hash of `key` (the same one that picks shards).
    pub fn hash(&self, key: &impl Hash) -> u64 {
        self.hasher.hash_one(key)
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, T> {
        // Nothing in a shard is left half-written by a panic: take it as it is.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}
