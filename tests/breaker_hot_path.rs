//! Issue 19's reworked hot path, attacked from outside: permits under
//! cancellation and adaptive limits, the key table under a flood from real
//! threads, `Model`'s hand-written Eq/Hash/Ord, the retry quota's refill,
//! the one error convention through the whole stack, and the JSON scanner
//! against serde_json. Real loopback HTTP (tests/support) where a call is
//! involved; paused clock.

mod support;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use support::{MockUpstream, Reply, client, messages_request};
use tower::{Layer, Service, ServiceExt};
use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer, KeySnapshot, PermitBody};
use tower_overload::{Error, ErrorKind, Model};

type Response = http::Response<PermitBody<hyper::body::Incoming>>;

fn limited(
    layer: &ConcurrencyPerModelLayer,
) -> impl Service<Request<Full<Bytes>>, Response = Response, Error = Error, Future: Send>
+ Clone
+ Send
+ 'static {
    layer.layer(client())
}

fn snapshot_of(layer: &ConcurrencyPerModelLayer, key: &str) -> KeySnapshot {
    layer
        .snapshot()
        .into_iter()
        .find(|s| s.key.as_str() == key)
        .unwrap_or_else(|| panic!("no key {key} in {:?}", layer.snapshot()))
}

// ---------------------------------------------------------------------------
// Permits: cancellation while holding the key permit and waiting for the
// global one, against an adaptive limit that shrank meanwhile.
// ---------------------------------------------------------------------------

/// Finding 1 (issue 19): a call that holds its key's permit while it waits
/// for the global one (`HeldKey`) gave that permit back with `add_permits(1)`
/// when dropped, ignoring the debt an adaptive shrink left. The next call
/// then went upstream while the key was already at its shrunk limit: two in
/// flight against a limit of one, although nothing was in flight above the
/// limit when the shrink happened beyond the held permit itself.
#[tokio::test(start_paused = true)]
async fn a_dropped_held_key_pays_the_debt_of_a_shrink() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        "m",
        [Reply::overloaded().delay(Duration::from_secs(10))],
    );
    let layer = ConcurrencyPerModelLayer::new(2)
        .global_limit(Some(2))
        .queue_timeout(None)
        .adaptive(Aimd {
            decrease_ratio: 0.5,
            ..Aimd::default()
        });
    let service = limited(&layer);

    // X holds one global permit (its body is never read).
    let x = service
        .clone()
        .oneshot(messages_request(&mock, "x"))
        .await
        .unwrap();
    // A holds m's first permit and the last global one; its 529 comes late.
    let a = tokio::spawn(service.clone().oneshot(messages_request(&mock, "m")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // B takes m's second permit and waits for a global one.
    let mut b = Box::pin(service.clone().oneshot(messages_request(&mock, "m")));
    assert!(futures::poll!(b.as_mut()).is_pending());
    assert_eq!(snapshot_of(&layer, "m").queued, 1);

    // A's 529 shrinks m to 1 while both of m's permits are out: a debt of 1.
    let a = a.await.unwrap().unwrap();
    assert_eq!(a.status(), 529);
    assert_eq!(snapshot_of(&layer, "m").limit, 1);

    // B gives up; X ends, so a global permit is free again.
    drop(b);
    drop(x);

    // A (529, body held) is still in flight at the limit of 1: C must wait.
    let mut c = Box::pin(service.clone().oneshot(messages_request(&mock, "m")));
    let polled = futures::poll!(c.as_mut());
    let m = snapshot_of(&layer, "m");
    assert!(
        m.in_flight <= m.limit,
        "m over its limit after a held key was dropped: {m:?}"
    );
    assert!(polled.is_pending(), "C must queue behind A");
    drop(a);
    let c = c.await.unwrap();
    assert_eq!(c.status(), 200);
    drop(c);
    assert_eq!(mock.peak_in_flight("m"), 1);
    let m = snapshot_of(&layer, "m");
    assert_eq!((m.in_flight, m.queued), (0, 0));
}
