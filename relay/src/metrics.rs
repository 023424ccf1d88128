//! What the relay counts for its operator, and the Prometheus exposition of it.
//!
//! Counting is a relaxed atomic add on the path that does the work (per frame, per batch of
//! writes, per refusal); everything else (gauges: connections, sessions by state, invites,
//! mailboxes, the process's CPU, memory and descriptors) is read when scraped. Labels are only
//! frame types and error codes: never a sid, code, token, name or address.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parley_protocol::{ErrorCode, FrameType};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::hub::Hub;

const FRAME_TYPES: usize = FrameType::ALL.len();
const ERROR_CODES: usize = ErrorCode::ALL.len();

/// Counters, shared by every connection of one relay.
#[derive(Debug, Default)]
pub struct Metrics {
    frames_received: [AtomicU64; FRAME_TYPES],
    /// Text frames that did not parse as a frame (no type to count them under).
    unparsed_frames: AtomicU64,
    /// Binary `DATA` frames received (well formed or not), forwarded (and their bytes), and
    /// dropped because the other member was not there to take them.
    data_frames_received: AtomicU64,
    data_frames_forwarded: AtomicU64,
    data_bytes_forwarded: AtomicU64,
    data_frames_dropped: AtomicU64,
    errors_sent: [AtomicU64; ERROR_CODES],
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    slow_consumers: AtomicU64,
    refused_connections: AtomicU64,
    failed_upgrades: AtomicU64,
    failed_tls_handshakes: AtomicU64,
    plain_http_requests: AtomicU64,
    /// In a cluster: requests to the shared store, those that failed, and their total time.
    store_requests: AtomicU64,
    store_errors: AtomicU64,
    store_micros: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    pub fn frame_received(&self, kind: Option<FrameType>, bytes: usize) {
        let slot = kind.and_then(|k| self.frames_received.get(k as usize));
        add(slot.unwrap_or(&self.unparsed_frames), 1);
        add(&self.bytes_received, bytes as u64);
    }

    pub fn data_received(&self, bytes: usize) {
        add(&self.data_frames_received, 1);
        add(&self.bytes_received, bytes as u64);
    }

    pub fn data_forwarded(&self, bytes: usize) {
        add(&self.data_frames_forwarded, 1);
        add(&self.data_bytes_forwarded, bytes as u64);
    }

    pub fn data_dropped(&self) {
        add(&self.data_frames_dropped, 1);
    }

    /// DATA frames forwarded, their bytes, and DATA frames dropped.
    #[cfg(test)]
    pub fn data_forwarded_for_tests(&self) -> (u64, u64, u64) {
        (
            load(&self.data_frames_forwarded),
            load(&self.data_bytes_forwarded),
            load(&self.data_frames_dropped),
        )
    }

    pub fn error_sent(&self, code: ErrorCode) {
        // Errors are rare: a search of 23 codes costs nothing that matters.
        let index = ErrorCode::ALL.iter().position(|c| *c == code);
        if let Some(slot) = index.and_then(|i| self.errors_sent.get(i)) {
            add(slot, 1);
        }
    }

    pub fn written(&self, frames: usize, bytes: usize) {
        add(&self.frames_sent, frames as u64);
        add(&self.bytes_sent, bytes as u64);
    }

    pub fn slow_consumer(&self) {
        add(&self.slow_consumers, 1);
    }

    pub fn refused_connection(&self) {
        add(&self.refused_connections, 1);
    }

    pub fn failed_upgrade(&self) {
        add(&self.failed_upgrades, 1);
    }

    pub fn failed_tls_handshake(&self) {
        add(&self.failed_tls_handshakes, 1);
    }

    pub fn plain_http_request(&self) {
        add(&self.plain_http_requests, 1);
    }

    pub fn store_request(&self, took: std::time::Duration, failed: bool) {
        add(&self.store_requests, 1);
        add(
            &self.store_micros,
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        );
        if failed {
            add(&self.store_errors, 1);
        }
    }
}

/// A registry with this relay's metrics in it (one per relay, so that several relays in one
/// process, as in tests, keep their numbers apart).
pub fn registry(hub: Arc<Hub>) -> Registry {
    let mut registry = Registry::with_prefix("parley_relay");
    registry.register_collector(Box::new(RelayCollector(hub)));
    registry
}

/// The text exposition (OpenMetrics 1.0, which Prometheus reads).
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

struct RelayCollector(Arc<Hub>);

impl fmt::Debug for RelayCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RelayCollector")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let metric = ConstCounter::new(v);
    metric.encode(e.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let metric = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    metric.encode(e.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Collector for RelayCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let hub = &self.0;
        let m = hub.metrics();
        let stats = hub.stats();
        let states = hub.session_states();

        gauge(
            &mut e,
            "connections",
            "Connections open, upgraded or not",
            stats.connections as u64,
        )?;
        let mut family = e.encode_descriptor(
            "sessions",
            "Sessions held, by state",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in [
            ("unpaired", states.unpaired),
            ("paired", states.paired),
            ("restored_awaiting", states.awaiting_member),
        ] {
            let labels = [("state", state)];
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        gauge(
            &mut e,
            "invites",
            "Invite codes held (live, or kept as tombstones)",
            stats.invites as u64,
        )?;
        gauge(
            &mut e,
            "mailbox_frames",
            "Frames held for offline members and unanswered join requests",
            hub.budget.held() as u64,
        )?;
        gauge(
            &mut e,
            "mailbox_bytes",
            "Bytes held for offline members and unanswered join requests",
            stats.mailbox_bytes as u64,
        )?;

        let mut family = e.encode_descriptor(
            "frames_received",
            "Client frames received, by type",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in FrameType::ALL.iter().zip(&m.frames_received) {
            let labels = [("type", kind.as_str())];
            ConstCounter::new(load(n)).encode(family.encode_family(&labels)?)?;
        }
        let labels = [("type", "DATA")];
        ConstCounter::new(load(&m.data_frames_received)).encode(family.encode_family(&labels)?)?;
        let labels = [("type", "unparsed")];
        ConstCounter::new(load(&m.unparsed_frames)).encode(family.encode_family(&labels)?)?;
        let mut family = e.encode_descriptor(
            "errors_sent",
            "ERROR frames sent, by code",
            None,
            MetricType::Counter,
        )?;
        for (code, n) in ErrorCode::ALL.iter().zip(&m.errors_sent) {
            let labels = [("code", code.as_str())];
            ConstCounter::new(load(n)).encode(family.encode_family(&labels)?)?;
        }
        let limited = ErrorCode::ALL
            .iter()
            .zip(&m.errors_sent)
            .find(|(code, _)| **code == ErrorCode::RateLimited)
            .map_or(0, |(_, n)| load(n));
        counter(
            &mut e,
            "rate_limited",
            "Frames refused by a rate limit",
            limited,
        )?;
        counter(
            &mut e,
            "frames_sent",
            "Frames written to clients",
            load(&m.frames_sent),
        )?;
        counter(
            &mut e,
            "bytes_sent",
            "Frame bytes written to clients",
            load(&m.bytes_sent),
        )?;
        counter(
            &mut e,
            "bytes_received",
            "Frame bytes received from clients",
            load(&m.bytes_received),
        )?;
        counter(
            &mut e,
            "data_frames_forwarded",
            "Binary DATA frames forwarded to the other member of their session",
            load(&m.data_frames_forwarded),
        )?;
        counter(
            &mut e,
            "data_bytes_forwarded",
            "Bytes of the DATA frames forwarded (headers included)",
            load(&m.data_bytes_forwarded),
        )?;
        counter(
            &mut e,
            "data_frames_dropped",
            "DATA frames dropped because the other member was not attached to take them (DATA is never kept)",
            load(&m.data_frames_dropped),
        )?;
        counter(
            &mut e,
            "slow_consumers",
            "Connections dropped for not reading their frames",
            load(&m.slow_consumers),
        )?;
        counter(
            &mut e,
            "refused_connections",
            "Connections refused (closed on accept, or answered 503 at the upgrade): the relay or the address at a connection limit",
            load(&m.refused_connections),
        )?;
        counter(
            &mut e,
            "failed_upgrades",
            "Connections that never became WebSocket (bad or slow HTTP request, or refused while draining)",
            load(&m.failed_upgrades),
        )?;
        counter(
            &mut e,
            "failed_tls_handshakes",
            "TLS handshakes that failed or timed out",
            load(&m.failed_tls_handshakes),
        )?;
        counter(
            &mut e,
            "plain_http_requests",
            "Plain HTTP requests answered (health checks included)",
            load(&m.plain_http_requests),
        )?;
        if hub.config().cluster.is_some() {
            counter(
                &mut e,
                "store_requests",
                "Requests to the cluster's shared store (Redis)",
                load(&m.store_requests),
            )?;
            counter(
                &mut e,
                "store_errors",
                "Requests to the cluster's shared store that failed or timed out",
                load(&m.store_errors),
            )?;
            let seconds = ConstCounter::new(load(&m.store_micros) as f64 / 1e6);
            let d = e.encode_descriptor(
                "store_seconds",
                "Time spent waiting for the shared store; divided by store_requests, the mean latency",
                None,
                seconds.metric_type(),
            )?;
            seconds.encode(d)?;
        }

        let process = crate::process::sample();
        let cpu = ConstCounter::new(process.cpu_seconds);
        let d = e.encode_descriptor(
            "process_cpu_seconds",
            "CPU time used by the relay process (user and system)",
            None,
            cpu.metric_type(),
        )?;
        cpu.encode(d)?;
        gauge(
            &mut e,
            "process_resident_memory_bytes",
            "Resident memory of the relay process",
            process.rss_bytes,
        )?;
        gauge(
            &mut e,
            "process_open_fds",
            "File descriptors the relay process holds",
            process.open_fds,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_types_index_their_counters() {
        // `kind as usize` is the counter's index on the hot path; the exposition zips ALL.
        for (i, kind) in FrameType::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i, "{kind}");
        }
    }

    #[test]
    fn every_error_code_has_its_counter() {
        let m = Metrics::default();
        for code in ErrorCode::ALL {
            m.error_sent(code);
        }
        assert!(m.errors_sent.iter().all(|n| load(n) == 1));
    }
}
