//! `OverloadMiddleware` in a real `reqwest_middleware::ClientWithMiddleware`
//! over a real `reqwest::Client`, against the loopback mock, on a paused clock.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Extensions;
use http_body::Frame;
use http_body_util::StreamBody;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use support::{MockUpstream, Reply, messages_body};
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_overload::concurrency::ConcurrencyPerModelLayer;
use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
use tower_overload::reqwest_middleware::OverloadMiddleware;
use tower_overload::retry::{RetryPolicy, RetryReport, StopReason};
use tower_overload::stack::OverloadStack;
use tower_overload::{ErrorKind, RequestId, model};

const OPUS: &str = "claude-opus-4-6";
const SONNET: &str = "claude-sonnet-4-6";

fn reqwest_client() -> reqwest::Client {
    // The dev build of reqwest has rustls without a provider; plain HTTP
    // needs none, but building a client asks for one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn with_stack(stack: OverloadStack) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(stack))
        .build()
}

/// A POST of `body` to the mock's `/v1/messages`, headers as a real client sends them.
fn post(
    client: &ClientWithMiddleware,
    mock: &MockUpstream,
    body: reqwest::Body,
) -> reqwest_middleware::RequestBuilder {
    client
        .post(mock.url("/v1/messages").to_string())
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "sk-ant-test-secret")
        .body(body)
}

fn report(response: &reqwest::Response) -> &RetryReport {
    response
        .extensions()
        .get::<RetryReport>()
        .expect("a RetryReport on the reqwest::Response")
}

#[tokio::test(start_paused = true)]
async fn a_529_storm_is_absorbed_and_every_attempt_carries_the_same_bytes() {
    let mock = MockUpstream::start().await;
    mock.push(std::iter::repeat_n(Reply::overloaded(), 3));
    let client = with_stack(OverloadStack::new().retry(RetryPolicy::foreground().seed(1)));
    let body = messages_body(OPUS);

    let response = post(&client, &mock, body.clone().into())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let report = report(&response);
    assert_eq!(report.attempts.len(), 4, "{report:?}");
    assert_eq!(report.stop, StopReason::Success);
    assert!(report.waited > Duration::ZERO);
    let text = response.text().await.unwrap();
    assert!(text.contains("\"type\":\"message\""), "{text}");
    let requests = mock.requests();
    assert_eq!(requests.len(), 4);
    for request in &requests {
        assert_eq!(request.body, body, "byte for byte on every attempt");
        assert_eq!(request.headers["x-api-key"], "sk-ant-test-secret");
        assert_eq!(request.headers["content-length"], body.len().to_string());
    }
}

#[tokio::test(start_paused = true)]
async fn a_429_retry_after_is_obeyed() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::rate_limited().retry_after("7")]);
    let client = with_stack(OverloadStack::new());
    let started = Instant::now();

    let response = post(&client, &mock, messages_body(OPUS).into())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_secs(7));
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[1].at - requests[0].at >= Duration::from_secs(7));
    assert!(report(&response).waited >= Duration::from_secs(7));
}

/// reqwest's own timeout, under the middleware and the default classifier
/// as shipped: the attempt is a `Timeout`, retried, and the next one answers.
#[tokio::test(start_paused = true)]
async fn a_reqwest_timeout_is_retried_through_the_middleware() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::ok().delay(Duration::from_secs(30)), Reply::ok()]);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let inner = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let client = ClientBuilder::new(inner)
        .with(OverloadMiddleware::new(OverloadStack::new()))
        .build();
    let started = Instant::now();
    let response = post(&client, &mock, messages_body(OPUS).into())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report = report(&response);
    assert_eq!(report.attempts.len(), 2, "{report:?}");
    assert_eq!(
        report.attempts[0].class,
        tower_overload::classify::Class::Timeout
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(30),
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn fallback_is_visible_on_the_reqwest_response() {
    let mock = MockUpstream::start().await;
    mock.storm(OPUS, Duration::from_secs(3600), Reply::overloaded());
    let client = with_stack(OverloadStack::new().fallback(ModelFallbackLayer::new([OPUS, SONNET])));
    let body = messages_body(OPUS);

    let response = post(&client, &mock, body.clone().into())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let served = response.extensions().get::<ServedBy>().expect("ServedBy");
    assert_eq!(
        (served.requested.as_str(), served.served.as_str()),
        (OPUS, SONNET)
    );
    assert!(served.fell_back());
    let requests = mock.requests();
    let last = requests.last().unwrap();
    assert_eq!(last.model.as_deref(), Some(SONNET));
    assert_eq!(
        last.body,
        model::rewrite(&body, SONNET).unwrap(),
        "only the model changed"
    );
    for request in &requests[..requests.len() - 1] {
        assert_eq!(request.body, body);
    }
}

#[tokio::test(start_paused = true)]
async fn a_streaming_body_is_sent_once_whole_and_reported() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded()]);
    let client = with_stack(OverloadStack::new());
    let body = messages_body(OPUS);
    let (head, tail) = body.split_at(body.len() / 2);
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(Bytes::copy_from_slice(head))),
        Ok(Frame::data(Bytes::copy_from_slice(tail))),
    ];
    let stream = reqwest::Body::wrap(StreamBody::new(futures::stream::iter(chunks)));

    let response = post(&client, &mock, stream).send().await.unwrap();

    assert_eq!(response.status(), 529, "the one answer, handed back");
    let report = report(&response);
    assert_eq!(report.stop, StopReason::BodyNotReplayable);
    assert_eq!(report.attempts.len(), 1);
    let requests = mock.requests();
    assert_eq!(requests.len(), 1, "sent once");
    assert_eq!(requests[0].body, body, "whole, byte for byte");
}

#[tokio::test(start_paused = true)]
async fn the_request_id_and_url_survive_the_round_trip() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded()]);
    let client = with_stack(OverloadStack::new());
    let url = mock.url("/v1/messages").to_string();

    let response = post(&client, &mock, messages_body(OPUS).into())
        .send()
        .await
        .unwrap();

    assert_eq!(response.url().as_str(), url);
    let id = RequestId::from_headers(response.headers()).expect("RequestId");
    assert_eq!(
        Some(id.as_str()),
        response.headers()["request-id"].to_str().ok()
    );
    let ids: Vec<_> = report(&response).request_ids().collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(*ids[1], id);
}

#[tokio::test(start_paused = true)]
async fn a_server_delay_too_long_is_the_crate_error_inside_middleware() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::rate_limited().retry_after("3600")]);
    let client = with_stack(OverloadStack::new().retry(RetryPolicy::foreground()));

    let error = post(&client, &mock, messages_body(OPUS).into())
        .send()
        .await
        .unwrap_err();

    let reqwest_middleware::Error::Middleware(error) = error else {
        panic!("expected Error::Middleware, got {error:?}");
    };
    let ours = error
        .downcast_ref::<tower_overload::Error>()
        .expect("the crate's Error");
    assert_eq!(ours.kind(), ErrorKind::ServerDelayTooLong);
    assert_eq!(ours.server_delay(), Some(Duration::from_secs(3600)));
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_after_retries_keeps_the_reqwest_error_in_the_chain() {
    let mock = MockUpstream::start().await;
    let url = mock.url("/v1/messages").to_string();
    drop(mock);
    tokio::task::yield_now().await;
    let client = with_stack(OverloadStack::new().retry(RetryPolicy::foreground().seed(2)));

    let error = client
        .post(url)
        .body(messages_body(OPUS))
        .send()
        .await
        .unwrap_err();

    let reqwest_middleware::Error::Middleware(error) = error else {
        panic!("expected Error::Middleware, got {error:?}");
    };
    let ours = error
        .downcast_ref::<tower_overload::Error>()
        .expect("the crate's Error");
    assert!(
        ours.attempts() > 1,
        "a refused connection is retried: {ours}"
    );
    let transport = error
        .chain()
        .find_map(|e| e.downcast_ref::<reqwest::Error>())
        .expect("the reqwest::Error in the chain");
    assert!(transport.is_connect());
}

#[tokio::test(start_paused = true)]
async fn a_reqwest_error_no_layer_wrapped_stays_reqwest() {
    let mock = MockUpstream::start().await;
    let url = mock.url("/v1/messages").to_string();
    drop(mock);
    tokio::task::yield_now().await;
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            ServiceBuilder::new().layer(ConcurrencyPerModelLayer::new(4)),
        ))
        .build();

    let error = client
        .post(url)
        .body(messages_body(OPUS))
        .send()
        .await
        .unwrap_err();

    assert!(
        matches!(&error, reqwest_middleware::Error::Reqwest(e) if e.is_connect()),
        "{error:?}"
    );
}

/// Counts its calls, records what the previous attempt left in the
/// extensions, and fails the first `fail` calls with its own error.
struct Inner {
    calls: Arc<AtomicUsize>,
    fail: usize,
}

#[derive(Clone, Debug, PartialEq)]
struct Seen(usize);

#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refused by an inner middleware")
    }
}

impl std::error::Error for Refused {}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

// The signature `#[async_trait]` gives the trait, written out.
impl Middleware for Inner {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        request: reqwest::Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> BoxFuture<'async_trait, reqwest_middleware::Result<reqwest::Response>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(
                extensions.get::<Seen>(),
                None,
                "each attempt starts from the call's extensions"
            );
            extensions.insert(Seen(call));
            if call < self.fail {
                return Err(reqwest_middleware::Error::middleware(Refused));
            }
            next.run(request, extensions).await
        })
    }
}

#[tokio::test(start_paused = true)]
async fn inner_middleware_runs_per_attempt_and_its_errors_come_back_unchanged() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded()]);
    let calls = Arc::new(AtomicUsize::new(0));
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            ServiceBuilder::new().layer(ConcurrencyPerModelLayer::new(4)),
        ))
        .with(Inner {
            calls: Arc::clone(&calls),
            fail: 0,
        })
        .build();
    let request = post(&client, &mock, messages_body(OPUS).into())
        .build()
        .unwrap();
    let mut extensions = Extensions::new();
    let response = client
        .execute_with_extensions(request, &mut extensions)
        .await
        .unwrap();
    assert_eq!(response.status(), 529, "no retry layer in this stack");
    assert_eq!(
        extensions.get::<Seen>(),
        Some(&Seen(0)),
        "the answering attempt's extensions come back"
    );

    // With a retry layer: every attempt runs the inner middleware again.
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(OverloadStack::new()))
        .with(Inner {
            calls: Arc::clone(&calls),
            fail: 0,
        })
        .build();
    mock.push([Reply::overloaded()]);
    let response = post(&client, &mock, messages_body(OPUS).into())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // An inner middleware's error that no layer wrapped is handed back as it was.
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            ServiceBuilder::new().layer(ConcurrencyPerModelLayer::new(4)),
        ))
        .with(Inner {
            calls,
            fail: usize::MAX,
        })
        .build();
    let error = post(&client, &mock, messages_body(OPUS).into())
        .send()
        .await
        .unwrap_err();
    let reqwest_middleware::Error::Middleware(error) = error else {
        panic!("expected Error::Middleware, got {error:?}");
    };
    assert!(error.downcast_ref::<Refused>().is_some(), "{error:?}");
}

#[tokio::test(start_paused = true)]
async fn the_per_model_limit_is_shared_by_every_call() {
    let mock = MockUpstream::start().await;
    mock.set_latency(Duration::from_millis(200));
    let client = with_stack(
        OverloadStack::new().concurrency(ConcurrencyPerModelLayer::new(2).queue_timeout(None)),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let request = post(&client, &mock, messages_body(OPUS).into());
        tasks.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            response.bytes().await.unwrap();
            status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(mock.request_count(), 8);
    // A limit made per call would let all 8 through at once.
    assert_eq!(
        mock.peak_in_flight(OPUS),
        2,
        "one limit shared by every call, though each builds its own service"
    );
}
