//! Names from a peer made safe to create under a download directory (protocol.md 3.10
//! "Names"). A name is a relative path with `/` between components. Whatever the peer sends,
//! the result is a path of plain components inside the directory, or a refusal: never a `..`,
//! a root, a drive, a device, a control character or an unbounded length.

use std::fmt;
use std::path::{Path, PathBuf};

/// Longest component kept (bytes of UTF-8): under every common file system's 255, with room
/// for the ` (999)` that [`unique_target`] may add and the `.part` suffix of [`part_name`].
pub const MAX_COMPONENT_BYTES: usize = 200;
/// Most components in one name (folders are sent as their files with relative paths).
pub const MAX_DEPTH: usize = 32;
/// Longest whole name kept (bytes, components and separators).
pub const MAX_NAME_BYTES: usize = 1024;
/// How many ` (n)` suffixes [`unique_target`] tries before giving up.
pub const MAX_SUFFIX: u32 = 999;

/// Windows device names: a file named so (with any extension, in any case) opens the device.
const DEVICES: [&str; 24] = [
    "CON", "PRN", "AUX", "NUL", "COM0", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7",
    "COM8", "COM9", "LPT0", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("the name is absolute (starts at a root or a drive)")]
    Absolute,
    #[error("the name climbs out of its folder (`..`)")]
    Parent,
    #[error("the name has too many folders")]
    TooDeep,
    #[error("the name is too long")]
    TooLong,
}

/// A name reduced to safe components, each a plain file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeName(Vec<String>);

impl SafeName {
    pub fn components(&self) -> &[String] {
        &self.0
    }

    /// Relative to (and so always inside) a download directory.
    pub fn to_path(&self) -> PathBuf {
        self.0.iter().collect()
    }
}

impl fmt::Display for SafeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("/"))
    }
}

/// Reduces a peer's name to safe components (protocol.md 3.10 "Names"):
/// - `\` counts as a separator too (a Windows sender's); empty and `.` components are dropped;
/// - a leading separator or a drive (`C:`) is refused as absolute, a `..` component refused;
/// - control characters (C0, DEL, C1), bidi controls and the characters Windows forbids
///   (`<>:"|?*`) become `_`; trailing dots and spaces are removed (Windows drops them, so
///   `a.` and `a` would be one file);
/// - a device name (`CON`, `con.txt`, `LPT1.tar.gz`) gets a leading `_`;
/// - a component longer than [`MAX_COMPONENT_BYTES`] is cut (at a character boundary,
///   keeping a short extension); more than [`MAX_DEPTH`] components, or a result longer than
///   [`MAX_NAME_BYTES`], is refused.
pub fn safe_name(name: &str) -> Result<SafeName, NameError> {
    if name.starts_with(['/', '\\']) || has_drive(name) {
        return Err(NameError::Absolute);
    }
    let mut out = Vec::new();
    for raw in name.split(['/', '\\']) {
        if raw.is_empty() || raw == "." {
            continue;
        }
        if raw == ".." {
            return Err(NameError::Parent);
        }
        let cleaned: String = raw.chars().map(replace_unsafe).collect();
        let trimmed = cleaned.trim_end_matches(['.', ' ']);
        // What is left of a component of dots and spaces only is not a name.
        if trimmed.is_empty() || trimmed == "." || trimmed.chars().all(|c| c == '.') {
            continue;
        }
        let mut component = shorten(trimmed);
        if is_device(&component) {
            component.insert(0, '_');
            component = shorten(&component);
        }
        out.push(component);
        if out.len() > MAX_DEPTH {
            return Err(NameError::TooDeep);
        }
    }
    if out.is_empty() {
        return Err(NameError::Empty);
    }
    let total = out.iter().fold(out.len().saturating_sub(1), |sum, c| {
        sum.saturating_add(c.len())
    });
    if total > MAX_NAME_BYTES {
        return Err(NameError::TooLong);
    }
    Ok(SafeName(out))
}

fn has_drive(name: &str) -> bool {
    let mut chars = name.chars();
    matches!((chars.next(), chars.next()), (Some(letter), Some(':')) if letter.is_ascii_alphabetic())
}

fn replace_unsafe(c: char) -> char {
    let bidi =
        matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if c.is_control() || bidi || matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*') {
        '_'
    } else {
        c
    }
}

fn is_device(component: &str) -> bool {
    let stem = component.split('.').next().unwrap_or(component);
    let stem = stem.trim_end_matches(' ');
    DEVICES.iter().any(|d| d.eq_ignore_ascii_case(stem))
        || stem.eq_ignore_ascii_case("CONIN$")
        || stem.eq_ignore_ascii_case("CONOUT$")
}

/// Cuts a component to [`MAX_COMPONENT_BYTES`], keeping an extension of up to 16 bytes.
fn shorten(component: &str) -> String {
    if component.len() <= MAX_COMPONENT_BYTES {
        return component.to_string();
    }
    let ext = match component.rfind('.') {
        Some(dot) if component.len().saturating_sub(dot) <= 16 && dot > 0 => {
            component.get(dot..).unwrap_or("")
        }
        _ => "",
    };
    let mut keep = MAX_COMPONENT_BYTES.saturating_sub(ext.len());
    while !component.is_char_boundary(keep) {
        keep = keep.saturating_sub(1);
    }
    let head = component.get(..keep).unwrap_or("");
    // The cut may leave a trailing dot or space, which Windows would drop.
    format!("{}{ext}", head.trim_end_matches(['.', ' ']))
}

/// Where a received file goes: `dir` joined with the safe name, made unique with ` (1)`,
/// ` (2)`... before the extension when `exists` says the name is taken, so that nothing is
/// ever overwritten. `None` when every suffix up to [`MAX_SUFFIX`] is taken.
pub fn unique_target(
    dir: &Path,
    name: &SafeName,
    exists: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    candidates(dir, name).find(|candidate| !exists(candidate))
}

/// Where [`unique_target`] put a file, found again after a restart (the move happened, its
/// record did not say where): the last name taken before the first free one.
pub fn placed_target(
    dir: &Path,
    name: &SafeName,
    exists: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    candidates(dir, name)
        .take_while(|candidate| exists(candidate))
        .last()
}

/// The names a file may be given, in order: its own, then ` (1)` to ` (999)` before its
/// extension.
fn candidates(dir: &Path, name: &SafeName) -> impl Iterator<Item = PathBuf> {
    let first = dir.join(name.to_path());
    let (parents, last) = name.0.split_at(name.0.len().saturating_sub(1));
    let last = last.first().map(String::as_str).unwrap_or("file");
    let (stem, ext) = match last.rfind('.') {
        Some(dot) if dot > 0 => (
            last.get(..dot).unwrap_or(last).to_string(),
            last.get(dot..).unwrap_or("").to_string(),
        ),
        _ => (last.to_string(), String::new()),
    };
    let folder = dir.join(parents.iter().collect::<PathBuf>());
    std::iter::once(first)
        .chain((1..=MAX_SUFFIX).map(move |n| folder.join(format!("{stem} ({n}){ext}"))))
}

/// The `.part` file a file is written to until its SHA-256 checks out, beside where it will
/// go: the name's last component, the file id in hex (two transfers of one name never share
/// a `.part`), and `.part`.
pub fn part_name(name: &SafeName, id: &super::FileId) -> PathBuf {
    let mut path = name.to_path();
    let last = name.0.last().map(String::as_str).unwrap_or("file");
    // The whole id: the peer chooses ids, and two offers sharing a prefix must never share
    // a `.part` (one's bytes would be placed under the other's name).
    path.set_file_name(format!("{last}.{}.part", hex::encode(id)));
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Component;

    /// Whatever a peer names its file, the result is plain components under the directory.
    fn lands_inside(name: &str) {
        let Ok(safe) = safe_name(name) else { return };
        let dir = Path::new("/downloads");
        let target = unique_target(dir, &safe, |_| false).unwrap();
        assert!(target.starts_with(dir), "{name:?} -> {target:?}");
        for c in safe.to_path().components() {
            assert!(matches!(c, Component::Normal(_)), "{name:?}: {c:?}");
        }
        for c in safe.components() {
            assert!(
                !c.is_empty() && c.len() <= MAX_COMPONENT_BYTES + 1,
                "{name:?}"
            );
            assert!(!c.chars().any(char::is_control), "{name:?}");
            assert!(!c.ends_with(['.', ' ']), "{name:?}");
            assert!(!is_device(c), "{name:?}: {c}");
        }
        assert!(safe.to_string().len() <= MAX_NAME_BYTES);
    }

    #[test]
    fn hostile_names_land_inside_or_are_refused() {
        let long = "a".repeat(10_000);
        let long_ext = format!("{}.pdf", "b".repeat(10_000));
        let names = [
            "../x",
            "/etc/x",
            "a/../../x",
            "..",
            ".",
            "",
            "/",
            "\\\\server\\share\\x",
            "C:\\x",
            "c:x",
            "x\0y",
            "\0",
            "a\nb\rc\x1b[2J",
            "\u{7f}\u{85}",
            "CON",
            "con.txt",
            "Lpt1.tar.gz",
            "dir/NUL",
            "com1 .txt",
            "CONIN$",
            "trailing. . ",
            "...",
            ". .",
            "a/./b",
            "a//b",
            "\u{202e}gpj.exe",
            "what?<>|*\":",
            &long,
            &long_ext,
        ];
        for name in names {
            lands_inside(name);
        }
        assert_eq!(safe_name("../x"), Err(NameError::Parent));
        assert_eq!(safe_name("a/../../x"), Err(NameError::Parent));
        assert_eq!(safe_name("/etc/x"), Err(NameError::Absolute));
        assert_eq!(safe_name("C:\\x"), Err(NameError::Absolute));
        assert_eq!(safe_name(""), Err(NameError::Empty));
        assert_eq!(safe_name("..."), Err(NameError::Empty));
        assert_eq!(safe_name(&"a/".repeat(40)), Err(NameError::TooDeep));
        let deep_long = vec!["c".repeat(150); 10].join("/");
        assert_eq!(safe_name(&deep_long), Err(NameError::TooLong));
        let ok = |n: &str| safe_name(n).unwrap().to_string();
        assert_eq!(ok("x\0y"), "x_y");
        assert_eq!(ok("CON"), "_CON");
        assert_eq!(ok("con.txt"), "_con.txt");
        assert_eq!(ok("dir/nul"), "dir/_nul");
        assert_eq!(ok("trailing. . "), "trailing");
        assert_eq!(ok("a/./b"), "a/b");
        assert_eq!(ok("report.pdf"), "report.pdf");
        assert_eq!(ok("photos/2024/a b.jpg"), "photos/2024/a b.jpg");
        assert_eq!(ok("\u{202e}gpj.exe"), "_gpj.exe");
        let cut = ok(&long_ext);
        assert!(
            cut.len() <= MAX_COMPONENT_BYTES && cut.ends_with(".pdf"),
            "{cut}"
        );
        // Multi-byte characters are cut at a boundary.
        let wide = ok(&"é".repeat(300));
        assert!(wide.len() <= MAX_COMPONENT_BYTES);
    }

    #[test]
    fn an_existing_file_is_never_overwritten() {
        let dir = Path::new("/d");
        let name = safe_name("sub/report.pdf").unwrap();
        let taken = [
            PathBuf::from("/d/sub/report.pdf"),
            PathBuf::from("/d/sub/report (1).pdf"),
        ];
        let got = unique_target(dir, &name, |p| taken.iter().any(|t| t == p)).unwrap();
        assert_eq!(got, PathBuf::from("/d/sub/report (2).pdf"));
        let bare = safe_name("README").unwrap();
        let got = unique_target(dir, &bare, |p| p == Path::new("/d/README")).unwrap();
        assert_eq!(got, PathBuf::from("/d/README (1)"));
        assert_eq!(unique_target(dir, &bare, |_| true), None);
    }

    #[test]
    fn part_files_sit_beside_the_target_and_differ_per_file() {
        let name = safe_name("sub/report.pdf").unwrap();
        let a = part_name(&name, &[0xab; 16]);
        assert_eq!(
            a,
            PathBuf::from("sub/report.pdf.abababababababababababababababab.part")
        );
        assert_ne!(a, part_name(&name, &[0xcd; 16]));
        // A peer's two ids sharing a prefix still get two `.part`s.
        let mut b = [0xab; 16];
        b[15] = 0;
        assert_ne!(a, part_name(&name, &b));
    }
}
