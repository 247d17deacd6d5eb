//! A bounded table of per-key values (metric handles, stats windows), read with no lock.

#![cfg_attr(
    not(all(feature = "request-id", feature = "metrics", feature = "retry")),
    allow(dead_code)
)]

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;

use crate::sync::lock;

type Map<K, V> = HashMap<K, Arc<V>, foldhash::fast::RandomState>;

/// Handles per key (a model, a pair of models), made on a key's first use
/// and kept: registering a handle allocates its key and labels, using it
/// afterwards does not. Bounded: past `cap` keys, and for any key whose
/// labels would not be clean, every call shares the `other` entry, so a
/// client sending 100,000 model names adds no label value beyond the cap.
///
/// Lookups read a published copy of the map (as the concurrency and pacing
/// layers' key tables do); a miss takes the lock and publishes a new copy,
/// at most `cap` times in the table's life. Once full, a miss goes to
/// `other` without the lock.
pub(crate) struct Table<K, V> {
    published: ArcSwap<Map<K, V>>,
    table: Mutex<Map<K, V>>,
    len: AtomicUsize,
    cap: usize,
    other: OnceLock<Arc<V>>,
}

impl<K, V> std::fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, V> Table<K, V> {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            published: ArcSwap::from_pointee(Map::default()),
            table: Mutex::new(Map::default()),
            len: AtomicUsize::new(0),
            cap,
            other: OnceLock::new(),
        }
    }

    /// Runs `use_it` with the values of `key`, made by `make` on first use
    /// (`None` from `make`: the key is not clean, it shares `other`, made
    /// by `make_other`). Metric handles are registered with the recorder in
    /// force when they are made.
    pub(crate) fn with<Q, T>(
        &self,
        key: &Q,
        make: impl FnOnce(&Q) -> Option<(K, V)>,
        make_other: impl FnOnce() -> V,
        use_it: impl FnOnce(&V) -> T,
    ) -> T
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        {
            let published = self.published.load();
            if let Some(found) = published.get(key) {
                return use_it(found);
            }
        }
        match self.insert(key, make) {
            Some(found) => use_it(&found),
            None => use_it(self.other.get_or_init(|| Arc::new(make_other()))),
        }
    }

    /// As [`with`](Self::with), keeping the value.
    #[cfg_attr(not(feature = "retry"), allow(dead_code))]
    pub(crate) fn arc<Q>(
        &self,
        key: &Q,
        make: impl FnOnce(&Q) -> Option<(K, V)>,
        make_other: impl FnOnce() -> V,
    ) -> Arc<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(found) = self.published.load().get(key) {
            return Arc::clone(found);
        }
        match self.insert(key, make) {
            Some(found) => found,
            None => Arc::clone(self.other.get_or_init(|| Arc::new(make_other()))),
        }
    }

    /// As [`with`](Self::with), for a key that gets a value of its own;
    /// `None` past the bound (nothing shared).
    pub(crate) fn with_own<Q, T>(
        &self,
        key: &Q,
        make: impl FnOnce(&Q) -> Option<(K, V)>,
        use_it: impl FnOnce(&V) -> T,
    ) -> Option<T>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        {
            let published = self.published.load();
            if let Some(found) = published.get(key) {
                return Some(use_it(found));
            }
        }
        self.insert(key, make).map(|found| use_it(&found))
    }

    #[cold]
    fn insert<Q>(&self, key: &Q, make: impl FnOnce(&Q) -> Option<(K, V)>) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.len.load(Ordering::Relaxed) >= self.cap {
            return None;
        }
        let mut table = lock(&self.table);
        if let Some(found) = table.get(key) {
            return Some(Arc::clone(found));
        }
        if table.len() >= self.cap {
            return None;
        }
        let (owned, value) = make(key)?;
        let value = Arc::new(value);
        table.insert(owned, Arc::clone(&value));
        self.len.store(table.len(), Ordering::Relaxed);
        self.published.store(Arc::new(table.clone()));
        Some(value)
    }

    /// How many keys have values of their own.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Every key with its value (a copy of the published map).
    pub(crate) fn entries(&self) -> Vec<(K, Arc<V>)> {
        self.published
            .load()
            .iter()
            .map(|(key, value)| (key.clone(), Arc::clone(value)))
            .collect()
    }

    /// The value of `key`, if it has one of its own (no insertion).
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.published.load().get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_stops_at_its_cap_and_folds_the_rest() {
        let table: Table<String, String> = Table::new(3);
        let seen: Vec<String> = (0..10)
            .map(|i| {
                let name = format!("m{i}");
                table.with(
                    name.as_str(),
                    |k| Some((k.to_owned(), k.to_owned())),
                    || "other".to_owned(),
                    Clone::clone,
                )
            })
            .collect();
        assert_eq!(&seen[..3], ["m0", "m1", "m2"]);
        assert!(seen[3..].iter().all(|v| v == "other"));
        assert_eq!(table.len(), 3);
        let again = table.with("m1", |_| None, || "other".to_owned(), Clone::clone);
        assert_eq!(again, "m1", "a known key is found, not made again");
    }

    #[test]
    fn unclean_keys_share_other_and_take_no_slot() {
        let table: Table<String, u8> = Table::new(3);
        let value = table.with("bad name", |_| None, || 0, |v| *v);
        assert_eq!(value, 0);
        assert_eq!(table.len(), 0);
    }
}
