//! `tower-overload-gateway`: see `--help` and the library's docs.

use clap::Parser;
use tower_overload_gateway::{Args, init_logs, serve_with_shutdown};

#[tokio::main]
async fn main() {
    let config = match Args::parse().resolve() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("tower-overload-gateway: {message}");
            std::process::exit(2);
        }
    };
    init_logs(config.log_format);
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "tower-overload-gateway: cannot listen on {}: {error} (is another process on that port? pick one with --listen)",
                config.listen
            );
            std::process::exit(1);
        }
    };
    let address = listener.local_addr().map_or(config.listen, |a| a);
    tracing::info!(
        listen = %address,
        upstream = %config.upstream,
        max_per_model = config.max_per_model,
        stream_guard = config.stream_guard,
        "forwarding /v1/* through the overload stack"
    );
    println!("forwarding http://{address}/v1/* to {}", config.upstream);
    serve_with_shutdown(config, listener, shutdown_signal()).await;
}

/// SIGTERM (what orchestrators send) or ctrl-c.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
