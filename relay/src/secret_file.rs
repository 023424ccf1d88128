//! The relay's secret on disk: 64 hex digits in a file only its owner can read, created on
//! first start. Losing it ends every session (their resume tokens no longer verify), so it is
//! written once and never rewritten.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parley_relay::RelaySecret;
use rand::Rng;

/// `$STATE_DIRECTORY/secret` under systemd, else `parley-relay/secret` in the user's state (or
/// local data) directory.
pub fn default_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several, separated by colons: the first is ours.
        let first = dir.to_string_lossy().split(':').next().map(PathBuf::from)?;
        return Some(first.join("secret"));
    }
    dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .map(|d| d.join("parley-relay").join("secret"))
}

pub fn load_or_create(path: &Path) -> Result<RelaySecret, String> {
    match read(path) {
        Ok(secret) => Ok(secret),
        Err(Problem::Missing) => create(path),
        Err(Problem::Other(why)) => Err(format!(
            "the secret file {} {why}; fix or remove it (a new secret ends every session)",
            path.display()
        )),
    }
}

enum Problem {
    Missing,
    Other(String),
}

fn read(path: &Path) -> Result<RelaySecret, Problem> {
    let file = OpenOptions::new()
        .read(true)
        // A symlink planted at the secret's path is refused, not followed.
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let mut file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Problem::Missing),
        Err(e) => return Err(Problem::Other(format!("cannot be opened ({e})"))),
    };
    let meta = file
        .metadata()
        .map_err(|e| Problem::Other(format!("cannot be inspected ({e})")))?;
    if !meta.is_file() {
        return Err(Problem::Other("is not a regular file".into()));
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "the secret file can be read by others than its owner: chmod 600 it"
        );
    }
    let mut text = String::new();
    (&mut file)
        .take(256)
        .read_to_string(&mut text)
        .map_err(|e| Problem::Other(format!("cannot be read ({e})")))?;
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut bytes)
        .map_err(|_| Problem::Other("does not hold 64 hex digits".into()))?;
    Ok(RelaySecret::from_bytes(bytes))
}

fn create(path: &Path) -> Result<RelaySecret, String> {
    let fail = |what: &str, e: io::Error| {
        format!(
            "cannot {what} the secret file {} ({e}); give another with --secret-file",
            path.display()
        )
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| fail("make the directory of", e))?;
    }
    let bytes: [u8; 32] = rand::rng().random();
    // Written whole under a temporary name, then linked into place: a crash leaves either no
    // secret or a complete one, and a relay started at the same moment cannot be overwritten.
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(format!("{}\n", hex::encode(bytes)).as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| fs::hard_link(&temporary, path));
    let _ = fs::remove_file(&temporary);
    if let Err(e) = written {
        if e.kind() == io::ErrorKind::AlreadyExists {
            // Another relay made it first: use that one.
            return read(path).map_err(|_| fail("read", e));
        }
        return Err(fail("write", e));
    }
    tracing::info!(path = %path.display(), "created a new relay secret");
    Ok(RelaySecret::from_bytes(bytes))
}
