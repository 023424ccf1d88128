//! The client's errors, each with the exit code a script can act on.

use std::process::ExitCode;

use parley_state::StateError;

use crate::handshake::PairingError;
use crate::session::DamagedRecord;

/// Exit codes (documented in README.md and `--help`).
pub mod exit {
    pub const OK: u8 = 0;
    pub const INTERNAL: u8 = 1;
    /// clap's own code for bad arguments.
    pub const USAGE: u8 = 2;
    pub const RELAY_UNREACHABLE: u8 = 3;
    pub const PAIRING_FAILED: u8 = 4;
    pub const STATE: u8 = 5;
    pub const TIMEOUT: u8 = 6;
    pub const RESUME_REFUSED: u8 = 7;
    /// `send`: a file was declined or failed (each has its `file_failed` event).
    pub const FILES_FAILED: u8 = 8;
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the relay at {url}: {reason}")]
    RelayUnreachable { url: String, reason: String },
    /// The relay's TLS certificate was refused (unknown issuer, wrong host name, expired...).
    #[error("refused the relay at {url}: {reason}")]
    RelayCertificate { url: String, reason: String },
    #[error("lost the connection to the relay: {0}")]
    ConnectionLost(String),
    /// The relay said something the protocol does not allow (a relay problem: exit 3).
    #[error("the relay broke the protocol: {0}; check the relay URL, or try another relay")]
    RelayProtocol(String),
    #[error(transparent)]
    Pairing(#[from] PairingError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("state file {}: {record}; pair again (`host` or `join`)", path.display())]
    Damaged {
        path: std::path::PathBuf,
        record: DamagedRecord,
    },
    #[error("{0}")]
    Usage(String),
    #[error("timed out after {0} s (--timeout)")]
    Timeout(u64),
    #[error("the relay refused to resume this session: {message} ({code})")]
    ResumeRefused { code: String, message: String },
    #[error("another device resumed this session with its token; this one stopped")]
    SessionTakenOver,
    #[error("{0}")]
    Internal(String),
    #[error("{0} file(s) could not be sent (declined or failed)")]
    FilesFailed(u64),
}

impl ClientError {
    /// A stable machine-readable code for the `error` event.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::RelayUnreachable { .. } => "relay_unreachable",
            ClientError::RelayCertificate { .. } => "relay_certificate",
            ClientError::ConnectionLost(_) => "connection_lost",
            ClientError::RelayProtocol(_) => "relay_protocol",
            ClientError::Pairing(_) => "pairing_failed",
            ClientError::State(_) | ClientError::Damaged { .. } => "state",
            ClientError::Usage(_) => "usage",
            ClientError::Timeout(_) => "timeout",
            ClientError::ResumeRefused { .. } => "resume_refused",
            ClientError::SessionTakenOver => "session_taken_over",
            ClientError::Internal(_) => "internal",
            ClientError::FilesFailed(_) => "files_failed",
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            ClientError::RelayUnreachable { .. }
            | ClientError::RelayCertificate { .. }
            | ClientError::ConnectionLost(_)
            | ClientError::RelayProtocol(_) => exit::RELAY_UNREACHABLE,
            ClientError::Pairing(_) => exit::PAIRING_FAILED,
            ClientError::State(_) | ClientError::Damaged { .. } => exit::STATE,
            ClientError::Usage(_) => exit::USAGE,
            ClientError::Timeout(_) => exit::TIMEOUT,
            ClientError::ResumeRefused { .. } | ClientError::SessionTakenOver => {
                exit::RESUME_REFUSED
            }
            ClientError::Internal(_) => exit::INTERNAL,
            ClientError::FilesFailed(_) => exit::FILES_FAILED,
        })
    }
}
