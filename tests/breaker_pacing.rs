//! An outsider's attempts to break `RateLimitPacingLayer` (issue 14):
//! leaked or double-returned reservations, the FIFO queue, hostile
//! upstreams and clients, and a clock that runs for days.
//!
//! Over the loopback mock where the network matters; a `service_fn`
//! upstream where only the layer's arithmetic does (100,000 model names,
//! an SSE body one byte per frame).

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::{Instant, timeout};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_overload::pacing::{PacedBody, PacingLimits, PacingSnapshot, RateLimitPacingLayer};
use tower_overload::{Error, ErrorKind};

use support::{MockUpstream, Reply, TestBody, client};

const MINUTE: Duration = Duration::from_secs(60);

fn limits(rpm: Option<u64>, itpm: Option<u64>, otpm: Option<u64>) -> PacingLimits {
    PacingLimits {
        requests_per_minute: rpm,
        input_tokens_per_minute: itpm,
        output_tokens_per_minute: otpm,
    }
}

/// A Messages body with `max_tokens` written as given (so any text fits).
fn body(model: &str, max_tokens: &str, tag: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"call {tag}"}}]}}"#
    ))
}

fn request(mock: &MockUpstream, body: Bytes) -> Request<TestBody> {
    Request::post(mock.url("/v1/messages"))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap()
}

/// A 200 JSON message reporting this usage.
fn usage_reply(input: &str, output: &str) -> Reply {
    Reply::raw(
        200,
        format!(
            r#"{{"type":"message","content":[{{"type":"text","text":"hi"}}],"usage":{{"input_tokens":{input},"output_tokens":{output}}}}}"#
        ),
    )
    .header("content-type", "application/json")
}

type Paced = tower_overload::pacing::RateLimitPacing<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        TestBody,
    >,
>;

fn paced(layer: &RateLimitPacingLayer) -> Paced {
    layer.layer(client())
}

async fn call(
    service: &Paced,
    request: Request<TestBody>,
) -> Result<Response<PacedBody<Incoming>>, Error> {
    service.clone().oneshot(request).await
}

async fn drain(response: Response<PacedBody<Incoming>>) {
    response.into_body().collect().await.unwrap();
}

fn key(layer: &RateLimitPacingLayer, name: &str) -> PacingSnapshot {
    layer
        .snapshot()
        .into_iter()
        .find(|s| s.key.as_str() == name)
        .unwrap_or_else(|| panic!("no key {name}"))
}

/// Every reservation returned, nobody queued, and (after a full refill
/// period) every bucket full.
async fn assert_settled_and_full(layer: &RateLimitPacingLayer, name: &str) {
    let s = key(layer, name);
    assert_eq!(
        (s.reserved_input_tokens, s.reserved_output_tokens, s.queued),
        (0, 0, 0),
        "{s:?}"
    );
    tokio::time::sleep(MINUTE + Duration::from_secs(1)).await;
    let s = key(layer, name);
    for bucket in [s.requests, s.input_tokens, s.output_tokens]
        .into_iter()
        .flatten()
    {
        assert_eq!(bucket.available, bucket.capacity as f64, "{s:?}");
    }
}

/// Defect B1 (breaker 14): a response reporting absurd usage (u64::MAX
/// tokens) on a small bucket made the next call panic while computing its
/// wait (`Duration::from_secs_f64` overflowed), inside the key's lock;
/// believing the report would stall the key for ages; and the estimator,
/// remembering it for ~160 calls at the lowest ratio, refused the next
/// calls as larger than the bucket.
#[tokio::test(start_paused = true)]
async fn defect_b1_absurd_usage_neither_panics_nor_stalls_the_key() {
    let mock = MockUpstream::start().await;
    let layer = RateLimitPacingLayer::new()
        .limits_for("m", limits(None, Some(200), Some(50)))
        .queue_timeout(None);
    let service = paced(&layer);
    mock.push([usage_reply("18446744073709551615", "18446744073709551615")]);
    drain(
        call(&service, request(&mock, body("m", "10", 1)))
            .await
            .unwrap(),
    )
    .await;
    mock.push([usage_reply("10", "1")]);
    let next = timeout(
        3 * MINUTE,
        call(&service, request(&mock, body("m", "10", 2))),
    )
    .await
    .expect("the debt of one bogus report is paid within minutes")
    .unwrap();
    drain(next).await;
    assert_settled_and_full(&layer, "m").await;
}

/// Defect B2 (breaker 14): `max_tokens` of u64::MAX on a key with no
/// output bucket (not learned yet) was added to the reserved count: the
/// second such call in flight overflowed it (a panic in debug, inside the
/// lock); so did the sum of reported input tokens.
#[tokio::test(start_paused = true)]
async fn defect_b2_huge_counts_do_not_overflow_the_counters() {
    let mock = MockUpstream::start().await;
    let layer = RateLimitPacingLayer::new();
    let service = paced(&layer);
    let max = "18446744073709551615";
    mock.set_default(usage_reply(max, "3").delay(Duration::from_secs(1)));
    let calls: Vec<_> = (0..3)
        .map(|i| call(&service, request(&mock, body("m", max, i))))
        .collect();
    for response in futures::future::join_all(calls).await {
        drain(response.unwrap()).await;
    }
    let s = key(&layer, "m");
    assert_eq!((s.reserved_input_tokens, s.reserved_output_tokens), (0, 0));
    assert_eq!(s.requests_sent, 3);
}

/// Cancellation at every await point returns every reservation: queued
/// (head and behind), in flight, mid-body, after an inner error and after
/// an error status.
#[tokio::test(start_paused = true)]
async fn cancellation_anywhere_returns_every_reservation() {
    let mock = MockUpstream::start().await;
    let layer = RateLimitPacingLayer::new()
        .limits_for("m", limits(Some(3), Some(10_000), Some(10_000)))
        .queue_timeout(None);
    let service = paced(&layer);
    // In flight, then cancelled.
    mock.push([Reply::ok().delay(Duration::from_secs(10))]);
    let in_flight = tokio::spawn({
        let service = service.clone();
        let request = request(&mock, body("m", "1000", 0));
        async move { call(&service, request).await.map(drop) }
    });
    // Mid-body, then dropped.
    mock.push([Reply::slow_body(
        &["{\"type\":\"message\",", "\"content\":[]", "}"],
        Duration::from_secs(5),
    )
    .header("content-type", "application/json")]);
    let mid_body = call(&service, request(&mock, body("m", "1000", 1)))
        .await
        .unwrap();
    // The third request slot: an inner error (connection dropped).
    mock.push([Reply::drop_connection()]);
    let error = call(&service, request(&mock, body("m", "1000", 2))).await;
    assert!(error.is_err());
    // RPM is out: two queued calls, the head sleeping, then both dropped.
    let head = tokio::spawn({
        let service = service.clone();
        let request = request(&mock, body("m", "1000", 3));
        async move { call(&service, request).await.map(drop) }
    });
    let behind = tokio::spawn({
        let service = service.clone();
        let request = request(&mock, body("m", "1000", 4));
        async move { call(&service, request).await.map(drop) }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = key(&layer, "m");
    assert_eq!(s.queued, 2, "{s:?}");
    assert_eq!(s.reserved_output_tokens, 2_000, "{s:?}");
    head.abort();
    behind.abort();
    in_flight.abort();
    let _ = (head.await, behind.await, in_flight.await);
    drop(mid_body);
    // An error status gives back too.
    tokio::time::sleep(MINUTE).await;
    mock.push([Reply::api_error()]);
    let status = call(&service, request(&mock, body("m", "1000", 5)))
        .await
        .unwrap();
    assert_eq!(status.status(), 500);
    drain(status).await;
    assert_settled_and_full(&layer, "m").await;
}

/// A burst queues first come, first served; a dropped waiter (head or
/// not) loses nobody's wake-up.
#[tokio::test(start_paused = true)]
async fn a_burst_keeps_its_order_and_dropped_waiters_wake_the_rest() {
    let mock = MockUpstream::start().await;
    mock.set_default(usage_reply("5", "5"));
    let layer = RateLimitPacingLayer::new()
        .limits_for("m", limits(Some(60), None, None))
        .queue_timeout(None);
    let mut service = paced(&layer);
    // Spend the whole minute's requests.
    for i in 0..60 {
        drain(
            call(&service, request(&mock, body("m", "5", 1000 + i)))
                .await
                .unwrap(),
        )
        .await;
    }
    let mut handles = Vec::new();
    for i in 0..20 {
        // `call` in order on this task: the queue order is the call order.
        let future = service
            .ready()
            .await
            .unwrap()
            .call(request(&mock, body("m", "5", i)));
        handles.push(tokio::spawn(async move {
            let response = future.await?;
            response.into_body().collect().await.unwrap();
            Ok::<_, Error>(())
        }));
    }
    // Drop the head while it sleeps, and some behind it.
    tokio::task::yield_now().await;
    for i in [0, 5, 6, 19] {
        handles[i].abort();
    }
    let start = Instant::now();
    for (i, handle) in handles.into_iter().enumerate() {
        let result = timeout(Duration::from_secs(30), handle)
            .await
            .unwrap_or_else(|_| panic!("call {i} slept past its turn"));
        if ![0, 5, 6, 19].contains(&i) {
            result.unwrap().unwrap();
        }
    }
    assert!(
        start.elapsed() <= Duration::from_secs(17),
        "{:?}",
        start.elapsed()
    );
    let order: Vec<String> = mock
        .requests()
        .iter()
        .skip(60)
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    let expected: Vec<usize> = (0..20).filter(|i| ![0, 5, 6, 19].contains(i)).collect();
    assert_eq!(order.len(), expected.len());
    for (body, i) in order.iter().zip(expected) {
        assert!(
            body.contains(&format!("\"call {i}\"")),
            "{body} is not call {i}"
        );
    }
    assert_settled_and_full(&layer, "m").await;
}

/// The queue bound and the timeout are exact.
#[tokio::test(start_paused = true)]
async fn queue_bound_and_timeout_are_exact() {
    let mock = MockUpstream::start().await;
    mock.set_default(usage_reply("5", "5"));
    let layer = RateLimitPacingLayer::new()
        .limits_for("m", limits(Some(1), None, None))
        .max_queued(3)
        .queue_timeout(Some(Duration::from_secs(5)));
    let service = paced(&layer);
    drain(
        call(&service, request(&mock, body("m", "5", 0)))
            .await
            .unwrap(),
    )
    .await;
    let start = Instant::now();
    let queued: Vec<_> = (1..=3)
        .map(|i| {
            let service = service.clone();
            let request = request(&mock, body("m", "5", i));
            tokio::spawn(async move { call(&service, request).await.map(drop) })
        })
        .collect();
    tokio::task::yield_now().await;
    assert_eq!(key(&layer, "m").queued, 3);
    let full = call(&service, request(&mock, body("m", "5", 4)))
        .await
        .unwrap_err();
    assert_eq!(full.kind(), ErrorKind::PacingQueueFull);
    for handle in queued {
        let error = handle.await.unwrap().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::PacingTimeout);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
    assert_eq!(mock.request_count(), 1);
    assert_settled_and_full(&layer, "m").await;
}

/// Absurd or malformed `anthropic-ratelimit-*` headers and a `retry-after`
/// of days: nothing panics, a pause lasts at most a minute, calls go on.
#[tokio::test(start_paused = true)]
async fn hostile_rate_limit_headers_are_survived() {
    let mock = MockUpstream::start().await;
    let layer = RateLimitPacingLayer::new().queue_timeout(None);
    let service = paced(&layer);
    let p = "anthropic-ratelimit-";
    let max = "18446744073709551615";
    let replies = [
        usage_reply("5", "5")
            .header(&format!("{p}requests-limit"), "0")
            .header(&format!("{p}requests-remaining"), "0")
            .header(&format!("{p}requests-reset"), "1970-01-01T00:00:00Z"),
        usage_reply("5", "5")
            .header(&format!("{p}input-tokens-limit"), max)
            .header(&format!("{p}input-tokens-remaining"), max)
            .header(&format!("{p}output-tokens-limit"), "100")
            .header(&format!("{p}output-tokens-remaining"), max),
        usage_reply("5", "5")
            .header(&format!("{p}input-tokens-limit"), "garbage")
            .header(&format!("{p}input-tokens-remaining"), "-5")
            .header(&format!("{p}input-tokens-reset"), "not a date"),
        usage_reply("5", "5")
            .header(&format!("{p}input-tokens-limit"), "1000")
            .header(&format!("{p}input-tokens-remaining"), "0")
            .header(&format!("{p}input-tokens-reset"), "9999-12-31T23:59:59Z"),
        Reply::rate_limited().retry_after("864000"),
        usage_reply(max, max).header(&format!("{p}requests-limit"), max),
        usage_reply("5", "5").header(&format!("{p}requests-remaining"), "0"),
    ];
    let start = Instant::now();
    for (i, reply) in replies.into_iter().enumerate() {
        mock.push([reply]);
        let response = timeout(
            3 * MINUTE,
            call(&service, request(&mock, body("m", "5", i))),
        )
        .await
        .unwrap_or_else(|_| panic!("call {i} stalled"))
        .unwrap();
        drain(response).await;
    }
    assert!(start.elapsed() < 10 * MINUTE, "{:?}", start.elapsed());
    assert_settled_and_full(&layer, "m").await;
}

/// A `retry-after` of days pauses the key for at most a minute.
#[tokio::test(start_paused = true)]
async fn a_retry_after_of_days_pauses_a_minute_at_most() {
    let mock = MockUpstream::start().await;
    let layer = RateLimitPacingLayer::new()
        .limits_for("m", limits(Some(1_000), None, None))
        .queue_timeout(None);
    let service = paced(&layer);
    mock.push([Reply::rate_limited().retry_after("864000")]);
    drain(
        call(&service, request(&mock, body("m", "5", 0)))
            .await
            .unwrap(),
    )
    .await;
    let start = Instant::now();
    mock.push([usage_reply("5", "5")]);
    drain(
        call(&service, request(&mock, body("m", "5", 1)))
            .await
            .unwrap(),
    )
    .await;
    assert!(
        start.elapsed() <= MINUTE + Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

/// Defect D (breaker 14): a 429 with `retry-after` but no
/// `anthropic-ratelimit-*` headers (a proxy, a gateway) on a key whose
/// limits are not known pauses nothing: every clone collects its own 429.
#[tokio::test(start_paused = true)]
async fn defect_d_a_bare_429_pauses_a_key_without_limits() {
    let mock = MockUpstream::start().await;
    let layer = RateLimitPacingLayer::new().queue_timeout(None);
    let service = paced(&layer);
    mock.push([Reply::rate_limited().retry_after("30")]);
    drain(
        call(&service, request(&mock, body("m", "5", 0)))
            .await
            .unwrap(),
    )
    .await;
    mock.push([usage_reply("5", "5")]);
    let start = Instant::now();
    drain(
        call(&service, request(&mock, body("m", "5", 1)))
            .await
            .unwrap(),
    )
    .await;
    assert!(
        start.elapsed() >= Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

/// Finding C (breaker 14): the input estimate of a body carrying a base64
/// image or PDF (bytes / 3 before calibration, / 32 at most after) makes a
/// 200 KB image call "larger than the whole bucket" on a 30k ITPM tier,
/// though the API counts it at a few thousand tokens: it is refused for
/// good, without being sent. Only an exact count should refuse at once; an
/// estimate above the bucket could reserve the whole bucket.
#[tokio::test(start_paused = true)]
async fn finding_c_an_image_body_is_not_refused_on_an_estimate() {
    let mock = MockUpstream::start().await;
    mock.set_default(usage_reply("1600", "5"));
    let layer = RateLimitPacingLayer::new()
        .limits_for("m", limits(None, Some(30_000), None))
        .queue_timeout(None);
    let service = paced(&layer);
    let image = "A".repeat(200_000);
    let body = Bytes::from(format!(
        r#"{{"model":"m","max_tokens":5,"messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{image}"}}}}]}}]}}"#
    ));
    let response = call(&service, request(&mock, body)).await;
    assert!(response.is_ok(), "{:?}", response.err());
}

/// A paused clock advanced by days: no overflow, buckets full, calls go.
#[tokio::test(start_paused = true)]
async fn a_clock_running_for_days_keeps_the_buckets_sane() {
    let mock = MockUpstream::start().await;
    mock.set_default(usage_reply("5", "5"));
    let layer = RateLimitPacingLayer::new()
        .limits_for("m", limits(Some(2), Some(1_000), Some(1_000)))
        .queue_timeout(None);
    let service = paced(&layer);
    for day in 0..5u64 {
        for i in 0..2 {
            drain(
                call(&service, request(&mock, body("m", "500", i)))
                    .await
                    .unwrap(),
            )
            .await;
        }
        tokio::time::advance(Duration::from_secs(86_400 * (day + 1))).await;
        let s = key(&layer, "m");
        assert_eq!(s.requests.unwrap().available, 2.0, "{s:?}");
        assert_eq!(s.output_tokens.unwrap().available, 1_000.0, "{s:?}");
    }
    assert_settled_and_full(&layer, "m").await;
}

/// Hostile clients: 100,000 model names use at most `max_keys` + 1 keys;
/// no model, duplicate members (the last counts, as for the API).
#[tokio::test(start_paused = true)]
async fn hostile_clients_are_bounded() {
    let layer = RateLimitPacingLayer::new();
    let upstream = service_fn(|_: Request<TestBody>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            br#"{"usage":{"input_tokens":1,"output_tokens":1}}"#,
        ))))
    });
    let service = layer.layer(upstream);
    for i in 0..100_000 {
        let body = Full::new(Bytes::from(format!(
            r#"{{"model":"m-{i}","max_tokens":1,"messages":[]}}"#
        )));
        let response = service.clone().oneshot(Request::new(body)).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    assert!(layer.snapshot().len() <= 65, "{}", layer.snapshot().len());
    let pending = service
        .clone()
        .oneshot(Request::new(Full::new(Bytes::from_static(
            br#"{"model":"a","max_tokens":7,"model":"dup","max_tokens":99,"messages":[]}"#,
        ))));
    let response = pending.await.unwrap();
    let held = layer.snapshot();
    let other = held.iter().find(|s| s.key.as_str() == "<other>").unwrap();
    assert_eq!(
        other.reserved_output_tokens, 99,
        "the last max_tokens counts"
    );
    drop(response);
    let response = service
        .clone()
        .oneshot(Request::new(Full::new(Bytes::from_static(
            b"{\"messages\":[]}",
        ))))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    for s in layer.snapshot() {
        assert_eq!(
            (s.reserved_input_tokens, s.reserved_output_tokens),
            (0, 0),
            "{s:?}"
        );
    }
}

/// A body yielding one byte per frame.
struct Trickle(Bytes);

impl Body for Trickle {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0.is_empty() {
            return Poll::Ready(None);
        }
        let byte = self.0.split_to(1);
        Poll::Ready(Some(Ok(Frame::data(byte))))
    }
}

/// SSE usage split at every byte, and a JSON `usage` split across chunks
/// past the kept tail, reconcile as if whole.
#[tokio::test(start_paused = true)]
async fn usage_split_at_every_byte_reconciles() {
    let stream: &'static str = concat!(
        "event: message_start\r\n",
        "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":40,\"cache_read_input_tokens\":900,\"output_tokens\":1}}}\r\n\r\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage usage\"}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":30}}\n\n",
    );
    let filler = "x".repeat(20_000);
    let json = format!(
        r#"{{"type":"message","content":[{{"type":"text","text":"{filler}"}}],"usage":{{"input_tokens":40,"output_tokens":30}}}}"#
    );
    for sse in [true, false] {
        let json = json.clone();
        let upstream = service_fn(move |_: Request<TestBody>| {
            let json = json.clone();
            async move {
                let (body, kind) = if sse {
                    (Bytes::from_static(stream.as_bytes()), "text/event-stream")
                } else {
                    (Bytes::from(json), "application/json")
                };
                let mut response = Response::new(Trickle(body));
                response
                    .headers_mut()
                    .insert("content-type", kind.parse().unwrap());
                Ok::<_, Infallible>(response)
            }
        });
        let layer =
            RateLimitPacingLayer::new().limits_for("m", limits(None, Some(10_000), Some(10_000)));
        let service = layer.layer(upstream);
        let body = Full::new(body("m", "1000", 0));
        let response = service.oneshot(Request::new(body)).await.unwrap();
        response.into_body().collect().await.unwrap();
        let s = key(&layer, "m");
        assert_eq!((s.reserved_input_tokens, s.reserved_output_tokens), (0, 0));
        assert_eq!(
            s.input_tokens.unwrap().available,
            10_000.0 - 40.0,
            "sse {sse}: {s:?}"
        );
        assert_eq!(
            s.output_tokens.unwrap().available,
            10_000.0 - 30.0,
            "sse {sse}: {s:?}"
        );
    }
}

/// A body that never ends keeps its reservation; dropping it settles.
#[tokio::test(start_paused = true)]
async fn a_body_that_never_ends_holds_until_dropped() {
    let layer =
        RateLimitPacingLayer::new().limits_for("m", limits(Some(10), Some(10_000), Some(10_000)));
    let upstream = service_fn(|_: Request<TestBody>| async {
        let body = http_body_util::StreamBody::new(futures::stream::pending::<
            Result<Frame<Bytes>, Infallible>,
        >());
        Ok::<_, Infallible>(Response::new(body))
    });
    let service = layer.layer(upstream);
    let response = service
        .oneshot(Request::new(Full::new(body("m", "1000", 0))))
        .await
        .unwrap();
    let mut body = response.into_body();
    let frame = timeout(Duration::from_secs(3_600), body.frame()).await;
    assert!(frame.is_err(), "never ends");
    assert_eq!(key(&layer, "m").reserved_output_tokens, 1_000);
    drop(body);
    assert_settled_and_full(&layer, "m").await;
}
