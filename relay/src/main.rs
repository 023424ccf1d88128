//! The `parley-relay` binary: options, logging, signals. The relay itself is the library.

mod secret_file;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use parley_relay::{IpNet, RateLimit, Relay, RelayConfig, RelaySecret, Tls};
use tracing_subscriber::EnvFilter;

/// Parley's relay: pairs two clients by a short invite code and forwards their end-to-end
/// encrypted frames. It keeps everything in memory and never sees a key, a code secret or a
/// plaintext.
///
/// Logs go to stderr; RUST_LOG sets the level (default "info"). Once listening, the relay prints
/// one line to stdout, `listening on ws://ADDR` (or `wss://`), then `metrics on http://ADDR`
/// if asked to serve them, so scripts can use `--listen 127.0.0.1:0`. GET /healthz on the
/// relay's port answers 200 while it serves. SIGINT or SIGTERM drains (`/healthz` answers 503,
/// new connections are refused, for --drain-secs), then closes every connection with "going
/// away" and exits 0. SIGHUP reloads the TLS certificate and key.
#[derive(Debug, Parser)]
#[command(name = "parley-relay", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "PARLEY_LISTEN", default_value = "127.0.0.1:9000")]
    listen: String,

    /// Largest frame accepted, in bytes; a larger one gets ERROR frame_too_large and the
    /// connection is closed.
    #[arg(long, default_value_t = parley_protocol::limits::MAX_FRAME_BYTES)]
    max_frame_bytes: usize,

    /// Seconds an invite code stays usable.
    #[arg(long, default_value_t = parley_protocol::limits::INVITE_TTL.as_secs())]
    invite_ttl_secs: u64,

    /// Seconds a paired session is kept while neither member is connected.
    #[arg(long, default_value_t = parley_protocol::limits::SESSION_IDLE_TTL.as_secs())]
    session_idle_ttl_secs: u64,

    /// Seconds an unpaired session (nobody joined) is kept once its host has gone.
    #[arg(long, default_value_t = parley_protocol::limits::UNPAIRED_SESSION_TTL.as_secs())]
    unpaired_session_ttl_secs: u64,

    /// Sessions one connection may be a member of at once.
    #[arg(long, default_value_t = parley_protocol::limits::MAX_SESSIONS_PER_CONNECTION)]
    max_sessions_per_connection: usize,

    /// Sessions the relay holds in all.
    #[arg(long, default_value_t = parley_protocol::limits::MAX_SESSIONS)]
    max_sessions: usize,

    /// Connections open at once; further ones are closed on accept.
    #[arg(long, default_value_t = parley_protocol::limits::MAX_CONNECTIONS)]
    max_connections: usize,

    /// Connections open at once from one address (IPv4, or IPv6 /64); further ones are closed
    /// on accept.
    #[arg(long, default_value_t = parley_protocol::limits::MAX_CONNECTIONS_PER_ADDRESS)]
    max_connections_per_address: usize,

    /// Frames queued for one connection before it counts as a slow consumer and is dropped.
    #[arg(long, default_value_t = parley_protocol::limits::OUTBOUND_QUEUE_FRAMES)]
    outbound_queue_frames: usize,

    /// Bytes queued for one connection before it counts as a slow consumer and is dropped.
    #[arg(long, default_value_t = parley_protocol::limits::OUTBOUND_QUEUE_BYTES)]
    outbound_queue_bytes: usize,

    /// Seconds a socket write may make no progress before the connection is dropped.
    #[arg(long, default_value_t = parley_protocol::limits::WRITE_TIMEOUT.as_secs())]
    write_timeout_secs: u64,

    /// Seconds between the relay's PING frames.
    #[arg(long, default_value_t = parley_protocol::limits::PING_INTERVAL.as_secs())]
    ping_interval_secs: u64,

    /// Seconds of silence after which a connection is considered dead and closed.
    #[arg(long, default_value_t = parley_protocol::limits::IDLE_TIMEOUT.as_secs())]
    idle_timeout_secs: u64,

    /// Failed JOINs one connection may make at once before it is rate-limited.
    #[arg(long, default_value_t = parley_protocol::limits::JOIN_FAILURES_PER_CONNECTION_BURST)]
    join_failures_per_connection: u32,

    /// Failed JOINs one address (IPv4, or IPv6 /64) may make at once before it is rate-limited;
    /// it then earns one more every 6 seconds.
    #[arg(long, default_value_t = parley_protocol::limits::JOIN_FAILURES_PER_ADDRESS_BURST)]
    join_failures_per_address: u32,

    /// CREATE_SESSIONs one address may make at once before it is rate-limited; it then earns
    /// one more every 10 seconds.
    #[arg(long, default_value_t = parley_protocol::limits::SESSIONS_CREATED_PER_ADDRESS_BURST)]
    sessions_created_per_address: u32,

    /// Frames kept for an offline member, per seat (handed over as its queue drains when it
    /// comes back).
    #[arg(long, default_value_t = parley_protocol::limits::MAILBOX_FRAMES)]
    mailbox_frames: usize,

    /// Bytes kept for an offline member, per seat (at least one frame's worth).
    #[arg(long, default_value_t = parley_protocol::limits::MAILBOX_BYTES)]
    mailbox_bytes: usize,

    /// Bytes that frames sent from one address (IPv4, or IPv6 /64) may hold in all mailboxes
    /// together (and in join requests awaiting an answer).
    #[arg(long, default_value_t = parley_protocol::limits::MAILBOX_BYTES_PER_ADDRESS)]
    mailbox_bytes_per_address: usize,

    /// Seconds a frame is kept for an offline member.
    #[arg(long, default_value_t = parley_protocol::limits::MAILBOX_AGE.as_secs())]
    mailbox_age_secs: u64,

    /// Threads that run connections (default: one per CPU). On a machine the relay shares with
    /// other busy processes, 1 avoids handing work between threads: lower latency and CPU per
    /// message (see BENCHMARKS.md).
    #[arg(long, env = "PARLEY_WORKER_THREADS")]
    worker_threads: Option<usize>,

    /// The relay's secret (64 hex digits), created (mode 0600) if missing. Resume tokens are
    /// MACs under it: with the same file, a restarted relay takes every session back from its
    /// members' tokens; a new secret ends them all. Every relay sharing sessions needs the same
    /// file. Default: $STATE_DIRECTORY/secret under systemd, else parley-relay/secret in the
    /// user's state (or local data) directory.
    #[arg(long, env = "PARLEY_RELAY_SECRET_FILE")]
    secret_file: Option<PathBuf>,

    /// Serve wss:// with this PEM certificate chain (leaf first); needs --tls-key.
    #[arg(long, env = "PARLEY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) for --tls-cert.
    #[arg(long, env = "PARLEY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Serve GET /metrics (Prometheus) and /healthz on this address, plain HTTP. Off by
    /// default: keep it on a private address.
    #[arg(long, env = "PARLEY_METRICS_LISTEN")]
    metrics_listen: Option<String>,

    /// A reverse proxy's address or network (CIDR), repeatable: for connections from it, the
    /// client address (for limits and logs) is the one its Forwarded or X-Forwarded-For
    /// header names. From anyone else those headers are ignored.
    #[arg(long, value_name = "CIDR")]
    trusted_proxy: Vec<String>,

    /// The header your trusted proxies write the client's address in: "x-forwarded-for"
    /// (nginx, Caddy, HAProxy) or "forwarded" (RFC 7239). Only that one is read.
    #[arg(long, default_value = "x-forwarded-for", value_parser = ["x-forwarded-for", "forwarded"])]
    forwarded_header: String,

    /// Connections from one address (IPv4, or IPv6 /64) still in their TLS handshake or HTTP
    /// request; further ones are closed on accept.
    #[arg(long, default_value_t = parley_protocol::limits::MAX_PENDING_PER_ADDRESS)]
    max_pending_per_address: usize,

    /// Seconds to go on serving after SIGTERM, with /healthz answering 503, before closing
    /// connections (give your load balancer's health-check interval).
    #[arg(long, default_value_t = 0)]
    drain_secs: u64,

    /// Log format: "text" (colour only on a terminal) or "json" (one object per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    /// Share sessions with every relay pointed at this Redis (redis://HOST:PORT[/DB]): they
    /// then act as one relay behind any load balancer, and a relay restart loses nobody's
    /// session. All of them need the same --secret-file. Without it, this relay keeps
    /// everything in its own memory. See docs/cluster.md.
    #[arg(long, env = "PARLEY_REDIS", value_name = "URL")]
    redis: Option<String>,

    /// Put before every key this relay writes to --redis, so several deployments can share
    /// one Redis.
    #[arg(long, env = "PARLEY_REDIS_PREFIX", default_value = "parley:")]
    redis_prefix: String,

    /// Accept REATTACH without a resume token, as the original relay did. Anyone who learns a
    /// session id can then take an empty seat in it: only for clients that predate tokens.
    #[arg(long)]
    allow_tokenless_reattach: bool,
}

impl Args {
    fn config(
        &self,
        secret: RelaySecret,
        tls: Option<std::sync::Arc<Tls>>,
        trusted_proxies: Vec<IpNet>,
    ) -> RelayConfig {
        let defaults = RelayConfig::default();
        RelayConfig {
            secret,
            tls,
            trusted_proxies,
            forwarded_header: if self.forwarded_header == "forwarded" {
                parley_relay::ForwardedHeader::Forwarded
            } else {
                parley_relay::ForwardedHeader::XForwardedFor
            },
            max_pending_per_address: self.max_pending_per_address,
            drain_time: Duration::from_secs(self.drain_secs),
            max_connections_per_address: self.max_connections_per_address,
            mailbox_bytes_per_address: self.mailbox_bytes_per_address,
            max_frame_bytes: self.max_frame_bytes,
            invite_ttl: Duration::from_secs(self.invite_ttl_secs),
            session_idle_ttl: Duration::from_secs(self.session_idle_ttl_secs),
            unpaired_session_ttl: Duration::from_secs(self.unpaired_session_ttl_secs),
            write_timeout: Duration::from_secs(self.write_timeout_secs.max(1)),
            max_sessions_per_connection: self.max_sessions_per_connection,
            max_sessions: self.max_sessions,
            max_connections: self.max_connections,
            outbound_queue_frames: self.outbound_queue_frames,
            outbound_queue_bytes: self.outbound_queue_bytes,
            ping_interval: Duration::from_secs(self.ping_interval_secs.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            join_failures_per_connection: RateLimit {
                burst: self.join_failures_per_connection,
                ..defaults.join_failures_per_connection
            },
            join_failures_per_address: RateLimit {
                burst: self.join_failures_per_address,
                ..defaults.join_failures_per_address
            },
            sessions_created_per_address: RateLimit {
                burst: self.sessions_created_per_address,
                ..defaults.sessions_created_per_address
            },
            mailbox: parley_relay::MailboxLimits {
                max_frames: self.mailbox_frames,
                max_bytes: self.mailbox_bytes,
                max_age: Duration::from_secs(self.mailbox_age_secs),
                ..defaults.mailbox
            },
            allow_tokenless_reattach: self.allow_tokenless_reattach,
            cluster: self.redis.as_ref().map(|url| parley_relay::ClusterConfig {
                url: url.clone(),
                prefix: self.redis_prefix.clone(),
            }),
            ..defaults
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        runtime.worker_threads(n.max(1));
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(serve(args)),
        Err(e) => {
            eprintln!("parley-relay: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> ExitCode {
    // Before anything slow: a SIGHUP (a certificate renewal's reload) that arrives while the
    // relay starts must not kill it with the default action.
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        logs.json().init();
    } else {
        // Colour only for a person: a file or a log shipper gets plain text.
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }

    let mut trusted_proxies = Vec::new();
    for text in &args.trusted_proxy {
        // A bare address is a network of one.
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
        match net {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => {
                eprintln!(
                    "parley-relay: --trusted-proxy {text:?} is not an address or a network like 10.0.0.0/8"
                );
                return ExitCode::from(2);
            }
        }
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match Tls::load(cert, key) {
            Ok(tls) => Some(std::sync::Arc::new(tls)),
            Err(e) => {
                eprintln!("parley-relay: TLS: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };

    let path = args.secret_file.clone().or_else(secret_file::default_path);
    let secret = match &path {
        Some(path) => match secret_file::load_or_create(path) {
            Ok(secret) => secret,
            Err(e) => {
                eprintln!("parley-relay: {e}");
                return ExitCode::from(2);
            }
        },
        None => {
            tracing::warn!(
                "no place for the relay's secret (no state directory); sessions will not survive a restart: give --secret-file"
            );
            RelaySecret::random()
        }
    };
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let config = args.config(secret, tls, trusted_proxies);
    let mut relay = match Relay::bind(&args.listen, config).await {
        Ok(relay) => relay,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::NotConnected
            ) =>
        {
            eprintln!("parley-relay: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("parley-relay: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(2);
        }
    };
    let metrics_addr = match &args.metrics_listen {
        Some(addr) => match relay.bind_metrics(addr).await {
            Ok(bound) => Some(bound),
            Err(e) => {
                eprintln!("parley-relay: cannot serve metrics on {addr}: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    match relay.local_addr() {
        Ok(addr) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {scheme}://{addr}");
            if let Some(metrics) = metrics_addr {
                let _ = writeln!(out, "metrics on http://{metrics}");
            }
            let _ = out.flush();
        }
        Err(e) => eprintln!("parley-relay: listening, but cannot read the bound address: {e}"),
    }
    let handle = relay.handle();
    #[cfg(unix)]
    if let Some(hangups) = hangups {
        tokio::spawn(reload_on_sighup(handle, hangups));
    }
    tracing::info!(
        allow_tokenless_reattach = args.allow_tokenless_reattach,
        "relay started"
    );
    match relay.run(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parley-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGHUP: load the TLS certificate and key again (after a renewal); a bad file keeps the old.
#[cfg(unix)]
async fn reload_on_sighup(
    relay: parley_relay::RelayHandle,
    mut hangups: tokio::signal::unix::Signal,
) {
    while hangups.recv().await.is_some() {
        match relay.reload_tls() {
            Ok(()) => tracing::info!("TLS certificate reloaded"),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::info!("SIGHUP: nothing to reload (no TLS)")
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate not reloaded; the old one stays in use")
            }
        }
    }
}
