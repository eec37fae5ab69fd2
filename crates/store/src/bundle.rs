//! Code bundles on disk: streaming an upload into place while hashing it, and unpacking a
//! bundle without trusting it. Any admin client can upload any tar, so the unpacker assumes
//! nothing the CLI's packer guarantees:
//!
//! - an entry whose path is absolute or has a `..` component is refused;
//! - nothing is ever written through a symlink (every parent of an entry must be a real
//!   directory of the bundle, files are created with `O_EXCL`);
//! - a symlink must resolve inside the bundle (checked once the whole tree is there, following
//!   the bundle's own links as the kernel would under `/var/task`); a hard link must name a
//!   regular file of the bundle;
//! - devices, fifos and other special entries are refused.
//!
//! A refused bundle is a caller's error (`StoreError::Invalid`) naming the entry; nothing of it
//! is kept. A failure of the host while unpacking (a full disk, a quota, no file descriptors, an
//! I/O error reading the stored bundle) is `StoreError::Io`, a 500: the bundle is kept and the
//! unpack is tried again at the next deploy or cold start. Unpacked code is readable by the sandboxed runtime and gust only
//! ([`restrict`]); see docs/security.md, "Code bundles".

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Result, StoreError, io};

/// The group the sandboxed runtime runs as when gust is root (`nobody`'s group, 65534; the
/// same number as `gust_sandbox::SANDBOX_GID`, which this crate does not depend on).
pub const SANDBOX_GID: u32 = 65534;

/// Removes a temp file or directory unless it was put in place.
pub(crate) struct TempPath(Option<PathBuf>);

impl TempPath {
    pub(crate) fn new(p: PathBuf) -> TempPath {
        TempPath(Some(p))
    }
    pub(crate) fn path(&self) -> &Path {
        self.0.as_deref().expect("temp path kept")
    }
    pub(crate) fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {
                    let _ = fs::remove_dir_all(&p);
                }
                Ok(_) => {
                    let _ = fs::remove_file(&p);
                }
                Err(_) => {}
            }
        }
    }
}

/// Copies `body` into a new file at `tmp` (mode 0600) and returns the sha256 of what was
/// written. Memory use is one buffer, whatever the size.
pub(crate) fn write_hashed(tmp: &Path, mut body: impl Read) -> Result<String> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io(format!("create {}", tmp.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("read the bundle upload")(e)),
        };
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(io(format!("write {}", tmp.display())))?;
    }
    file.flush()
        .map_err(io(format!("write {}", tmp.display())))?;
    Ok(hex::encode(hasher.finalize()))
}

fn invalid(sha: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(format!(
        "code bundle {sha} is refused: {what}; bundles hold only files, directories and links inside the code directory (pack it with `gust deploy`)"
    ))
}

/// The entry's path as components under the bundle root; refuses absolute paths and `..`.
fn entry_path(sha: &str, path: &Path) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid(
                    sha,
                    format_args!("entry '{}' is an absolute path", path.display()),
                ));
            }
            Component::ParentDir => {
                return Err(invalid(
                    sha,
                    format_args!("entry '{}' has a '..' component", path.display()),
                ));
            }
        }
    }
    Ok(out)
}

/// Makes sure every directory on the way to `parts` (excluding the last) is a real directory of
/// the bundle, creating missing ones; never follows a symlink.
fn real_parents(sha: &str, root: &Path, parts: &[OsString], create: bool) -> Result<PathBuf> {
    let mut at = root.to_path_buf();
    for p in &parts[..parts.len().saturating_sub(1)] {
        at.push(p);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(invalid(
                    sha,
                    format_args!(
                        "entry '{}' lies under the symlink '{}'",
                        join(parts).display(),
                        at.strip_prefix(root).unwrap_or(&at).display()
                    ),
                ));
            }
            Ok(_) => {
                return Err(invalid(
                    sha,
                    format_args!(
                        "entry '{}' lies under the file '{}'",
                        join(parts).display(),
                        at.strip_prefix(root).unwrap_or(&at).display()
                    ),
                ));
            }
            Err(_) if create => {
                fs::create_dir(&at).map_err(io(format!("create {}", at.display())))?;
            }
            Err(_) => {
                return Err(invalid(
                    sha,
                    format_args!("'{}' does not exist", join(parts).display()),
                ));
            }
        }
    }
    Ok(root.join(join(parts)))
}

fn join(parts: &[OsString]) -> PathBuf {
    parts.iter().collect()
}

/// Makes room for a new entry at `at`: an earlier entry of the same name (tar lets a later
/// one win) is removed, unless it is a directory.
fn clear(at: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(at) {
        Ok(m) if m.is_dir() => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a directory of that name is already there",
        )),
        Ok(_) => fs::remove_file(at),
        Err(_) => Ok(()),
    }
}

/// Whether a relative symlink target, read from a link whose directory is `dir` (components
/// under the root), stays inside the root when followed lexically. Used for a first check when
/// the link is created; [`escapes`] decides on the finished tree.
fn lexically_inside(dir: &[OsString], target: &Path) -> bool {
    let mut depth = dir.len();
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Whether following the symlink at `link` (components under `root`) leaves `root`, resolving
/// the bundle's own symlinks on the way as the kernel would with `root` mounted anywhere.
/// Components that do not exist are taken lexically; a loop counts as escaping.
pub(crate) fn escapes(root: &Path, link: &[OsString]) -> bool {
    let mut stack: Vec<OsString> = link[..link.len().saturating_sub(1)].to_vec();
    let Ok(target) = fs::read_link(root.join(join(link))) else {
        return true;
    };
    let mut pending: Vec<OsString> = Vec::new();
    // `pending` is used as a stack of components still to walk, last = next.
    let push_target = |pending: &mut Vec<OsString>, t: &Path| -> bool {
        let mut comps = Vec::new();
        for c in t.components() {
            match c {
                Component::RootDir | Component::Prefix(_) => return false,
                Component::CurDir => {}
                Component::ParentDir => comps.push(OsString::from("..")),
                Component::Normal(n) => comps.push(n.to_os_string()),
            }
        }
        pending.extend(comps.into_iter().rev());
        true
    };
    if !push_target(&mut pending, &target) {
        return true;
    }
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            if stack.pop().is_none() {
                return true;
            }
            continue;
        }
        stack.push(c);
        let here = root.join(join(&stack));
        if let Ok(m) = fs::symlink_metadata(&here)
            && m.file_type().is_symlink()
        {
            hops += 1;
            if hops > 40 {
                return true;
            }
            stack.pop();
            let Ok(t) = fs::read_link(&here) else {
                return true;
            };
            if !push_target(&mut pending, &t) {
                return true;
            }
        }
    }
    false
}

/// Every symlink of the tree under `root`, as components.
fn symlinks(root: &Path, under: &mut Vec<OsString>, out: &mut Vec<Vec<OsString>>) {
    let Ok(rd) = fs::read_dir(root.join(join(under))) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(t) = e.file_type() else { continue };
        under.push(e.file_name());
        if t.is_symlink() {
            out.push(under.clone());
        } else if t.is_dir() {
            symlinks(root, under, out);
        }
        under.pop();
    }
}

/// A read of the bundle failed: its format (gzip, tar) is the caller's error; an error of the
/// file under it (EIO) is the host's.
fn read_error(sha: &str, e: std::io::Error) -> StoreError {
    if e.raw_os_error().is_some() {
        return io(format!("read code bundle {sha}"))(e);
    }
    invalid(sha, format_args!("not a valid tar.gz: {e}"))
}

/// Writing an entry failed. A few failures come from what the bundle holds (a name too long, a
/// directory where a file goes, too many links to one file): the caller's error. The others
/// are the host's (ENOSPC, EDQUOT, EMFILE, EIO, EROFS…): a 5xx, and the bundle is kept.
fn write_error(sha: &str, entry: &impl std::fmt::Display, e: std::io::Error) -> StoreError {
    const ENAMETOOLONG: i32 = 36;
    const EMLINK: i32 = 31;
    let callers = e.kind() == std::io::ErrorKind::AlreadyExists
        || matches!(e.raw_os_error(), Some(ENAMETOOLONG | EMLINK));
    if callers {
        return invalid(sha, format_args!("entry '{entry}': {e}"));
    }
    io(format!("unpack code bundle {sha}: write entry '{entry}'"))(e)
}

/// Copies an entry's data, telling the bundle's errors (read) from the disk's (write).
fn copy_entry(
    sha: &str,
    shown: &impl std::fmt::Display,
    from: &mut impl Read,
    to: &mut impl Write,
) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(sha, e)),
        };
        to.write_all(&buf[..n])
            .map_err(|e| write_error(sha, shown, e))?;
    }
}

/// Unpacks the tar.gz `blob` into the new, private directory `dest`, refusing anything that
/// could reach outside it (module docs). `dest` is left half-filled on error: the caller
/// removes it.
pub(crate) fn unpack(sha: &str, blob: impl Read, dest: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    let not_tar = |e: std::io::Error| read_error(sha, e);
    for entry in archive.entries().map_err(not_tar)? {
        let mut entry = entry.map_err(not_tar)?;
        let raw = entry.path().map_err(not_tar)?.into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            continue;
        }
        let parts = entry_path(sha, &raw)?;
        if parts.is_empty() {
            // The root itself (`./`).
            continue;
        }
        let at = real_parents(sha, dest, &parts, true)?;
        let shown = raw.display();
        let write_err = |e: std::io::Error| write_error(sha, &shown, e);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                clear(&at).map_err(write_err)?;
                let exec = entry.header().mode().unwrap_or(0o644) & 0o111 != 0;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(if exec { 0o700 } else { 0o600 })
                    .open(&at)
                    .map_err(write_err)?;
                copy_entry(sha, &shown, &mut entry, &mut f)?;
            }
            tar::EntryType::Directory => match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(invalid(
                        sha,
                        format_args!("directory '{shown}' has the name of another entry"),
                    ));
                }
                Err(_) => fs::create_dir(&at).map_err(write_err)?,
            },
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(not_tar)?
                    .ok_or_else(|| invalid(sha, format_args!("symlink '{shown}' has no target")))?
                    .into_owned();
                if !lexically_inside(&parts[..parts.len() - 1], &target) {
                    return Err(invalid(
                        sha,
                        format_args!(
                            "symlink '{shown}' points outside the bundle (to {})",
                            target.display()
                        ),
                    ));
                }
                clear(&at).map_err(write_err)?;
                std::os::unix::fs::symlink(&target, &at).map_err(write_err)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(not_tar)?
                    .ok_or_else(|| invalid(sha, format_args!("hard link '{shown}' has no target")))?
                    .into_owned();
                let outside = || {
                    invalid(
                        sha,
                        format_args!(
                            "hard link '{shown}' does not name a file of the bundle (it names {})",
                            target.display()
                        ),
                    )
                };
                let tparts = entry_path(sha, &target).map_err(|_| outside())?;
                if tparts.is_empty() {
                    return Err(outside());
                }
                let src = real_parents(sha, dest, &tparts, false).map_err(|_| outside())?;
                match fs::symlink_metadata(&src) {
                    Ok(m) if m.is_file() => {}
                    _ => return Err(outside()),
                }
                clear(&at).map_err(write_err)?;
                fs::hard_link(&src, &at).map_err(write_err)?;
            }
            other => {
                return Err(invalid(
                    sha,
                    format_args!("entry '{shown}' is of a kind bundles may not hold ({other:?})"),
                ));
            }
        }
    }
    // Links are judged on the finished tree: one created early may lead through one created
    // later.
    let mut links = Vec::new();
    symlinks(dest, &mut Vec::new(), &mut links);
    for l in links {
        if escapes(dest, &l) {
            let target = fs::read_link(dest.join(join(&l))).unwrap_or_default();
            return Err(invalid(
                sha,
                format_args!(
                    "symlink '{}' leads outside the bundle or into a loop (its target is {})",
                    join(&l).display(),
                    target.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Gives an unpacked tree its final owner and modes: group `nobody` (65534) with dirs and
/// executables 0750 and files 0640 when gust may set that group (as root: the sandboxed
/// runtime reads through the group, other host users cannot); otherwise (rootless, or
/// `--no-sandbox`, where the runtime runs as gust's own user) 0700/0600. Symlinks keep theirs.
pub(crate) fn restrict(root: &Path) -> Result<()> {
    let shared = std::os::unix::fs::lchown(root, None, Some(SANDBOX_GID)).is_ok();
    fn walk(p: &Path, shared: bool) -> Result<()> {
        let meta = fs::symlink_metadata(p).map_err(io(format!("read {}", p.display())))?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        if shared && meta.gid() != SANDBOX_GID {
            std::os::unix::fs::lchown(p, None, Some(SANDBOX_GID))
                .map_err(io(format!("chown {}", p.display())))?;
        }
        let exec = meta.is_dir() || meta.permissions().mode() & 0o100 != 0;
        let mode = match (shared, exec) {
            (true, true) => 0o750,
            (true, false) => 0o640,
            (false, true) => 0o700,
            (false, false) => 0o600,
        };
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {}", p.display())))?;
        if meta.is_dir() {
            for e in fs::read_dir(p).map_err(io(format!("read {}", p.display())))? {
                let e = e.map_err(io(format!("read {}", p.display())))?;
                walk(&e.path(), shared)?;
            }
        }
        Ok(())
    }
    walk(root, shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "gust-bundle-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    enum E<'a> {
        File(&'a str, &'a str),
        Dir(&'a str),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Fifo(&'a str),
    }

    /// A tar.gz with raw names: the tar crate's builder refuses `..` and absolute paths, a
    /// malicious client does not.
    fn tar(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let (name, link, kind, data): (&str, Option<&str>, _, &[u8]) = match e {
                E::File(n, d) => (n, None, tar::EntryType::Regular, d.as_bytes()),
                E::Dir(n) => (n, None, tar::EntryType::Directory, b""),
                E::Sym(n, t) => (n, Some(*t), tar::EntryType::Symlink, b""),
                E::Hard(n, t) => (n, Some(*t), tar::EntryType::Link, b""),
                E::Fifo(n) => (n, None, tar::EntryType::Fifo, b""),
            };
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn run(entries: &[E]) -> (Dir, Result<()>) {
        let d = Dir::new("unpack");
        let dest = d.0.join("root");
        fs::create_dir(&dest).unwrap();
        let r = unpack("s", tar(entries).as_slice(), &dest);
        (d, r)
    }

    fn refused(entries: &[E], needle: &str) {
        let (d, r) = run(entries);
        match r {
            Err(StoreError::Invalid(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("expected a refusal naming {needle:?}, got {other:?}"),
        }
        // Nothing was written beside the root.
        let names: Vec<_> = fs::read_dir(&d.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["root"], "written outside the root: {names:?}");
    }

    #[test]
    fn escaping_entries_are_refused() {
        refused(&[E::File("../x", "a")], "'../x' has a '..' component");
        refused(&[E::File("a/../../x", "a")], "'..' component");
        refused(&[E::File("/tmp/x", "a")], "absolute path");
        refused(&[E::Sym("l", "/etc/passwd")], "points outside");
        refused(&[E::Sym("l", "..")], "points outside");
        refused(&[E::Sym("d/l", "../../x")], "points outside");
        // Lexically inside, physically out: b is the root, so b/.. is its parent.
        refused(
            &[E::Sym("b", "."), E::Sym("a", "b/..")],
            "'a' leads outside",
        );
        // The same with the links in the other order, and through a chain.
        refused(
            &[E::Sym("a", "c/.."), E::Sym("c", "b"), E::Sym("b", ".")],
            "'a' leads outside",
        );
        refused(&[E::Sym("l", "l")], "leads outside");
        refused(
            &[E::Sym("up", "."), E::File("up/x", "a")],
            "lies under the symlink 'up'",
        );
        refused(&[E::Hard("h", "/etc/passwd")], "hard link 'h'");
        refused(&[E::Hard("h", "../root/x")], "hard link 'h'");
        refused(&[E::Hard("h", "missing")], "hard link 'h'");
        refused(
            &[E::Sym("s", "x"), E::File("x", "a"), E::Hard("h", "s")],
            "hard link 'h'",
        );
        refused(&[E::Fifo("p")], "kind bundles may not hold");
    }

    #[test]
    fn links_inside_the_bundle_are_kept() {
        let (d, r) = run(&[
            E::File("lib/a.js", "A"),
            E::Sym("alias.js", "lib/a.js"),
            E::Sym("lib/self", "."),
            E::Sym("lib/up", "../lib/a.js"),
            E::Sym("dangling", "nowhere/x"),
            E::Dir("empty"),
            E::Hard("hard.js", "lib/a.js"),
            E::File("lib/a.js", "B"),
        ]);
        r.unwrap();
        let root = d.0.join("root");
        assert_eq!(fs::read_to_string(root.join("alias.js")).unwrap(), "B");
        assert_eq!(fs::read_to_string(root.join("lib/up")).unwrap(), "B");
        // The later entry of a name wins; the hard link keeps the first file.
        assert_eq!(fs::read_to_string(root.join("hard.js")).unwrap(), "A");
        assert!(
            fs::symlink_metadata(root.join("alias.js"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn unpacked_code_is_not_readable_by_others() {
        let (d, r) = run(&[E::File("a/b.txt", "x"), E::Sym("l", "a/b.txt")]);
        r.unwrap();
        let root = d.0.join("root");
        restrict(&root).unwrap();
        for p in [root.clone(), root.join("a"), root.join("a/b.txt")] {
            let m = fs::metadata(&p).unwrap();
            assert_eq!(m.permissions().mode() & 0o007, 0, "{}", p.display());
            // /proc/self belongs to the process's effective uid.
            if fs::metadata("/proc/self").unwrap().uid() == 0 {
                assert_eq!(m.gid(), SANDBOX_GID, "{}", p.display());
                assert_eq!(m.permissions().mode() & 0o040, 0o040, "{}", p.display());
            }
        }
    }

    /// A writer that fails like a full disk.
    struct FullDisk;
    impl Write for FullDisk {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(28)) // ENOSPC
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A reader that fails like a corrupt gzip stream.
    struct Corrupt;
    impl Read for Corrupt {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "corrupt deflate stream",
            ))
        }
    }

    #[test]
    fn a_failing_disk_is_the_hosts_error_and_a_broken_bundle_the_callers() {
        match copy_entry("s", &"a.js", &mut &b"data"[..], &mut FullDisk) {
            Err(StoreError::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(28)),
            other => panic!("a full disk must be an I/O error, got {other:?}"),
        }
        match copy_entry("s", &"a.js", &mut Corrupt, &mut Vec::new()) {
            Err(StoreError::Invalid(m)) => assert!(m.contains("not a valid tar.gz"), "{m}"),
            other => panic!("a corrupt bundle must be the caller's error, got {other:?}"),
        }
        // A whole unpack into a target that cannot be written (it is gone).
        let d = Dir::new("unwritable");
        let r = unpack(
            "s",
            tar(&[E::File("index.js", "x")]).as_slice(),
            &d.0.join("gone"),
        );
        assert!(matches!(r, Err(StoreError::Io { .. })), "{r:?}");
        // The bundle's own conflicts stay the caller's error.
        let (_d, r) = run(&[E::Dir("a"), E::File("a", "x")]);
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
        // And a stream that is not gzip at all.
        let d = Dir::new("notgz");
        fs::create_dir(d.0.join("root")).unwrap();
        let r = unpack("s", &b"not a tarball at all"[..], &d.0.join("root"));
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    }
}
