//! The `parley-relay` binary: options, logging, signals. The relay itself is the library.

mod secret_file;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use parley_relay::{RateLimit, Relay, RelayConfig, RelaySecret};
use tracing_subscriber::EnvFilter;

/// Parley's relay: pairs two clients by a short invite code and forwards their end-to-end
/// encrypted frames. It keeps everything in memory and never sees a key, a code secret or a
/// plaintext.
///
/// Logs go to stderr; RUST_LOG sets the level (default "info"). Once listening, the relay prints
/// one line to stdout, `listening on ws://ADDR`, so scripts can use `--listen 127.0.0.1:0`.
/// SIGINT or SIGTERM closes every connection with "going away" and exits 0.
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

    /// Frames kept for an offline member, per seat (capped below --outbound-queue-frames).
    #[arg(long, default_value_t = parley_protocol::limits::MAILBOX_FRAMES)]
    mailbox_frames: usize,

    /// Bytes kept for an offline member, per seat (capped below --outbound-queue-bytes).
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

    /// Accept REATTACH without a resume token, as the original relay did. Anyone who learns a
    /// session id can then take an empty seat in it: only for clients that predate tokens.
    #[arg(long)]
    allow_tokenless_reattach: bool,
}

impl Args {
    fn config(&self, secret: RelaySecret) -> RelayConfig {
        let defaults = RelayConfig::default();
        RelayConfig {
            secret,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person: a file or a log shipper gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();

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
    let config = args.config(secret);
    let relay = match Relay::bind(&args.listen, config).await {
        Ok(relay) => relay,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            eprintln!("parley-relay: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("parley-relay: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(2);
        }
    };
    match relay.local_addr() {
        Ok(addr) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on ws://{addr}");
            let _ = out.flush();
        }
        Err(e) => eprintln!("parley-relay: listening, but cannot read the bound address: {e}"),
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
