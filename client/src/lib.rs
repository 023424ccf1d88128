//! The parley client library: invite codes, the pairing handshake, message encryption, the
//! session and the conversation's delivery logic (all sans-IO), plus the async driver that
//! moves their frames, lines and timers, and the CLI's output.
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod code;
pub mod conversation;
pub mod dh;
pub mod disk_files;
pub mod driver;
pub mod error;
pub mod files;
pub mod handshake;
pub mod keys;
pub mod liveness;
pub mod message;
pub mod output;
pub mod ratchet;
pub mod session;
pub mod transfers;
pub mod transport;
pub mod wire;
