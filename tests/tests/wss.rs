//! The client against a relay on the internet: `wss://` with a private CA (`--ca-file`),
//! certificates it must refuse (and say why), the warning for an unencrypted relay that is not
//! on this machine, and a relay renewing its certificate (SIGHUP) under an open chat.
//! Certificates are made here (tests/src/pki.rs); every connection stays on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parley_e2e::pki::{TestCa, Validity};
use parley_e2e::{Client, RelayProcess, STEP, TempDir, run_client, run_human, texts};
use serde_json::Value;

/// A relay serving `wss://` with `cert`.
fn tls_relay(cert: &parley_e2e::pki::ServerCert) -> RelayProcess {
    let relay = RelayProcess::start(&[
        "--tls-cert",
        cert.cert.to_str().unwrap(),
        "--tls-key",
        cert.key.to_str().unwrap(),
    ]);
    assert!(relay.url().starts_with("wss://"), "{}", relay.url());
    relay
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `parley host` against `url` trusting `ca_file`: `Ok` once it has its invite code (the
/// connection and the certificate were accepted), or the `error` event and exit code.
fn probe(url: &str, ca_file: Option<&Path>) -> Result<(), (Option<i32>, Value)> {
    probe_with_env(url, ca_file, &[])
}

/// [`probe`] with extra environment variables.
fn probe_with_env(
    url: &str,
    ca_file: Option<&Path>,
    env: &[(&str, &str)],
) -> Result<(), (Option<i32>, Value)> {
    let dir = TempDir::new("probe");
    let mut args = vec!["--timeout", "20"];
    if let Some(ca) = ca_file {
        args.extend(["--ca-file", arg(ca)]);
    }
    args.push("host");
    let mut client = Client::spawn_with_env(url, dir.path(), "probe", &args, env);
    let first = client.next_event().expect("the client printed nothing");
    if first["event"] == "invite" {
        client.kill();
        return Ok(());
    }
    let (status, rest) = client.wait();
    let error = std::iter::once(first)
        .chain(rest)
        .find(|e| e["event"] == "error")
        .expect("no error event");
    Err((status.code(), error))
}

/// The client refuses the relay's certificate: exit 3, `relay_certificate`, a message that
/// names `cause` and the flag that can help or cannot.
fn assert_refused(result: Result<(), (Option<i32>, Value)>, cause: &str) {
    let (code, error) = result.expect_err("the certificate was accepted");
    assert_eq!(code, Some(3), "{error}");
    assert_eq!(error["code"], "relay_certificate", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(cause), "`{cause}` not in: {message}");
    assert!(message.contains("--ca-file"), "{message}");
}

#[test]
fn pair_chat_and_resume_over_wss_with_a_private_ca() {
    let pki = TempDir::new("pki");
    let ca = TestCa::new("Parley test CA");
    let ca_file = ca.write(pki.path(), "ca.pem");
    let cert = ca.server(
        pki.path(),
        "relay",
        &["localhost", "127.0.0.1"],
        Validity::Now,
    );
    let relay = tls_relay(&cert);
    // By name for one side, by address for the other: both are in the certificate.
    let by_name = format!("wss://localhost:{}", relay.port());
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    let ca_arg = arg(&ca_file);

    let mut alice = Client::spawn(
        relay.url(),
        alice_dir.path(),
        "alice",
        &["--ca-file", ca_arg, "--exit-after", "1", "host"],
    );
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn_with_env(
        &by_name,
        bob_dir.path(),
        "bob",
        &["--exit-after", "1", "join", &code],
        &[("PARLEY_CA_FILE", ca_arg)],
    );
    let paired = alice.expect("paired");
    assert_eq!(bob.expect("paired")["sid"], paired["sid"]);
    let sid = paired["sid"].as_str().unwrap().to_string();
    alice.send_line("hello over tls");
    bob.send_line("hello back");
    assert_eq!(bob.expect("message")["text"], "hello over tls");
    assert_eq!(alice.expect("message")["text"], "hello back");
    let (alice_status, alice_rest) = alice.wait();
    let (bob_status, bob_rest) = bob.wait();
    assert!(alice_status.success(), "{alice_status}: {alice_rest:?}");
    assert!(bob_status.success(), "{bob_status}: {bob_rest:?}");
    for events in [&alice_rest, &bob_rest] {
        assert!(events.iter().all(|e| e["event"] != "warning"), "{events:?}");
    }

    // The wss:// URL is stored with the session; `resume` needs the CA again.
    let (code, events) = run_client(relay.url(), alice_dir.path(), "alice", &["sessions"]);
    assert_eq!(code, Some(0));
    assert_eq!(events[0]["relay"], relay.url());
    let mut alice = Client::spawn(
        "ws://unused.invalid:1",
        alice_dir.path(),
        "alice",
        &["--ca-file", ca_arg, "--exit-after", "1", "resume"],
    );
    assert_eq!(alice.expect("resumed")["sid"], sid.as_str());
    let mut bob = Client::spawn(
        "ws://unused.invalid:1",
        bob_dir.path(),
        "bob",
        &["--ca-file", ca_arg, "--exit-after", "1", "resume"],
    );
    assert_eq!(bob.expect("resumed")["sid"], sid.as_str());
    alice.send_line("resumed over tls");
    bob.send_line("so it is");
    assert_eq!(bob.expect("message")["text"], "resumed over tls");
    assert_eq!(alice.expect("message")["text"], "so it is");
    let (alice_status, alice_rest) = alice.wait();
    let (bob_status, bob_rest) = bob.wait();
    assert!(alice_status.success() && bob_status.success());
    assert!(texts(&alice_rest).is_empty() && texts(&bob_rest).is_empty());

    // Without the CA, the same resume is refused for its certificate, not retried.
    let (code, events) = run_client(relay.url(), alice_dir.path(), "alice", &["resume"]);
    assert_eq!(code, Some(3), "{events:?}");
    let error = events.iter().find(|e| e["event"] == "error").unwrap();
    assert_eq!(error["code"], "relay_certificate", "{error}");
}

#[test]
fn a_certificate_from_an_unknown_authority_is_refused_and_the_message_says_ca_file() {
    let pki = TempDir::new("pki");
    let (ca, other) = (TestCa::new("Relay CA"), TestCa::new("Some other CA"));
    let other_file = other.write(pki.path(), "other.pem");
    let cert = ca.server(
        pki.path(),
        "relay",
        &["localhost", "127.0.0.1"],
        Validity::Now,
    );
    let relay = tls_relay(&cert);
    assert_refused(probe(relay.url(), Some(&other_file)), "unknown issuer");
    // No --ca-file at all: the system's roots do not know a private CA either.
    assert_refused(probe(relay.url(), None), "unknown issuer");

    // A person sees the same on stderr.
    let dir = TempDir::new("human");
    let run = run_human(
        relay.url(),
        dir.path(),
        "alice",
        &["--ca-file", arg(&other_file), "host"],
    );
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("not signed by an authority this machine trusts")
            && run.stderr.contains("--ca-file"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_certificate_for_another_host_name_is_refused() {
    let pki = TempDir::new("pki");
    let ca = TestCa::new("Relay CA");
    let ca_file = ca.write(pki.path(), "ca.pem");
    let cert = ca.server(pki.path(), "relay", &["relay.example"], Validity::Now);
    let relay = tls_relay(&cert);
    let by_name = format!("wss://localhost:{}", relay.port());
    for url in [relay.url(), by_name.as_str()] {
        let result = probe(url, Some(&ca_file));
        assert_refused(result.clone(), "wrong host name");
        let message = result.unwrap_err().1["message"].to_string();
        assert!(message.contains("relay.example"), "{message}");
    }
}

#[test]
fn an_expired_certificate_is_refused() {
    let pki = TempDir::new("pki");
    let ca = TestCa::new("Relay CA");
    let ca_file = ca.write(pki.path(), "ca.pem");
    let cert = ca.server(
        pki.path(),
        "relay",
        &["localhost", "127.0.0.1"],
        Validity::Expired,
    );
    let relay = tls_relay(&cert);
    assert_refused(probe(relay.url(), Some(&ca_file)), "expired");
}

#[test]
fn a_ca_file_that_cannot_be_read_or_is_not_pem_is_a_usage_error_naming_it() {
    let dir = TempDir::new("cafile");
    let not_pem = dir.path().join("notes.txt");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    for path in [&not_pem, &missing] {
        let run = run_human(
            "wss://127.0.0.1:9",
            dir.path(),
            "alice",
            &["--ca-file", arg(path), "host"],
        );
        assert_eq!(run.code, Some(2), "{}", run.stderr);
        assert!(
            run.stderr.contains(arg(path)) && run.stderr.contains("--ca-file"),
            "{}",
            run.stderr
        );
    }
}

/// A `ws://` relay that is not on this machine: warned about before connecting. The host
/// name is reserved (RFC 6761) and never resolves, so nothing leaves this machine but a DNS
/// query for it.
#[test]
fn a_plaintext_relay_off_this_machine_gets_one_warning_before_connecting() {
    let dir = TempDir::new("plain");
    let remote = "ws://relay.invalid:9";
    let (code, events) = run_client(remote, dir.path(), "alice", &["--timeout", "10", "host"]);
    assert!(code == Some(3) || code == Some(6), "{code:?} {events:?}");
    let warnings: Vec<&Value> = events.iter().filter(|e| e["event"] == "warning").collect();
    assert_eq!(warnings.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "warning", "the warning comes first");
    assert_eq!(warnings[0]["code"], "plaintext_relay");
    let message = warnings[0]["message"].as_str().unwrap();
    assert!(
        message.contains("relay.invalid") && message.contains("wss://"),
        "{message}"
    );

    let run = run_human(remote, dir.path(), "alice", &["--timeout", "10", "host"]);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("parley: warning:"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(lines[0].contains("in the clear"), "{}", run.stderr);
}

#[test]
fn a_plaintext_relay_on_this_machine_gets_no_warning() {
    let relay = RelayProcess::start(&[]);
    assert!(
        relay.url().starts_with("ws://127.0.0.1:"),
        "{}",
        relay.url()
    );
    let dir = TempDir::new("local");
    for url in [
        relay.url().to_string(),
        format!("ws://localhost:{}", relay.port()),
    ] {
        let mut client = Client::spawn(&url, dir.path(), "alice", &["host"]);
        let first = client.next_event().unwrap();
        assert_eq!(first["event"], "invite", "{first}");
        client.kill();
    }
    let run = run_human(
        relay.url(),
        dir.path(),
        "alice",
        &["--timeout", "1", "host"],
    );
    assert_eq!(run.code, Some(6), "{}", run.stderr);
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
}

/// Retries `probe` until it succeeds (the relay reloads on its own time after SIGHUP).
fn eventually_accepted(url: &str, ca_file: &Path) {
    let deadline = Instant::now() + STEP;
    loop {
        match probe(url, Some(ca_file)) {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("never accepted: {e:?}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn sighup_renews_the_certificate_for_new_clients_while_a_chat_goes_on() {
    let pki = TempDir::new("pki");
    let (old_ca, new_ca) = (TestCa::new("Old CA"), TestCa::new("New CA"));
    let old_file: PathBuf = old_ca.write(pki.path(), "old.pem");
    let new_file: PathBuf = new_ca.write(pki.path(), "new.pem");
    let names = ["localhost", "127.0.0.1"];
    let first = old_ca.server(pki.path(), "relay", &names, Validity::Now);
    let relay = tls_relay(&first);
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    let mut alice = Client::spawn(
        relay.url(),
        alice_dir.path(),
        "alice",
        &["--ca-file", arg(&old_file), "host"],
    );
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(
        relay.url(),
        bob_dir.path(),
        "bob",
        &["--ca-file", arg(&old_file), "join", &code],
    );
    alice.expect("paired");
    bob.expect("paired");
    alice.send_line("before the renewal");
    assert_eq!(bob.expect("message")["text"], "before the renewal");

    // Renewed from another CA, over the same files, then SIGHUP.
    let second = new_ca.server(pki.path(), "relay", &names, Validity::Now);
    assert_eq!(second.cert, first.cert);
    relay.signal("HUP");
    eventually_accepted(relay.url(), &new_file);
    assert_refused(probe(relay.url(), Some(&old_file)), "unknown issuer");
    // The chat opened before goes on, both ways, on its old connections.
    alice.send_line("after the renewal");
    assert_eq!(bob.expect("message")["text"], "after the renewal");
    bob.send_line("still here");
    assert_eq!(alice.expect("message")["text"], "still here");

    // A broken renewal: the relay says so and keeps the certificate it has.
    std::fs::write(&second.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    relay.signal("HUP");
    relay.expect_log("not reloaded");
    assert_eq!(probe(relay.url(), Some(&new_file)), Ok(()));
    alice.send_line("after the broken renewal");
    assert_eq!(bob.expect("message")["text"], "after the broken renewal");
    for events in [&alice.seen, &bob.seen] {
        assert!(
            events.iter().all(|e| e["event"] != "relay_offline"),
            "the open chat was cut: {events:?}"
        );
    }
}

/// The relay comes back (same address) with a certificate this client does not trust: the
/// chat stops with the reason, rather than retrying in silence for ever.
#[test]
fn a_relay_back_with_an_untrusted_certificate_ends_the_chat_with_the_reason() {
    let pki = TempDir::new("pki");
    let (ca, stranger) = (TestCa::new("Relay CA"), TestCa::new("Stranger CA"));
    let ca_file = ca.write(pki.path(), "ca.pem");
    let names = ["localhost", "127.0.0.1"];
    let first = ca.server(pki.path(), "relay", &names, Validity::Now);
    let relay = tls_relay(&first);
    let url = relay.url().to_string();
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    let mut alice = Client::spawn(
        &url,
        alice_dir.path(),
        "alice",
        &["--ca-file", arg(&ca_file), "host"],
    );
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(
        &url,
        bob_dir.path(),
        "bob",
        &["--ca-file", arg(&ca_file), "join", &code],
    );
    alice.expect("paired");
    bob.expect("paired");

    let stopped = relay.kill();
    alice.expect("relay_offline");
    let other = stranger.server(pki.path(), "stranger", &names, Validity::Now);
    let _relay = stopped.start_again(&[
        "--tls-cert",
        other.cert.to_str().unwrap(),
        "--tls-key",
        other.key.to_str().unwrap(),
    ]);
    let error = alice.expect("error");
    assert_eq!(error["code"], "relay_certificate", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("unknown issuer"),
        "{error}"
    );
    let (status, events) = alice.wait();
    assert_eq!(status.code(), Some(3), "{events:?}");
    bob.kill();
}

/// A self-signed relay: trusted once its own certificate is the `--ca-file`, refused (and
/// told how to fix it) when that certificate says it is a CA, as `openssl req -x509` makes
/// them by default.
#[test]
fn a_self_signed_relay_is_trusted_through_ca_file() {
    let pki = TempDir::new("pki");
    let names = ["localhost", "127.0.0.1"];
    let plain = parley_e2e::pki::self_signed(pki.path(), "relay", &names, false);
    let relay = tls_relay(&plain);
    assert_eq!(probe(relay.url(), Some(&plain.cert)), Ok(()));
    assert_refused(probe(relay.url(), None), "unknown issuer");
    drop(relay);

    let ca_like = parley_e2e::pki::self_signed(pki.path(), "ca-relay", &names, true);
    let relay = tls_relay(&ca_like);
    assert_refused(probe(relay.url(), Some(&ca_like.cert)), "CA:FALSE");
}

/// A `ws://` URL for a relay that serves TLS: the message says to use `wss://`.
#[test]
fn a_ws_url_for_a_tls_relay_says_to_use_wss() {
    let pki = TempDir::new("pki");
    let ca = TestCa::new("Relay CA");
    let cert = ca.server(pki.path(), "relay", &["127.0.0.1"], Validity::Now);
    let relay = tls_relay(&cert);
    let dir = TempDir::new("plain");
    let url = format!("ws://{}", relay.addr());
    let (code, events) = run_client(&url, dir.path(), "alice", &["--timeout", "20", "host"]);
    assert_eq!(code, Some(3), "{events:?}");
    let error = events.iter().find(|e| e["event"] == "error").unwrap();
    assert_eq!(error["code"], "relay_unreachable", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("use a wss:// URL"),
        "{error}"
    );
}

/// No usable system roots (SSL_CERT_FILE and SSL_CERT_DIR point at nothing): --ca-file is
/// enough, and without it the message says the store is empty.
#[test]
fn an_empty_system_store_is_not_fatal_with_ca_file() {
    let pki = TempDir::new("pki");
    let ca = TestCa::new("Relay CA");
    let ca_file = ca.write(pki.path(), "ca.pem");
    let cert = ca.server(pki.path(), "relay", &["127.0.0.1"], Validity::Now);
    let relay = tls_relay(&cert);
    let nowhere = pki.path().join("no-such-store");
    let env = [
        ("SSL_CERT_FILE", arg(&nowhere)),
        ("SSL_CERT_DIR", arg(&nowhere)),
    ];
    assert_eq!(probe_with_env(relay.url(), Some(&ca_file), &env), Ok(()));
    let refused = probe_with_env(relay.url(), None, &env);
    assert_refused(refused.clone(), "unknown issuer");
    let message = refused.unwrap_err().1["message"].to_string();
    assert!(message.contains("certificate store is empty"), "{message}");
}
