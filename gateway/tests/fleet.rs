//! Two gateways sharing one Redis (`--redis`): one per-model cap for both.
//! A real redis-server on 127.0.0.1 (installed by `.ci/run`), real clock.

#[path = "../../tests/support/redis.rs"]
mod redis_server;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Full};
use redis_server::RedisServer;
use support::{MockUpstream, Reply, client, messages_body};
use tower::ServiceExt;
use tower_overload_gateway as gateway;

const MODEL: &str = "claude-opus-4-6";

async fn start(config: gateway::Config) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(gateway::serve(config, listener));
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_cap_through_redis() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::slow_body(
        &["data: a\n\n", "data: b\n\n"],
        Duration::from_millis(20),
    ));
    let config = || gateway::Config {
        upstream: format!("http://{}", mock.addr()).parse().unwrap(),
        limits: vec![(MODEL.to_owned(), 3)],
        redis: Some(redis.url()),
        fleet_share: 0.5,
        ..gateway::Config::default()
    };
    let gateways = [start(config()).await, start(config()).await];
    let mut calls = tokio::task::JoinSet::new();
    for index in 0..60 {
        let gateway = gateways[index % 2];
        calls.spawn(async move {
            let request = Request::post(format!("http://{gateway}/v1/messages"))
                .header("content-type", "application/json")
                .header("x-api-key", "sk-ant-fleet")
                .body(Full::new(messages_body(MODEL)))
                .unwrap();
            let response = client().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    assert_eq!(mock.request_count(), 60);
    let peak = mock.peak_in_flight(MODEL);
    assert!(
        peak <= 3,
        "two gateways under one cap of 3 put {peak} in flight"
    );
    assert!(peak >= 2, "the cap was used: {peak}");
}

#[test]
fn a_redis_flag_that_is_not_a_url_says_so() {
    use clap::Parser;
    let args = gateway::Args::try_parse_from(["gw", "--redis", "localhost:6379"]).unwrap();
    let error = args.resolve().unwrap_err().to_string();
    assert!(error.contains("--redis localhost:6379"), "{error}");
    let args = gateway::Args::try_parse_from(["gw", "--fleet-share", "0"]).unwrap();
    let error = args.resolve().unwrap_err().to_string();
    assert!(error.contains("--fleet-share 0"), "{error}");
}
