//! Harness for Parley's end-to-end tests: the real `parley-relay` and `parley` binaries as
//! child processes, talking over real sockets on 127.0.0.1, driven through `--json`.
//!
//! Every wait is bounded (`STEP`), so a broken build fails a test instead of hanging it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod balancer;
pub mod fake_relay;
pub mod pki;
pub mod proxy;
pub mod raw;
pub mod redis;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest any single expected event may take.
pub const STEP: Duration = Duration::from_secs(30);

/// The binaries under test, built once per test process (a no-op when `cargo test --workspace`
/// already built them).
pub struct Binaries {
    pub relay: PathBuf,
    pub client: PathBuf,
}

pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        // The test executable lives in target/<profile>/deps/.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "--quiet",
            "-p",
            "parley",
            "-p",
            "parley-relay",
            "--bins",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("cannot run cargo to build the binaries");
        assert!(status.success(), "building parley and parley-relay failed");
        Binaries {
            relay: profile_dir.join("parley-relay"),
            client: profile_dir.join("parley"),
        }
    })
}

/// A `parley-relay` process on a free port, with its secret in a directory of its own;
/// killed when dropped.
pub struct RelayProcess {
    child: Child,
    url: String,
    secret_dir: TempDir,
    /// What it logged on stderr (at `RUST_LOG=warn`), line by line.
    log: Arc<Mutex<Vec<String>>>,
}

/// A relay that was killed: where it listened, and its secret, to start it again.
pub struct StoppedRelay {
    addr: String,
    secret_dir: TempDir,
}

impl RelayProcess {
    pub fn start(extra_args: &[&str]) -> RelayProcess {
        RelayProcess::spawn("127.0.0.1:0", TempDir::new("relay"), extra_args)
    }

    /// A relay whose secret is the file `secret` (relays of one cluster share it).
    pub fn start_with_secret(secret: &Path, extra_args: &[&str]) -> RelayProcess {
        RelayProcess::spawn_with_secret("127.0.0.1:0", TempDir::new("relay"), secret, extra_args)
    }

    fn spawn(listen: &str, secret_dir: TempDir, extra_args: &[&str]) -> RelayProcess {
        let secret = secret_dir.path().join("secret");
        RelayProcess::spawn_with_secret(listen, secret_dir, &secret, extra_args)
    }

    fn spawn_with_secret(
        listen: &str,
        secret_dir: TempDir,
        secret: &Path,
        extra_args: &[&str],
    ) -> RelayProcess {
        let mut child = Command::new(&binaries().relay)
            .args(["--listen", listen])
            .arg("--secret-file")
            .arg(secret)
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .expect("relay did not report its address")
            .to_string();
        RelayProcess {
            child,
            url,
            secret_dir,
            log,
        }
    }

    /// Waits up to `STEP` for a line of the relay's log that contains `needle`.
    pub fn expect_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not log `{needle}` within {STEP:?}; it logged {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// SIGKILL: the relay forgets every session, as in a crash; it keeps its secret.
    pub fn kill(mut self) -> StoppedRelay {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let addr = self.addr().to_string();
        let secret_dir = std::mem::replace(&mut self.secret_dir, TempDir::new("relay-spent"));
        StoppedRelay { addr, secret_dir }
    }

    /// The relay's address, `127.0.0.1:PORT` (whether it serves `ws://` or `wss://`).
    pub fn addr(&self) -> &str {
        self.url
            .strip_prefix("wss://")
            .or_else(|| self.url.strip_prefix("ws://"))
            .unwrap_or(&self.url)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr().rsplit(':').next().unwrap().parse().unwrap()
    }

    /// The relay's process id (for signals such as SIGHUP).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a name `kill` knows, such as `HUP`) to the relay process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }
}

impl StoppedRelay {
    /// The same relay again: its address and its secret, but nothing in memory.
    pub fn start_again(self, extra_args: &[&str]) -> RelayProcess {
        RelayProcess::spawn(&self.addr, self.secret_dir, extra_args)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server on 127.0.0.1 (a free port), on its own thread and runtime, living until the test
/// process ends: `serve` is called for each accepted connection, and what it returns runs as a
/// task of its own. Its address.
pub fn serve_on_loopback<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream));
            }
        });
    });
    rx.recv().unwrap()
}

/// A fresh, private directory for state files, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        // The clock alone is not enough: tests run in parallel threads of one process, and two
        // of them asking at the same tick got the same directory (and each other's state).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "parley-e2e-{tag}-{}-{nanos}-{unique}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `parley` process in `--json` mode; its stdout events arrive on a channel.
pub struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Value>,
    /// Reads stdout until EOF; joined once the process is gone, so no event is missed.
    reader: Option<std::thread::JoinHandle<()>>,
    /// Events read while looking for another one, in order.
    pub seen: Vec<Value>,
}

impl Client {
    /// `parley --json --relay URL --state-dir DIR --name NAME ARGS...`
    pub fn spawn(relay_url: &str, state_dir: &Path, name: &str, args: &[&str]) -> Client {
        Client::spawn_with_env(relay_url, state_dir, name, args, &[])
    }

    /// As [`Client::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        relay_url: &str,
        state_dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Client {
        let mut child = Command::new(&binaries().client)
            .envs(env.iter().copied())
            .arg("--json")
            .args(["--relay", relay_url, "--name", name])
            .arg("--state-dir")
            .arg(state_dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("stdout line is not JSON: {line}"));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        Client {
            stdin: child.stdin.take(),
            child,
            events,
            reader: Some(reader),
            seen: Vec::new(),
        }
    }

    /// The next event, whichever it is; `None` if the output ended (or nothing came within
    /// `STEP`).
    pub fn next_event(&mut self) -> Option<Value> {
        self.events.recv_timeout(STEP).ok()
    }

    pub fn send_line(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        writeln!(stdin, "{text}").unwrap();
        stdin.flush().unwrap();
    }

    /// The client's stdin, to write from another thread (a writer that may block when the
    /// client stops reading); the client sees end of input when it is dropped.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// End of input: the client finishes sending, then exits.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next event named `name`; events before it are kept in `seen`.
    pub fn expect(&mut self, name: &str) -> Value {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.events.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no `{name}` event within {STEP:?}; saw {:?}", self.seen)
            });
            if event["event"] == name {
                return event;
            }
            self.seen.push(event);
        }
    }

    /// Waits for the process to exit; returns its status and every event not yet taken.
    pub fn wait(mut self) -> (ExitStatus, Vec<Value>) {
        self.stdin = None;
        let deadline = Instant::now() + STEP;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("client did not exit within {STEP:?}; saw {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        (status, self.collect_rest())
    }

    /// After the process is gone: every event not taken yet, up to the end of its output.
    fn collect_rest(&mut self) -> Vec<Value> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let mut rest = std::mem::take(&mut self.seen);
        rest.extend(self.events.try_iter());
        rest
    }

    /// SIGKILL: no chance to clean up, like a crash or a power cut.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL, then every event it printed that was not taken yet.
    pub fn kill_and_collect(mut self) -> Vec<Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.collect_rest()
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running.
    pub fn wait_up_to(&mut self, limit: Duration) -> Option<(ExitStatus, Vec<Value>)> {
        self.stdin = None;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some((status, self.collect_rest()));
            }
            // Keep the pipe drained so a chatty client never blocks on stdout.
            while let Ok(event) = self.events.try_recv() {
                self.seen.push(event);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Alice (host) and Bob (guest) paired through `url`, both exited: their state directories.
pub fn pair_and_quit(url: &str) -> (TempDir, TempDir) {
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    let mut alice = Client::spawn(url, alice_dir.path(), "alice", &["host"]);
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(url, bob_dir.path(), "bob", &["join", &code]);
    alice.expect("paired");
    bob.expect("paired");
    let (a, _) = alice.wait();
    let (b, _) = bob.wait();
    assert!(a.success() && b.success(), "{a} {b}");
    (alice_dir, bob_dir)
}

/// `len` random bytes written to `path` (its folders made first); returns them.
pub fn random_file(path: &Path, len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// The texts of `message` events, in order.
pub fn texts(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| e["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Runs `parley` to completion with the given stdin; returns (exit code, events).
pub fn run_client(
    relay_url: &str,
    state_dir: &Path,
    name: &str,
    args: &[&str],
) -> (Option<i32>, Vec<Value>) {
    let client = Client::spawn(relay_url, state_dir, name, args);
    let (status, events) = client.wait();
    (status.code(), events)
}

/// What a `parley` run in human mode (no `--json`) printed.
pub struct HumanRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `parley --relay URL --state-dir DIR --name NAME ARGS...` without `--json`, stdin
/// closed, to completion (killed after `STEP`).
pub fn run_human(relay_url: &str, state_dir: &Path, name: &str, args: &[&str]) -> HumanRun {
    let mut child = Command::new(&binaries().client)
        .args(["--relay", relay_url, "--name", name])
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + STEP;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    HumanRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes a state file for `name` in `dir` holding one freshly made session (host side) whose
/// relay is `relay_url` and whose peer called itself `peer_name`: what a pairing would have
/// left, without running one. Returns the session id.
pub fn fabricate_session(dir: &Path, name: &str, relay_url: &str, peer_name: &str) -> String {
    use parley::dh::DhKeyPair;
    use parley::keys::SecretKey;
    use parley::ratchet::Ratchet;
    use parley::session::{NewSession, Session};
    use parley_state::{Role, Secret, StateFile, Store};

    let sid = "0123456789abcdef0123456789abcdef".to_string();
    let peer = DhKeyPair::generate().unwrap();
    let ratchet = Ratchet::initiator(
        SecretKey::from_bytes([7; 32]),
        DhKeyPair::generate().unwrap(),
        peer.public(),
    )
    .unwrap();
    let mut session = Session::new(NewSession {
        sid: sid.clone(),
        sid_bytes: [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ],
        role: Role::Host,
        relay_url: relay_url.into(),
        resume_token: Secret::new("ab".repeat(32)),
        restore_proof: Secret::new("cd".repeat(32)),
        ratchet,
        safety_number: "0000 1111 2222".into(),
        now: 1_700_000_000,
    });
    session.set_peer_name(peer_name.into());
    let store = Store::open(dir, name).unwrap();
    let mut state = StateFile::new(name);
    state.upsert(session.record());
    store.save(&state).unwrap();
    sid
}
