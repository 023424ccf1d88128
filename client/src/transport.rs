//! How the client reaches the relay: `ws://` or `wss://` (rustls with the ring provider), which
//! certificates it trusts (the system's roots plus `--ca-file`), what a failed connection
//! means, and the warning for an unencrypted connection that leaves this machine.
//!
//! One [`Dialer`] per process: it holds what every connection needs, and builds the TLS
//! configuration once, at the first `wss://` connection.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parley_protocol::limits::MAX_FRAME_BYTES;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{CertificateError, ClientConfig, RootCertStore};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::{Error as WsError, TlsError};
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::error::ClientError;

/// How long to wait for the relay to accept the connection (TCP, TLS and WebSocket handshakes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `warning` event's code for a `ws://` relay that is not on this machine.
pub const PLAINTEXT_WARNING: &str = "plaintext_relay";

pub type RelaySocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What every relay connection of this process needs: the liveness bound, the certificates
/// to trust, and whether the plaintext warning was given.
pub struct Dialer {
    idle: Duration,
    /// The certificates of `--ca-file`, already checked to be usable trust anchors.
    extra_roots: Vec<CertificateDer<'static>>,
    tls: OnceLock<Tls>,
    warned_plaintext: AtomicBool,
}

/// The TLS configuration, and whether the system's store gave us anything (for the message
/// when a certificate's issuer is unknown).
struct Tls {
    config: Arc<ClientConfig>,
    system_roots: usize,
}

impl Dialer {
    /// Reads `ca_file` now, so that a missing or broken file is a usage error before anything
    /// else happens; the system's roots are read at the first `wss://` connection.
    pub fn new(idle: Duration, ca_file: Option<&Path>) -> Result<Dialer, ClientError> {
        let extra_roots = match ca_file {
            Some(path) => read_ca_file(path)?,
            None => Vec::new(),
        };
        Ok(Dialer {
            idle,
            extra_roots,
            tls: OnceLock::new(),
            warned_plaintext: AtomicBool::new(false),
        })
    }

    /// A relay connection that delivers no frame at all for this long is dead.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// The `warning` event for a `ws://` URL whose host is not this machine (not loopback);
    /// `None` for any other URL, and after the first time in this process.
    pub fn plaintext_warning(&self, url: &str) -> Option<Value> {
        let host = plaintext_remote_host(url)?;
        if self.warned_plaintext.swap(true, Ordering::Relaxed) {
            return None;
        }
        Some(json!({
            "event": "warning",
            "code": PLAINTEXT_WARNING,
            "message": format!(
                "the relay at {host} is reached over ws://, unencrypted: messages stay end-to-end \
                 encrypted, but resume tokens, session ids and metadata (who talks when, how \
                 much) travel in the clear; use a wss:// URL"
            ),
        }))
    }

    /// Opens a WebSocket to `url`, verifying the relay's certificate for `wss://`.
    pub async fn open(&self, url: &str) -> Result<RelaySocket, ClientError> {
        // The protocol's frame limit, not tungstenite's defaults (64 MiB messages, 16 MiB
        // frames): a relay never has a reason to send more, so more is not read.
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let tls = if is_wss(url) { Some(self.tls()?) } else { None };
        let connector = tls.map(|tls| Connector::Rustls(Arc::clone(&tls.config)));
        // Nagle off (TCP_NODELAY): small frames (a receipt, a file's acknowledgement) must
        // not wait for the previous segment's ACK, which a delayed ACK can hold for 40 ms.
        let connecting =
            tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, connector);
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(e)) => Err(self.classify(url, e)),
            Err(_) => Err(ClientError::RelayUnreachable {
                url: url.to_string(),
                reason: format!(
                    "no answer within {} s{}",
                    CONNECT_TIMEOUT.as_secs(),
                    if is_wss(url) {
                        " (a relay without TLS does not answer a wss:// client: if it serves \
                         ws://, use a ws:// URL)"
                    } else {
                        ""
                    }
                ),
            }),
        }
    }

    fn tls(&self) -> Result<&Tls, ClientError> {
        if let Some(tls) = self.tls.get() {
            return Ok(tls);
        }
        let built = self.build_tls()?;
        Ok(self.tls.get_or_init(|| built))
    }

    fn build_tls(&self) -> Result<Tls, ClientError> {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(self.extra_roots.iter().cloned());
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            // Not fatal: --ca-file may be all that is needed. Without any root, the first
            // certificate check fails and says so.
            tracing::debug!(error = %e, "cannot read part of the system's certificate store");
        }
        let (system_roots, _) = roots.add_parsable_certificates(native.certs);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Internal(format!("cannot set up TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls {
            config: Arc::new(config),
            system_roots,
        })
    }

    /// What a failed connection attempt means, in words that say what to do.
    fn classify(&self, url: &str, e: WsError) -> ClientError {
        let unreachable = |reason: String| ClientError::RelayUnreachable {
            url: url.to_string(),
            reason,
        };
        let tls_error = match &e {
            WsError::Io(io) => io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
            _ => None,
        };
        match (tls_error, &e) {
            (Some(rustls::Error::InvalidCertificate(cert)), _) => {
                let system_roots = self.tls.get().map_or(0, |t| t.system_roots);
                ClientError::RelayCertificate {
                    url: url.to_string(),
                    reason: certificate_problem(cert, system_roots),
                }
            }
            (Some(other), _) => unreachable(format!(
                "the TLS handshake failed ({other}); check that the relay serves wss:// on \
                 that port (a relay started without --tls-cert serves ws://)"
            )),
            (None, WsError::Tls(TlsError::InvalidDnsName)) => {
                unreachable("its host is not a name a TLS certificate can be checked for".into())
            }
            // A TLS relay answers a plaintext handshake with bytes that are not HTTP.
            (None, WsError::Protocol(_) | WsError::HttpFormat(_)) if !is_wss(url) => {
                unreachable(format!(
                    "{e}; it does not answer as a ws:// relay: if it serves TLS, use a wss:// URL"
                ))
            }
            _ => unreachable(e.to_string()),
        }
    }
}

/// The cause of a certificate rejection, in plain words, and what helps.
fn certificate_problem(e: &CertificateError, system_roots: usize) -> String {
    const CA_FILE_HINT: &str = "if the relay uses a private CA or a self-signed certificate, \
                                pass --ca-file with that CA's (or that certificate's) PEM file";
    match e {
        CertificateError::UnknownIssuer => {
            let store = if system_roots == 0 {
                " (this machine's certificate store is empty or unreadable)"
            } else {
                ""
            };
            format!(
                "the relay's certificate is not signed by an authority this machine trusts \
                 (unknown issuer){store}; {CA_FILE_HINT}"
            )
        }
        CertificateError::NotValidForName => {
            "the relay's certificate is for another host name (wrong host name); use the \
             name the certificate was issued for in the relay URL, or have it reissued \
             (--ca-file only adds trusted authorities, it cannot fix a name)"
                .into()
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => {
            let listed: Vec<&str> = presented.iter().take(4).map(|p| subject_name(p)).collect();
            format!(
                "the relay's certificate is for another host name (wrong host name): it names \
                 {}, not {}; use a name it lists in the relay URL, or have it reissued \
                 (--ca-file only adds trusted authorities, it cannot fix a name)",
                if listed.is_empty() {
                    "no host".to_string()
                } else {
                    listed.join(", ")
                },
                expected.to_str()
            )
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            let when = match e {
                CertificateError::ExpiredContext { not_after, .. } => {
                    format!(" on {}", utc(not_after.as_secs()))
                }
                _ => String::new(),
            };
            format!(
                "the relay's certificate has expired{when} (expired); its operator must renew \
                 it, or this machine's clock is wrong (--ca-file cannot make an expired \
                 certificate valid)"
            )
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the relay's certificate is not valid yet (not yet valid); check this machine's \
             clock (--ca-file cannot change a certificate's dates)"
                .into()
        }
        CertificateError::BadSignature
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => format!(
            "the relay's certificate is not signed by an authority this machine trusts (bad \
             signature: a trusted authority of the name it gives as issuer did not sign it); \
             {CA_FILE_HINT}"
        ),
        CertificateError::Other(other)
            if other.0.downcast_ref::<webpki::Error>()
                == Some(&webpki::Error::CaUsedAsEndEntity) =>
        {
            "the relay's certificate is a CA certificate used as the relay's own (CA used as \
             end entity; `openssl req -x509` makes such certificates by default); a \
             self-signed relay certificate given with --ca-file must say CA:FALSE in its \
             basicConstraints, or the relay needs a certificate signed by that CA"
                .into()
        }
        CertificateError::Revoked => {
            "the relay's certificate has been revoked (revoked); its operator must replace it"
                .into()
        }
        other => format!("the relay's certificate was rejected ({other:?}); {CA_FILE_HINT}"),
    }
}

/// A name from a certificate as webpki lists it (`DnsName("relay.example")`,
/// `IpAddress(192.0.2.1)`), without the wrapping.
fn subject_name(listed: &str) -> &str {
    listed
        .split_once('(')
        .and_then(|(_, inner)| inner.strip_suffix(')'))
        .unwrap_or(listed)
        .trim_matches('"')
}

fn utc(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("unix time {unix}"))
}

/// Far more than any bundle of CA certificates (the system's whole store is about 200 KiB).
const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The certificates in a PEM file, each usable as a trust anchor, or a usage error naming it.
fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let named = |what: String| {
        ClientError::Usage(format!(
            "--ca-file {}: {what}; it must be a PEM file of one or more CA certificates \
             (-----BEGIN CERTIFICATE-----)",
            path.display()
        ))
    };
    // A regular file (a FIFO or a device would block or never end), read with a bound.
    let metadata = std::fs::metadata(path).map_err(|e| named(format!("cannot read it ({e})")))?;
    if !metadata.is_file() {
        return Err(named("not a regular file".into()));
    }
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| {
            use std::io::Read;
            file.take(MAX_CA_FILE_BYTES.saturating_add(1))
                .read_to_end(&mut pem)
        })
        .map_err(|e| named(format!("cannot read it ({e})")))?;
    if u64::try_from(pem.len()).unwrap_or(u64::MAX) > MAX_CA_FILE_BYTES {
        return Err(named(format!(
            "larger than {} MiB",
            MAX_CA_FILE_BYTES / (1024 * 1024)
        )));
    }
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| named(format!("not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(named("no certificate in it".into()));
    }
    let mut check = RootCertStore::empty();
    for cert in &certs {
        check
            .add(cert.clone())
            .map_err(|e| named(format!("a certificate in it cannot be used ({e})")))?;
    }
    Ok(certs)
}

fn is_wss(url: &str) -> bool {
    url.parse::<Uri>()
        .ok()
        .is_some_and(|uri| uri.scheme_str() == Some("wss"))
}

/// The host of a `ws://` URL that is not this machine (127.0.0.0/8, ::1, localhost).
fn plaintext_remote_host(url: &str) -> Option<String> {
    let uri = url.parse::<Uri>().ok()?;
    if uri.scheme_str() != Some("ws") {
        return None;
    }
    let host = uri.host()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => {
            let name = bare.strip_suffix('.').unwrap_or(bare);
            name.eq_ignore_ascii_case("localhost")
        }
    };
    (!loopback).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ws_urls_that_leave_this_machine_are_plaintext_remote() {
        for local in [
            "ws://127.0.0.1:9000",
            "ws://127.8.9.10:9000/x",
            "ws://localhost:9000",
            "ws://LocalHost.:9000",
            "ws://[::1]:9000",
            "ws://[::ffff:127.0.0.1]:9000",
            "wss://relay.example:443",
            "wss://192.0.2.1",
            "not a url",
        ] {
            assert_eq!(plaintext_remote_host(local), None, "{local}");
        }
        for remote in [
            "ws://relay.example:9000",
            "ws://192.0.2.1:9",
            "ws://[2001:db8::1]:9000",
            "ws://localhost.example:9000",
            "ws://0.0.0.0:9000",
        ] {
            assert!(plaintext_remote_host(remote).is_some(), "{remote}");
        }
    }

    #[test]
    fn the_plaintext_warning_is_given_once_per_process() {
        let dialer = Dialer::new(Duration::from_secs(1), None).unwrap();
        assert!(dialer.plaintext_warning("ws://127.0.0.1:9").is_none());
        let warning = dialer.plaintext_warning("ws://relay.example:9").unwrap();
        assert_eq!(warning["event"], "warning");
        assert_eq!(warning["code"], PLAINTEXT_WARNING);
        assert!(dialer.plaintext_warning("ws://relay.example:9").is_none());
    }

    #[test]
    fn a_ca_file_that_is_missing_or_not_pem_is_a_usage_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("parley-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        // A FIFO would block a plain read for ever; a directory is no file.
        let fifo = dir.join("fifo.pem");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        for path in [dir.join("missing.pem"), garbage, broken, fifo, dir.clone()] {
            let Err(e) = Dialer::new(Duration::from_secs(1), Some(&path)) else {
                panic!("{} accepted", path.display());
            };
            assert!(matches!(e, ClientError::Usage(_)), "{e}");
            assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
            assert!(e.to_string().contains("--ca-file"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_certificate_problem_names_its_cause() {
        for (error, cause) in [
            (CertificateError::UnknownIssuer, "unknown issuer"),
            (CertificateError::NotValidForName, "wrong host name"),
            (CertificateError::Expired, "expired"),
            (CertificateError::NotValidYet, "not yet valid"),
            (CertificateError::BadSignature, "bad signature"),
            (CertificateError::InvalidPurpose, "InvalidPurpose"),
            (
                CertificateError::Other(rustls::OtherError(Arc::new(
                    webpki::Error::CaUsedAsEndEntity,
                ))),
                "CA:FALSE",
            ),
        ] {
            let message = certificate_problem(&error, 1);
            assert!(message.contains(cause), "{message}");
            assert!(message.contains("--ca-file"), "{message}");
        }
        assert!(
            certificate_problem(&CertificateError::UnknownIssuer, 0).contains("store is empty")
        );
        let name = certificate_problem(
            &CertificateError::NotValidForNameContext {
                expected: rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                presented: vec![
                    "DnsName(\"relay.example\")".into(),
                    "IpAddress(192.0.2.1)".into(),
                ],
            },
            1,
        );
        assert!(
            name.contains("it names relay.example, 192.0.2.1, not 127.0.0.1"),
            "{name}"
        );
    }
}
