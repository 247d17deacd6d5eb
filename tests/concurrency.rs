//! ConcurrencyPerModelLayer against the loopback mock upstream, through a
//! real hyper-util client, on a paused clock.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::{MockUpstream, Reply, client, messages_request};
use tower::{Layer, Service, ServiceExt};
use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer, KeySnapshot, PermitBody};
use tower_overload::{Error, ErrorKind, Model};

type Response = http::Response<PermitBody<hyper::body::Incoming>>;

fn limited(
    layer: &ConcurrencyPerModelLayer,
) -> impl Service<Request<Full<Bytes>>, Response = Response, Error = tower_overload::Error, Future: Send>
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

fn kind(error: &Error) -> ErrorKind {
    error.kind()
}

#[tokio::test(start_paused = true)]
async fn a_thousand_calls_over_three_models_never_exceed_the_caps() {
    let mock = MockUpstream::start().await;
    mock.set_latency(Duration::from_secs(1));
    let layer = ConcurrencyPerModelLayer::new(16)
        .limit_for("claude-opus-4-6", 4)
        .limit_for("claude-sonnet-4-6", 8)
        .max_queued(1000)
        .queue_timeout(None);
    let service = limited(&layer);
    let models = ["claude-opus-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let service = service.clone();
        let request = messages_request(&mock, models[i % 3]);
        tasks.spawn(async move {
            let response = service.oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(mock.request_count(), 1000);
    assert_eq!(mock.peak_in_flight("claude-opus-4-6"), 4);
    assert_eq!(mock.peak_in_flight("claude-sonnet-4-6"), 8);
    assert_eq!(mock.peak_in_flight("claude-haiku-4-5"), 16);
    for snapshot in layer.snapshot() {
        assert_eq!(
            (snapshot.in_flight, snapshot.queued),
            (0, 0),
            "{snapshot:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_keeps_its_permit_until_read_to_the_end() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        "m",
        [
            Reply::sse_message().chunk_interval(Duration::from_secs(10)),
            Reply::ok(),
        ],
    );
    let layer = ConcurrencyPerModelLayer::new(1);
    let service = limited(&layer);
    let streaming = service
        .clone()
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    assert!(streaming.body().holds_permit());
    let second = tokio::spawn(service.clone().oneshot(messages_request(&mock, "m")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        snapshot_of(&layer, "m").queued,
        1,
        "the second call waits for the stream"
    );
    assert_eq!(mock.request_count(), 1);

    let text = streaming.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("message_stop"));
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(mock.peak_in_flight("m"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_stream_frees_its_permit() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        "m",
        [Reply::sse_message().chunk_interval(Duration::from_secs(10))],
    );
    let layer = ConcurrencyPerModelLayer::new(1);
    let service = limited(&layer);
    let streaming = service
        .clone()
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    assert_eq!(snapshot_of(&layer, "m").in_flight, 1);
    drop(streaming);
    assert_eq!(snapshot_of(&layer, "m").in_flight, 0);
    let next = service.oneshot(messages_request(&mock, "m")).await.unwrap();
    assert_eq!(next.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_bounded_and_a_dropped_waiter_frees_its_slot() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        "m",
        [Reply::slow_body(&["a", "b"], Duration::from_secs(30))],
    );
    let layer = ConcurrencyPerModelLayer::new(1).max_queued(1);
    let service = limited(&layer);
    let holder = service
        .clone()
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();

    let mut waiter = Box::pin(service.clone().oneshot(messages_request(&mock, "m")));
    assert!(futures::poll!(waiter.as_mut()).is_pending());
    assert_eq!(snapshot_of(&layer, "m").queued, 1);

    let error = service
        .clone()
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap_err();
    assert_eq!(kind(&error), ErrorKind::QueueFull);
    assert_eq!(snapshot_of(&layer, "m").rejected, 1);

    drop(waiter);
    assert_eq!(
        snapshot_of(&layer, "m").queued,
        0,
        "the dropped waiter left the queue"
    );
    let mut again = Box::pin(service.clone().oneshot(messages_request(&mock, "m")));
    assert!(
        futures::poll!(again.as_mut()).is_pending(),
        "its slot can be taken again"
    );
    drop(holder);
    assert_eq!(again.await.unwrap().status(), 200);
    assert_eq!(
        mock.request_count(),
        2,
        "refused and dropped calls never reached the upstream"
    );
}

#[tokio::test(start_paused = true)]
async fn a_wait_times_out_with_nothing_sent() {
    let mock = MockUpstream::start().await;
    mock.push_for_model("m", [Reply::slow_body(&["a"], Duration::from_secs(60))]);
    let layer = ConcurrencyPerModelLayer::new(1).queue_timeout(Some(Duration::from_secs(5)));
    let service = limited(&layer);
    let _holder = service
        .clone()
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let error = service
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap_err();
    assert_eq!(kind(&error), ErrorKind::QueueTimeout);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert!(error.to_string().contains("for m after 5 s"), "{error}");
    let snapshot = snapshot_of(&layer, "m");
    assert_eq!((snapshot.timed_out, snapshot.queued), (1, 0));
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn aimd_shrinks_in_a_529_storm_on_one_model_and_grows_back() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        "claude-opus-4-6",
        std::iter::repeat_n(Reply::overloaded(), 20),
    );
    let layer = ConcurrencyPerModelLayer::new(16).adaptive(Aimd::default());
    let service = limited(&layer);
    for _ in 0..20 {
        let response = service
            .clone()
            .oneshot(messages_request(&mock, "claude-opus-4-6"))
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 529);
    }
    assert_eq!(
        snapshot_of(&layer, "claude-opus-4-6").limit,
        1,
        "shrunk to the floor"
    );
    let haiku = service
        .clone()
        .oneshot(messages_request(&mock, "claude-haiku-4-5"))
        .await
        .unwrap();
    drop(haiku);
    assert_eq!(
        snapshot_of(&layer, "claude-haiku-4-5").limit,
        16,
        "other models untouched"
    );

    // The storm is over: concurrent successes grow the limit back, one at a time.
    mock.set_latency(Duration::from_secs(1));
    for _ in 0..40 {
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let service = service.clone();
                let request = messages_request(&mock, "claude-opus-4-6");
                tokio::spawn(async move {
                    let response = service.oneshot(request).await.unwrap();
                    response.into_body().collect().await.unwrap();
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
    }
    assert_eq!(snapshot_of(&layer, "claude-opus-4-6").limit, 16);
    assert!(mock.peak_in_flight("claude-opus-4-6") <= 16);
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_model_share_the_default_key() {
    let mock = MockUpstream::start().await;
    let layer = ConcurrencyPerModelLayer::new(2).default_key("unknown");
    let service = limited(&layer);
    let request = Request::post(mock.url("/v1/messages"))
        .body(Full::new(Bytes::from_static(b"not json")))
        .unwrap();
    let response = service.clone().oneshot(request).await.unwrap();
    assert_eq!(snapshot_of(&layer, "unknown").in_flight, 1);
    drop(response);

    // The caller's extension wins over the body.
    let mut request = messages_request(&mock, "claude-opus-4-6");
    request.extensions_mut().insert(Model::new("pinned"));
    drop(service.oneshot(request).await.unwrap());
    assert_eq!(snapshot_of(&layer, "pinned").limit, 2);
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_model_names_cannot_grow_the_table() {
    let mock = MockUpstream::start().await;
    let layer = ConcurrencyPerModelLayer::new(2).max_keys(4);
    let service = limited(&layer);
    for i in 0..100 {
        let response = service
            .clone()
            .oneshot(messages_request(&mock, &format!("model-{i}")))
            .await
            .unwrap();
        drop(response);
    }
    let snapshot = layer.snapshot();
    assert!(snapshot.len() <= 5, "{snapshot:?}");
}

// ===== defect 4: configured models keep their key; unknown names are bounded =====

const OPUS: &str = "claude-opus-4-6";

/// `count` distinct invented model names from a seeded xorshift: a client
/// making names up, reproducibly.
fn invented_names(count: usize, seed: u64) -> Vec<String> {
    let mut state = seed.max(1);
    (0..count)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            format!("invented-{i}-{state:016x}")
        })
        .collect()
}

async fn call_and_read(
    service: impl Service<Request<Full<Bytes>>, Response = Response, Error = Error>,
    request: Request<Full<Bytes>>,
) -> Result<(), tower_overload::BoxError> {
    let response = service.oneshot(request).await?;
    response.into_body().collect().await?;
    Ok(())
}

/// Defect 4 (a): a hundred invented names held open first, then opus: opus
/// still has its own key and is capped at exactly its configured 2.
#[tokio::test(start_paused = true)]
async fn defect_4_invented_names_held_open_do_not_take_the_configured_key() {
    let mock = MockUpstream::start().await;
    mock.set_latency(Duration::from_secs(100));
    let layer = ConcurrencyPerModelLayer::new(16)
        .limit_for(OPUS, 2)
        .queue_timeout(None);
    let service = limited(&layer);
    let mut invented = tokio::task::JoinSet::new();
    for name in invented_names(100, 4) {
        let request = messages_request(&mock, &name);
        invented.spawn(call_and_read(service.clone(), request));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mock.request_count(), 64 + 16, "64 own keys, 16 in overflow");

    let mut opus = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let request = messages_request(&mock, OPUS);
        opus.spawn(call_and_read(service.clone(), request));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let snapshot = snapshot_of(&layer, OPUS);
    assert_eq!(
        (snapshot.limit, snapshot.in_flight, snapshot.queued),
        (2, 2, 8)
    );
    while let Some(done) = opus.join_next().await {
        done.unwrap().unwrap();
    }
    assert_eq!(mock.peak_in_flight(OPUS), 2);
    while let Some(done) = invented.join_next().await {
        done.unwrap().unwrap();
    }
}

/// Defect 4 (a): the same with the invented calls completed first.
#[tokio::test(start_paused = true)]
async fn defect_4_invented_names_completed_do_not_take_the_configured_key() {
    let mock = MockUpstream::start().await;
    let layer = ConcurrencyPerModelLayer::new(16).limit_for(OPUS, 2);
    let service = limited(&layer);
    for name in invented_names(100, 5) {
        call_and_read(service.clone(), messages_request(&mock, &name))
            .await
            .unwrap();
    }
    mock.set_latency(Duration::from_secs(1));
    let mut opus = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let request = messages_request(&mock, OPUS);
        opus.spawn(call_and_read(service.clone(), request));
    }
    while let Some(done) = opus.join_next().await {
        done.unwrap().unwrap();
    }
    assert_eq!(mock.peak_in_flight(OPUS), 2);
    assert_eq!(snapshot_of(&layer, OPUS).limit, 2);
    assert!(layer.snapshot().len() <= 64 + 1, "{:?}", layer.snapshot());
}

/// Defect 4 (b): 100,000 distinct names through the layer: the table stays
/// within its documented bound (`max_keys` unknown keys, the configured ones,
/// the default key and `<overflow>`), nothing panics, the configured model
/// keeps its key, and a new name still gets a key of its own once the
/// invented ones are idle.
#[tokio::test(start_paused = true)]
async fn defect_4_a_hundred_thousand_names_keep_the_table_bounded() {
    let layer = ConcurrencyPerModelLayer::new(4)
        .limit_for(OPUS, 2)
        .max_queued(0);
    let service = layer.layer(tower::service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    }));
    let request = |name: &str| {
        Request::new(Full::new(Bytes::from(format!(
            r#"{{"model":"{name}","max_tokens":1}}"#
        ))))
    };
    let bound = 64 + 1 + 1 + 1;
    // Some calls stay open (their bodies unread) so that slots are busy too.
    let mut held = std::collections::VecDeque::new();
    let opus = service.clone().oneshot(request(OPUS)).await.unwrap();
    for (i, name) in invented_names(100_000, 6).iter().enumerate() {
        match service.clone().oneshot(request(name)).await {
            Ok(response) if i % 7 == 0 => held.push_back(response),
            Ok(_) => {}
            // Only the overflow bucket, when every slot is busy, refuses.
            Err(error) => assert_eq!(kind(&error), ErrorKind::QueueFull),
        }
        if held.len() > 80 {
            held.pop_front();
        }
        if i % 1000 == 0 {
            let snapshot = layer.snapshot();
            assert!(snapshot.len() <= bound, "{i}: {} keys", snapshot.len());
        }
    }
    held.clear();
    let snapshot = snapshot_of_layer(&layer, OPUS);
    assert_eq!((snapshot.limit, snapshot.in_flight), (2, 1));
    drop(opus);
    let fresh = service
        .clone()
        .oneshot(request("late-model"))
        .await
        .unwrap();
    assert_eq!(snapshot_of_layer(&layer, "late-model").in_flight, 1);
    drop(fresh);
    assert!(layer.snapshot().len() <= bound);
}

fn snapshot_of_layer<K>(layer: &ConcurrencyPerModelLayer<K>, key: &str) -> KeySnapshot {
    layer
        .snapshot()
        .into_iter()
        .find(|s| s.key.as_str() == key)
        .unwrap_or_else(|| panic!("no key {key} in {:?}", layer.snapshot()))
}

/// Defect 4 (c): unknown names that fill every slot and the overflow queue
/// cannot block a configured model: its limit and queue are its own.
#[tokio::test(start_paused = true)]
async fn defect_4_unknown_names_cannot_block_a_configured_model() {
    let mock = MockUpstream::start().await;
    mock.set_latency(Duration::from_secs(100));
    let layer = ConcurrencyPerModelLayer::new(1)
        .limit_for(OPUS, 2)
        .max_keys(4)
        .max_queued(2)
        .queue_timeout(Some(Duration::from_secs(300)));
    let service = limited(&layer);
    let mut invented = tokio::task::JoinSet::new();
    for name in invented_names(50, 7) {
        let request = messages_request(&mock, &name);
        invented.spawn(call_and_read(service.clone(), request));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let overflow = snapshot_of(&layer, "<overflow>");
    assert_eq!(
        (overflow.in_flight, overflow.queued, overflow.rejected),
        (1, 2, 43),
        "4 own keys, then one overflow bucket with the default limit"
    );

    let start = tokio::time::Instant::now();
    let mut opus = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let request = messages_request(&mock, OPUS);
        opus.spawn(call_and_read(service.clone(), request));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let snapshot = snapshot_of(&layer, OPUS);
    assert_eq!(
        (
            snapshot.limit,
            snapshot.in_flight,
            snapshot.queued,
            snapshot.rejected
        ),
        (2, 2, 2, 0)
    );
    while let Some(done) = opus.join_next().await {
        done.unwrap().unwrap();
    }
    assert_eq!(start.elapsed(), Duration::from_secs(200), "two rounds of 2");
    assert_eq!(mock.peak_in_flight(OPUS), 2);
    let mut refused = 0;
    while let Some(done) = invented.join_next().await {
        if let Err(error) = done.unwrap() {
            assert_eq!(Error::from_inner(error).kind(), ErrorKind::QueueFull);
            refused += 1;
        }
    }
    assert_eq!(refused, 43);
}

/// Defect 4 (d): a waiter dropped while queued, and one whose wait timed
/// out, leave no stale entry: once the calls end, their keys are evicted for
/// new names; a key with a call in flight is never evicted.
#[tokio::test(start_paused = true)]
async fn defect_4_cancelled_waiters_leave_no_stale_entry() {
    let mock = MockUpstream::start().await;
    let layer = ConcurrencyPerModelLayer::new(1)
        .max_keys(2)
        .queue_timeout(Some(Duration::from_secs(5)));
    let service = limited(&layer);
    let a = service
        .clone()
        .oneshot(messages_request(&mock, "a"))
        .await
        .unwrap();
    let b = service
        .clone()
        .oneshot(messages_request(&mock, "b"))
        .await
        .unwrap();

    let mut dropped = Box::pin(service.clone().oneshot(messages_request(&mock, "a")));
    assert!(futures::poll!(dropped.as_mut()).is_pending());
    assert_eq!(snapshot_of(&layer, "a").queued, 1);
    drop(dropped);
    let error = service
        .clone()
        .oneshot(messages_request(&mock, "b"))
        .await
        .unwrap_err();
    assert_eq!(kind(&error), ErrorKind::QueueTimeout);

    // Both slots busy: a third name shares the overflow bucket, and the busy keys stay.
    let c = service
        .clone()
        .oneshot(messages_request(&mock, "c"))
        .await
        .unwrap();
    assert_eq!(snapshot_of(&layer, "<overflow>").in_flight, 1);
    assert_eq!(snapshot_of(&layer, "a").in_flight, 1);
    assert_eq!(snapshot_of(&layer, "b").in_flight, 1);
    drop(c);

    drop(a);
    drop(b);
    for name in ["d", "e"] {
        let response = service
            .clone()
            .oneshot(messages_request(&mock, name))
            .await
            .unwrap();
        assert_eq!(
            snapshot_of(&layer, name).in_flight,
            1,
            "{name} has its own key"
        );
        drop(response);
    }
    let keys: Vec<String> = layer
        .snapshot()
        .iter()
        .map(|s| s.key.as_str().to_owned())
        .collect();
    assert_eq!(keys, ["d", "e"]);
}

// A call that holds its model's permit while it waits for the global one,
// then is dropped, gives the model's permit back: without that, the model
// would stay blocked after the global permit is free again.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_waiting_for_the_global_permit_returns_its_key_permit() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        "a",
        [Reply::slow_body(&["a", "b"], Duration::from_secs(30))],
    );
    let layer = ConcurrencyPerModelLayer::new(1).global_limit(Some(1));
    let service = limited(&layer);
    let holder = service
        .clone()
        .oneshot(messages_request(&mock, "a"))
        .await
        .unwrap();

    // Takes b's only permit, then waits for the global one that `holder` has.
    let mut waiter = Box::pin(service.clone().oneshot(messages_request(&mock, "b")));
    assert!(futures::poll!(waiter.as_mut()).is_pending());
    drop(waiter);
    drop(holder);

    let next = tokio::time::timeout(
        Duration::from_secs(5),
        service.oneshot(messages_request(&mock, "b")),
    )
    .await
    .expect("b's permit came back")
    .unwrap();
    assert_eq!(next.status(), 200);
    assert_eq!(snapshot_of(&layer, "b").in_flight, 1);
}
