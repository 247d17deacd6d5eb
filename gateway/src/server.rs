//! The listening side: HTTP/1.1 and h2c on one port, header and body read
//! timeouts, hyper's own refusals in the API's error shape, and a graceful
//! shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::ops::Ops;
use crate::proxy::{self, Shared};

/// Serves the gateway on `listener` until the future is dropped.
///
/// ```no_run
/// use tower_overload_gateway::{Config, serve};
///
/// # #[tokio::main] async fn main() {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8787").await.unwrap();
/// tokio::spawn(serve(Config::default(), listener));
/// # }
/// ```
pub async fn serve(config: Config, listener: TcpListener) {
    serve_with_shutdown(config, listener, std::future::pending()).await;
}

/// Serves the gateway on `listener` until `signal` completes, then stops
/// accepting, tells `/readyz` callers it is going, and lets the calls and
/// streams in flight finish for up to `config.shutdown_grace` before it
/// returns (dropping whatever is left).
///
/// ```no_run
/// use tower_overload_gateway::{Config, serve_with_shutdown};
///
/// # #[tokio::main] async fn main() {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8787").await.unwrap();
/// serve_with_shutdown(Config::default(), listener, async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await;
/// # }
/// ```
pub async fn serve_with_shutdown(
    config: Config,
    listener: TcpListener,
    signal: impl Future<Output = ()>,
) {
    let base = config.upstream.to_string().trim_end_matches('/').to_owned();
    let shared = Arc::new(Shared {
        upstream: proxy::upstream_service(&config),
        base,
        ops: Ops::new(),
        config,
    });
    let builder = connection_builder(&shared.config);
    let graceful = GracefulShutdown::new();
    // Owned here so that what is left at the end of the grace period is
    // dropped (and its upstream calls with it), not left running.
    let mut connections = tokio::task::JoinSet::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut signal => break,
        };
        let Ok((stream, _)) = accepted else {
            // Out of descriptors or a reset before accept: the next one may do.
            tokio::task::yield_now().await;
            continue;
        };
        // Streamed events go out as they come, not when an ACK lets Nagle flush.
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |request| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(proxy::handle(shared, request).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(Refusals::new(stream)), service)
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            // A client that goes away mid-call ends its connection; nothing to report.
            let _ = connection.await;
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    shared.ops.shutting_down();
    let grace = shared.config.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "shutting down: no new connections"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("every connection finished"),
        () = tokio::time::sleep(grace) => tracing::warn!(
            connections = connections.len(),
            "grace period over: dropping the calls still in flight"
        ),
    }
    connections.shutdown().await;
}

fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        // Above the gateway's own byte limit, so that it answers in the
        // API's shape; hyper's empty refusals past this (and past its 100
        // headers: a larger count costs every request a heap array) are
        // rewritten below.
        .max_buf_size((config.max_header_bytes * 4).max(400 * 1024));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes * 4).unwrap_or(u32::MAX));
    builder
}

pin_project_lite::pin_project! {
    /// A connection whose writes are watched for hyper's own refusals of
    /// requests it could not parse (400, 414, 431 with no body): those go
    /// out with an error body in the API's shape, so an SDK shows a reason.
    pub(crate) struct Refusals<T> {
        #[pin]
        inner: T,
        // The replacement being written, how much of it is out, and the
        // length of hyper's original (what hyper is told was written).
        pending: Option<(Bytes, usize, usize)>,
    }
}

impl<T> Refusals<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self {
            inner,
            pending: None,
        }
    }
}

/// hyper's refusal heads as it writes them, and what they mean.
const REFUSALS: [(&[u8], &str); 3] = [
    (
        b"HTTP/1.1 400 Bad Request\r\n",
        "the request could not be parsed as HTTP/1.1",
    ),
    (
        b"HTTP/1.1 414 URI Too Long\r\n",
        "the request URI is too long",
    ),
    (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        "request headers too large",
    ),
];

/// The rewritten refusal, when `buf` is exactly one of hyper's empty
/// refusals (never a forwarded answer: those carry the upstream's
/// `request-id` or the gateway's JSON body).
fn rewrite_refusal(buf: &[u8]) -> Option<Bytes> {
    let (status_line, message) = REFUSALS.iter().find(|(line, _)| buf.starts_with(line))?;
    if !buf.ends_with(b"\r\n\r\n") || buf.len() > 1024 {
        return None;
    }
    let head = std::str::from_utf8(&buf[status_line.len()..buf.len() - 2]).ok()?;
    let lower = head.to_ascii_lowercase();
    if !lower.contains("content-length: 0\r\n") || lower.contains("request-id") {
        return None;
    }
    let body = proxy::api_error_body("invalid_request_error", message);
    let mut out = Vec::with_capacity(buf.len() + body.len() + 96);
    out.extend_from_slice(status_line);
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("content-length:") {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"content-type: application/json\r\nx-should-retry: false\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    Some(Bytes::from(out))
}

impl<T: AsyncRead> AsyncRead for Refusals<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Refusals<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        if this.pending.is_none()
            && buf.starts_with(b"HTTP/1.1 4")
            && let Some(replacement) = rewrite_refusal(buf)
        {
            *this.pending = Some((replacement, 0, buf.len()));
        }
        if let Some((bytes, written, original)) = this.pending.as_mut() {
            while *written < bytes.len() {
                let n = ready!(this.inner.as_mut().poll_write(cx, &bytes[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
            let original = *original;
            *this.pending = None;
            return Poll::Ready(Ok(original));
        }
        this.inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Only reached if hyper thinks vectored writes are supported (they
        // are not, below): write the first non-empty slice through the check.
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        // One flat buffer per write, so a refusal head is seen whole.
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_refusals_get_a_body_and_forwarded_answers_do_not() {
        let hyper_431 =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let rewritten = rewrite_refusal(hyper_431).unwrap();
        let text = String::from_utf8(rewritten.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        assert!(head.contains("date: x"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["type"], "invalid_request_error");

        let forwarded =
            b"HTTP/1.1 400 Bad Request\r\nrequest-id: req_1\r\ncontent-length: 0\r\n\r\n";
        assert!(rewrite_refusal(forwarded).is_none());
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}";
        assert!(rewrite_refusal(with_body).is_none());
        assert!(rewrite_refusal(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }
}
