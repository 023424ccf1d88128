//! Parley's wire protocol, defined once for the relay and the client.
//!
//! Every WebSocket text message is one JSON object `{"t": TYPE, "sid": SESSION_ID?, "data": {...}?}`
//! (see `protocol.md` at the workspace root, which is normative). This crate knows the frame
//! types, how to read an envelope without copying the parts a relay only forwards, the
//! `data` shape of every frame the relay itself reads or writes, the stable error codes, and the
//! default limits. The one binary frame, `DATA`, is in [`data`]. It does no IO.

#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod data;
mod error_code;
mod frame;
pub mod limits;
pub mod payload;

pub use error_code::ErrorCode;
pub use frame::{Envelope, FrameError, FrameType, encode};
