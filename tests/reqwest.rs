//! The shipped reqwest adapter and classifier: a real `reqwest::Client`
//! against the loopback mock upstream, on a paused clock (reqwest's own
//! timeouts run on tokio's clock too).

#![cfg(feature = "reqwest")]

mod support;

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{Empty, Full, StreamBody};
use support::{MockUpstream, Reply, messages_body, messages_request};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_overload::classify::Class;
use tower_overload::reqwest::{ReqwestErrorClassifier, ReqwestService};
use tower_overload::retry::{
    ClassifyError, DefaultErrorClassifier, OverloadRetryLayer, RetryPolicy, RetryReport,
};
use tower_overload::{BoxError, ErrorKind};

const OPUS: &str = "claude-opus-4-6";
const SONNET: &str = "claude-sonnet-4-6";

/// A plain-HTTP reqwest client. The dev build of reqwest carries rustls
/// without a provider, so one is installed once (an error means it already is).
fn reqwest_client(builder: reqwest::ClientBuilder) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    builder.build().expect("a reqwest client")
}

fn adapter<B>() -> ReqwestService<B> {
    ReqwestService::new(reqwest_client(reqwest::Client::builder()))
}

fn policy() -> RetryPolicy {
    RetryPolicy::foreground().budget(None).seed(7)
}

fn gaps(mock: &MockUpstream) -> Vec<Duration> {
    let requests = mock.requests();
    requests.windows(2).map(|w| w[1].at - w[0].at).collect()
}

fn report<T>(response: &http::Response<T>) -> &RetryReport {
    response
        .extensions()
        .get::<RetryReport>()
        .expect("a retry report")
}

// The whole stack needs every layer.
#[cfg(all(feature = "concurrency", feature = "fallback", feature = "request-id"))]
#[tokio::test(start_paused = true)]
async fn a_529_storm_is_absorbed_by_the_stack_on_reqwest() {
    use http_body_util::BodyExt;
    use tower::Layer;
    use tower_overload::stack::OverloadStack;

    let mock = MockUpstream::start().await;
    mock.push([
        Reply::overloaded(),
        Reply::overloaded(),
        Reply::overloaded(),
        Reply::ok(),
    ]);
    let service = OverloadStack::new().layer(adapter());
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let classes: Vec<Class> = report(&response).attempts.iter().map(|a| a.class).collect();
    assert_eq!(
        classes,
        [
            Class::Overloaded,
            Class::Overloaded,
            Class::Overloaded,
            Class::Success
        ]
    );
    assert_eq!(mock.request_count(), 4);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{"), "the success body arrives whole");
}

#[tokio::test(start_paused = true)]
async fn a_429_retry_after_is_obeyed_on_reqwest() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::rate_limited().retry_after("3"), Reply::ok()]);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy()))
        .service(adapter());
    let response = service
        .oneshot(messages_request(&mock, SONNET))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(gaps(&mock), [Duration::from_secs(3)]);
    assert_eq!(report(&response).attempts[0].class, Class::RateLimited);
}

/// The policy keeps the default classifier, as a user who never heard of
/// ReqwestErrorClassifier would: reqwest's timeout must still be retried.
#[tokio::test(start_paused = true)]
async fn a_reqwest_timeout_is_classified_timeout_and_retried() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::ok().delay(Duration::from_secs(30)), Reply::ok()]);
    let client = reqwest_client(reqwest::Client::builder().timeout(Duration::from_secs(5)));
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy()))
        .service(ReqwestService::new(client.clone()));
    let started = tokio::time::Instant::now();
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let report = report(&response);
    assert_eq!(report.attempts.len(), 2);
    assert_eq!(report.attempts[0].class, Class::Timeout);
    assert!(report.attempts[0].status.is_none(), "no response came");
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not the slow reply"
    );

    // The same with the classifier named, and every attempt timing out: a
    // typed error whose class is Timeout and whose source is reqwest's.
    mock.push(std::iter::repeat_n(
        Reply::ok().delay(Duration::from_secs(30)),
        3,
    ));
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(
            policy()
                .max_attempts(3)
                .error_classifier(ReqwestErrorClassifier::new()),
        ))
        .service(ReqwestService::new(client));
    let error = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::RetriesExhausted);
    assert_eq!(error.class(), Some(Class::Timeout));
    assert_eq!(error.attempts(), 3);
    let source = StdError::source(&error).expect("reqwest's error");
    let reqwest = source
        .downcast_ref::<reqwest::Error>()
        .expect("a reqwest::Error");
    assert!(reqwest.is_timeout());
}

/// An error type of another layer that boxes reqwest's.
#[derive(Debug)]
struct Wrapped(BoxError);

impl fmt::Display for Wrapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the layer below failed")
    }
}

impl StdError for Wrapped {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

#[tokio::test(start_paused = true)]
async fn reqwest_errors_are_found_inside_a_boxed_chain() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::ok().delay(Duration::from_secs(30))]);
    let client = reqwest_client(reqwest::Client::builder().timeout(Duration::from_secs(1)));
    let timeout = ReqwestService::new(client)
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap_err();
    assert!(timeout.is_timeout());
    let wrapped = Wrapped(Box::new(timeout));
    for verdict in [
        ReqwestErrorClassifier::new().classify_error(&wrapped),
        DefaultErrorClassifier.classify_error(&wrapped),
    ] {
        assert_eq!(verdict.class, Class::Timeout);
        assert!(verdict.retryable);
    }

    // A bad URL is reqwest's builder error: another attempt fails the same way.
    let bad = Request::post("unix://nowhere/v1/messages")
        .body(Full::new(messages_body(OPUS)))
        .unwrap();
    let error = adapter().oneshot(bad).await.unwrap_err();
    let verdict = ReqwestErrorClassifier::new().classify_error(&Wrapped(Box::new(error)));
    assert_eq!(verdict.class, Class::Transport);
    assert!(!verdict.retryable);
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_is_transport_and_retried() {
    // Nothing listens on this port: connection refused, every time.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap();
    drop(closed);
    let request = || {
        Request::post(format!("http://{address}/v1/messages"))
            .body(Full::new(messages_body(OPUS)))
            .unwrap()
    };

    let refused = adapter().oneshot(request()).await.unwrap_err();
    assert!(refused.is_connect());
    for verdict in [
        ReqwestErrorClassifier::new().classify_error(&refused),
        DefaultErrorClassifier.classify_error(&refused),
    ] {
        assert_eq!(verdict.class, Class::Transport);
        assert!(verdict.retryable);
    }

    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy().max_attempts(3)))
        .service(adapter());
    let error = service.oneshot(request()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::RetriesExhausted);
    assert_eq!(error.class(), Some(Class::Transport));
    assert_eq!(error.attempts(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_connection_is_retried_on_reqwest() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::drop_connection(), Reply::ok()]);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy()))
        .service(adapter());
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(report(&response).attempts[0].class, Class::Transport);
}

// The whole stack needs every layer.
#[cfg(all(feature = "concurrency", feature = "fallback", feature = "request-id"))]
#[tokio::test(start_paused = true)]
async fn fallback_on_reqwest_shows_served_by() {
    use tower::Layer;
    use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
    use tower_overload::stack::OverloadStack;

    let mock = MockUpstream::start().await;
    mock.push_for_model(OPUS, std::iter::repeat_n(Reply::overloaded(), 3));
    let service = OverloadStack::new()
        .retry(policy().max_attempts(3))
        .fallback(ModelFallbackLayer::new([OPUS, SONNET]))
        .layer(adapter());
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let served = response
        .extensions()
        .get::<ServedBy>()
        .expect("ServedBy on the response");
    assert_eq!(served.served.as_str(), SONNET);
    assert_eq!(served.fallbacks[0].request_ids.len(), 3);
    let models: Vec<Option<String>> = mock.requests().into_iter().map(|r| r.model).collect();
    assert_eq!(models.last().unwrap().as_deref(), Some(SONNET));
    assert_eq!(models.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn bodies_reach_the_upstream_byte_for_byte() {
    let mock = MockUpstream::start().await;
    let client = reqwest_client(reqwest::Client::builder());
    let json = messages_body(OPUS);
    let url = mock.url("/v1/messages");

    // Full<Bytes>: framed with its length, as reqwest frames its own bytes.
    let request = Request::post(url.clone())
        .body(Full::new(json.clone()))
        .unwrap();
    let mut full = ReqwestService::new(client.clone());
    // `ready` infers the body type from the call that follows.
    let response = full.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let text = String::from("{\"model\":\"claude-haiku-4-5\",\"note\":\"é ✓\"}");
    let request = Request::post(url.clone()).body(text.clone()).unwrap();
    ReqwestService::new(client.clone())
        .oneshot(request)
        .await
        .unwrap();

    let request = Request::get(url.clone())
        .body(Empty::<Bytes>::new())
        .unwrap();
    ReqwestService::new(client.clone())
        .oneshot(request)
        .await
        .unwrap();

    // A stream of unknown length, sent as it comes.
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = json
        .chunks(7)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let request = Request::post(url)
        .body(StreamBody::new(futures::stream::iter(chunks)))
        .unwrap();
    ReqwestService::new(client.clone())
        .oneshot(request)
        .await
        .unwrap();

    let seen = mock.requests();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[0].body, json);
    assert_eq!(
        seen[0].headers["content-length"],
        json.len().to_string().as_str()
    );
    assert_eq!(seen[1].body, text.as_bytes());
    assert_eq!(
        seen[1].headers["content-length"],
        text.len().to_string().as_str()
    );
    assert!(seen[2].body.is_empty());
    assert_eq!(seen[3].body, json);
}

#[derive(Debug, Clone, PartialEq)]
struct CallerTag(&'static str);

#[tokio::test(start_paused = true)]
async fn the_request_extensions_are_on_the_response() {
    let mock = MockUpstream::start().await;
    let mut request = messages_request(&mock, OPUS);
    request.extensions_mut().insert(CallerTag("job-42"));
    let response = adapter().oneshot(request).await.unwrap();
    assert_eq!(
        response.extensions().get::<CallerTag>(),
        Some(&CallerTag("job-42"))
    );
}
