//! A fuzz soak over real sockets against the real `parley-relay` binary.
//!
//! Several connections send a stream of bad, odd and valid frames (random bytes, truncated and
//! mutated valid frames built from the relay's own answers, wrong field types, huge numbers,
//! deep nesting, invalid UTF-8, oversize frames, every frame type, missing and extra fields,
//! fragmented messages, raw TCP junk). Every frame the relay sends back must be well formed.
//! After every batch a fresh host and guest must still pair and exchange messages, and at the
//! end the relay's open fds must be back to their baseline and its RSS growth bounded.
//!
//! Short run (CI, debug build): `cargo test -p parley-relay --test soak`.
//! Long run: `SOAK_FRAMES=1000000 cargo test --release -p parley-relay --test soak -- --nocapture`.
//! Knobs: `SOAK_SEED` (replay; printed at the start), `SOAK_FRAMES` (default 20,000),
//! `SOAK_CONNS` (fuzzing connections, default 4), `SOAK_BATCH` (frames between healthy-pair
//! checks, default 1,000), `SOAK_MAX_SECS` (time cap on the fuzzing, default 120 s plus 1 s
//! per 500 frames), `SOAK_MAX_RSS_GROWTH_MIB` (default 64 MiB plus 1 MiB per 5,000 frames),
//! `SOAK_SETTLE_SECS` (extra wait before the last RSS reading, so that the relay's sweep
//! runs; default 45 s above 100,000 frames, else 0). FUZZING.md has the long run's figures.
//!
//! The seed fixes what the generator chooses; the values it learns from the relay (session
//! ids, tokens, codes) are new random ones on every run, and the connections run concurrently,
//! so a replay follows the same shape, not the same bytes. Findings print the frames that led
//! up to them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::File;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The relay's frame limit (its default; the soak runs the relay with defaults for it).
const MAX_FRAME: usize = 64 * 1024;
/// How long any one expected answer may take before it counts as a hang.
const STEP: Duration = Duration::from_secs(10);
/// Fuzzing frames between two sync points on a connection.
const SYNC_EVERY: u32 = 48;
/// Frames kept per connection for a finding's reproduction.
const RECENT: usize = 24;

/// Every frame type protocol.md section 2 defines.
const ALL_TYPES: [&str; 20] = [
    "CREATE_SESSION",
    "SESSION_CREATED",
    "INVITE_CREATE",
    "INVITE_CODE",
    "JOIN",
    "JOIN_REQUEST",
    "JOIN_ACCEPT",
    "JOINED",
    "JOIN_DENY",
    "JOIN_DENIED",
    "MSG",
    "DELIVERED",
    "MSG_READ",
    "REATTACH",
    "RESTORE",
    "PEER_ONLINE",
    "PEER_OFFLINE",
    "PING",
    "PONG",
    "ERROR",
];

/// What the relay may send (2.3): its own frames, forwarded MSG/MSG_READ, PING and PONG.
const RELAY_SENDS: [&str; 13] = [
    "SESSION_CREATED",
    "INVITE_CODE",
    "JOIN_REQUEST",
    "JOINED",
    "JOIN_DENIED",
    "MSG",
    "MSG_READ",
    "DELIVERED",
    "PEER_ONLINE",
    "PEER_OFFLINE",
    "PING",
    "PONG",
    "ERROR",
];

/// The error codes of protocol.md 2.4.
const ERROR_CODES: [&str; 24] = [
    "malformed_json",
    // Random binary bytes that happen to start with 0x01 (a DATA frame's tag), too short.
    "malformed_data",
    "unknown_type",
    "missing_field",
    "invalid_field",
    "frame_too_large",
    "not_member",
    "host_only",
    "invite_unknown",
    "invite_expired",
    "invite_used",
    "rate_limited",
    "session_full",
    "session_unknown",
    "token_invalid",
    "peer_offline",
    "mailbox_full",
    "restore_refused",
    "not_paired",
    "unknown_client",
    "too_many_sessions",
    "relay_full",
    "already_member",
    "replaced",
];

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    seed: u64,
    frames: u64,
    conns: usize,
    batch: u64,
    max_secs: u64,
    max_rss_growth_mib: u64,
    settle_secs: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let seed = env_u64("SOAK_SEED", rand::rng().random());
        let frames = env_u64("SOAK_FRAMES", 20_000);
        Settings {
            seed,
            frames,
            conns: usize::try_from(env_u64("SOAK_CONNS", 4)).unwrap().max(1),
            batch: env_u64("SOAK_BATCH", 1_000).max(1),
            // Far above what the frames need on a slow machine (about 5,000 a second in a
            // debug build); a cap, not a target.
            max_secs: env_u64("SOAK_MAX_SECS", 120 + frames / 500),
            // Generous: the relay's live state between two sweeps, plus what the allocator
            // keeps, is about 100 MiB in the 1,000,000-frame run (FUZZING.md).
            max_rss_growth_mib: env_u64("SOAK_MAX_RSS_GROWTH_MIB", 64 + frames / 5_000),
            // Long runs wait out the relay's 30-second sweep before the last RSS reading.
            settle_secs: env_u64("SOAK_SETTLE_SECS", if frames > 100_000 { 45 } else { 0 }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The relay process

struct RelayProcess {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl RelayProcess {
    fn start() -> RelayProcess {
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("soak-relay-{}.log", std::process::id()));
        let stderr = File::create(&log).unwrap();
        let max = u32::MAX.to_string();
        let secret = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("soak-relay-{}.secret", std::process::id()));
        let _ = std::fs::remove_file(&secret);
        let mut child = Command::new(env!("CARGO_BIN_EXE_parley-relay"))
            .args(["--listen", "127.0.0.1:0"])
            .arg("--secret-file")
            .arg(&secret)
            // Random JOINs and CREATE_SESSIONs would otherwise be answered `rate_limited` only.
            .args(["--join-failures-per-connection", &max])
            .args(["--join-failures-per-address", &max])
            .args(["--sessions-created-per-address", &max])
            // Every fuzzer and every healthy pair comes from 127.0.0.1: the per-address caps
            // would otherwise charge the fuzzers' mailboxed frames and pending joins (and
            // connections) to the healthy pairs too, and refuse their JOINs.
            .args(["--mailbox-bytes-per-address", "1000000000"])
            .args(["--max-connections-per-address", "100000"])
            .args(["--max-pending-per-address", "100000"])
            // Short lives, so that what the fuzzers leave behind is swept while the soak runs
            // (the relay sweeps every 30 s) and memory measures leaks, not live state.
            .args(["--invite-ttl-secs", "20"])
            .args(["--unpaired-session-ttl-secs", "5"])
            .args(["--session-idle-ttl-secs", "10"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("start parley-relay");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ws://")
            .unwrap_or_else(|| panic!("unexpected first line from the relay: {line:?}"))
            .parse()
            .unwrap();
        RelayProcess { child, addr, log }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the relay exited: {status}")),
            Err(e) => Err(format!("cannot wait for the relay: {e}")),
        }
    }

    /// VmRSS in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// SIGTERM, and the relay must exit 0 within a few seconds (it closes every connection
    /// with "going away"). Returns what happened.
    fn terminate(&mut self) -> Result<(), String> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        if !sent.is_ok_and(|s| s.success()) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Ok(()); // no `kill` binary: nothing to check
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("relay exited with {status} on SIGTERM")),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("relay did not exit within 10 s of SIGTERM".into());
                }
            }
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state: what the relay told the fuzzers, what they sent, what went wrong.

#[derive(Default)]
struct Learned {
    sids: VecDeque<String>,
    codes: VecDeque<String>,
    /// (sid, token, role)
    tokens: VecDeque<(String, String, &'static str)>,
    /// (sid, clientID)
    client_ids: VecDeque<(String, String)>,
    /// Sessions someone has joined: where MSG and MSG_READ get forwarded.
    paired: VecDeque<String>,
    /// Sessions created (by CREATE_SESSION or RESTORE as host): where INVITE_CREATE works.
    hosted: VecDeque<String>,
}

const POOL: usize = 64;

/// A value the relay handed out, to be used in later frames.
enum Learn {
    Sid(String),
    Paired(String),
    Hosted(String),
    Code(String),
    Token(String, String, &'static str),
    Client(String, String),
}

impl Learned {
    fn apply(&mut self, learn: &Learn) {
        match learn {
            Learn::Sid(s) => remember(&mut self.sids, s.clone()),
            Learn::Paired(s) => remember(&mut self.paired, s.clone()),
            Learn::Hosted(s) => remember(&mut self.hosted, s.clone()),
            Learn::Code(c) => remember(&mut self.codes, c.clone()),
            Learn::Token(s, t, r) => remember(&mut self.tokens, (s.clone(), t.clone(), *r)),
            Learn::Client(s, c) => remember(&mut self.client_ids, (s.clone(), c.clone())),
        }
    }

    /// A new connection holds no seat, but may re-attach with the tokens it had.
    fn forget_seats(&mut self) {
        self.sids.clear();
        self.paired.clear();
        self.hosted.clear();
        self.client_ids.clear();
        self.codes.clear();
    }
}

/// What a fuzzing connection draws values from: its own answers, and everyone's.
struct Pools<'a> {
    own: &'a Learned,
    all: &'a Learned,
}

impl Pools<'_> {
    fn either(&self, rng: &mut StdRng) -> &Learned {
        if rng.random_ratio(2, 3) {
            self.own
        } else {
            self.all
        }
    }
}

fn remember<T: PartialEq>(pool: &mut VecDeque<T>, v: T) {
    if pool.contains(&v) {
        return;
    }
    if pool.len() >= POOL {
        pool.pop_front();
    }
    pool.push_back(v);
}

#[derive(Debug, Clone)]
struct Finding {
    kind: String,
    detail: String,
    /// The fuzzing connection, or none for the relay as a whole.
    conn: Option<usize>,
    recent: Vec<String>,
}

#[derive(Default)]
struct Shared {
    learned: Mutex<Learned>,
    /// Hashes of every message the fuzzers sent, so forwarded frames can be checked byte for
    /// byte.
    sent: Mutex<HashSet<u64>>,
    findings: Mutex<Vec<Finding>>,
    /// Frames sent, by category.
    categories: Mutex<BTreeMap<&'static str, u64>>,
    /// Frames received, by type (and error code).
    answers: Mutex<BTreeMap<String, u64>>,
    /// How the relay ended connections we expected it to end.
    endings: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn count(map: &Mutex<BTreeMap<String, u64>>, key: String) {
        *map.lock().unwrap().entry(key).or_default() += 1;
    }

    fn find(&self, conn: Option<usize>, kind: &str, detail: String, recent: &VecDeque<String>) {
        let mut findings = self.findings.lock().unwrap();
        // The same defect tends to repeat: keep the first few of each kind.
        if findings.iter().filter(|f| f.kind == kind).count() >= 5 {
            return;
        }
        eprintln!("FINDING [{kind}] conn {conn:?}: {detail}");
        findings.push(Finding {
            kind: kind.into(),
            detail,
            conn,
            recent: recent.iter().cloned().collect(),
        });
    }
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn abbreviate(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let chars: Vec<char> = text.chars().collect();
    let utf8 = if std::str::from_utf8(bytes).is_ok() {
        ""
    } else {
        " (not UTF-8)"
    };
    if chars.len() <= 240 {
        format!("{text}{utf8}")
    } else {
        let head: String = chars[..160].iter().collect();
        let tail: String = chars[chars.len() - 60..].iter().collect();
        format!("{head}…[{} bytes]…{tail}{utf8}", bytes.len())
    }
}

// ---------------------------------------------------------------------------------------------
// Checking what the relay sends

/// What one received frame told us.
struct Answer {
    t: String,
    error_code: Option<String>,
    /// The number of a sync marker this ERROR answers.
    sync: Option<u64>,
    learned: Vec<Learn>,
}

/// The keys of a JSON object, read off its text (which is valid JSON already), so that a
/// duplicated key, which a map would silently merge, is seen.
fn keys(object: &str) -> Vec<String> {
    let bytes = object.as_bytes();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut string_start = 0;
    let mut last_string = (0, 0);
    let mut keys = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                    last_string = (string_start, i + 1);
                }
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                string_start = i;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b':' if depth == 1 => {
                let raw = &object[last_string.0..last_string.1];
                keys.push(serde_json::from_str(raw).unwrap_or_else(|_| raw.to_string()));
            }
            _ => {}
        }
    }
    keys
}

type Object = BTreeMap<String, Box<RawValue>>;

/// Parses a JSON object at any nesting depth (values stay raw; serde_json skips them without
/// recursing); with `unique`, refuses duplicate keys.
fn parse_object(text: &str, unique: bool) -> Result<Object, String> {
    let map: Object = serde_json::from_str(text).map_err(|e| format!("not a JSON object ({e})"))?;
    if unique && keys(text).len() != map.len() {
        return Err("duplicate key".into());
    }
    Ok(map)
}

fn object(text: &str) -> Result<Object, String> {
    parse_object(text, true)
}

fn string_member(obj: &Object, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map(Some)
            .map_err(|_| format!("`{key}` is not a string: {}", raw.get())),
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn require_sid(sid: &Option<String>) -> Result<&str, String> {
    match sid {
        Some(s) if is_hex(s, 32) => Ok(s),
        Some(s) => Err(format!("sid {s:?} is not 32 lowercase hex digits")),
        None => Err("no sid".into()),
    }
}

/// Checks one frame from the relay against protocol.md 2.3/2.4 and learns the values in it.
fn check_frame(text: &str, shared: &Shared) -> Result<Answer, String> {
    let top = parse_object(text, false)?;
    let t = string_member(&top, "t")?.ok_or("no `t`")?;
    if !ALL_TYPES.contains(&t.as_str()) {
        return Err(format!("`t` {t:?} is not a protocol frame type"));
    }
    if !RELAY_SENDS.contains(&t.as_str()) {
        return Err(format!("the relay sent {t}, which only clients send"));
    }
    if t == "MSG" || t == "MSG_READ" {
        // Forwarded byte for byte: it must be exactly something a client sent.
        if !shared
            .sent
            .lock()
            .unwrap()
            .contains(&hash_bytes(text.as_bytes()))
        {
            return Err(format!(
                "forwarded {t} is not byte for byte a frame any client sent"
            ));
        }
        // Its unknown members are the sender's business, but the relay refuses a duplicated
        // `t`, `sid` or `data` (section 1), so it must never forward one.
        let keys = keys(text);
        for k in ["t", "sid", "data"] {
            if keys.iter().filter(|key| *key == k).count() > 1 {
                return Err(format!("forwarded {t} has a duplicated `{k}`"));
            }
        }
        return Ok(Answer {
            t,
            error_code: None,
            sync: None,
            learned: Vec::new(),
        });
    }
    if keys(text).len() != top.len() {
        return Err("duplicate key".into());
    }
    if let Some(extra) = top
        .keys()
        .find(|k| !["t", "sid", "data"].contains(&k.as_str()))
    {
        return Err(format!("unexpected top-level member {extra:?}"));
    }
    let sid = string_member(&top, "sid")?;
    if let Some(s) = &sid
        && !is_hex(s, 32)
    {
        return Err(format!("sid {s:?} is not 32 lowercase hex digits"));
    }
    let data = match top.get("data") {
        None => Object::new(),
        Some(raw) => object(raw.get()).map_err(|e| format!("data: {e}"))?,
    };
    let mut answer = Answer {
        t: t.clone(),
        error_code: None,
        sync: None,
        learned: Vec::new(),
    };
    let learned = &mut answer.learned;
    match t.as_str() {
        "ERROR" => {
            let code = string_member(&data, "code")?.ok_or("ERROR without data.code")?;
            if !ERROR_CODES.contains(&code.as_str()) {
                return Err(format!("error code {code:?} is not in protocol.md 2.4"));
            }
            let message = string_member(&data, "message")?.unwrap_or_default();
            if message.is_empty() {
                return Err("ERROR without a message".into());
            }
            if let Some(extra) = data
                .keys()
                .find(|k| !["code", "message", "msgID"].contains(&k.as_str()))
            {
                return Err(format!("ERROR has an unexpected member {extra:?}"));
            }
            if let Some(id) = data.get("msgID") {
                let raw = id.get();
                if !(raw.starts_with('"')
                    || raw.starts_with('-')
                    || raw.as_bytes()[0].is_ascii_digit())
                {
                    return Err(format!(
                        "ERROR echoes a msgID that is not a string or number: {raw}"
                    ));
                }
                answer.sync = serde_json::from_str::<String>(raw)
                    .ok()
                    .and_then(|s| s.strip_prefix("sync-").and_then(|n| n.parse().ok()));
            }
            if let Some(s) = &sid {
                learned.push(Learn::Sid(s.clone()));
            }
            answer.error_code = Some(code);
        }
        "SESSION_CREATED" => {
            let sid = require_sid(&sid)?;
            let token = string_member(&data, "resumeToken")?.ok_or("no resumeToken")?;
            if !is_hex(&token, 64) {
                return Err(format!("resumeToken {token:?} is not 64 hex digits"));
            }
            learned.push(Learn::Sid(sid.to_string()));
            learned.push(Learn::Token(sid.to_string(), token, "host"));
            learned.push(Learn::Hosted(sid.to_string()));
        }
        "INVITE_CODE" => {
            require_sid(&sid)?;
            let code = string_member(&data, "code")?.ok_or("no code")?;
            if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("invite code {code:?} is not 6 digits"));
            }
            let expires = data.get("expiresIn").ok_or("no expiresIn")?;
            if expires.get().parse::<u64>().is_err() {
                return Err(format!("expiresIn {} is not a whole number", expires.get()));
            }
            learned.push(Learn::Code(code));
        }
        "JOIN_REQUEST" => {
            let sid = require_sid(&sid)?;
            if data.contains_key("code") {
                return Err("JOIN_REQUEST carries the invite code".into());
            }
            let id = string_member(&data, "clientID")?.ok_or("no clientID")?;
            if !is_hex(&id, 16) {
                return Err(format!("clientID {id:?} is not 16 hex digits"));
            }
            learned.push(Learn::Client(sid.to_string(), id));
            learned.push(Learn::Paired(sid.to_string()));
        }
        "JOINED" => {
            let sid = require_sid(&sid)?;
            match string_member(&data, "resumeToken")? {
                // The first JOINED: the host's stored INVITE_CREATE data (opaque) and the
                // guest's token.
                Some(token) => {
                    if !is_hex(&token, 64) {
                        return Err(format!(
                            "JOINED carries a resumeToken the relay never issued: {token:?}"
                        ));
                    }
                    learned.push(Learn::Token(sid.to_string(), token, "guest"));
                }
                // The second: JOIN_ACCEPT's data without the relay's routing field.
                None => {
                    if data.contains_key("clientID") {
                        return Err("JOINED carries JOIN_ACCEPT's clientID".into());
                    }
                }
            }
            learned.push(Learn::Sid(sid.to_string()));
            learned.push(Learn::Paired(sid.to_string()));
        }
        "JOIN_DENIED" => {
            require_sid(&sid)?;
            if data.contains_key("clientID") {
                return Err("JOIN_DENIED carries clientID".into());
            }
        }
        "DELIVERED" => {
            learned.push(Learn::Paired(require_sid(&sid)?.to_string()));
            if !data.contains_key("msgID") {
                return Err("DELIVERED without msgID".into());
            }
        }
        "PEER_ONLINE" => {
            learned.push(Learn::Paired(require_sid(&sid)?.to_string()));
        }
        "PEER_OFFLINE" => {
            require_sid(&sid)?;
        }
        "PING" | "PONG" => {
            if sid.is_some() {
                return Err(format!("{t} with a sid"));
            }
        }
        _ => unreachable!(),
    }
    Ok(answer)
}

// ---------------------------------------------------------------------------------------------
// Generating frames

/// A frame as members (key, raw JSON text), so that any member can be dropped, doubled,
/// retyped or replaced with text no JSON library would write.
#[derive(Clone)]
struct Spec {
    top: Vec<(String, String)>,
    data: Option<Vec<(String, String)>>,
}

fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn render_object(members: &[(String, String)]) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&js(k));
        out.push(':');
        out.push_str(v);
    }
    out.push('}');
    out
}

impl Spec {
    fn new(t: &str) -> Spec {
        Spec {
            top: vec![("t".into(), js(t))],
            data: None,
        }
    }

    fn sid(mut self, sid: &str) -> Spec {
        self.top.push(("sid".into(), js(sid)));
        self
    }

    fn data(mut self, members: &[(&str, String)]) -> Spec {
        self.data = Some(
            members
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect(),
        );
        self
    }

    fn render(&self) -> String {
        let mut members = self.top.clone();
        if let Some(data) = &self.data {
            members.push(("data".into(), render_object(data)));
        }
        render_object(&members)
    }

    /// Every member as (is_data, index).
    fn slots(&self) -> Vec<(bool, usize)> {
        let mut slots: Vec<(bool, usize)> = (0..self.top.len()).map(|i| (false, i)).collect();
        if let Some(data) = &self.data {
            slots.extend((0..data.len()).map(|i| (true, i)));
        }
        slots
    }

    fn set(&mut self, slot: (bool, usize), value: String) {
        match slot {
            (false, i) => self.top[i].1 = value,
            (true, i) => self.data.as_mut().unwrap()[i].1 = value,
        }
    }

    /// Replaces a random member's value, or the whole `data`.
    fn replace_random(&mut self, rng: &mut StdRng, value: String) -> &'static str {
        let slots = self.slots();
        if self.data.is_some() && rng.random_ratio(1, 4) {
            self.data = None;
            self.top.push(("data".into(), value));
            return "data";
        }
        let slot = slots[rng.random_range(0..slots.len())];
        self.set(slot, value);
        if slot.0 { "data member" } else { "top member" }
    }
}

fn hex(rng: &mut StdRng, len: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdef";
    (0..len)
        .map(|_| DIGITS[rng.random_range(0..16)] as char)
        .collect()
}

/// Any entry of the pool, or half the time one of the newest (likely still live).
fn pick<'a, T>(rng: &mut StdRng, pool: &'a VecDeque<T>) -> Option<&'a T> {
    if pool.is_empty() {
        None
    } else if rng.random_bool(0.5) {
        pool.get(pool.len() - 1 - rng.random_range(0..pool.len().min(3)))
    } else {
        pool.get(rng.random_range(0..pool.len()))
    }
}

fn pick_sid(rng: &mut StdRng, p: &Pools) -> String {
    let from = |rng: &mut StdRng, pools: &[&VecDeque<String>]| -> String {
        pools
            .iter()
            .find(|pool| !pool.is_empty())
            .and_then(|pool| pick(rng, pool).cloned())
            .unwrap_or_else(|| hex(rng, 32))
    };
    match rng.random_range(0..20) {
        0..=7 => from(rng, &[&p.own.paired, &p.own.sids, &p.all.paired]),
        8..=11 => from(rng, &[&p.own.sids, &p.all.sids]),
        12..=14 => from(rng, &[&p.all.sids]),
        15 | 16 => hex(rng, 32),
        17 => from(rng, &[&p.all.sids]).to_uppercase(),
        18 => {
            let len = rng.random_range(0..40);
            hex(rng, len)
        }
        _ => "not-a-session-id".into(),
    }
}

fn pick_code(rng: &mut StdRng, p: &Pools) -> String {
    if rng.random_ratio(7, 10)
        && let Some(c) = pick(rng, &p.all.codes)
    {
        return c.clone();
    }
    format!("{:06}", rng.random_range(0..1_000_000))
}

fn msg_id(rng: &mut StdRng) -> String {
    match rng.random_range(0..4) {
        0 => rng.random_range(0..1_000_000u64).to_string(),
        1 => format!("-{}", rng.random_range(0..1000)),
        _ => js(&format!("m{}", rng.random::<u32>())),
    }
}

fn payload_len(rng: &mut StdRng) -> usize {
    match rng.random_range(0..20) {
        0 => 0,
        1 => rng.random_range(2_000..20_000),
        _ => rng.random_range(1..400),
    }
}

/// A well-formed client frame, mostly with values the relay handed out.
fn valid_spec(rng: &mut StdRng, p: &Pools) -> Spec {
    match rng.random_range(0..100) {
        0..=4 => Spec::new("CREATE_SESSION"),
        5..=15 => {
            let sid = match pick(rng, &p.own.hosted) {
                Some(sid) if rng.random_ratio(2, 3) => sid.clone(),
                _ => pick_sid(rng, p),
            };
            let spec = Spec::new("INVITE_CREATE").sid(&sid);
            match rng.random_range(0..8) {
                0 | 1 => spec,
                2 => spec.data(&[]),
                3 => {
                    let len = rng.random_range(3_000..5_000);
                    spec.data(&[("publicKey", js(&hex(rng, len)))])
                }
                _ => {
                    let key = hex(rng, 64);
                    spec.data(&[
                        ("prime", js("ffffffff")),
                        ("generator", js("02")),
                        ("publicKey", js(&key)),
                    ])
                }
            }
        }
        16..=25 => {
            let code = pick_code(rng, p);
            let key = hex(rng, 32);
            Spec::new("JOIN").data(&[
                ("code", js(&code)),
                ("publicKey", js(&key)),
                ("pake", js("p2")),
            ])
        }
        26..=37 => {
            let t = if rng.random_ratio(3, 4) {
                "JOIN_ACCEPT"
            } else {
                "JOIN_DENY"
            };
            let pool = p.either(rng);
            let (sid, id) = pick(rng, &pool.client_ids)
                .cloned()
                .unwrap_or_else(|| (hex(rng, 32), hex(rng, 16)));
            let sid = if rng.random_ratio(1, 8) {
                pick_sid(rng, p)
            } else {
                sid
            };
            Spec::new(t).sid(&sid).data(&[
                ("clientID", js(&id)),
                ("publicKey", js("aa")),
                ("confirm", js("c1")),
            ])
        }
        38..=61 => {
            let len = payload_len(rng);
            let payload = hex(rng, len);
            let id = msg_id(rng);
            let mut members = vec![("payload", js(&payload)), ("msgID", id)];
            if rng.random_bool(0.5) {
                members.push(("seq", rng.random_range(0..100u32).to_string()));
            }
            Spec::new("MSG").sid(&pick_sid(rng, p)).data(&members)
        }
        62..=69 => {
            let id = msg_id(rng);
            Spec::new("MSG_READ")
                .sid(&pick_sid(rng, p))
                .data(&[("msgID", id)])
        }
        70..=79 => {
            let pool = p.either(rng);
            let (sid, token, _) = pick(rng, &pool.tokens)
                .cloned()
                .unwrap_or_else(|| (hex(rng, 32), hex(rng, 64), "host"));
            let sid = if rng.random_ratio(1, 8) {
                pick_sid(rng, p)
            } else {
                sid
            };
            Spec::new("REATTACH")
                .sid(&sid)
                .data(&[("resumeToken", js(&token))])
        }
        80..=87 => {
            let (sid, token, role) = if rng.random_bool(0.5) {
                (hex(rng, 32), hex(rng, 64), "host")
            } else {
                let pool = p.either(rng);
                pick(rng, &pool.tokens)
                    .cloned()
                    .unwrap_or_else(|| (hex(rng, 32), hex(rng, 64), "guest"))
            };
            let role = if rng.random_ratio(1, 4) {
                if role == "host" { "guest" } else { "host" }
            } else {
                role
            };
            let proof = ["p1", "p2", "p3"][rng.random_range(0..3)];
            Spec::new("RESTORE").sid(&sid).data(&[
                ("role", js(role)),
                ("resumeToken", js(&token)),
                ("proof", js(proof)),
            ])
        }
        88..=94 => Spec::new("PING"),
        _ => Spec::new("PONG"),
    }
}

fn wrong_value(rng: &mut StdRng) -> String {
    let options = [
        "42",
        "-1",
        "3.5",
        "true",
        "false",
        "null",
        "[]",
        "{}",
        "[1,\"a\",null]",
        "{\"a\":1}",
        "\"\"",
        "\"x\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"😀\"",
        "0",
        "\"042917\"",
    ];
    if rng.random_ratio(1, 10) {
        return js(&"z".repeat(rng.random_range(100..3000)));
    }
    options[rng.random_range(0..options.len())].to_string()
}

fn huge_number(rng: &mut StdRng) -> String {
    let digits = |rng: &mut StdRng, n: usize| -> String {
        let mut s = String::with_capacity(n);
        s.push(char::from(b'1' + rng.random_range(0..9u8)));
        for _ in 1..n {
            s.push(char::from(b'0' + rng.random_range(0..10u8)));
        }
        s
    };
    match rng.random_range(0..9) {
        0 => {
            let n = rng.random_range(20..5_000);
            digits(rng, n)
        }
        1 => {
            let n = rng.random_range(20..5_000);
            format!("-{}", digits(rng, n))
        }
        2 => "1e999999".into(),
        3 => "-1e-999999".into(),
        4 => "18446744073709551616".into(),
        5 => "-9223372036854775809".into(),
        6 => format!(
            "{}.{}e+{}",
            digits(rng, 30),
            digits(rng, 30),
            rng.random_range(300..100_000)
        ),
        7 => "1.7976931348623157e309".into(),
        _ => "-0".into(),
    }
}

fn deep(rng: &mut StdRng) -> String {
    let depth = [64, 129, 1_000, 10_000, 10_000, 30_000][rng.random_range(0..6)];
    match rng.random_range(0..3) {
        0 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        1 => {
            let depth = depth.min(10_000);
            format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
        }
        _ => {
            let depth = depth.min(10_000) / 2;
            format!("{}0{}", "[{\"a\":".repeat(depth), "}]".repeat(depth))
        }
    }
}

fn random_text(rng: &mut StdRng) -> String {
    const ALPHABET: &[char] = &[
        '{', '}', '[', ']', '"', ':', ',', '\\', 't', 's', 'i', 'd', 'a', 'M', 'S', 'G', '0', '1',
        '9', 'e', '-', '.', ' ', '\n', '\u{0}', '\u{7f}', 'é', '😀', '\u{fffd}', '\u{feff}', 'u',
        'n', 'l',
    ];
    let len = rng.random_range(0..400);
    (0..len)
        .map(|_| {
            if rng.random_ratio(1, 10) {
                char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('?')
            } else {
                ALPHABET[rng.random_range(0..ALPHABET.len())]
            }
        })
        .collect()
}

fn mutate_bytes(rng: &mut StdRng, mut bytes: Vec<u8>) -> Vec<u8> {
    const INTERESTING: &[u8] = b"{}[]\":,\\0-e.nul\x00\x7f\xff";
    for _ in 0..rng.random_range(1..8) {
        if bytes.is_empty() {
            bytes.push(b'{');
        }
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..6) {
            0 => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes[at] = INTERESTING[rng.random_range(0..INTERESTING.len())],
            2 => bytes.insert(at, INTERESTING[rng.random_range(0..INTERESTING.len())]),
            3 => {
                bytes.remove(at);
            }
            4 => {
                let end = (at + rng.random_range(1..16)).min(bytes.len());
                let chunk = bytes[at..end].to_vec();
                bytes.splice(at..at, chunk);
            }
            _ => bytes[at] = rng.random(),
        }
    }
    bytes
}

const INVALID_UTF8: &[&[u8]] = &[
    b"\xff",
    b"\xfe",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xe2\x82",
    b"\x80",
    b"\xf4\x90\x80\x80",
];

fn insert_invalid_utf8(rng: &mut StdRng, text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    let bad = INVALID_UTF8[rng.random_range(0..INVALID_UTF8.len())];
    // Inside a string value most of the time, where a lenient decoder would let it through.
    let at = match text.find("\":\"") {
        Some(i) if rng.random_ratio(3, 4) => i + 3,
        _ => rng.random_range(0..=bytes.len()),
    };
    bytes.splice(at..at, bad.iter().copied());
    bytes
}

/// How one fuzzing step goes on the wire.
enum Wire {
    Text(String),
    /// Sent as text if it is UTF-8, else as binary.
    Bytes(Vec<u8>),
    Binary(Vec<u8>),
    /// A text message split into continuation frames.
    Fragmented(String, usize),
    /// A text frame whose payload is not UTF-8 (a protocol violation at the WebSocket layer).
    InvalidUtf8Text(Vec<u8>),
    /// A WebSocket-level ping.
    WsPing(Vec<u8>),
    /// A TCP connection that never becomes a WebSocket.
    RawTcp(Vec<u8>),
}

/// What the relay may do to the connection in answer.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// Answer (or not) and keep the connection.
    Stay,
    /// `ERROR frame_too_large`, then close 1009.
    TooLarge,
    /// May close the connection (any way), or answer `malformed_json`.
    MayClose,
}

const CATEGORIES: &[(&str, u32)] = &[
    ("valid", 300),
    ("truncated", 70),
    ("mutated", 110),
    ("random_bytes_binary", 40),
    ("random_text", 40),
    ("wrong_type", 80),
    ("huge_number", 40),
    ("deep_nesting", 20),
    ("invalid_utf8_binary", 30),
    ("valid_as_binary", 40),
    ("oversize", 4),
    ("at_frame_limit", 4),
    ("any_type", 60),
    ("missing_field", 40),
    ("extra_field", 60),
    ("fragmented", 15),
    ("invalid_utf8_text", 2),
    ("ws_ping", 5),
    ("raw_tcp", 2),
];

fn choose_category(rng: &mut StdRng) -> &'static str {
    let total: u32 = CATEGORIES.iter().map(|(_, w)| w).sum();
    let mut n = rng.random_range(0..total);
    for (name, w) in CATEGORIES {
        if n < *w {
            return name;
        }
        n -= w;
    }
    unreachable!()
}

fn type_variant(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0..=5 => js(ALL_TYPES[rng.random_range(0..ALL_TYPES.len())]),
        6 => js(&ALL_TYPES[rng.random_range(0..ALL_TYPES.len())].to_lowercase()),
        7 => {
            let variants = [
                " MSG",
                "MSG ",
                "MSG\u{0}",
                "",
                "ＭＳＧ",
                "M\u{0}SG",
                "JOIN\n",
            ];
            js(variants[rng.random_range(0..variants.len())])
        }
        8 => "\"\\u004dSG\"".into(), // "MSG", escaped
        _ => js(&"A".repeat(rng.random_range(33..2000))),
    }
}

fn extra_member(rng: &mut StdRng, spec: &mut Spec) {
    let forged = [
        ("resumeToken", js("FORGED-TOKEN")),
        ("clientID", js("FORGED-ID")),
        ("code", js("FORGED")),
        ("expiresIn", "-1".to_string()),
        ("msgID", js("forged")),
        ("payload", "17".to_string()),
        ("role", js("host")),
    ];
    match rng.random_range(0..6) {
        // Relay-owned names inside data, with values the relay would never issue.
        0 | 1 => {
            let (k, v) = forged[rng.random_range(0..forged.len())].clone();
            spec.data.get_or_insert_with(Vec::new).push((k.into(), v));
        }
        // Unknown top-level members.
        2 => {
            let keys = ["x", "T", "sid2", "", "données", "__proto__", "DATA"];
            let k = keys[rng.random_range(0..keys.len())];
            let v = wrong_value(rng);
            spec.top.push((k.into(), v));
        }
        // A duplicated top-level key (refused: invalid_field).
        3 => {
            let (k, _) = spec.top[rng.random_range(0..spec.top.len())].clone();
            let v = if rng.random_bool(0.5) {
                type_variant(rng)
            } else {
                wrong_value(rng)
            };
            spec.top.push((k, v));
        }
        // A duplicated data key.
        4 => {
            if let Some(data) = &mut spec.data
                && !data.is_empty()
            {
                let (k, _) = data[rng.random_range(0..data.len())].clone();
                data.push((k, wrong_value(rng)));
            }
        }
        // Many opaque members.
        _ => {
            let n = rng.random_range(1..200);
            let data = spec.data.get_or_insert_with(Vec::new);
            for i in 0..n {
                data.push((format!("k{i}"), i.to_string()));
            }
        }
    }
}

/// One fuzzing step: its category, what goes on the wire, and what the relay may do.
fn generate(rng: &mut StdRng, p: &Pools) -> (&'static str, Wire, Expect) {
    let category = choose_category(rng);
    let mut spec = valid_spec(rng, p);
    let wire = match category {
        "valid" => Wire::Text(spec.render()),
        "truncated" => {
            let text = spec.render();
            let mut cut = rng.random_range(0..text.len());
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            Wire::Text(text[..cut].to_string())
        }
        "mutated" => Wire::Bytes(mutate_bytes(rng, spec.render().into_bytes())),
        "random_bytes_binary" => {
            let len = rng.random_range(0..600);
            Wire::Binary((0..len).map(|_| rng.random()).collect())
        }
        "random_text" => Wire::Text(random_text(rng)),
        "wrong_type" => {
            let v = wrong_value(rng);
            spec.replace_random(rng, v);
            Wire::Text(spec.render())
        }
        "huge_number" => {
            let v = huge_number(rng);
            spec.replace_random(rng, v);
            Wire::Text(spec.render())
        }
        "deep_nesting" => {
            let d = deep(rng);
            match rng.random_range(0..4) {
                0 => Wire::Text(d),
                1 => {
                    spec.replace_random(rng, d);
                    Wire::Text(spec.render())
                }
                // An opaque member of a frame the relay forwards.
                _ => {
                    let id = msg_id(rng);
                    let sid = pick_sid(rng, p);
                    let mut spec = if rng.random_bool(0.5) {
                        Spec::new("MSG")
                            .sid(&sid)
                            .data(&[("payload", js("00")), ("msgID", id)])
                    } else {
                        let code = pick_code(rng, p);
                        Spec::new("JOIN").data(&[("code", js(&code))])
                    };
                    spec.data.as_mut().unwrap().push(("x".into(), d));
                    Wire::Text(spec.render())
                }
            }
        }
        "invalid_utf8_binary" => Wire::Binary(insert_invalid_utf8(rng, &spec.render())),
        "valid_as_binary" => Wire::Binary(spec.render().into_bytes()),
        "oversize" | "at_frame_limit" => {
            let target = if category == "oversize" {
                MAX_FRAME + 1 + rng.random_range(0..MAX_FRAME)
            } else {
                MAX_FRAME
            };
            let sid = pick_sid(rng, p);
            let head = format!(r#"{{"t":"MSG","sid":{},"data":{{"msgID":"big","payload":""#, js(&sid));
            let fill = target.saturating_sub(head.len() + 3);
            let text = format!("{head}{}\"}}}}", &"ab".repeat(fill / 2 + 1)[..fill]);
            assert_eq!(text.len(), target);
            match rng.random_range(0..4) {
                0 => Wire::Binary(text.into_bytes()),
                1 => Wire::Fragmented(text, rng.random_range(2..6)),
                _ => Wire::Text(text),
            }
        }
        "any_type" => {
            let t = type_variant(rng);
            spec.top[0].1 = t;
            Wire::Text(spec.render())
        }
        "missing_field" => {
            let slots = spec.slots();
            if spec.data.is_some() && rng.random_ratio(1, 4) {
                spec.data = None;
            } else {
                match slots[rng.random_range(0..slots.len())] {
                    (false, i) => {
                        spec.top.remove(i);
                    }
                    (true, i) => {
                        spec.data.as_mut().unwrap().remove(i);
                    }
                }
            }
            Wire::Text(spec.render())
        }
        "extra_field" => {
            for _ in 0..rng.random_range(1..4) {
                extra_member(rng, &mut spec);
            }
            Wire::Text(spec.render())
        }
        "fragmented" => Wire::Fragmented(spec.render(), rng.random_range(2..6)),
        "invalid_utf8_text" => Wire::InvalidUtf8Text(insert_invalid_utf8(rng, &spec.render())),
        "ws_ping" => {
            let len = rng.random_range(0..126);
            Wire::WsPing((0..len).map(|_| rng.random()).collect())
        }
        "raw_tcp" => Wire::RawTcp(match rng.random_range(0..3) {
            0 => (0..rng.random_range(1..2000)).map(|_| rng.random()).collect(),
            1 => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            _ => b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\n".to_vec(),
        }),
        other => unreachable!("{other}"),
    };
    let len = match &wire {
        Wire::Text(t) | Wire::Fragmented(t, _) => t.len(),
        Wire::Bytes(b) | Wire::Binary(b) | Wire::InvalidUtf8Text(b) => b.len(),
        Wire::WsPing(_) | Wire::RawTcp(_) => 0,
    };
    let expect = match category {
        // (A deep value put into a frame with a large payload can end up oversize too.)
        _ if len > MAX_FRAME => Expect::TooLarge,
        "invalid_utf8_text" => Expect::MayClose,
        _ => Expect::Stay,
    };
    (category, wire, expect)
}

// ---------------------------------------------------------------------------------------------
// A fuzzing connection: a writer (the soak's task) and a reader task that checks every frame.

enum Event {
    Sync(u64),
    TooLarge,
    Bad(String),
    Closed(String),
}

struct FuzzConn {
    id: usize,
    url: String,
    rng: StdRng,
    shared: Arc<Shared>,
    sink: Option<SplitSink<Ws, Message>>,
    events: Option<mpsc::UnboundedReceiver<Event>>,
    /// Set while the relay may legitimately end the connection.
    closing_allowed: Arc<AtomicBool>,
    recent: VecDeque<String>,
    since_sync: u32,
    sync_n: u64,
    lifetime: u32,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// What the relay told this connection (the shared pool has everyone's).
    own: Arc<Mutex<Learned>>,
    /// Set once the connection is known to be gone.
    dead: bool,
}

async fn read_loop(
    mut stream: SplitStream<Ws>,
    tx: mpsc::UnboundedSender<Event>,
    shared: Arc<Shared>,
    own: Arc<Mutex<Learned>>,
    closing_allowed: Arc<AtomicBool>,
) {
    let mut too_large_seen = false;
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Text(text)) => match check_frame(text.as_str(), &shared) {
                Ok(answer) => {
                    {
                        let mut all = shared.learned.lock().unwrap();
                        let mut own = own.lock().unwrap();
                        for l in &answer.learned {
                            all.apply(l);
                            own.apply(l);
                        }
                    }
                    if let Some(n) = answer.sync {
                        let _ = tx.send(Event::Sync(n));
                        continue;
                    }
                    let key = match &answer.error_code {
                        Some(code) => format!("ERROR {code}"),
                        None => answer.t.clone(),
                    };
                    if answer.error_code.as_deref() == Some("frame_too_large") {
                        too_large_seen = true;
                        if !closing_allowed.load(Ordering::SeqCst) {
                            let _ = tx.send(Event::Bad(
                                "frame_too_large for a frame within the limit".into(),
                            ));
                        }
                        let _ = tx.send(Event::TooLarge);
                    }
                    Shared::count(&shared.answers, key);
                }
                Err(why) => {
                    let _ = tx.send(Event::Bad(format!(
                        "{why}: {}",
                        abbreviate(text.as_bytes())
                    )));
                }
            },
            Ok(Message::Binary(b)) => {
                let _ = tx.send(Event::Bad(format!(
                    "the relay sent a binary message: {}",
                    abbreviate(&b)
                )));
            }
            Ok(Message::Close(frame)) => {
                let how = match frame {
                    Some(f) => format!("close {}", u16::from(f.code)),
                    None => "close without a code".into(),
                };
                let how = if too_large_seen {
                    format!("frame_too_large, {how}")
                } else {
                    how
                };
                let _ = tx.send(Event::Closed(how));
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Event::Closed(format!("error: {e}")));
                return;
            }
        }
    }
    let _ = tx.send(Event::Closed("stream ended without a close frame".into()));
}

impl FuzzConn {
    fn new(id: usize, url: String, seed: u64, shared: Arc<Shared>) -> FuzzConn {
        FuzzConn {
            id,
            url,
            rng: StdRng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            shared,
            sink: None,
            events: None,
            closing_allowed: Arc::new(AtomicBool::new(false)),
            recent: VecDeque::new(),
            since_sync: 0,
            sync_n: 0,
            lifetime: 0,
            reader: None,
            own: Arc::new(Mutex::new(Learned::default())),
            dead: true,
        }
    }

    fn find(&self, kind: &str, detail: String) {
        self.shared.find(Some(self.id), kind, detail, &self.recent);
    }

    async fn connect(&mut self) {
        let connected = timeout(STEP, tokio_tungstenite::connect_async(&self.url)).await;
        let ws = match connected {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => {
                self.find("connect", format!("cannot open a WebSocket: {e}"));
                return;
            }
            Err(_) => {
                self.find("hang", "the WebSocket upgrade did not complete".into());
                return;
            }
        };
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        self.closing_allowed = Arc::new(AtomicBool::new(false));
        self.own.lock().unwrap().forget_seats();
        self.reader = Some(tokio::spawn(read_loop(
            stream,
            tx,
            self.shared.clone(),
            self.own.clone(),
            self.closing_allowed.clone(),
        )));
        self.sink = Some(sink);
        self.events = Some(rx);
        self.recent.clear();
        self.since_sync = 0;
        self.lifetime = self.rng.random_range(30..300);
        self.dead = false;
    }

    fn note(&mut self, what: String) {
        if self.recent.len() >= RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(what);
    }

    async fn send(&mut self, msg: Message) -> Result<(), String> {
        let sink = self.sink.as_mut().ok_or("no connection")?;
        match timeout(STEP, sink.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("send failed: {e}")),
            Err(_) => Err("send did not complete in time".into()),
        }
    }

    /// Handles what the reader reported so far; with `wait_sync`, until that sync arrives.
    async fn drain(&mut self, wait_sync: Option<u64>) {
        loop {
            let Some(events) = self.events.as_mut() else {
                return;
            };
            let got = if wait_sync.is_some() {
                timeout(STEP, events.recv()).await.map_err(|_| ())
            } else {
                Ok(events.try_recv().ok())
            };
            let event = match got {
                Ok(Some(e)) => e,
                Ok(None) => return,
                Err(()) => {
                    self.find(
                        "hang",
                        format!("no answer to a sync marker within {STEP:?}"),
                    );
                    self.abandon();
                    return;
                }
            };
            match event {
                Event::Sync(n) if Some(n) == wait_sync => return,
                Event::Sync(_) | Event::TooLarge => {}
                Event::Bad(why) => self.find("malformed answer", why),
                Event::Closed(how) => {
                    if !self.closing_allowed.load(Ordering::SeqCst) {
                        self.find(
                            "unexpected close",
                            format!("the relay ended the connection: {how}"),
                        );
                    }
                    self.abandon();
                    return;
                }
            }
        }
    }

    fn abandon(&mut self) {
        self.sink = None;
        self.events = None;
        // The reader holds the other half of the socket: without it the socket closes.
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
        self.dead = true;
    }

    /// An MSG no session can own (malformed sid): answered `not_member` with its msgID, and
    /// since the relay answers in order, everything sent before has been answered by then.
    async fn sync(&mut self) {
        if self.dead {
            return;
        }
        self.sync_n += 1;
        let n = self.sync_n;
        let marker =
            format!(r#"{{"t":"MSG","sid":"sync","data":{{"payload":"","msgID":"sync-{n}"}}}}"#);
        if let Err(e) = self.send(Message::Text(marker.into())).await {
            self.drain(None).await;
            if !self.dead && !self.closing_allowed.load(Ordering::SeqCst) {
                self.find("unexpected close", format!("sync marker: {e}"));
            }
            self.abandon();
            return;
        }
        self.drain(Some(n)).await;
        self.since_sync = 0;
    }

    async fn close(&mut self) {
        self.sync().await;
        // Half the time a closing handshake; otherwise the socket is just dropped.
        if self.rng.random_bool(0.5)
            && let Some(sink) = self.sink.as_mut()
        {
            let _ = timeout(STEP, sink.close()).await;
        }
        self.abandon();
    }

    /// Waits for the relay to end the connection after a frame it may end it for.
    async fn await_close(&mut self, expect: Expect, category: &str) {
        let deadline = Instant::now() + STEP;
        loop {
            let Some(events) = self.events.as_mut() else {
                return;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let got = timeout(left, events.recv()).await;
            match got {
                Ok(Some(Event::Closed(how))) => {
                    Shared::count(&self.shared.endings, format!("{category}: {how}"));
                    // (FUZZING.md finding F1, fixed: the relay now lingers, reading, before
                    // it drops the socket, so no reset destroys the answer.)
                    if expect == Expect::TooLarge && how != "frame_too_large, close 1009" {
                        self.find(
                            "oversize handling",
                            format!("after an oversize frame: {how} (want ERROR frame_too_large, then close 1009)"),
                        );
                    }
                    break;
                }
                Ok(Some(Event::Bad(why))) => self.find("malformed answer", why),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    if expect == Expect::MayClose {
                        // Kept open: then it must still answer.
                        Shared::count(&self.shared.endings, format!("{category}: kept open"));
                        self.closing_allowed.store(false, Ordering::SeqCst);
                        self.sync().await;
                        return;
                    }
                    self.find(
                        "hang",
                        format!("{category}: the relay did not close within {STEP:?}"),
                    );
                    break;
                }
            }
        }
        self.abandon();
    }

    async fn raw_tcp(&mut self, bytes: Vec<u8>) {
        let addr = self.url.trim_start_matches("ws://").to_string();
        match timeout(STEP, TcpStream::connect(&addr)).await {
            Ok(Ok(mut s)) => {
                let _ = timeout(STEP, s.write_all(&bytes)).await;
            }
            _ => self.find("connect", "cannot open a TCP connection".into()),
        }
    }

    /// Sends `n` fuzzing frames, syncing now and then and at the end.
    async fn run(&mut self, n: u64, stop_at: Instant) {
        for _ in 0..n {
            if Instant::now() >= stop_at {
                break;
            }
            if self.dead {
                self.connect().await;
                if self.dead {
                    return;
                }
            }
            let (category, wire, expect) = {
                let all = self.shared.learned.lock().unwrap();
                let own = self.own.lock().unwrap();
                generate(
                    &mut self.rng,
                    &Pools {
                        own: &own,
                        all: &all,
                    },
                )
            };
            *self
                .shared
                .categories
                .lock()
                .unwrap()
                .entry(category)
                .or_default() += 1;
            if expect != Expect::Stay {
                self.closing_allowed.store(true, Ordering::SeqCst);
            }
            let result = match wire {
                Wire::RawTcp(bytes) => {
                    self.raw_tcp(bytes).await;
                    Ok(())
                }
                Wire::Text(text) => self.send_text(category, text).await,
                Wire::Bytes(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => self.send_text(category, text).await,
                    Err(e) => self.send_binary(category, e.into_bytes()).await,
                },
                Wire::Binary(bytes) => self.send_binary(category, bytes).await,
                Wire::Fragmented(text, parts) => self.send_fragmented(category, text, parts).await,
                Wire::InvalidUtf8Text(bytes) => {
                    self.note(format!(
                        "{category} [raw text frame]: {}",
                        abbreviate(&bytes)
                    ));
                    self.send(Message::Frame(Frame::message(
                        bytes,
                        OpCode::Data(Data::Text),
                        true,
                    )))
                    .await
                }
                Wire::WsPing(bytes) => {
                    self.note(format!("{category}: {} bytes", bytes.len()));
                    self.send(Message::Ping(bytes.into())).await
                }
            };
            if expect != Expect::Stay {
                self.await_close(expect, category).await;
                continue;
            }
            if let Err(e) = result {
                self.drain(None).await;
                if !self.dead {
                    self.find("unexpected close", format!("{category}: {e}"));
                }
                self.abandon();
                continue;
            }
            self.drain(None).await;
            self.since_sync += 1;
            self.lifetime = self.lifetime.saturating_sub(1);
            if self.lifetime == 0 {
                self.close().await;
            } else if self.since_sync >= SYNC_EVERY {
                self.sync().await;
            }
        }
        self.sync().await;
    }

    fn remember_sent(&self, bytes: &[u8]) {
        self.shared.sent.lock().unwrap().insert(hash_bytes(bytes));
    }

    async fn send_text(&mut self, category: &str, text: String) -> Result<(), String> {
        self.remember_sent(text.as_bytes());
        self.note(format!("{category}: {}", abbreviate(text.as_bytes())));
        self.send(Message::Text(text.into())).await
    }

    async fn send_binary(&mut self, category: &str, bytes: Vec<u8>) -> Result<(), String> {
        self.remember_sent(&bytes);
        self.note(format!("{category} [binary]: {}", abbreviate(&bytes)));
        self.send(Message::Binary(bytes.into())).await
    }

    async fn send_fragmented(
        &mut self,
        category: &str,
        text: String,
        parts: usize,
    ) -> Result<(), String> {
        self.remember_sent(text.as_bytes());
        self.note(format!(
            "{category} [{parts} fragments]: {}",
            abbreviate(text.as_bytes())
        ));
        let bytes = text.into_bytes();
        let size = bytes.len().div_ceil(parts).max(1);
        let chunks: Vec<Vec<u8>> = bytes.chunks(size).map(<[u8]>::to_vec).collect();
        let last = chunks.len().saturating_sub(1);
        if chunks.is_empty() {
            return self
                .send(Message::Frame(Frame::message(
                    Vec::new(),
                    OpCode::Data(Data::Text),
                    true,
                )))
                .await;
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let op = if i == 0 { Data::Text } else { Data::Continue };
            self.send(Message::Frame(Frame::message(
                chunk,
                OpCode::Data(op),
                i == last,
            )))
            .await?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The healthy pair

struct Plain {
    ws: Ws,
}

impl Plain {
    async fn connect(url: &str) -> Result<Plain, String> {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        Ok(Plain { ws })
    }

    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .map_err(|e| format!("send: {e}"))
    }

    async fn recv_text(&mut self) -> Result<String, String> {
        loop {
            match timeout(STEP, self.ws.next()).await {
                Err(_) => return Err("timed out waiting for a frame".into()),
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() != r#"{"t":"PING"}"# => {
                    return Ok(t.to_string());
                }
                Ok(Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => return Err(format!("expected a text frame, got {other:?}")),
            }
        }
    }

    async fn expect(&mut self, t: &str) -> Result<serde_json::Value, String> {
        let text = self.recv_text().await?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if v["t"] != t {
            return Err(format!("expected {t}, got {text}"));
        }
        Ok(v)
    }
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

/// A MSG arrives at `to` byte for byte and `from` gets DELIVERED with its msgID.
async fn exchange(from: &mut Plain, to: &mut Plain, sid: &str, id: &str) -> Result<(), String> {
    let text = format!(
        r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"00aa{id}","msgID":"{id}","seq":1}}}}"#
    );
    from.send(&text).await?;
    let got = to.recv_text().await?;
    ensure(got == text, || {
        format!("MSG not forwarded byte for byte: {got}")
    })?;
    let delivered = from.expect("DELIVERED").await?;
    ensure(
        delivered["sid"] == sid && delivered["data"]["msgID"] == id,
        || format!("DELIVERED {delivered}"),
    )
}

/// A fresh host and guest pair and exchange a MSG each way, byte for byte.
async fn healthy_pair(url: &str, tag: &str) -> Result<(), String> {
    let mut host = Plain::connect(url).await?;
    let mut guest = Plain::connect(url).await?;
    host.send(r#"{"t":"CREATE_SESSION"}"#).await?;
    let created = host.expect("SESSION_CREATED").await?;
    let sid = created["sid"].as_str().ok_or("no sid")?.to_string();
    ensure(is_hex(&sid, 32), || format!("bad sid {sid}"))?;
    host.send(&format!(r#"{{"t":"INVITE_CREATE","sid":"{sid}"}}"#))
        .await?;
    let invite = host.expect("INVITE_CODE").await?;
    let code = invite["data"]["code"]
        .as_str()
        .ok_or("no code")?
        .to_string();
    guest
        .send(&format!(
            r#"{{"t":"JOIN","data":{{"code":"{code}","publicKey":"bb","pake":"p2"}}}}"#
        ))
        .await?;
    let request = host.expect("JOIN_REQUEST").await?;
    ensure(request["sid"] == sid.as_str(), || {
        format!("JOIN_REQUEST {request}")
    })?;
    ensure(
        request["data"]["publicKey"] == "bb" && request["data"]["pake"] == "p2",
        || format!("JOIN_REQUEST lost opaque fields: {request}"),
    )?;
    ensure(request["data"].get("code").is_none(), || {
        "code forwarded".into()
    })?;
    let client_id = request["data"]["clientID"]
        .as_str()
        .ok_or("no clientID")?
        .to_string();
    let joined = guest.expect("JOINED").await?;
    ensure(joined["sid"] == sid.as_str(), || format!("JOINED {joined}"))?;
    let token = joined["data"]["resumeToken"].as_str().unwrap_or_default();
    ensure(is_hex(token, 64), || format!("guest token {joined}"))?;
    host.send(&format!(
        r#"{{"t":"JOIN_ACCEPT","sid":"{sid}","data":{{"clientID":"{client_id}","publicKey":"aa","confirm":"c1"}}}}"#
    ))
    .await?;
    let mut accepted = guest.expect("JOINED").await?;
    // The relay adds the guest's member token (protocol.md 2.2) to the host's fields.
    let member = accepted["data"]
        .as_object_mut()
        .and_then(|d| d.remove("resumeToken"));
    ensure(
        member
            .as_ref()
            .and_then(|t| t.as_str())
            .is_some_and(|t| is_hex(t, 64))
            && accepted["data"] == serde_json::json!({"publicKey": "aa", "confirm": "c1"}),
        || format!("second JOINED {accepted}"),
    )?;
    exchange(&mut host, &mut guest, &sid, &format!("{tag}-h")).await?;
    exchange(&mut guest, &mut host, &sid, &format!("{tag}-g")).await?;
    let _ = timeout(STEP, host.ws.close(None)).await;
    let _ = timeout(STEP, guest.ws.close(None)).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The soak

/// Polls until the relay's open fds are at most `bound`; returns the last count.
async fn fds_settle(relay: &RelayProcess, bound: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let fds = relay.fds();
        if fds <= bound || Instant::now() >= deadline {
            return fds;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_table(title: &str, map: &BTreeMap<impl std::fmt::Display, u64>) {
    println!("{title}:");
    for (k, v) in map {
        println!("  {k:<48} {v:>10}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_soak_against_the_relay_binary() {
    let settings = Settings::from_env();
    println!(
        "soak: SOAK_SEED={} SOAK_FRAMES={} SOAK_CONNS={} SOAK_BATCH={} (replay with SOAK_SEED)",
        settings.seed, settings.frames, settings.conns, settings.batch
    );
    let mut relay = RelayProcess::start();
    let url = relay.url();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fds_baseline = relay.fds();
    let rss_baseline = relay.rss_kib();
    println!(
        "relay pid {} on {url}: baseline {rss_baseline} KiB RSS, {fds_baseline} fds",
        relay.pid()
    );

    let shared = Arc::new(Shared::default());
    let mut conns: Vec<FuzzConn> = (0..settings.conns)
        .map(|i| FuzzConn::new(i, url.clone(), settings.seed, shared.clone()))
        .collect();
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(settings.max_secs);
    let mut sent = 0u64;
    let mut batches = 0u64;
    let mut slowest_pair = Duration::ZERO;
    let mut curve: Vec<(u64, u64, usize)> = Vec::new();
    let mut fatal: Option<String> = None;

    while sent < settings.frames && Instant::now() < stop_at {
        let batch = settings.batch.min(settings.frames - sent);
        let per_conn = batch.div_ceil(settings.conns as u64);
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                tokio::spawn(async move {
                    c.run(per_conn, stop_at).await;
                    c
                })
            })
            .collect();
        conns = Vec::new();
        for t in tasks {
            conns.push(t.await.expect("a fuzzing task panicked"));
        }
        sent += batch;
        batches += 1;

        if let Err(e) = relay.alive() {
            fatal = Some(e);
            break;
        }
        let began = Instant::now();
        match timeout(3 * STEP, healthy_pair(&url, &format!("b{batches}"))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.find(
                    None,
                    "healthy pair",
                    format!("after batch {batches}: {e}"),
                    &VecDeque::new(),
                );
            }
            Err(_) => shared.find(
                None,
                "healthy pair",
                format!(
                    "after batch {batches}: did not complete within {:?}",
                    3 * STEP
                ),
                &VecDeque::new(),
            ),
        }
        slowest_pair = slowest_pair.max(began.elapsed());
        let rss = relay.rss_kib();
        // Open now: the fuzzing connections and whatever is still being torn down.
        let fds = fds_settle(
            &relay,
            fds_baseline + settings.conns + 8,
            Duration::from_secs(5),
        )
        .await;
        if fds > fds_baseline + settings.conns + 8 {
            shared.find(
                None,
                "fd growth",
                format!("after batch {batches}: {fds} fds open (baseline {fds_baseline}, {} fuzzing connections)", settings.conns),
                &VecDeque::new(),
            );
        }
        curve.push((sent, rss, fds));
        if batches.is_multiple_of(50) {
            println!(
                "  {sent} frames, {:.0?}: RSS {rss} KiB, {fds} fds",
                started.elapsed()
            );
        }
    }
    let fuzz_time = started.elapsed();

    for c in &mut conns {
        c.close().await;
    }
    let fds_after = fds_settle(&relay, fds_baseline, Duration::from_secs(10)).await;
    let rss_after = relay.rss_kib();
    let mut rss_settled = None;
    if settings.settle_secs > 0 {
        tokio::time::sleep(Duration::from_secs(settings.settle_secs)).await;
        rss_settled = Some(relay.rss_kib());
    }
    let alive = relay.alive();
    let log = relay.log_text();
    let terminated = if alive.is_ok() {
        relay.terminate()
    } else {
        Ok(())
    };

    // Report.
    println!(
        "sent {sent} frames in {batches} batches in {fuzz_time:.1?} ({} connections); slowest healthy pair {slowest_pair:.0?}",
        settings.conns
    );
    let categories: BTreeMap<&str, u64> = shared.categories.lock().unwrap().clone();
    let total: u64 = categories.values().sum();
    if total < settings.frames {
        println!(
            "time cap of {} s reached: {total} of {} frames sent",
            settings.max_secs, settings.frames
        );
    }
    print_table(&format!("{total} frames sent, by category"), &categories);
    let answers = shared.answers.lock().unwrap().clone();
    print_table("frames received by the fuzzers, by type", &answers);
    let endings = shared.endings.lock().unwrap().clone();
    print_table(
        "connections the relay ended (as the frame allowed)",
        &endings,
    );
    let peak = curve.iter().map(|c| c.1).max().unwrap_or(rss_after);
    println!(
        "RSS: baseline {rss_baseline} KiB, peak {peak} KiB, after {rss_after} KiB{}",
        rss_settled
            .map(|r| format!(", after {} s more {r} KiB", settings.settle_secs))
            .unwrap_or_default()
    );
    println!("fds: baseline {fds_baseline}, after closing everything {fds_after}");
    if curve.len() > 1 {
        let step = (curve.len() / 10).max(1);
        let points: Vec<String> = curve
            .iter()
            .step_by(step)
            .map(|(f, r, d)| format!("{f}:{r}KiB/{d}fd"))
            .collect();
        println!("curve (frames:RSS/fds): {}", points.join(" "));
        // A leak grows with the frames; live state and the allocator's high-water mark level
        // off. The last third of the run shows which.
        let third = &curve[curve.len() * 2 / 3..];
        if let (Some(first), Some(last)) = (third.first(), third.last()) {
            println!(
                "RSS over the last third ({} to {} frames): {:+} KiB",
                first.0,
                last.0,
                i128::from(last.1) - i128::from(first.1)
            );
        }
    }

    let mut problems: Vec<String> = Vec::new();
    if let Some(f) = fatal {
        problems.push(format!("crash: {f}"));
    }
    if let Err(e) = alive {
        problems.push(format!("crash: {e}"));
    }
    if let Err(e) = terminated {
        problems.push(format!("shutdown: {e}"));
    }
    if log.contains("panicked") {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("panicked"))
            .take(5)
            .collect();
        problems.push(format!("the relay panicked: {}", lines.join(" | ")));
    }
    if fds_after > fds_baseline {
        problems.push(format!(
            "fds: {fds_after} open after every connection closed, baseline {fds_baseline}"
        ));
    }
    let growth_kib = rss_settled
        .unwrap_or(rss_after)
        .saturating_sub(rss_baseline);
    if growth_kib > settings.max_rss_growth_mib * 1024 {
        problems.push(format!(
            "RSS grew by {growth_kib} KiB, more than {} MiB",
            settings.max_rss_growth_mib
        ));
    }
    if let Some(n) = shared.answers.lock().unwrap().get("ERROR rate_limited") {
        problems.push(format!(
            "{n} rate_limited answers although the soak relaxed every limit"
        ));
    }
    // The soak must reach the states it is meant to stress, not bounce off the front door.
    for reached in [
        "SESSION_CREATED",
        "JOIN_REQUEST",
        "JOINED",
        "DELIVERED",
        "MSG",
        "ERROR malformed_json",
    ] {
        if sent >= 5_000 && !shared.answers.lock().unwrap().contains_key(reached) {
            problems.push(format!("the fuzzers never got {reached}"));
        }
    }
    let findings = shared.findings.lock().unwrap().clone();
    for f in &findings {
        problems.push(format!("[{}] conn {:?}: {}", f.kind, f.conn, f.detail));
        if !f.recent.is_empty() {
            println!(
                "[{}] {}; conn {:?} had sent, oldest first:",
                f.kind, f.detail, f.conn
            );
        }
        for r in &f.recent {
            println!("    {r}");
        }
    }
    assert!(
        problems.is_empty(),
        "the soak found {} problem(s) (SOAK_SEED={}):\n{}",
        problems.len(),
        settings.seed,
        problems.join("\n")
    );
}

/// The checker the soak relies on refuses what protocol.md does not allow (so the soak can
/// fail), and accepts well-formed answers at any nesting depth.
#[test]
fn the_answer_checker_refuses_what_the_protocol_does_not_allow() {
    let shared = Shared::default();
    let sid = "0123456789abcdef".repeat(2);
    let token = "ab".repeat(32);
    let bad = [
        "not json".to_string(),
        "[]".into(),
        r#"{"sid":"x"}"#.into(),
        r#"{"t":"NOPE"}"#.into(),
        r#"{"t":"CREATE_SESSION"}"#.into(),
        r#"{"t":"ERROR","data":{"code":"oops","message":"m"}}"#.into(),
        r#"{"t":"ERROR","data":{"code":"not_member"}}"#.into(),
        r#"{"t":"ERROR","data":{"code":"not_member","message":"m","msgID":[1]}}"#.into(),
        r#"{"t":"ERROR","t":"ERROR","data":{"code":"not_member","message":"m"}}"#.into(),
        r#"{"t":"ERROR","data":{"code":"not_member","code":"replaced","message":"m"}}"#.into(),
        r#"{"t":"ERROR","sid":"NOT-A-SID","data":{"code":"not_member","message":"m"}}"#.into(),
        format!(r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"","msgID":1}}}}"#),
        format!(r#"{{"t":"SESSION_CREATED","sid":"{sid}","data":{{"resumeToken":"x"}}}}"#),
        format!(r#"{{"t":"INVITE_CODE","sid":"{sid}","data":{{"code":"12345","expiresIn":600}}}}"#),
        format!(
            r#"{{"t":"JOIN_REQUEST","sid":"{sid}","data":{{"code":"123456","clientID":"0011223344556677"}}}}"#
        ),
        format!(r#"{{"t":"JOINED","sid":"{sid}","data":{{"resumeToken":"FORGED-TOKEN"}}}}"#),
        format!(r#"{{"t":"JOINED","sid":"{sid}","data":{{"clientID":"0011223344556677"}}}}"#),
        format!(r#"{{"t":"PING","sid":"{sid}"}}"#),
        format!(r#"{{"t":"DELIVERED","sid":"{sid}","data":{{}}}}"#),
    ];
    for text in &bad {
        assert!(check_frame(text, &shared).is_err(), "accepted {text}");
    }

    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let sync = check_frame(
        r#"{"t":"ERROR","data":{"code":"not_member","message":"m","msgID":"sync-7"}}"#,
        &shared,
    )
    .unwrap();
    assert_eq!(sync.sync, Some(7));
    let forwarded =
        format!(r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"","msgID":1,"x":{deep}}}}}"#);
    shared
        .sent
        .lock()
        .unwrap()
        .insert(hash_bytes(forwarded.as_bytes()));
    let doubled =
        format!(r#"{{"t":"MSG","sid":"{sid}","x":1,"x":2,"data":{{"payload":"","msgID":1}}}}"#);
    let doubled_t =
        format!(r#"{{"t":"MSG","sid":"{sid}","\u0074":"MSG","data":{{"payload":"","msgID":1}}}}"#);
    for text in [&doubled, &doubled_t] {
        shared
            .sent
            .lock()
            .unwrap()
            .insert(hash_bytes(text.as_bytes()));
    }
    assert!(
        check_frame(&doubled_t, &shared).is_err(),
        "a forwarded frame with two `t`s"
    );
    let good = [
        forwarded,
        doubled,
        format!(
            r#"{{"t":"JOIN_REQUEST","sid":"{sid}","data":{{"x":{deep},"clientID":"0011223344556677"}}}}"#
        ),
        format!(
            r#"{{"t":"JOINED","sid":"{sid}","data":{{"code":"opaque","resumeToken":"{token}"}}}}"#
        ),
        format!(r#"{{"t":"DELIVERED","sid":"{sid}","data":{{"msgID":1e999999}}}}"#),
        format!(r#"{{"t":"SESSION_CREATED","sid":"{sid}","data":{{"resumeToken":"{token}"}}}}"#),
        r#"{"t":"PING"}"#.into(),
    ];
    for text in &good {
        if let Err(e) = check_frame(text, &shared) {
            panic!("refused {}: {e}", abbreviate(text.as_bytes()));
        }
    }
}

/// FUZZING.md finding F1, reduced: a client that is behind on reading (its receive window is
/// full) sends an oversize frame. protocol.md 1 promises `ERROR frame_too_large`, then close
/// 1009. Before the fix what arrived was part of the earlier answers and a TCP reset: the
/// relay closed the socket with the rest of the oversize message unread, so the kernel sent
/// RST and dropped whatever the relay had queued, the ERROR and the close frame included.
#[tokio::test]
async fn oversize_is_answered_even_when_the_client_is_behind() {
    let relay = RelayProcess::start();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(relay.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(relay.url(), MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    // 1,000 PINGs, unread: their PONGs fill our receive buffer and wait in the relay's send
    // queue. (Far below the relay's outbound bound, so it goes on reading.)
    for _ in 0..1_000 {
        ws.feed(Message::Text(r#"{"t":"PING"}"#.into()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let big = format!(
        r#"{{"t":"MSG","sid":"{}","data":{{"msgID":"big","payload":"{}"}}}}"#,
        "0".repeat(32),
        "a".repeat(70_000)
    );
    ws.send(Message::Text(big.into())).await.unwrap();
    let mut pongs = 0;
    let mut too_large = false;
    let close = loop {
        match timeout(STEP, ws.next()).await.expect("no answer") {
            Some(Ok(Message::Text(t))) if t.as_str() == r#"{"t":"PONG"}"# => pongs += 1,
            Some(Ok(Message::Text(t))) => {
                assert!(t.contains(r#""code":"frame_too_large""#), "{t}");
                too_large = true;
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                panic!("after {pongs} of 1000 PONGs, frame_too_large seen: {too_large}: {e}")
            }
            None => panic!("after {pongs} of 1000 PONGs: stream ended without a close frame"),
        }
    };
    assert_eq!(pongs, 1_000, "answers to the frames before were lost");
    assert!(too_large, "no ERROR frame_too_large");
    assert_eq!(close, Some(1009));
}
