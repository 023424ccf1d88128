//! `parley`: pair by invite code, chat end-to-end encrypted, resume after restarts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use parley::code::InviteCode;
use parley::driver::{self, Command, Options};
use parley::error::ClientError;
use parley::transport::Dialer;

const AFTER_HELP: &str = "\
Examples:
  parley --name alice host                 # prints an invite code such as 042917-553108
  parley --name bob join 042917-553108     # on the other machine
  parley --name alice resume               # later: back into the same session, no new code
  parley --name alice sessions
  parley --name alice send report.pdf photos/   # files to the stored session's peer

Scripting: --json makes stdout one JSON object per line (events: invite, paired, resumed,
message, sent, delivered, read, relay_offline, relay_online, peer_online, peer_offline,
waiting, outbox_full, outbox_ready, error, warning, session, file_offer, file_progress,
file_received, file_sent, file_failed). Feed messages on stdin, one
per line. At end of input the client exits 0 once the peer has acknowledged everything typed
(a `delivered` event for each), and, with --exit-after N, once N messages have been received
too. Stopping earlier loses nothing: unacknowledged messages stay in the state file and go
out on the next `resume`. (On a terminal, Ctrl-D quits as soon as the relay holds everything
typed.) At most 1000 messages (4 MiB) wait unacknowledged: then reading stdin pauses
(outbox_full; a pipe blocks, nothing is lost) until receipts make room (outbox_ready).

Relays: ws://HOST:PORT, or wss://HOST:PORT for TLS. A wss:// relay's certificate must
be valid for HOST and signed by an authority the system trusts or by one in --ca-file
(PARLEY_CA_FILE); a ws:// relay that is not on this machine gets a `plaintext_relay`
warning.

Exit codes: 0 done; 1 internal error; 2 usage (also: an unreadable --ca-file);
3 relay unreachable, its certificate refused (`relay_certificate`: unknown issuer,
wrong host name, expired), connection lost, or the relay broke the protocol;
4 pairing failed (wrong code, tampering, code unknown/used/expired, join denied);
5 state file problem (missing, corrupt, too large, not a regular file, foreign,
locked by another process);
6 --timeout reached; 7 the relay refused to resume the session (unknown session or token),
or another device resumed it; 8 `send`: a file was declined or failed.";

/// Pair two terminals through a relay with a short invite code, then chat end-to-end
/// encrypted; resume the same session after a restart without a new code.
#[derive(Debug, Parser)]
#[command(name = "parley", version, after_help = AFTER_HELP)]
struct Cli {
    /// Relay WebSocket URL, ws:// or wss:// (stored with the session; `resume` uses the stored
    /// one). A ws:// relay that is not on this machine gets a warning: tokens and metadata
    /// would travel in the clear.
    #[arg(
        long,
        global = true,
        env = "PARLEY_RELAY",
        default_value = "ws://127.0.0.1:9000"
    )]
    relay: String,

    /// Where state-NAME.json lives (default: the per-user data directory, e.g. ~/.local/share/parley).
    #[arg(long, global = true, env = "PARLEY_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// Also trust the CA certificate(s) in this PEM file for a wss:// relay (a private CA or a
    /// self-signed relay), besides the system's root certificates.
    #[arg(long, global = true, env = "PARLEY_CA_FILE", value_name = "PEM")]
    ca_file: Option<PathBuf>,

    /// Your name: shown to your peer, and names your state file (letters, digits, '-', '_').
    #[arg(long, global = true, env = "PARLEY_NAME")]
    name: Option<String>,

    /// Write events as NDJSON on stdout, for scripts.
    #[arg(long, global = true)]
    json: bool,

    /// Exit 0 once N chat messages have been received and everything typed was delivered.
    #[arg(long, global = true, value_name = "N")]
    exit_after: Option<u64>,

    /// Give up with exit code 6 after SECS seconds.
    #[arg(long, global = true, value_name = "SECS")]
    timeout: Option<u64>,

    /// For tests: declare the relay connection dead after MS milliseconds without any frame
    /// (a PING goes out half-way). Default: the relay's idle limit, 35 s.
    #[arg(
        long,
        global = true,
        hide = true,
        env = "PARLEY_IDLE_TIMEOUT_MS",
        value_name = "MS",
        value_parser = clap::value_parser!(u64).range(100..)
    )]
    idle_timeout_ms: Option<u64>,

    /// Accept file offers without asking (scripts). Without it, offers are declined when no
    /// terminal can ask.
    #[arg(long, global = true)]
    accept_files: bool,

    /// Where received files land (never outside it). Default: your download directory's
    /// `parley` folder.
    #[arg(long, global = true, env = "PARLEY_DOWNLOAD_DIR", value_name = "DIR")]
    download_dir: Option<PathBuf>,

    /// Decline offers of files larger than BYTES (`too_large`).
    #[arg(long, global = true, value_name = "BYTES")]
    max_file_bytes: Option<u64>,

    /// Exit 0 once N files have been received and verified.
    #[arg(long, global = true, value_name = "N")]
    exit_after_files: Option<u64>,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a session, print its invite code, wait for the peer, pair, chat.
    Host,
    /// Pair using the invite code the host read out, then chat.
    Join {
        /// The whole code, e.g. 042917-553108.
        code: InviteCode,
    },
    /// Re-attach to a stored session (no code, no new handshake), then chat.
    Resume {
        /// Session id or a unique prefix of it; optional when only one session is stored.
        sid: Option<String>,
    },
    /// Resume the stored session and send files or folders (a folder as its files, with
    /// their paths relative to it); exit 0 once the peer has every one, verified.
    Send {
        /// The session (id or a unique prefix); optional when only one session is stored.
        #[arg(long)]
        sid: Option<String>,
        /// Offer the file under this name rather than its own (one file only). Sent as
        /// given: the receiver makes every name safe (protocol.md 3.10, "Names").
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
        /// Files and folders to send.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// List stored sessions.
    Sessions,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PARLEY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let result = options(&cli).and_then(|opts| {
        let command = match cli.command {
            Cmd::Host => Command::Host,
            Cmd::Join { code } => Command::Join(code),
            Cmd::Resume { sid } => Command::Resume(sid),
            Cmd::Send {
                sid,
                as_name,
                paths,
            } => Command::Send {
                sid,
                as_name,
                paths,
            },
            Cmd::Sessions => Command::Sessions,
        };
        // One thread: the client is one loop (the driver's) plus blocking helpers (stdin,
        // syncs). Handing its wake-ups between two workers cost a file transfer 15% of its
        // rate (benches/files.py, BENCHMARKS.md "Files").
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Internal(format!("cannot start the runtime: {e}")))?;
        let json = opts.json;
        let result = runtime.block_on(driver::run(command, opts));
        // The stdin reader thread may be blocked in a read: do not wait for it.
        runtime.shutdown_background();
        if let (Err(e), false) = (&result, json) {
            eprintln!("parley: {}", parley::output::printable(&e.to_string()));
        }
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.exit_code(),
    }
}

fn options(cli: &Cli) -> Result<Options, ClientError> {
    let usage = |e: ClientError| {
        eprintln!("parley: {}", parley::output::printable(&e.to_string()));
        e
    };
    let name = cli.name.clone().ok_or_else(|| {
        usage(ClientError::Usage(
            "--name NAME is required (or set PARLEY_NAME)".into(),
        ))
    })?;
    parley_state::validate_name(&name).map_err(|e| usage(ClientError::Usage(e.to_string())))?;
    let state_dir = match &cli.state_dir {
        Some(dir) => dir.clone(),
        None => dirs::data_dir().map(|d| d.join("parley")).ok_or_else(|| {
            usage(ClientError::Usage(
                "no per-user data directory here; pass --state-dir DIR".into(),
            ))
        })?,
    };
    let download_dir = match &cli.download_dir {
        Some(dir) => dir.clone(),
        // No download directory on this system (a server): a folder of the data directory's
        // own, apart from the state files.
        None => dirs::download_dir()
            .map(|d| d.join("parley"))
            .or_else(|| dirs::data_dir().map(|d| d.join("parley").join("downloads")))
            .ok_or_else(|| {
                usage(ClientError::Usage(
                    "no per-user download directory here; pass --download-dir DIR".into(),
                ))
            })?,
    };
    Ok(Options {
        files: parley::transfers::FileConfig {
            accept: cli.accept_files,
            download_dir,
            max_bytes: cli
                .max_file_bytes
                .unwrap_or(parley::files::MAX_FILE_BYTES)
                .min(parley::files::MAX_FILE_BYTES),
        },
        exit_after_files: cli.exit_after_files,
        relay_url: cli.relay.clone(),
        state_dir,
        name,
        json: cli.json,
        exit_after: cli.exit_after,
        timeout: cli.timeout.map(Duration::from_secs),
        dialer: Dialer::new(
            cli.idle_timeout_ms
                .map_or(driver::IDLE_TIMEOUT, Duration::from_millis),
            cli.ca_file.as_deref(),
        )
        .map_err(usage)?,
    })
}
