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
}

fn collect(dir: &Path, rel: &Path, out: &mut Vec<(PathBuf, PathBuf)>) -> anyhow::Result<()> {
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
        let meta = std::fs::metadata(&path).with_context(|| format!("read {}", path.display()))?;
        if meta.is_dir() {
            collect(&path, &rel.join(&name), out)?;
        } else if meta.is_file() {
            out.push((path, rel.join(&name)));
        }
    }
    Ok(())
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
/// same code always gives the same hash (and is uploaded once).
pub fn pack(dir: &Path) -> anyhow::Result<Bundle> {
    let mut files = Vec::new();
    collect(dir, Path::new(""), &mut files)?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (path, rel) in &files {
        let data = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let exec = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path)?.permissions())
            & 0o111
            != 0;
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(if exec { 0o755 } else { 0o644 });
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, rel, data.as_slice())
            .with_context(|| format!("pack {}", rel.display()))?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    let bytes = gz.finish()?;
    Ok(Bundle {
        sha256: hex::encode(Sha256::digest(&bytes)),
        bytes,
        files: files.len(),
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
