//! Poison-tolerant locks: the crate's one way to take a `Mutex`.
//!
//! No code in this crate panics while holding one of its locks, and every
//! guarded state stays valid between two statements; a lock poisoned by a
//! panic elsewhere (a user's callback, a test) still holds valid state, so
//! taking it recovers the guard instead of spreading the panic.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, poisoned or not.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_yields_its_state() {
        let mutex = Mutex::new(1);
        let _ = std::panic::catch_unwind(|| {
            let _held = mutex.lock().unwrap();
            panic!("poison it");
        });
        assert!(mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
    }
}
