//! Throughput of a 1 MB SSE stream through the retry layer's stream guard,
//! beside the same stream read raw, in one group.

use std::convert::Infallible;
use std::future::ready;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{Service, service_fn};
use tower_overload::retry::{OverloadRetry, RetryPolicy, StreamGuard};

type Chunk = Result<Frame<Bytes>, Infallible>;
type SseBody = StreamBody<futures::stream::Iter<std::vec::IntoIter<Chunk>>>;

/// About 1 MB of Messages API stream events, cut into 4 KiB network-sized chunks.
fn stream_chunks() -> Vec<Bytes> {
    let mut text = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\"}}\n\n",
    );
    let mut n = 0;
    while text.len() < 1 << 20 {
        text.push_str(&format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"token {n} of a long \\\"answer\\\"\"}}}}\n\n"
        ));
        n += 1;
    }
    text.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    let bytes = Bytes::from(text);
    (0..bytes.len())
        .step_by(4096)
        .map(|at| bytes.slice(at..(at + 4096).min(bytes.len())))
        .collect()
}

/// One call whose upstream answers at once, its body read to the end: the bytes read.
fn read_whole<S, B>(service: &mut S, request: Request<Full<Bytes>>) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = service.call(request).now_or_never().unwrap().unwrap();
    let body = response
        .into_body()
        .collect()
        .now_or_never()
        .unwrap()
        .unwrap();
    body.to_bytes().len()
}

fn bench_stream_guard(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let chunks = stream_chunks();
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let upstream = service_fn(move |_: Request<Full<Bytes>>| {
        let frames: Vec<Chunk> = chunks.iter().cloned().map(|c| Ok(Frame::data(c))).collect();
        let body: SseBody = StreamBody::new(futures::stream::iter(frames));
        let response = Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap();
        ready(Ok::<_, Infallible>(response))
    });
    let mut raw = upstream.clone();
    let mut guarded = OverloadRetry::new(
        upstream,
        RetryPolicy::foreground()
            .seed(1)
            .stream_guard(Some(StreamGuard::default())),
    );
    let request = || {
        Request::new(Full::new(Bytes::from_static(
            br#"{"model":"claude-opus-4-6","stream":true}"#,
        )))
    };

    let mut group = c.benchmark_group("stream_guard_1MB");
    group.throughput(Throughput::Bytes(total as u64));
    group.bench_function("anchor/raw_body", |b| {
        b.iter(|| black_box(read_whole(&mut raw, request())))
    });
    group.bench_function("tower_overload/guarded", |b| {
        b.iter(|| black_box(read_whole(&mut guarded, request())))
    });
    group.finish();
}

criterion_group!(benches, bench_stream_guard);
criterion_main!(benches);
