//! The `parley-relay` binary itself: its secret file and its logs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "parley-relay-bin-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn relay(secret: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley-relay"));
    cmd.args(["--listen", "127.0.0.1:0", "--secret-file"])
        .arg(secret)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn the_secret_is_created_private_and_logs_to_a_pipe_have_no_colour() {
    let dir = temp_dir("secret");
    let secret = dir.join("nested").join("secret");
    let mut child = relay(&secret).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on ws://"), "{line}");
    child.kill().unwrap();
    child.wait().unwrap();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("created a new relay secret"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in piped logs: {logs:?}"
    );
    assert!(!logs.contains(std::fs::read_to_string(&secret).unwrap().trim()));

    let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&secret).unwrap();
    assert_eq!(text.trim().len(), 64);
    assert!(text.trim().bytes().all(|b| b.is_ascii_hexdigit()));

    // Started again, it keeps the same secret.
    let mut child = relay(&secret).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), text);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_damaged_secret_file_stops_the_relay_with_a_reason() {
    let dir = temp_dir("damaged");
    let secret = dir.join("secret");
    std::fs::write(&secret, "not a secret").unwrap();
    let out = relay(&secret).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("64 hex digits"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap(),
        "not a secret",
        "never overwritten"
    );
    // A directory where the file should be.
    let out = relay(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A GET over a fresh connection: the status code and the whole answer.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n").unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).unwrap().parse().unwrap();
    (status, answer)
}

#[test]
fn metrics_json_logs_and_a_drain_through_the_binary() {
    let dir = temp_dir("ops");
    let mut child = relay(&dir.join("secret"))
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--drain-secs",
            "3",
        ])
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut first, mut second) = (String::new(), String::new());
    out.read_line(&mut first).unwrap();
    out.read_line(&mut second).unwrap();
    let relay_addr = first
        .trim()
        .strip_prefix("listening on ws://")
        .unwrap()
        .to_string();
    let metrics_addr = second
        .trim()
        .strip_prefix("metrics on http://")
        .unwrap()
        .to_string();

    let (status, answer) = http_get(&metrics_addr, "/metrics");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("parley_relay_connections "), "{answer}");
    assert!(answer.contains("application/openmetrics-text"), "{answer}");
    assert_eq!(http_get(&relay_addr, "/healthz").0, 200);
    assert_eq!(
        http_get(&relay_addr, "/metrics").0,
        404,
        "not on the public port"
    );

    // SIGTERM: the health check turns 503 at once, and the process exits after the drain.
    let started = std::time::Instant::now();
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let mut unhealthy = false;
    for _ in 0..40 {
        if http_get(&relay_addr, "/healthz").0 == 503 {
            unhealthy = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(unhealthy, "/healthz never answered 503 while draining");
    assert_eq!(http_get(&metrics_addr, "/healthz").0, 503);
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(3),
        "drained for --drain-secs"
    );

    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    let lines: Vec<&str> = logs.lines().collect();
    assert!(lines.len() >= 2, "{logs}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
