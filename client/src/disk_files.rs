//! The transfers' file system on disk ([`FileSystem`]): the files being sent, read in place;
//! the `.part`s being received, written, synced and moved into place. Whatever a peer's names
//! say, nothing is created or opened through a symbolic link below the download directory,
//! and nothing is ever replaced.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::files::receive::PartFile;
use crate::transfers::{FileSystem, SyncFn};

/// A `.part` on disk, and beside it its durable mark: the file `<part>.mark`, eight bytes,
/// the durable position in chunks (big-endian), rewritten and synced after each sync of the
/// `.part` (protocol.md 3.10, "Receiving chunks").
struct DiskPart {
    file: File,
    mark: File,
}

impl PartFile for DiskPart {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn durable_mark(&mut self) -> Option<u64> {
        // Anything but eight bytes (none yet, or damaged) is no mark: the record's position
        // is used, which is never ahead of what is durable.
        let mut bytes = [0u8; 8];
        self.mark.read_exact_at(&mut bytes, 0).ok()?;
        Some(u64::from_be_bytes(bytes))
    }
}

/// Where a `.part`'s durable mark is kept.
fn mark_path(part: &Path) -> PathBuf {
    let mut name = part.as_os_str().to_os_string();
    name.push(".mark");
    PathBuf::from(name)
}

/// Opens (creating) a file below a checked folder, never through a link.
fn open_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Open files are kept (one source, the `.part`s) so that a chunk costs no `open`.
#[derive(Default)]
pub struct DiskFiles {
    source: Option<(PathBuf, File)>,
    parts: HashMap<PathBuf, DiskPart>,
}

impl FileSystem for DiskFiles {
    fn read_at(&mut self, path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let file = match self.source.take() {
            Some((open, file)) if open == path => file,
            _ => File::open(path)?,
        };
        let read = file.read_exact_at(buf, offset);
        self.source = Some((path.to_path_buf(), file));
        read
    }

    fn part(&mut self, base: &Path, path: &Path) -> io::Result<&mut dyn PartFile> {
        use std::collections::hash_map::Entry;
        match self.parts.entry(path.to_path_buf()) {
            Entry::Occupied(open) => Ok(open.into_mut()),
            Entry::Vacant(slot) => {
                folders_within(base, path)?;
                let file = open_private(path)?;
                let mark = open_private(&mark_path(path))?;
                Ok(slot.insert(DiskPart { file, mark }))
            }
        }
    }

    fn remove_part(&mut self, path: &Path) -> io::Result<()> {
        self.parts.remove(path);
        remove_if_there(&mark_path(path))?;
        remove_if_there(path)
    }

    fn exists(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }

    fn sync_job(&mut self, path: &Path, upto: u64) -> io::Result<SyncFn> {
        // Second handles on the open files: syncing them syncs the files, while the first
        // go on writing. (Chunks were written through it, so it is open.)
        let part = self.parts.get(path).ok_or(io::ErrorKind::NotFound)?;
        let (file, mark) = (part.file.try_clone()?, part.mark.try_clone()?);
        Ok(Box::new(move || {
            file.sync_data()?;
            mark.write_all_at(&upto.to_be_bytes(), 0)?;
            mark.sync_data()
        }))
    }

    fn place(&mut self, base: &Path, part: &Path, target: &Path) -> io::Result<()> {
        self.parts.remove(part);
        folders_within(base, target)?;
        // A hard link fails if the name exists: nothing is ever replaced.
        remove_if_there(&mark_path(part))?;
        match std::fs::hard_link(part, target) {
            Ok(()) => std::fs::remove_file(part),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
            // A file system without hard links (FAT, some network shares): take the name
            // first (created only if absent), then move the `.part` over what we took.
            Err(_) => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(target)?;
                std::fs::rename(part, target)
            }
        }
    }
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Creates the folders between `base` (the download directory, created if need be: it is the
/// user's, and may itself be a link) and `path`'s parent, one at a time, refusing any that is
/// a symbolic link or not a folder, and any `path` not below `base`.
fn folders_within(base: &Path, path: &Path) -> io::Result<()> {
    let inside = path
        .parent()
        .and_then(|parent| parent.strip_prefix(base).ok())
        .ok_or_else(|| io::Error::other("not inside the download directory"))?;
    std::fs::create_dir_all(base)?;
    let mut at = base.to_path_buf();
    for component in inside.components() {
        let Component::Normal(name) = component else {
            return Err(io::Error::other("not a plain name"));
        };
        at.push(name);
        match std::fs::create_dir(&at) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
        // (`symlink_metadata` does not follow: a link is no folder.)
        if !std::fs::symlink_metadata(&at)?.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a folder (a link, say)",
                at.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("parley-disk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A link someone left in the download directory (to /etc, say) does not lead a peer's
    /// `dir/x` out of it: nothing is created on the other side.
    #[test]
    fn a_link_inside_the_download_directory_is_not_followed() {
        let root = scratch("link");
        let (base, outside) = (root.join("downloads"), root.join("outside"));
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("dir")).unwrap();
        let mut fs = DiskFiles::default();
        assert!(fs.part(&base, &base.join("dir/x.1234.part")).is_err());
        assert!(fs.part(&base, &base.join("dir/deeper/x.part")).is_err());
        // A link at the .part's own name is not opened either.
        std::os::unix::fs::symlink(outside.join("victim"), base.join("y.part")).unwrap();
        assert!(fs.part(&base, &base.join("y.part")).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // A real folder is fine, and the file is placed without replacing anything; its
        // durable mark goes with it.
        let part = base.join("real/z.part");
        fs.part(&base, &part).unwrap().write_at(0, b"data").unwrap();
        fs.sync_job(&part, 1).unwrap()().unwrap();
        assert_eq!(fs.part(&base, &part).unwrap().durable_mark(), Some(1));
        fs.place(&base, &part, &base.join("real/z")).unwrap();
        assert_eq!(std::fs::read(base.join("real/z")).unwrap(), b"data");
        let mut left: Vec<_> = std::fs::read_dir(base.join("real"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["z"]);
        let again = base.join("real/w.part");
        fs.part(&base, &again).unwrap();
        let taken = fs.place(&base, &again, &base.join("real/z")).unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(base.join("real/z")).unwrap(), b"data");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
