//! The CLI's side of the admin API and the Invoke API: a small HTTP client, code packing and
//! the deploy sequence (pack, upload, deploy). Used by the binary and the tests.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use gust_core::Runtime;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub struct Client {
    base: String,
    token: Option<String>,
    http: HyperClient<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "the server answered {} with a body that is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The server's error message, for errors the CLI reports.
    fn error_message(&self) -> String {
        let v: Option<Value> = serde_json::from_slice(&self.body).ok();
        v.as_ref()
            .and_then(|v| {
                v["error"]["message"]
                    .as_str()
                    .or(v["message"].as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: HyperClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).context("build request")?;
        let resp = self.http.request(req).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the gust server at {}: {e}. Is `gust serve` running? Point the CLI at it with --server or GUST_SERVER",
                self.base
            )
        })?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .context("read the response")?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// An admin API call that must succeed; errors carry the server's message.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Value> {
        let r = self
            .request(
                method,
                &format!("/_gust/v1{path}"),
                &[("content-type", "application/json")],
                body,
            )
            .await?;
        if r.status == StatusCode::UNAUTHORIZED {
            bail!(
                "the server refused the admin token: pass the token of the server's data dir with --data-dir / \
                 GUST_DATA_DIR, or set GUST_TOKEN (it is in <data-dir>/admin-token)"
            );
        }
        if !r.status.is_success() {
            bail!("{} ({})", r.error_message(), r.status);
        }
        if r.body.is_empty() {
            Ok(Value::Null)
        } else {
            r.json()
        }
    }
}

/// A packed code directory: a deterministic tar.gz and its sha256.
pub struct Bundle {
    pub sha256: String,
    pub bytes: Vec<u8>,
    pub files: usize,
    /// What was left out and why (gust data dirs, token files), for the CLI to say.
    pub skipped: Vec<String>,
}

/// One entry of a bundle: a file, or a symlink kept as a link (its target relative, inside
/// the code dir).
enum Item {
    File { path: PathBuf, rel: PathBuf },
    Link { rel: PathBuf, target: PathBuf },
}

/// Whether `dir` is a gust server's data dir: it holds the marker the server writes at every
/// start, or (a data dir of a gust from before the marker) a database beside a token or bundles.
pub fn is_data_dir(dir: &Path) -> bool {
    dir.join(gust_store::DATA_DIR_MARKER).exists()
        || (dir.join("gust.db").is_file()
            && (dir.join("admin-token").is_file() || dir.join("blobs/sha256").is_dir()))
}

/// The name of the admin token file; never packed, whatever directory it is in.
const TOKEN_FILE: &str = "admin-token";

/// `to` relative to the directory `from` (both absolute, canonical).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let f: Vec<_> = from.components().collect();
    let t: Vec<_> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Joins a relative link target to `base` lexically (`..` pops); None if it climbs above `/`.
fn lexical_join(base: &Path, target: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let mut out: Vec<std::ffi::OsString> = Vec::new();
    let start = if target.is_absolute() {
        Path::new("/")
    } else {
        base
    };
    for c in start.components().chain(target.components()) {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::ParentDir => {
                out.pop()?;
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Some(Path::new("/").join(out.iter().collect::<PathBuf>()))
}

struct Walk<'a> {
    /// The code dir as the user named it, for messages.
    shown: &'a Path,
    /// The code dir, canonical.
    root: PathBuf,
    items: Vec<Item>,
    skipped: Vec<String>,
}

impl Walk<'_> {
    fn refuse_link(&self, rel: &Path, to: &Path, why: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "code dir {}: symlink '{}' {why} (to {}); remove it or copy the file in",
            self.shown.display(),
            rel.display(),
            to.display()
        )
    }

    /// A symlink at `rel` (whose directory, `root/rel.parent()`, is a real directory):
    /// kept as a link when it resolves inside the code dir, else the deploy is refused. A link
    /// is never followed: neither a file's content nor a directory's is packed through it.
    fn link(&mut self, path: &Path, rel: &Path) -> anyhow::Result<()> {
        let raw = std::fs::read_link(path).with_context(|| format!("read {}", path.display()))?;
        let dir = self.root.join(rel.parent().unwrap_or(Path::new("")));
        let resolved = match path.canonicalize() {
            Ok(t) => t,
            // Dangling: judged by where it would point.
            Err(_) => match lexical_join(&dir, &raw) {
                Some(t) => t,
                None => {
                    return Err(self.refuse_link(rel, &raw, "points outside the code directory"));
                }
            },
        };
        let Ok(inside) = resolved.strip_prefix(&self.root) else {
            return Err(self.refuse_link(rel, &resolved, "points outside the code directory"));
        };
        // Inside, but into something that is never packed: refuse rather than ship a link
        // that means something else on the server.
        let mut at = self.root.clone();
        for c in inside.components() {
            at.push(c);
            if at.is_dir() && is_data_dir(&at) {
                return Err(self.refuse_link(rel, &resolved, "points into a gust data dir"));
            }
        }
        if resolved.file_name().is_some_and(|n| n == TOKEN_FILE) {
            return Err(self.refuse_link(rel, &resolved, "points to an admin token file"));
        }
        let target = relative(&dir, &resolved);
        self.items.push(Item::Link {
            rel: rel.to_path_buf(),
            target,
        });
        Ok(())
    }

    fn collect(&mut self, dir: &Path, rel: &Path) -> anyhow::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("read {}", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("read {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            if name == ".git" || name == ".gust" || name == "__pycache__" {
                continue;
            }
            let path = e.path();
            let rel = rel.join(&name);
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("read {}", path.display()))?;
            if meta.file_type().is_symlink() {
                self.link(&path, &rel)?;
            } else if meta.is_dir() {
                if is_data_dir(&path) {
                    self.skipped.push(format!(
                        "{}: a gust data dir (admin token, database, code bundles) is never packed",
                        rel.display()
                    ));
                    continue;
                }
                self.collect(&path, &rel)?;
            } else if meta.is_file() {
                if name == TOKEN_FILE {
                    self.skipped.push(format!(
                        "{}: admin token files are never packed",
                        rel.display()
                    ));
                    continue;
                }
                self.items.push(Item::File { path, rel });
            }
        }
        Ok(())
    }
}

/// A fingerprint of a service directory's files (paths, sizes, modification times), for
/// `gust dev`'s change detection. `node_modules` and other dependency or state dirs are not
/// walked: watching them every half second would cost more than it tells.
pub fn fingerprint(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    fn walk(dir: &Path, h: &mut std::collections::hash_map::DefaultHasher) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            if [".git", ".gust", "__pycache__", "node_modules", "target"]
                .iter()
                .any(|n| name == *n)
            {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            e.path().hash(h);
            if meta.is_dir() {
                walk(&e.path(), h);
            } else {
                meta.len().hash(h);
                meta.modified().ok().hash(h);
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    walk(dir, &mut h);
    h.finish()
}

/// Packs a code directory. Entries are sorted and stamped with fixed times and owners, so the
/// same code always gives the same hash (and is uploaded once). Symlinks are packed as links
/// when they resolve inside the code dir, and refuse the deploy when they do not; gust data
/// dirs and admin token files are left out (listed in `skipped`).
pub fn pack(dir: &Path) -> anyhow::Result<Bundle> {
    let root = dir
        .canonicalize()
        .with_context(|| format!("resolve the code dir {}", dir.display()))?;
    // The code dir may be a data dir itself (`gust serve --data-dir .` in the service
    // directory: the database, the token), or lie in a data dir's bundles (every function's
    // code): nothing there may be packed. A service dir elsewhere inside a data dir is fine.
    let in_bundles = |a: &Path| {
        ["code", "blobs"]
            .iter()
            .any(|s| root.starts_with(a.join(s)))
    };
    if let Some(d) = root
        .ancestors()
        .find(|a| is_data_dir(a) && (*a == root.as_path() || in_bundles(a)))
    {
        anyhow::bail!(
            "code dir {}: it is gust's data dir {} or its code bundles (the database, every function's code and its environment): serve from another --data-dir, or point `code` at a directory outside it",
            dir.display(),
            d.display()
        );
    }
    let mut walk = Walk {
        shown: dir,
        root,
        items: Vec::new(),
        skipped: Vec::new(),
    };
    walk.collect(&walk.root.clone(), Path::new(""))?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let stamp = |h: &mut tar::Header, mode: u32| {
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
    };
    for item in &walk.items {
        match item {
            Item::File { path, rel } => {
                let data =
                    std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
                let exec = std::os::unix::fs::PermissionsExt::mode(
                    &std::fs::metadata(path)?.permissions(),
                ) & 0o111
                    != 0;
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                stamp(&mut h, if exec { 0o755 } else { 0o644 });
                h.set_entry_type(tar::EntryType::Regular);
                tar.append_data(&mut h, rel, data.as_slice())
                    .with_context(|| format!("pack {}", rel.display()))?;
            }
            Item::Link { rel, target } => {
                let mut h = tar::Header::new_gnu();
                h.set_size(0);
                stamp(&mut h, 0o777);
                h.set_entry_type(tar::EntryType::Symlink);
                tar.append_link(&mut h, rel, target)
                    .with_context(|| format!("pack the symlink {}", rel.display()))?;
            }
        }
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    let bytes = gz.finish()?;
    Ok(Bundle {
        sha256: hex::encode(Sha256::digest(&bytes)),
        bytes,
        files: walk.items.len(),
        skipped: walk.skipped,
    })
}

/// Checks what can be checked before uploading: the code dir exists, and the handler file (or
/// the provided runtime's bootstrap) is there.
fn check_code(dir: &Path, f: &gust_manifest::ManifestFunction) -> anyhow::Result<()> {
    let name = &f.spec.name;
    if !dir.is_dir() {
        bail!(
            "function {name}: code directory {} does not exist (set code = \"DIR\" in gust.toml)",
            dir.display()
        );
    }
    match f.spec.runtime {
        Runtime::Provided => {
            let b = dir.join("bootstrap");
            let meta = std::fs::metadata(&b).with_context(|| {
                format!(
                    "function {name}: runtime \"provided\" needs an executable file {}",
                    b.display()
                )
            })?;
            if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 == 0 {
                bail!(
                    "function {name}: {} is not executable: run chmod +x on it",
                    b.display()
                );
            }
        }
        Runtime::Nodejs | Runtime::Python => {
            let module = f
                .spec
                .handler
                .rsplit_once('.')
                .map(|(m, _)| m)
                .unwrap_or(&f.spec.handler);
            let candidates: Vec<String> = if f.spec.runtime == Runtime::Nodejs {
                vec![
                    format!("{module}.js"),
                    format!("{module}.mjs"),
                    format!("{module}.cjs"),
                    format!("{module}/index.js"),
                ]
            } else {
                let m = module.replace('.', "/");
                vec![format!("{m}.py"), format!("{m}/__init__.py")]
            };
            if !candidates.iter().any(|c| dir.join(c).is_file()) {
                bail!(
                    "function {name}: handler {:?} needs one of {} in {}",
                    f.spec.handler,
                    candidates.join(", "),
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// Deploys the service in `dir` (its gust.toml), printing progress through `progress`.
pub async fn deploy(
    client: &Client,
    dir: &Path,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Value> {
    let manifest_path = dir.join("gust.toml");
    let text = std::fs::read_to_string(&manifest_path).with_context(|| {
        format!(
            "no manifest at {}: create one with `gust init NAME`, or pass the service directory",
            manifest_path.display()
        )
    })?;
    let shown = manifest_path.display().to_string();
    let manifest = gust_manifest::parse(&shown, &text)?;
    let mut code: HashMap<String, String> = HashMap::new();
    let mut bundles: BTreeMap<PathBuf, Bundle> = BTreeMap::new();
    for f in &manifest.functions {
        let code_dir = dir.join(&f.code);
        check_code(&code_dir, f)?;
        let key = code_dir.canonicalize().unwrap_or(code_dir.clone());
        if !bundles.contains_key(&key) {
            let b = pack(&code_dir)?;
            for s in &b.skipped {
                progress(&format!("skipping {s}"));
            }
            progress(&format!(
                "packing {} ({}): {} files, {:.1} KB",
                f.spec.name,
                code_dir.display(),
                b.files,
                b.bytes.len() as f64 / 1024.0
            ));
            bundles.insert(key.clone(), b);
        }
        code.insert(f.spec.name.clone(), bundles[&key].sha256.clone());
    }
    for b in bundles.values() {
        let path = format!("/_gust/v1/blobs/{}", b.sha256);
        let have = client
            .request(Method::GET, &path, &[], Bytes::new())
            .await?;
        if have.status == StatusCode::UNAUTHORIZED {
            bail!(
                "the server refused the admin token: use --data-dir / GUST_DATA_DIR or GUST_TOKEN"
            );
        }
        if have.status == StatusCode::OK {
            progress(&format!(
                "uploading {}: already on the server",
                &b.sha256[..12]
            ));
            continue;
        }
        progress(&format!(
            "uploading {} ({:.1} KB)",
            &b.sha256[..12],
            b.bytes.len() as f64 / 1024.0
        ));
        let r = client
            .request(
                Method::PUT,
                &path,
                &[("content-type", "application/gzip")],
                Bytes::from(b.bytes.clone()),
            )
            .await?;
        if !r.status.is_success() {
            bail!("upload failed: {} ({})", r.error_message(), r.status);
        }
    }
    let min: u32 = manifest
        .functions
        .iter()
        .map(|f| f.spec.scaling.min_instances)
        .sum();
    progress(&format!(
        "deploying service {} ({} function{}{})",
        manifest.service,
        manifest.functions.len(),
        if manifest.functions.len() == 1 {
            ""
        } else {
            "s"
        },
        if min > 0 {
            format!(
                ", starting {min} min instance{}",
                if min == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        }
    ));
    let body = serde_json::json!({ "manifest": text, "file": shown, "code": code });
    client
        .admin(Method::POST, "/services", body.to_string())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("gust-pack-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// (name, link target) of every entry of a bundle.
    fn entries(b: &Bundle) -> Vec<(String, Option<String>)> {
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(b.bytes.as_slice()));
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.link_name().unwrap().map(|l| l.display().to_string()),
                )
            })
            .collect()
    }

    #[test]
    fn relative_and_lexical_paths() {
        let r = |a: &str, b: &str| relative(Path::new(a), Path::new(b)).display().to_string();
        assert_eq!(r("/c", "/c/a/b"), "a/b");
        assert_eq!(r("/c/x/y", "/c/a"), "../../a");
        assert_eq!(r("/c/a", "/c/a"), ".");
        let l = |a: &str, b: &str| lexical_join(Path::new(a), Path::new(b));
        assert_eq!(l("/c/x", "../a"), Some(PathBuf::from("/c/a")));
        assert_eq!(l("/c/x", "/etc/shadow"), Some(PathBuf::from("/etc/shadow")));
        assert_eq!(l("/c", "../../.."), None);
    }

    #[test]
    fn links_inside_are_packed_as_links_and_the_hash_is_stable() {
        let dir = temp("inside");
        std::fs::create_dir_all(dir.join("lib/deep")).unwrap();
        std::fs::write(dir.join("lib/a.js"), "A").unwrap();
        std::os::unix::fs::symlink(dir.join("lib/a.js"), dir.join("abs.js")).unwrap();
        std::os::unix::fs::symlink("../a.js", dir.join("lib/deep/up.js")).unwrap();
        std::os::unix::fs::symlink("..", dir.join("lib/deep/parent")).unwrap();
        std::os::unix::fs::symlink("missing/x", dir.join("dangling")).unwrap();
        let b = pack(&dir).unwrap();
        assert_eq!(
            entries(&b),
            [
                ("abs.js".to_string(), Some("lib/a.js".to_string())),
                ("dangling".into(), Some("missing/x".into())),
                ("lib/a.js".into(), None),
                ("lib/deep/parent".into(), Some("..".into())),
                ("lib/deep/up.js".into(), Some("../a.js".into())),
            ]
        );
        assert_eq!(pack(&dir).unwrap().sha256, b.sha256);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn links_outside_and_data_dirs() {
        let dir = temp("outside");
        std::fs::write(dir.join("index.js"), "").unwrap();
        std::os::unix::fs::symlink("../../nowhere/x", dir.join("gone")).unwrap();
        let e = pack(&dir).err().unwrap().to_string();
        assert!(
            e.contains("symlink 'gone' points outside the code directory (to /nowhere/x)"),
            "{e}"
        );
        std::fs::remove_file(dir.join("gone")).unwrap();
        std::fs::create_dir_all(dir.join("state/blobs/sha256")).unwrap();
        std::fs::write(dir.join("state/gust.db"), "").unwrap();
        std::os::unix::fs::symlink("state/gust.db", dir.join("db")).unwrap();
        let e = pack(&dir).err().unwrap().to_string();
        assert!(
            e.contains("symlink 'db' points into a gust data dir"),
            "{e}"
        );
        std::fs::remove_file(dir.join("db")).unwrap();
        std::fs::write(dir.join("admin-token"), "t").unwrap();
        let b = pack(&dir).unwrap();
        assert_eq!(entries(&b), [("index.js".to_string(), None)]);
        assert_eq!(b.skipped.len(), 2, "{:?}", b.skipped);
        // The code dir is itself a data dir (`gust serve --data-dir .`), or lies inside one.
        std::fs::write(dir.join(".gust-data-dir"), "").unwrap();
        let e = pack(&dir).err().unwrap().to_string();
        assert!(e.contains("it is gust's data dir"), "{e}");
        std::fs::create_dir_all(dir.join("code/abc")).unwrap();
        std::fs::write(dir.join("code/abc/index.js"), "").unwrap();
        let e = pack(&dir.join("code/abc")).err().unwrap().to_string();
        assert!(e.contains("it is gust's data dir"), "{e}");
        // A service directory that merely lies in a data dir packs (gust dev does this).
        std::fs::create_dir_all(dir.join("svc")).unwrap();
        std::fs::write(dir.join("svc/index.js"), "").unwrap();
        assert!(pack(&dir.join("svc")).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
