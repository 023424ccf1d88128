//! parley-relay: an untrusted, in-memory WebSocket relay for two-party Parley sessions.
//!
//! It pairs two clients by a short invite code, then forwards their frames to each other
//! without reading what is end-to-end. protocol.md (workspace root) is the normative
//! description of everything it accepts and sends.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let relay = parley_relay::Relay::bind("127.0.0.1:0", parley_relay::RelayConfig::default()).await?;
//! println!("listening on {}", relay.local_addr()?);
//! relay.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod budget;
mod cluster;
mod cmd;
mod config;
mod connection;
mod http;
mod hub;
mod ids;
mod journal;
mod limiter;
mod mailbox;
mod metrics;
mod outbox;
mod process;
mod read_ahead;
mod server;
mod tls;

pub use cluster::ClusterConfig;
pub use config::{RateLimit, RelayConfig};
pub use http::ForwardedHeader;
pub use hub::Stats;
pub use ids::RelaySecret;
pub use ipnet::IpNet;
pub use mailbox::MailboxLimits;
pub use server::{Relay, RelayHandle};
pub use tls::Tls;
