//! ModelFallbackLayer against the loopback mock upstream, through a real
//! hyper-util client, on a paused clock.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{MockUpstream, Reply, client, messages_request};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_overload::classify::Class;
use tower_overload::fallback::{FallbackStep, ModelFallbackLayer, ServedBy};
use tower_overload::model;
use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};

const OPUS: &str = "claude-opus-4-6";
const SONNET: &str = "claude-sonnet-4-6";
const HAIKU: &str = "claude-haiku-4-5";

fn layer() -> ModelFallbackLayer {
    ModelFallbackLayer::new([OPUS, SONNET, HAIKU])
        .served_by_header(http::HeaderName::from_static("x-served-by-model"))
}

type Response = http::Response<hyper::body::Incoming>;

fn falling_back(
    layer: &ModelFallbackLayer,
) -> impl Service<Request<Full<Bytes>>, Response = Response, Error = tower_overload::Error, Future: Send>
+ Clone
+ Send
+ 'static {
    layer.layer(client())
}

fn served<T>(response: &http::Response<T>) -> &ServedBy {
    response
        .extensions()
        .get::<ServedBy>()
        .expect("ServedBy on a chain call")
}

fn requests_for(mock: &MockUpstream, model: &str) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.model.as_deref() == Some(model))
        .count()
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_primary_falls_back_with_only_the_model_changed() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(OPUS, [Reply::overloaded()]);
    let response = falling_back(&layer())
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-served-by-model"], SONNET);
    let served = served(&response);
    assert_eq!(
        (served.requested.as_str(), served.served.as_str()),
        (OPUS, SONNET)
    );
    assert_eq!(served.fallbacks.len(), 1);
    assert_eq!(served.fallbacks[0].class, Some(Class::Overloaded));
    assert_eq!(served.fallbacks[0].request_ids.len(), 1);

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    let original = &requests[0].body;
    let rewritten = &requests[1].body;
    assert_eq!(
        *rewritten,
        model::rewrite(original, SONNET).unwrap(),
        "byte-identical but for model"
    );
    let mut a: serde_json::Value = serde_json::from_slice(original).unwrap();
    let b: serde_json::Value = serde_json::from_slice(rewritten).unwrap();
    a["model"] = SONNET.into();
    assert_eq!(a, b);
    assert_eq!(
        requests[1].headers["x-api-key"],
        requests[0].headers["x-api-key"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_cooling_primary_is_not_contacted_then_probed() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(OPUS, std::iter::repeat_n(Reply::overloaded(), 5));
    let layer = layer();
    let service = falling_back(&layer);
    for _ in 0..5 {
        let response = service
            .clone()
            .oneshot(messages_request(&mock, OPUS))
            .await
            .unwrap();
        assert_eq!(served(&response).served.as_str(), SONNET);
    }
    assert_eq!(requests_for(&mock, OPUS), 5);
    // Five overloaded calls within a minute, no success between: opus rests for 2 s.
    for _ in 0..4 {
        let response = service
            .clone()
            .oneshot(messages_request(&mock, OPUS))
            .await
            .unwrap();
        let served = served(&response);
        assert_eq!(served.served.as_str(), SONNET);
        assert!(served.fallbacks[0].skipped);
        tokio::time::sleep(Duration::from_millis(450)).await;
    }
    assert_eq!(
        requests_for(&mock, OPUS),
        5,
        "not contacted while cooling down"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = service
        .clone()
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(
        served(&response).served.as_str(),
        OPUS,
        "the probe succeeded"
    );
    assert_eq!(requests_for(&mock, OPUS), 6);
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert!(!served(&response).fell_back(), "closed again");
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_chain_returns_the_last_answer_with_the_whole_story() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let response = falling_back(&layer())
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 529);
    let served = served(&response);
    assert_eq!(served.served.as_str(), HAIKU);
    let tried: Vec<&str> = served.fallbacks.iter().map(|f| f.model.as_str()).collect();
    assert_eq!(tried, [OPUS, SONNET]);
    assert_eq!(mock.request_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn models_outside_the_chains_and_client_errors_pass_through() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let service = falling_back(&layer());
    let response = service
        .clone()
        .oneshot(messages_request(&mock, "gpt-4o"))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 529);
    assert!(response.extensions().get::<ServedBy>().is_none());
    assert_eq!(mock.request_count(), 1);

    mock.push_for_model(OPUS, [Reply::error(400, "invalid_request_error", "bad")]);
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert!(
        !served(&response).fell_back(),
        "a 400 never triggers a fallback"
    );
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn after_a_cooldown_a_crowd_sends_a_single_probe() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        OPUS,
        [
            Reply::overloaded(),
            Reply::overloaded(),
            Reply::overloaded(),
            Reply::overloaded(),
            Reply::overloaded(),
            Reply::ok().delay(Duration::from_secs(2)),
        ],
    );
    let layer = layer();
    let service = falling_back(&layer);
    for _ in 0..5 {
        service
            .clone()
            .oneshot(messages_request(&mock, OPUS))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let service = service.clone();
        let request = messages_request(&mock, OPUS);
        tasks.spawn(async move {
            let response = service.oneshot(request).await.unwrap();
            served(&response).served.clone()
        });
    }
    let mut served_by_opus = 0;
    while let Some(model) = tasks.join_next().await {
        if model.unwrap().as_str() == OPUS {
            served_by_opus += 1;
        }
    }
    assert_eq!(requests_for(&mock, OPUS), 6, "one probe, not a stampede");
    assert_eq!(served_by_opus, 1);
}

#[tokio::test(start_paused = true)]
async fn with_retries_inside_a_model_is_given_up_only_after_its_retries() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(OPUS, std::iter::repeat_n(Reply::overloaded(), 5));
    let service = ServiceBuilder::new()
        .layer(layer())
        .layer(OverloadRetryLayer::new(
            RetryPolicy::foreground().budget(None).seed(2),
        ))
        .service(client());
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let served = response.extensions().get::<ServedBy>().unwrap();
    assert_eq!(served.served.as_str(), SONNET);
    assert_eq!(
        served.fallbacks[0].request_ids.len(),
        5,
        "every attempt's request id"
    );
    assert_eq!(requests_for(&mock, OPUS), 5);
    assert_eq!(requests_for(&mock, SONNET), 1);
}

#[tokio::test(start_paused = true)]
async fn a_chain_step_can_route_to_another_endpoint() {
    let primary = MockUpstream::start().await;
    let gateway = MockUpstream::start().await;
    primary.set_default(Reply::overloaded());
    let gateway_url = gateway.url("/gateway/v1/messages");
    let layer = ModelFallbackLayer::new([
        FallbackStep::new(OPUS),
        FallbackStep::new(HAIKU).route(move |parts| {
            parts.uri = gateway_url.clone();
            parts
                .headers
                .insert("x-gateway", http::HeaderValue::from_static("1"));
        }),
    ]);
    let response = falling_back(&layer)
        .oneshot(messages_request(&primary, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let routed = &gateway.requests()[0];
    assert_eq!(routed.uri.path(), "/gateway/v1/messages");
    assert_eq!(routed.headers["x-gateway"], "1");
    assert_eq!(routed.model.as_deref(), Some(HAIKU));
}

#[tokio::test(start_paused = true)]
async fn a_typed_overload_error_from_the_retry_layer_falls_back_too() {
    use tower_overload::retry::FinalFailure;
    let mock = MockUpstream::start().await;
    mock.push_for_model(OPUS, std::iter::repeat_n(Reply::overloaded(), 2));
    let policy = RetryPolicy::foreground()
        .budget(None)
        .max_attempts(2)
        .final_failure(FinalFailure::Error)
        .seed(4);
    let service = ServiceBuilder::new()
        .layer(layer())
        .layer(OverloadRetryLayer::new(policy))
        .service(client());
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    let served = response.extensions().get::<ServedBy>().unwrap();
    assert_eq!(served.served.as_str(), SONNET);
    assert_eq!(served.fallbacks[0].class, Some(Class::Overloaded));

    // A typed client error does not fall back, and comes back as it was.
    mock.push_for_model(OPUS, [Reply::error(401, "authentication_error", "bad key")]);
    let policy = RetryPolicy::foreground().final_failure(FinalFailure::Error);
    let service = ServiceBuilder::new()
        .layer(layer())
        .layer(OverloadRetryLayer::new(policy))
        .service(client());
    let error = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), tower_overload::ErrorKind::NotRetryable);
}

/// Defect 10: a probe slot taken for a model the body cannot be rewritten
/// for (the model came from the `Model` extension) must be given back.
#[tokio::test(start_paused = true)]
async fn defect_10_a_probe_slot_is_released_when_the_body_cannot_be_rewritten() {
    use tower_overload::fallback::Cooldown;
    let mock = MockUpstream::start().await;
    let layer = ModelFallbackLayer::new([OPUS, SONNET, HAIKU]).cooldown(Cooldown {
        overloads: 1,
        cooldown: Duration::from_secs(10),
        max_cooldown: Duration::from_secs(10),
        ..Cooldown::default()
    });
    let service = layer.layer(client());

    // Sonnet's breaker opens.
    mock.push_for_model(SONNET, [Reply::overloaded()]);
    let response = service
        .clone()
        .oneshot(messages_request(&mock, SONNET))
        .await
        .unwrap();
    assert_eq!(served(&response).served.as_str(), HAIKU);
    tokio::time::sleep(Duration::from_secs(11)).await;

    // A call for opus named by the extension, its body without a model:
    // opus is overloaded, and sonnet (due a probe) cannot be written into the body.
    mock.push([Reply::overloaded()]);
    let mut request = Request::post(mock.url("/v1/messages"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"max_tokens":9,"messages":[]}"#,
        )))
        .unwrap();
    request
        .extensions_mut()
        .insert(tower_overload::Model::new(OPUS));
    let response = service.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status().as_u16(), 529, "nothing to fall back to");

    // Sonnet is healthy again and must get its probe.
    let response = service
        .clone()
        .oneshot(messages_request(&mock, SONNET))
        .await
        .unwrap();
    assert_eq!(
        served(&response).served.as_str(),
        SONNET,
        "the probe slot leaked: sonnet is skipped for good"
    );
    assert!(!service.is_cooling_down(SONNET));
}

/// The presets as shipped: fallback outside, the foreground retry policy inside.
fn shipped() -> impl Service<
    Request<Full<Bytes>>,
    Response = http::Response<tower_overload::body::PeekedBody<hyper::body::Incoming>>,
    Error = tower_overload::Error,
    Future: Send,
> + Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        .layer(ModelFallbackLayer::new([OPUS, SONNET]))
        .layer(OverloadRetryLayer::new(RetryPolicy::foreground().seed(12)))
        .service(client())
}

/// Defect 12: once opus's breaker opens, calls already retrying it stop at
/// their next decision and move on, instead of finishing their retry loops.
#[tokio::test(start_paused = true)]
async fn defect_12_a_dead_primary_costs_about_one_attempt_per_call() {
    let mock = MockUpstream::start().await;
    mock.storm(OPUS, Duration::from_secs(3600), Reply::overloaded());
    let service = shipped();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let service = service.clone();
        let request = messages_request(&mock, OPUS);
        tasks.spawn(async move { service.oneshot(request).await.unwrap() });
    }
    while let Some(response) = tasks.join_next().await {
        let response = response.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(served(&response).served.as_str(), SONNET);
    }
    let opus = requests_for(&mock, OPUS);
    println!("opus attempts for 50 calls: {opus}");
    assert!(
        opus as f64 / 50.0 <= 1.3,
        "{opus} opus attempts for 50 calls"
    );
    assert_eq!(requests_for(&mock, SONNET), 50);
}

/// Defect 13: a recovered primary gets its traffic back within seconds,
/// and probing it during the storm costs next to nothing.
#[tokio::test(start_paused = true)]
async fn defect_13_a_recovered_primary_gets_traffic_back_within_seconds() {
    let mock = MockUpstream::start().await;
    let service = shipped();
    let start = tokio::time::Instant::now();
    let storm = Duration::from_secs(40);
    mock.storm(OPUS, storm, Reply::overloaded());
    let storm_end = start + storm;
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let mut tasks = tokio::task::JoinSet::new();
    // 20 calls/s for 70 s.
    for _ in 0..1400 {
        ticker.tick().await;
        let service = service.clone();
        let request = messages_request(&mock, OPUS);
        tasks.spawn(async move {
            let started = tokio::time::Instant::now();
            let response = service.oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200);
            (started, served(&response).served.clone())
        });
    }
    let mut calls = Vec::new();
    while let Some(call) = tasks.join_next().await {
        calls.push(call.unwrap());
    }
    calls.sort_by_key(|(started, _)| *started);
    let during = calls.iter().filter(|(at, _)| *at < storm_end).count();
    let opus_during = mock
        .requests()
        .iter()
        .filter(|r| r.model.as_deref() == Some(OPUS) && r.at < storm_end)
        .count();
    let back = calls
        .iter()
        .find(|(at, model)| *at >= storm_end && model.as_str() == OPUS)
        .map(|(at, _)| at.duration_since(storm_end));
    println!("storm: {opus_during} opus attempts for {during} calls; opus back after {back:?}");
    let back = back.expect("opus never got its traffic back");
    assert!(
        back <= Duration::from_secs(10),
        "opus back only after {back:?}"
    );
    let per_call = opus_during as f64 / during as f64;
    assert!(
        per_call <= 1.2,
        "{per_call} opus attempts per call in the storm"
    );
    // A successful probe closes the breaker at once: every later call goes to opus.
    let after = storm_end + back + Duration::from_secs(1);
    assert!(
        calls
            .iter()
            .filter(|(at, _)| *at >= after)
            .all(|(_, model)| model.as_str() == OPUS),
        "opus served only part of the traffic after its probe succeeded"
    );
}

/// Defects 12 and 13: the breaker hears of single overloaded attempts now,
/// so it must not open on transient 529s that the retries absorb (10% of
/// attempts here; with two calls opening the breaker, 83 of 600 calls fell back).
#[tokio::test(start_paused = true)]
async fn sparse_transient_overloads_do_not_move_traffic_to_another_model() {
    let mock = MockUpstream::start().await;
    mock.set_chaos(13, vec![(90, Reply::ok()), (10, Reply::overloaded())]);
    let service = shipped();
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..600 {
        ticker.tick().await;
        let service = service.clone();
        let request = messages_request(&mock, OPUS);
        tasks.spawn(async move {
            let response = service.oneshot(request).await.unwrap();
            served(&response).fell_back()
        });
    }
    let mut fell_back = 0;
    while let Some(moved) = tasks.join_next().await {
        fell_back += usize::from(moved.unwrap());
    }
    println!("{fell_back} of 600 calls fell back");
    assert!(fell_back <= 6, "{fell_back} of 600 calls fell back");
}
