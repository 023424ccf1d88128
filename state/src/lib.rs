//! The parley client's persistent state: one `state-NAME.json` per client name.
//!
//! - **Schema**: [`StateFile`], versioned by [`SCHEMA_VERSION`]; a file from a newer version,
//!   or one that is not a parley state file, is refused with a clear error, never overwritten.
//! - **Atomic save**: the new content goes to a temporary file in the same directory (mode
//!   0600), is fsynced, renamed over the old file, and the directory is fsynced. A crash at any
//!   point leaves either the old or the new file, whole.
//! - **Locking**: a process that will write holds an exclusive lock on `state-NAME.json.lock`
//!   for as long as it runs ([`Store::open`]); a second writer with the same name is refused.
//!   Readers ([`read_snapshot`]) need no lock, since a rename is atomic.
//!
//! Secrets (keys, resume tokens) are kept in [`Secret`], which zeroizes its memory on drop and
//! never prints itself.
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The schema this build writes. A higher version is refused (it was written by a newer
/// parley); so is schema 1, whose sessions had one key per direction for their whole life and
/// cannot be turned into a ratchet (protocol.md 3.8): their users pair again.
pub const SCHEMA_VERSION: u32 = 2;

/// Marks a file as ours, so that a stray JSON file is never mistaken for state.
const FORMAT: &str = "parley-state";

/// Longest state file this loader reads; anything larger is not ours. Nothing in a session's
/// record grows with the conversation (protocol.md 3.8): the client bounds its outbox (1000
/// messages, 4 MiB of frames; 16 MiB for all the sessions of a file together), the messages
/// held ahead of a gap (128), and the skipped keys (1000), so a record stays under 13 MiB
/// even with every part at its bound, and about 1 MiB with a full outbox of ordinary chat
/// lines.
pub const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;

/// Permission bits that let the group or others read or write the file.
#[cfg(unix)]
const SHARED_MODE_BITS: u32 = 0o066;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("no state for `{name}` in {dir}: pair first with `host` or `join`")]
    Missing { name: String, dir: PathBuf },
    #[error("state file {path} is corrupt ({reason}); it was left untouched")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} is not a parley state file for `{name}`; it was left untouched")]
    Foreign { path: PathBuf, name: String },
    #[error(
        "state file {path} has schema {found}, newer than this parley understands ({SCHEMA_VERSION}); upgrade parley"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error(
        "state file {path} has schema {found}, written by a parley without forward secrecy; its sessions cannot be resumed: move it away and pair again"
    )]
    TooOld { path: PathBuf, found: u32 },
    #[error("state `{name}` is in use by another parley process (lock {path} is held)")]
    Locked { name: String, path: PathBuf },
    #[error("invalid client name `{0}`: use 1-64 letters, digits, '-' or '_'")]
    BadName(String),
    #[error(
        "state file {path} is {what}, not a regular file; it was left untouched: move it away (parley keeps a plain file there)"
    )]
    NotRegular { path: PathBuf, what: &'static str },
    #[error(
        "state file {path} is too large (over {MAX_STATE_BYTES} bytes) to be a parley state file; it was left untouched: move it away"
    )]
    TooLarge { path: PathBuf },
    #[error("state I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Something wrong with a state file that does not stop it being used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWarning {
    /// Stable, for scripts: `state_permissions`.
    pub code: &'static str,
    pub message: String,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A secret string (hex key, resume token): zeroized on drop, redacted in `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }

    /// The secret itself; callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Host,
    Guest,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Host => "host",
            Role::Guest => "guest",
        })
    }
}

/// Everything needed to resume one session without a new handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub sid: String,
    pub relay_url: String,
    pub role: Role,
    pub resume_token: Secret,
    /// The peer's name as it introduced itself (end-to-end), once known.
    pub peer_name: Option<String>,
    pub safety_number: String,
    /// The Double Ratchet's state (protocol.md 3.6): saved together with the counters and the
    /// outbox, so a key is never used twice and the next message can always be decrypted.
    pub ratchet: RatchetRecord,
    /// The last sequence number we sent, and the highest one we accepted from the peer.
    pub send_seq: u64,
    pub recv_seq: u64,
    /// Our messages the peer has not yet acknowledged end to end, as the exact `MSG` frames
    /// sent (ciphertext only), oldest first: resent until acknowledged.
    #[serde(default)]
    pub outbox: Vec<OutboxEntry>,
    /// The highest sequence number the peer acknowledged (it has everything up to it).
    #[serde(default)]
    pub peer_acked: u64,
    /// Messages recorded as received but perhaps not yet shown (a crash between the two): shown
    /// again at the next start. Cleared right after they are shown.
    #[serde(default)]
    pub unshown: Vec<Unshown>,
    /// Messages decrypted ahead of a gap (their keys are gone), waiting for it to fill; `text`
    /// holds the decrypted content (JSON). Bounded by the client's early-message limit.
    #[serde(default)]
    pub early: Vec<Unshown>,
    /// Presented with `RESTORE` when a restarted relay has forgotten the session (hex).
    #[serde(default)]
    pub restore_proof: Secret,
    /// Unix seconds.
    pub created: u64,
    pub last_used: u64,
    /// Files this side is sending (protocol.md 3.10 "What each side stores"): saved with the
    /// sealed offer, in the same write. Only the offer and positions, never file content, and
    /// at most [`MAX_FILE_RECORDS`]: the state file does not grow with a file's size. Absent
    /// in files written before transfers existed (and while there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_out: Vec<FileSendState>,
    /// Files this side is receiving: saved with the sealed `file_accept`, in the same write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_in: Vec<FileReceiveState>,
}

/// How many transfers (each way) a session keeps records of: finished ones are dropped, and
/// a peer offering more at once is declined, so these lists stay small.
pub const MAX_FILE_RECORDS: usize = 64;

/// A file offer as stored (protocol.md 3.10 "Messages"): the file key is as secret as a
/// message key, so it is a [`Secret`] (zeroized, never printed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOfferState {
    /// 32 hex digits.
    pub id: String,
    pub name: String,
    pub size: u64,
    /// 64 hex digits.
    pub sha256: String,
    pub chunk: u32,
    /// 64 hex digits.
    pub key: Secret,
}

/// Where a transfer stands: `offered`, `sending`, `verifying`, `receiving`, `verified`,
/// `done`, or `failed` with its code (the client's status names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStatusState {
    pub s: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// The sending end of a file: the offer, the local file it reads, the last pass number used
/// (saved before that pass's first chunk is sealed) and the acknowledged position (a lower
/// bound).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSendState {
    pub offer: FileOfferState,
    pub path: PathBuf,
    pub pass: u32,
    /// Chunks acknowledged.
    pub acked: u64,
    pub status: FileStatusState,
}

/// The receiving end of a file: the offer, the directory it lands in, the current pass and
/// the durable position (chunks written and synced, saved before they are acknowledged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReceiveState {
    pub offer: FileOfferState,
    pub dir: PathBuf,
    pub pass: u32,
    /// Chunks written and synced.
    pub durable: u64,
    pub status: FileStatusState,
}

/// The Double Ratchet's state, every key as hex. Field names follow the Signal specification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatchetRecord {
    /// RK.
    pub root_key: Secret,
    /// DHs: our current ratchet private exponent (the public key is recomputed from it).
    pub own_private: Secret,
    /// DHr: the peer's current ratchet public key, once known.
    pub peer_public: Option<String>,
    /// CKs and CKr, each with the receipt key of its chain.
    pub send_chain: Option<ChainRecord>,
    pub recv_chain: Option<ChainRecord>,
    /// Ns, Nr, PN.
    pub send_n: u32,
    pub recv_n: u32,
    pub prev_send_n: u32,
    /// The receipt key of our previous sending chain: receipts for it may still be on the way.
    pub prev_send_receipt_key: Option<Secret>,
    /// Skipped message keys, oldest chain first.
    pub skipped: Vec<SkippedChainRecord>,
    /// How many receiving chains this side has started (the age unit for skipped keys).
    pub recv_steps: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainRecord {
    pub chain_key: Secret,
    pub receipt_key: Secret,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedChainRecord {
    pub peer_public: String,
    /// The receiving chain count when this chain's keys were skipped.
    pub step: u64,
    pub keys: Vec<SkippedKeyRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedKeyRecord {
    pub n: u32,
    pub key: Secret,
}

/// A received message between being recorded and being shown. The text is a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unshown {
    pub seq: u64,
    pub text: Secret,
}

/// One unacknowledged message of ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub seq: u64,
    pub frame: String,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: String,
    pub schema: u32,
    pub name: String,
    pub sessions: Vec<SessionRecord>,
}

impl StateFile {
    pub fn new(name: &str) -> StateFile {
        StateFile {
            format: FORMAT.into(),
            schema: SCHEMA_VERSION,
            name: name.into(),
            sessions: Vec::new(),
        }
    }

    pub fn session(&self, sid: &str) -> Option<&SessionRecord> {
        self.sessions.iter().find(|s| s.sid == sid)
    }

    /// Inserts the record, or replaces the one with the same sid.
    pub fn upsert(&mut self, record: SessionRecord) {
        match self.sessions.iter_mut().find(|s| s.sid == record.sid) {
            Some(existing) => *existing = record,
            None => self.sessions.push(record),
        }
    }
}

/// Client names become file names: keep them to a safe alphabet.
pub fn validate_name(name: &str) -> Result<(), StateError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StateError::BadName(name.into()))
    }
}

pub fn state_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("state-{name}.json"))
}

/// The state of one client name, locked for writing by this process.
#[derive(Debug)]
pub struct Store {
    name: String,
    dir: PathBuf,
    path: PathBuf,
    /// Held for the Store's lifetime; the OS releases the lock when the file closes, even if
    /// the process is killed.
    _lock: File,
}

impl Store {
    /// Takes the lock for `name` in `dir` (created, mode 0700, if missing).
    pub fn open(dir: &Path, name: &str) -> Result<Store, StateError> {
        validate_name(name)?;
        create_private_dir(dir)?;
        let lock_path = dir.join(format!("state-{name}.json.lock"));
        let lock = private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StateError::Locked {
                    name: name.into(),
                    path: lock_path,
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(StateError::Io {
                    path: lock_path,
                    source: e,
                });
            }
        }
        // Holding the lock, no other writer of this name exists: any temporary file left is
        // from a save that was killed before its rename, and is garbage.
        let stale = format!("state-{name}.json.tmp-");
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_name().to_string_lossy().starts_with(&stale) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(Store {
            name: name.into(),
            dir: dir.to_path_buf(),
            path: state_path(dir, name),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current state, or `None` when there is no file yet.
    pub fn load(&self) -> Result<Option<StateFile>, StateError> {
        Ok(self.load_with_warnings()?.0)
    }

    /// As [`Store::load`], with what is wrong with the file but does not stop its use (it is
    /// readable or writable by others).
    pub fn load_with_warnings(&self) -> Result<(Option<StateFile>, Vec<StateWarning>), StateError> {
        match read_file(&self.path, &self.name)? {
            Some((state, warnings)) => Ok((Some(state), warnings)),
            None => Ok((None, Vec::new())),
        }
    }

    /// The current state, or a new empty one when there is no file yet.
    pub fn load_or_new(&self) -> Result<StateFile, StateError> {
        Ok(self.load()?.unwrap_or_else(|| StateFile::new(&self.name)))
    }

    /// Replaces the file atomically with `state`, durably.
    pub fn save(&self, state: &StateFile) -> Result<(), StateError> {
        self.save_visible(state)?;
        self.sync_dir()
    }

    /// Replaces the file atomically with `state`: once this returns, any later process reads
    /// the new content. Durable against a power cut only after [`Store::sync_dir`]; a caller
    /// that must act right after the commit (print what it recorded) does so in between.
    pub fn save_visible(&self, state: &StateFile) -> Result<(), StateError> {
        let mut bytes =
            Zeroizing::new(
                serde_json::to_vec_pretty(state).map_err(|e| StateError::Corrupt {
                    path: self.path.clone(),
                    reason: format!("cannot serialise: {e}"),
                })?,
            );
        bytes.push(b'\n');
        let tmp = self.dir.join(format!(
            "state-{}.json.tmp-{}",
            self.name,
            std::process::id()
        ));
        let written = (|| {
            let mut file = private_options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(io_err(&self.path))
    }

    /// Makes the last rename durable (the directory entry itself).
    pub fn sync_dir(&self) -> Result<(), StateError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }
}

/// Reads the state of `name` without taking the lock (for listing): the file is replaced by
/// rename, so a reader sees either the old or the new content, whole.
pub fn read_snapshot(dir: &Path, name: &str) -> Result<StateFile, StateError> {
    Ok(read_snapshot_with_warnings(dir, name)?.0)
}

/// As [`read_snapshot`], with the warnings of [`Store::load_with_warnings`].
pub fn read_snapshot_with_warnings(
    dir: &Path,
    name: &str,
) -> Result<(StateFile, Vec<StateWarning>), StateError> {
    validate_name(name)?;
    read_file(&state_path(dir, name), name)?.ok_or_else(|| StateError::Missing {
        name: name.into(),
        dir: dir.into(),
    })
}

/// Reads the state file, if there is one: only a regular file (not through a symbolic link,
/// never waiting on a FIFO or reading a device), at most `MAX_STATE_BYTES`. Every check is on
/// the file actually opened, not on the path, so nothing swapped in between can slip through.
fn read_file(
    path: &Path,
    name: &str,
) -> Result<Option<(StateFile, Vec<StateWarning>)>, StateError> {
    let file = match open_for_reading(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if is_symlink_refusal(&e) => {
            return Err(StateError::NotRegular {
                path: path.into(),
                what: "a symbolic link",
            });
        }
        Err(e) => {
            return Err(StateError::Io {
                path: path.into(),
                source: e,
            });
        }
    };
    let metadata = file.metadata().map_err(io_err(path))?;
    if !metadata.is_file() {
        return Err(StateError::NotRegular {
            path: path.into(),
            what: file_kind(&metadata),
        });
    }
    if metadata.len() > MAX_STATE_BYTES {
        return Err(StateError::TooLarge { path: path.into() });
    }
    // Bounded even if the file grows after the check above.
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_STATE_BYTES.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_STATE_BYTES {
        return Err(StateError::TooLarge { path: path.into() });
    }
    let state = parse(&bytes, path, name)?;
    Ok(Some((state, permission_warnings(path, &metadata))))
}

/// Opens without following a symbolic link in the last component, and without blocking on a
/// FIFO (which would wait for a writer for ever).
fn open_for_reading(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    options.open(path)
}

/// What `open` with `O_NOFOLLOW` says when the path is a symbolic link.
fn is_symlink_refusal(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::ELOOP)
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

fn file_kind(metadata: &fs::Metadata) -> &'static str {
    let kind = metadata.file_type();
    if kind.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// The file holds keys and tokens: say so if the group or others may read or write it.
fn permission_warnings(path: &Path, metadata: &fs::Metadata) -> Vec<StateWarning> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & SHARED_MODE_BITS != 0 {
            return vec![StateWarning {
                code: "state_permissions",
                message: format!(
                    "state file {} can be read or written by other users (mode {mode:04o}); it holds your keys: run `chmod 600 {}`",
                    path.display(),
                    path.display()
                ),
            }];
        }
    }
    #[cfg(not(unix))]
    let _ = (path, metadata);
    Vec::new()
}

/// Checks, in order: JSON at all, ours at all, a schema we understand, then the full shape.
/// The header is read on its own so that the secrets are decoded once, straight into
/// zeroizing types, never into an intermediate `serde_json::Value` tree.
fn parse(bytes: &[u8], path: &Path, name: &str) -> Result<StateFile, StateError> {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow, default)]
        format: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow, default)]
        name: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        schema: Option<u64>,
    }
    let corrupt = |reason: String| StateError::Corrupt {
        path: path.into(),
        reason,
    };
    let foreign = || StateError::Foreign {
        path: path.into(),
        name: name.into(),
    };
    let head: Head = match serde_json::from_slice(bytes) {
        Ok(head) => head,
        Err(e) if e.is_data() => return Err(foreign()),
        Err(e) => return Err(corrupt(e.to_string())),
    };
    if head.format.as_deref() != Some(FORMAT) || head.name.as_deref() != Some(name) {
        return Err(foreign());
    }
    let schema = head
        .schema
        .ok_or_else(|| corrupt("no schema version".into()))?;
    let schema =
        u32::try_from(schema).map_err(|_| corrupt(format!("schema {schema} out of range")))?;
    if schema > SCHEMA_VERSION {
        return Err(StateError::TooNew {
            path: path.into(),
            found: schema,
        });
    }
    if schema < SCHEMA_VERSION {
        return Err(StateError::TooOld {
            path: path.into(),
            found: schema,
        });
    }
    let state: StateFile = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    // The client never stores more; a file with more was not written by it.
    if let Some(s) = state
        .sessions
        .iter()
        .find(|s| s.files_out.len() > MAX_FILE_RECORDS || s.files_in.len() > MAX_FILE_RECORDS)
    {
        return Err(corrupt(format!(
            "session {} records more than {MAX_FILE_RECORDS} file transfers",
            s.sid
        )));
    }
    Ok(state)
}

fn create_private_dir(dir: &Path) -> Result<(), StateError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err(dir))
}

/// Files holding secrets are created readable by their owner only.
fn private_options() -> OpenOptions {
    #[allow(unused_mut)]
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sid: &str) -> SessionRecord {
        SessionRecord {
            sid: sid.into(),
            relay_url: "ws://127.0.0.1:9000".into(),
            role: Role::Host,
            resume_token: Secret::new("ab".repeat(32)),
            peer_name: Some("bob".into()),
            safety_number: "1234 5678 9012".into(),
            ratchet: RatchetRecord {
                root_key: Secret::new("11".repeat(32)),
                own_private: Secret::new("22".repeat(32)),
                peer_public: Some("33".repeat(256)),
                send_chain: Some(ChainRecord {
                    chain_key: Secret::new("44".repeat(32)),
                    receipt_key: Secret::new("55".repeat(32)),
                }),
                recv_chain: None,
                send_n: 3,
                recv_n: 0,
                prev_send_n: 0,
                prev_send_receipt_key: None,
                skipped: vec![SkippedChainRecord {
                    peer_public: "66".repeat(256),
                    step: 1,
                    keys: vec![SkippedKeyRecord {
                        n: 7,
                        key: Secret::new("77".repeat(32)),
                    }],
                }],
                recv_steps: 2,
            },
            send_seq: 3,
            recv_seq: 4,
            outbox: vec![OutboxEntry {
                seq: 3,
                frame: "{}".into(),
            }],
            peer_acked: 2,
            unshown: Vec::new(),
            early: Vec::new(),
            restore_proof: Secret::new("cd".repeat(32)),
            created: 1,
            last_used: 2,
            files_out: Vec::new(),
            files_in: Vec::new(),
        }
    }

    fn offer_state(id: u8) -> FileOfferState {
        FileOfferState {
            id: format!("{id:02x}").repeat(16),
            name: "docs/report.pdf".into(),
            size: 1 << 40,
            sha256: "ab".repeat(32),
            chunk: 45_056,
            key: Secret::new("cd".repeat(32)),
        }
    }

    /// Transfers round-trip; a state file from before them (no `files_out`/`files_in`) still
    /// loads; a file with more records than the client ever keeps is refused as corrupt; and
    /// the record's size does not depend on the file's size.
    #[test]
    fn file_transfer_records_round_trip_and_stay_bounded() {
        let dir = tempdir();
        let store = Store::open(&dir, "alice").unwrap();
        let mut state = StateFile::new("alice");
        let mut with_files = record("s1");
        with_files.files_out.push(FileSendState {
            offer: offer_state(1),
            path: PathBuf::from("/home/a/report.pdf"),
            pass: 3,
            acked: 10,
            status: FileStatusState {
                s: "sending".into(),
                code: None,
            },
        });
        with_files.files_in.push(FileReceiveState {
            offer: offer_state(2),
            dir: PathBuf::from("/home/a/Downloads/parley"),
            pass: 1,
            durable: 4,
            status: FileStatusState {
                s: "failed".into(),
                code: Some("declined".into()),
            },
        });
        state.upsert(with_files);
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state.clone()));
        // A terabyte offer costs what a byte's does.
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(text.len() < 8 * 1024, "{}", text.len());

        // Without transfers the members are left out, so the file is what it was before.
        let mut plain = StateFile::new("alice");
        plain.upsert(record("s1"));
        let text = serde_json::to_string(&plain).unwrap();
        assert!(!text.contains("files_"));
        assert_eq!(serde_json::from_str::<StateFile>(&text).unwrap(), plain);

        let mut too_many = StateFile::new("alice");
        let mut crowded = record("s1");
        crowded.files_in = (0..=MAX_FILE_RECORDS)
            .map(|_| FileReceiveState {
                offer: offer_state(3),
                dir: PathBuf::from("/d"),
                pass: 0,
                durable: 0,
                status: FileStatusState {
                    s: "receiving".into(),
                    code: None,
                },
            })
            .collect();
        too_many.upsert(crowded);
        let bytes = serde_json::to_vec(&too_many).unwrap();
        assert!(matches!(
            parse(&bytes, Path::new("/x"), "alice"),
            Err(StateError::Corrupt { .. })
        ));
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "parley-state-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn save_then_load_round_trips_with_private_permissions() {
        let dir = tempdir();
        let store = Store::open(&dir, "alice").unwrap();
        assert!(store.load().unwrap().is_none());
        let mut state = store.load_or_new().unwrap();
        state.upsert(record("s1"));
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), Some(state.clone()));
        assert_eq!(read_snapshot(&dir, "alice").unwrap(), state);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(store.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A file others can read is used, with a warning; the next save makes it private.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(store.path(), fs::Permissions::from_mode(0o644)).unwrap();
            let (loaded, warnings) = store.load_with_warnings().unwrap();
            assert_eq!(loaded, Some(state.clone()));
            assert_eq!(warnings.len(), 1);
            assert_eq!(warnings[0].code, "state_permissions");
            store.save(&state).unwrap();
            let mode = fs::metadata(store.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            assert!(store.load_with_warnings().unwrap().1.is_empty());
        }
        // No temporary file is left behind.
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_second_writer_with_the_same_name_is_refused() {
        let dir = tempdir();
        let _first = Store::open(&dir, "alice").unwrap();
        assert!(matches!(
            Store::open(&dir, "alice"),
            Err(StateError::Locked { .. })
        ));
        assert!(Store::open(&dir, "bob").is_ok());
        drop(_first);
        assert!(Store::open(&dir, "alice").is_ok());
    }

    #[test]
    fn corrupt_foreign_and_newer_files_are_refused_and_left_alone() {
        let dir = tempdir();
        let path = state_path(&dir, "alice");
        let store = Store::open(&dir, "alice").unwrap();
        type Check = fn(&StateError) -> bool;
        let cases: [(&str, Check); 6] = [
            ("{ not json", |e| matches!(e, StateError::Corrupt { .. })),
            ("[1,2,3]", |e| matches!(e, StateError::Foreign { .. })),
            (
                r#"{"format":"parley-state","schema":2,"name":"mallory","sessions":[]}"#,
                |e| matches!(e, StateError::Foreign { .. }),
            ),
            (
                r#"{"format":"parley-state","schema":99,"name":"alice","sessions":[]}"#,
                |e| matches!(e, StateError::TooNew { found: 99, .. }),
            ),
            (
                r#"{"format":"parley-state","schema":1,"name":"alice","sessions":[]}"#,
                |e| matches!(e, StateError::TooOld { found: 1, .. }),
            ),
            (
                r#"{"format":"parley-state","schema":2,"name":"alice","sessions":[{"sid":1}]}"#,
                |e| matches!(e, StateError::Corrupt { .. }),
            ),
        ];
        for (content, expected) in cases {
            fs::write(&path, content).unwrap();
            let err = store.load().unwrap_err();
            assert!(expected(&err), "{content}: {err}");
            assert!(!err.to_string().is_empty());
            assert_eq!(
                fs::read_to_string(&path).unwrap(),
                content,
                "file must be left untouched"
            );
        }
    }

    /// Loads on a thread: a loader that blocks (opening a FIFO) fails the test instead of
    /// hanging it.
    #[cfg(unix)]
    fn load_within(dir: &Path, limit: std::time::Duration) -> Result<StateError, String> {
        let dir = dir.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let store = Store::open(&dir, "alice").unwrap();
            let loaded = store.load().map(|_| ());
            // Unlocked before the answer: the caller's next load must not find it held.
            drop(store);
            let _ = tx.send(loaded);
        });
        match rx.recv_timeout(limit) {
            Ok(Err(e)) => Ok(e),
            Ok(Ok(())) => Err("loaded".into()),
            Err(_) => Err(format!("still loading after {limit:?}")),
        }
    }

    #[cfg(unix)]
    #[test]
    fn only_a_regular_file_is_read_never_through_a_symlink_nor_a_fifo() {
        use std::time::Duration;
        let dir = tempdir();
        let path = state_path(&dir, "alice");
        // A symlink to a perfectly good state file: refused all the same (the loader opens
        // with O_NOFOLLOW, so a link swapped in cannot point it anywhere).
        let real = dir.join("real.json");
        let mut state = StateFile::new("alice");
        state.upsert(record("s1"));
        fs::write(&real, serde_json::to_vec(&state).unwrap()).unwrap();
        std::os::unix::fs::symlink(&real, &path).unwrap();
        let err = load_within(&dir, Duration::from_secs(5)).unwrap();
        let message = err.to_string();
        assert!(
            message.contains("symbolic link") && message.contains(&*path.to_string_lossy()),
            "{message}"
        );
        // A FIFO: opening it must not wait for a writer.
        fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let message = load_within(&dir, Duration::from_secs(5))
            .unwrap()
            .to_string();
        assert!(
            message.contains("FIFO") && message.contains("not a regular file"),
            "{message}"
        );
        // A symlink to /dev/zero (endless): refused before a byte is read.
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let message = load_within(&dir, Duration::from_secs(5))
            .unwrap()
            .to_string();
        assert!(message.contains("symbolic link"), "{message}");
        // The files are left alone.
        assert!(
            fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn an_oversize_file_gets_its_own_error_naming_it() {
        let dir = tempdir();
        let path = state_path(&dir, "alice");
        let store = Store::open(&dir, "alice").unwrap();
        // Sparse: costs no disk.
        File::create(&path)
            .unwrap()
            .set_len(MAX_STATE_BYTES + 1)
            .unwrap();
        let message = store.load().unwrap_err().to_string();
        assert!(
            message.contains("too large") && message.contains(&*path.to_string_lossy()),
            "{message}"
        );
        // At the limit it is read (and then found not to be JSON).
        File::create(&path)
            .unwrap()
            .set_len(MAX_STATE_BYTES)
            .unwrap();
        assert!(matches!(
            store.load().unwrap_err(),
            StateError::Corrupt { .. }
        ));
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(
                matches!(validate_name(bad), Err(StateError::BadName(_))),
                "{bad}"
            );
        }
        assert!(validate_name("alice-laptop_2").is_ok());
    }

    #[test]
    fn secrets_do_not_print() {
        let printed = format!("{:?}", record("s1"));
        assert!(!printed.contains(&"ab".repeat(32)));
        for secret in ["11", "22", "44", "55", "77"] {
            assert!(!printed.contains(&secret.repeat(32)), "{secret}");
        }
    }

    proptest::proptest! {
        // Whatever bytes are in the file, loading returns an error or a state; never panics.
        #[test]
        fn loading_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse(&bytes, Path::new("x"), "alice");
        }
    }
}
