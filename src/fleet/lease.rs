//! [`FleetLease`]: a call's slot in the fleet's cap, given back when dropped.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::Shared;
use super::store::Acquired;
use crate::sync::lock;

/// One fleet slot held by a call: a lease in the store, or while the store
/// is down a slot of this worker's local share. Dropping it gives the slot
/// back (a lease's release is sent in the background).
pub struct FleetLease {
    held: Held,
}

enum Held {
    Shared {
        fleet: Arc<Shared>,
        key: String,
        holder: String,
        /// When the fleet granted it: kept for later calls only so long.
        taken: Instant,
    },
    /// A slot of the local share, under a holder name of its own: when the
    /// store comes back while the call is still in flight, the lease is
    /// written there, so the fleet counts it.
    Local {
        _permit: OwnedSemaphorePermit,
        fleet: Arc<Shared>,
        key: String,
        holder: String,
    },
}

impl FleetLease {
    /// Whether the slot is a lease in the store (not a local one).
    ///
    /// ```
    /// # fn check(lease: &tower_overload::fleet::FleetLease) -> bool {
    /// lease.is_shared()
    /// # }
    /// ```
    pub fn is_shared(&self) -> bool {
        matches!(self.held, Held::Shared { .. })
    }
}

/// A lease whose call ended, kept for the worker's next call.
pub(super) struct Idle {
    holder: String,
    taken: Instant,
    since: Instant,
}

/// How long a kept lease may sit idle before it goes back to the fleet.
pub(super) const IDLE_TICK: Duration = Duration::from_millis(20);

impl Drop for FleetLease {
    fn drop(&mut self) {
        if let Held::Local {
            fleet, key, holder, ..
        } = &mut self.held
        {
            let (key, holder) = (std::mem::take(key), std::mem::take(holder));
            let mut local = lock(&fleet.local_held);
            let was_local = local
                .get_mut(key.as_str())
                .is_some_and(|holders| holders.remove(holder.as_str()));
            if local.get(key.as_str()).is_some_and(HashSet::is_empty) {
                local.remove(key.as_str());
            }
            drop(local);
            if !was_local {
                // Written to the store when it came back: released there.
                give_back(fleet, key, holder);
            }
            return;
        }
        let Held::Shared {
            fleet,
            key,
            holder,
            taken,
        } = &mut self.held
        else {
            return;
        };
        let now = Instant::now();
        let (key, holder) = (std::mem::take(key), std::mem::take(holder));
        if !fleet.is_degraded() && now < *taken + fleet.config.reuse {
            // Kept (and still renewed) for the next call of this worker.
            lock(&fleet.idle).entry(key).or_default().push(Idle {
                holder,
                taken: *taken,
                since: now,
            });
        } else {
            give_back(fleet, key, holder);
        }
        fleet.released.notify_waiters();
    }
}

/// Stops renewing a lease and sends its release (in the background).
fn give_back(fleet: &Shared, key: String, holder: String) {
    let mut held = lock(&fleet.held);
    if let Some(holders) = held.get_mut(key.as_str()) {
        holders.remove(holder.as_str());
        if holders.is_empty() {
            held.remove(key.as_str());
        }
    }
    drop(held);
    // Never blocks; fails only when the background task is gone, and then
    // the lease expires on its own.
    let _ = fleet.releases.send((key, holder));
}

/// Gives back the kept leases idle for a tick, or kept as long as allowed.
pub(super) fn release_idle(fleet: &Shared, now: Instant) {
    let mut expired = Vec::new();
    {
        let mut idle = lock(&fleet.idle);
        idle.retain(|key, kept| {
            kept.retain(|lease| {
                let keep = now < lease.since + IDLE_TICK && now < lease.taken + fleet.config.reuse;
                if !keep {
                    expired.push((key.clone(), lease.holder.clone()));
                }
                keep
            });
            !kept.is_empty()
        });
    }
    for (key, holder) in expired {
        give_back(fleet, key, holder);
    }
}

/// Gives back every kept lease (the store went down, or came back).
pub(super) fn give_back_idle(fleet: &Shared) {
    let kept: Vec<(String, String)> = lock(&fleet.idle)
        .drain()
        .flat_map(|(key, leases)| {
            leases
                .into_iter()
                .map(move |lease| (key.clone(), lease.holder))
        })
        .collect();
    for (key, holder) in kept {
        give_back(fleet, key, holder);
    }
}

/// A lease this worker kept from an ended call, when one is fresh enough.
fn reuse(fleet: &Arc<Shared>, key: &str) -> Option<FleetLease> {
    let now = Instant::now();
    let mut stale = Vec::new();
    let found = {
        let mut idle = lock(&fleet.idle);
        let kept = idle.get_mut(key)?;
        let mut found = None;
        while let Some(lease) = kept.pop() {
            if now < lease.taken + fleet.config.reuse {
                found = Some(lease);
                break;
            }
            stale.push(lease.holder);
        }
        found
    };
    for holder in stale {
        give_back(fleet, key.to_owned(), holder);
    }
    let lease = found?;
    fleet.reused.fetch_add(1, Ordering::Relaxed);
    fleet.shared_calls.fetch_add(1, Ordering::Relaxed);
    Some(FleetLease {
        held: Held::Shared {
            fleet: Arc::clone(fleet),
            key: key.to_owned(),
            holder: lease.holder,
            taken: lease.taken,
        },
    })
}

impl fmt::Debug for FleetLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.held {
            Held::Shared { key, holder, .. } => f
                .debug_struct("FleetLease")
                .field("key", key)
                .field("holder", holder)
                .finish(),
            Held::Local { key, holder, .. } => f
                .debug_struct("FleetLease")
                .field("key", key)
                .field("holder", holder)
                .field("local", &true)
                .finish(),
        }
    }
}

/// Waits for one of `cap` slots of `name`, or `None` once `deadline` passes.
pub(super) async fn acquire(
    fleet: &Arc<Shared>,
    name: &str,
    cap: u32,
    deadline: Option<Instant>,
) -> Option<FleetLease> {
    let key = fleet.key("sem", name);
    let mut waited = false;
    loop {
        if fleet.is_degraded() {
            return local(fleet, &key, cap, deadline).await;
        }
        if let Some(kept) = reuse(fleet, &key) {
            return Some(kept);
        }
        let holder = format!(
            "{}:{}",
            fleet.worker,
            fleet.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        fleet.acquires.fetch_add(1, Ordering::Relaxed);
        // A call cancelled while the store answers may have been granted a
        // slot nobody holds: released at once rather than left to expire.
        let mut asking = Asking {
            fleet,
            key: &key,
            holder: Some(&holder),
        };
        let acquired = fleet
            .timed(
                fleet
                    .store
                    .acquire(&key, cap.max(1), fleet.config.lease, &holder),
            )
            .await;
        // Answered: the slot is this call's (or nobody's) now. Unanswered
        // (timed out), the store may still have granted it: the guard
        // releases it.
        if acquired.is_ok() {
            asking.holder = None;
        }
        drop(asking);
        match acquired {
            Ok(Acquired::Granted) => {
                lock(&fleet.held)
                    .entry(key.clone())
                    .or_default()
                    .insert(holder.clone());
                fleet.shared_calls.fetch_add(1, Ordering::Relaxed);
                return Some(FleetLease {
                    held: Held::Shared {
                        fleet: Arc::clone(fleet),
                        key,
                        holder,
                        taken: Instant::now(),
                    },
                });
            }
            Ok(Acquired::Full { earliest_expiry }) => {
                if !waited {
                    waited = true;
                    fleet.waits.fetch_add(1, Ordering::Relaxed);
                }
                let pause = fleet
                    .config
                    .poll
                    .min(earliest_expiry)
                    .max(Duration::from_millis(1));
                let mut until = Instant::now() + pause;
                if let Some(deadline) = deadline {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    until = until.min(deadline);
                }
                // A call of this worker ending frees a slot it can ask for at once.
                let released = fleet.released.notified();
                tokio::select! {
                    () = released => {}
                    () = tokio::time::sleep_until(until) => {}
                }
            }
            // A lease the store granted but whose answer was lost is not
            // renewed: it expires within one lease.
            Err(error) => fleet.degrade(&error),
        }
    }
}

/// An acquire in flight: if dropped before the store answered (the call
/// was cancelled), sends a release for its holder (harmless when the store
/// granted nothing).
struct Asking<'a> {
    fleet: &'a Shared,
    key: &'a str,
    holder: Option<&'a String>,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if let Some(holder) = self.holder.take() {
            let _ = self
                .fleet
                .releases
                .send((self.key.to_owned(), holder.clone()));
        }
    }
}

/// A slot of the local share while the store is down.
async fn local(
    fleet: &Arc<Shared>,
    key: &str,
    cap: u32,
    deadline: Option<Instant>,
) -> Option<FleetLease> {
    let semaphore = fleet.local_semaphore(key, cap);
    let acquire = semaphore.acquire_owned();
    let permit = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, acquire).await.ok()?,
        None => acquire.await,
    }
    .ok()?;
    fleet.local_calls.fetch_add(1, Ordering::Relaxed);
    let holder = format!(
        "{}:{}",
        fleet.worker,
        fleet.next_lease.fetch_add(1, Ordering::Relaxed)
    );
    lock(&fleet.local_held)
        .entry(key.to_owned())
        .or_default()
        .insert(holder.clone());
    Some(FleetLease {
        held: Held::Local {
            _permit: permit,
            fleet: Arc::clone(fleet),
            key: key.to_owned(),
            holder,
        },
    })
}

/// The store is back: the calls still in flight on the local share become
/// leases to renew (the renewal writes them), so the fleet counts them.
pub(super) fn promote_local(fleet: &Shared) {
    let local: Vec<(String, HashSet<String>)> = lock(&fleet.local_held).drain().collect();
    let mut held = lock(&fleet.held);
    for (key, holders) in local {
        held.entry(key).or_default().extend(holders);
    }
}
