//! Deploys that must not leak host files, and bundle uploads a client cannot abuse: symlinks
//! out of a code dir, the server's data dir inside a service dir, hand-crafted tars with
//! escaping entries, the modes of unpacked code, unknown code hashes, and streamed uploads
//! (memory, hash mismatch, size limit) against the real binary.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{KillOnDrop, TempDir, TestServer, body_json, listening_url, write_service};
use gust::client::Client;
use http::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Reads a file under the code root, or says why it cannot.
const READER: &str = r#"
const fs = require('fs');
const path = require('path');
exports.handler = async (e) => {
  try {
    return { ok: true, body: fs.readFileSync(path.join(process.env.LAMBDA_TASK_ROOT, e.file), 'utf8') };
  } catch (err) {
    return { ok: false, error: err.code };
  }
};
"#;

fn reader_manifest(service: &str, name: &str) -> String {
    common::manifest(service, name, "nodejs", "index.handler", "")
}

/// Every file of a directory tree (not following links), relative.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Names in `<data>/blobs/sha256` and temp files anywhere in blobs/ and code/.
fn stored_blobs(data: &Path) -> Vec<String> {
    tree(&data.join("blobs"))
        .into_iter()
        .filter(|n| n != "sha256")
        .collect()
}

fn temp_files(data: &Path) -> Vec<String> {
    let mut t = tree(&data.join("blobs"));
    t.extend(tree(&data.join("code")));
    t.into_iter().filter(|n| n.contains(".tmp-")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_out_of_the_code_dir_refuse_the_deploy_and_upload_nothing() {
    let ts = TestServer::start().await;
    let outside = TempDir::new("outside");
    let shadow = outside.path().join("shadow");
    std::fs::write(&shadow, "root:TOPSECRET").unwrap();
    std::fs::create_dir(outside.path().join("etc")).unwrap();
    std::fs::write(outside.path().join("etc/passwd"), "TOPSECRET").unwrap();
    let data = ts.data.path().canonicalize().unwrap();

    let cases: Vec<(&str, PathBuf)> = vec![
        ("secret", shadow.clone()),
        ("hosts", outside.path().join("etc")),
        ("state", data.clone()),
        ("token", data.join("admin-token")),
        (
            "lib/up",
            PathBuf::from("../../../../../../../..").join(shadow.strip_prefix("/").unwrap()),
        ),
    ];
    for (link, target) in cases {
        let svc = write_service(
            &reader_manifest("leaky", "leaky"),
            &[("index.js", READER), ("lib/a.js", "")],
        );
        std::os::unix::fs::symlink(&target, svc.path().join(link)).unwrap();
        let err = gust::client::deploy(&ts.client, svc.path(), |_| {})
            .await
            .expect_err("a link out of the code dir is refused");
        let msg = format!("{err:#}");
        let shown = if target.is_absolute() {
            target.canonicalize().unwrap()
        } else {
            shadow.canonicalize().unwrap()
        };
        assert!(
            msg.contains(&format!(
                "symlink '{link}' points outside the code directory (to {})",
                shown.display()
            )) && msg.contains("remove it or copy the file in"),
            "{link}: {msg}"
        );
        assert_eq!(
            stored_blobs(ts.data.path()),
            Vec::<String>::new(),
            "{link}: uploaded"
        );
    }
    let r = ts.get("/fn/leaky").await;
    assert_eq!(r.status, 404, "nothing was deployed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpacked_code_is_private_links_inside_stay_links_and_the_function_reads_it() {
    let mut ts = TestServer::start().await;
    let svc = write_service(
        &reader_manifest("private", "private"),
        &[
            ("index.js", READER),
            ("data/msg.txt", "hello from the bundle"),
        ],
    );
    std::os::unix::fs::symlink("data/msg.txt", svc.path().join("alias.txt")).unwrap();
    std::os::unix::fs::symlink("../data", svc.path().join("data/self")).unwrap();
    std::os::unix::fs::symlink(".", svc.path().join("here")).unwrap();
    ts.deploy_dir(svc.path()).await.expect("deploy");
    ts.dirs.push(svc);

    let sha = ts.describe("private").await["code_sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let code = ts.data.path().join("code").join(&sha);
    let link = std::fs::symlink_metadata(code.join("alias.txt")).unwrap();
    assert!(
        link.file_type().is_symlink(),
        "a link inside is kept as a link"
    );
    assert_eq!(
        std::fs::read_link(code.join("alias.txt")).unwrap(),
        Path::new("data/msg.txt")
    );
    // SAFETY-free check of the effective uid: /proc/self belongs to it.
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let blob = ts.data.path().join("blobs/sha256").join(&sha);
    assert_eq!(
        std::fs::metadata(&blob).unwrap().permissions().mode() & 0o077,
        0,
        "the uploaded bundle is private"
    );
    for rel in ["", "index.js", "data", "data/msg.txt"] {
        let p = code.join(rel);
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(
            m.permissions().mode() & 0o007,
            0,
            "{} is readable by other users ({:o})",
            p.display(),
            m.permissions().mode()
        );
        if root {
            assert_eq!(m.gid(), 65534, "{}: the sandbox's group", p.display());
        }
    }
    // The sandboxed runtime (nobody, as root) still reads its code, through links too.
    for file in [
        "data/msg.txt",
        "alias.txt",
        "data/self/msg.txt",
        "here/data/msg.txt",
    ] {
        let v = ts
            .invoke_ok("private", &json!({ "file": file }).to_string())
            .await;
        assert_eq!(
            v,
            json!({"ok": true, "body": "hello from the bundle"}),
            "{file}"
        );
    }
}

/// One entry of a hand-made tar: name, kind, link target, content.
type Raw<'a> = (&'a str, tar::EntryType, &'a str, &'a [u8]);

/// A tar.gz with raw entry names and link targets, as a malicious client can send.
fn raw_tar(entries: &[Raw]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

async fn put_blob(client: &Client, bytes: Vec<u8>) -> (String, gust::client::Reply) {
    let sha = hex::encode(Sha256::digest(&bytes));
    let r = client
        .request(
            Method::PUT,
            &format!("/_gust/v1/blobs/{sha}"),
            &[],
            Bytes::from(bytes),
        )
        .await
        .unwrap();
    (sha, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_bundles_are_refused_and_write_nothing_outside() {
    use tar::EntryType::{Link, Regular, Symlink};
    let ts = TestServer::start().await;
    let outside = TempDir::new("victim");
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "TOPSECRET").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let victim = outside.path().canonicalize().unwrap();
    let v = victim.display().to_string();
    // Bundles unpack in <data>/code/<tmp>/: climbing from there reaches the victim dir.
    let climb = format!("../../../../../../../../..{v}");
    let abs_file = format!("{v}/abs");
    let climb_file = format!("{climb}/climbed");
    let through = "evil/through";
    let secret_s = secret.display().to_string();
    let x: &[u8] = b"x";
    let none: &[u8] = b"";
    let cases: Vec<(Vec<Raw>, &str)> = vec![
        (vec![(&climb_file, Regular, "", x)], "'..' component"),
        (vec![(&abs_file, Regular, "", x)], "absolute path"),
        (
            vec![("evil", Symlink, &v, none), (through, Regular, "", x)],
            "symlink 'evil' points outside",
        ),
        (
            vec![("root", Symlink, "/", none)],
            "symlink 'root' points outside",
        ),
        (
            vec![("up", Symlink, &climb, none)],
            "symlink 'up' points outside",
        ),
        (
            vec![("b", Symlink, ".", none), ("a", Symlink, "b/..", none)],
            "symlink 'a' leads outside",
        ),
        (
            vec![("h", Link, &secret_s, none)],
            "hard link 'h' does not name a file of the bundle",
        ),
    ];
    for (entries, needle) in &cases {
        let mut entries = entries.clone();
        entries.push((
            "index.js",
            Regular,
            "",
            b"exports.handler = async () => 1".as_slice(),
        ));
        let (sha, r) = put_blob(&ts.client, raw_tar(&entries)).await;
        let body = body_json(&r);
        assert_eq!(r.status, 400, "{needle}: {body}");
        assert_eq!(body["error"]["code"], "BadRequest", "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{needle}: {msg}");
        assert!(
            !ts.data.path().join("code").join(&sha).exists(),
            "{needle}: refused code stays unpacked"
        );
        let have = ts
            .client
            .request(
                Method::GET,
                &format!("/_gust/v1/blobs/{sha}"),
                &[],
                Bytes::new(),
            )
            .await
            .unwrap();
        assert_eq!(have.status, 404, "{needle}: a refused bundle is not kept");
    }
    let mut victim_files = tree(&victim);
    victim_files.sort();
    assert_eq!(victim_files, ["secret"], "written outside the bundle");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "TOPSECRET");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600,
        "the outside file's mode is untouched"
    );
    assert_eq!(tree(&ts.data.path().join("code")), Vec::<String>::new());
    assert_eq!(temp_files(ts.data.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_inside_the_service_dir_is_never_packed() {
    let svc = write_service(
        &reader_manifest("nested", "nested"),
        &[("index.js", READER), ("conf/admin-token", "gust_copied")],
    );
    // The server's data dir inside the service dir, under a name the packer has no rule for.
    let data = svc.path().join("my-state");
    let server = gust::server::start(common::config(&data))
        .await
        .expect("server starts");
    let client = Client::new(&server.url(), Some(server.token.clone()));
    let mut said = Vec::new();
    gust::client::deploy(&client, svc.path(), |m| said.push(m.to_string()))
        .await
        .expect("deploy");
    let said = said.join("\n");
    assert!(
        said.contains("skipping my-state: a gust data dir")
            && said.contains("skipping conf/admin-token: admin token files are never packed"),
        "{said}"
    );
    let f = client
        .admin(Method::GET, "/functions/nested", Bytes::new())
        .await
        .unwrap();
    let code = data.join("code").join(f["code_sha256"].as_str().unwrap());
    assert_eq!(tree(&code), ["gust.toml", "index.js"]);
    let r = client
        .request(
            Method::POST,
            "/2015-03-31/functions/nested/invocations",
            &[],
            json!({"file": "my-state/admin-token"}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(body_json(&r), json!({"ok": false, "error": "ENOENT"}));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_with_an_unknown_code_hash_is_a_400_in_json() {
    let ts = TestServer::start().await;
    let sha = "b".repeat(64);
    let r = ts
        .admin_raw(
            Method::POST,
            "/_gust/v1/services",
            json!({
                "manifest": reader_manifest("ghost", "ghost"),
                "code": { "ghost": sha },
            })
            .to_string(),
        )
        .await;
    assert_eq!(
        r.headers["content-type"], "application/json",
        "{:?}",
        r.headers
    );
    let body = body_json(&r);
    assert_eq!(r.status, 400, "{body}");
    assert_eq!(body["error"]["code"], "BadRequest");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("code bundle {sha} was not uploaded"))
            && msg.contains(&format!("PUT it to /_gust/v1/blobs/{sha}")),
        "{msg}"
    );
}

/// The peak resident set of a process, in bytes.
fn vm_hwm(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// A valid bundle of `size` bytes (one file of zeros, gzip without compression), built
/// without a second copy in memory.
fn big_bundle(size: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::with_capacity(size as usize + (1 << 20)),
        flate2::Compression::none(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    b.append_data(&mut h, "big.bin", std::io::repeat(0).take(size))
        .unwrap();
    let index = b"exports.handler = async () => 1";
    let mut h = tar::Header::new_gnu();
    h.set_size(index.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "index.js", &index[..]).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

/// One raw HTTP/1.1 exchange: sends `head`, then `body` chunks from another thread (the server
/// may answer and stop reading before the end), and returns the status and JSON body.
fn raw_exchange(addr: &str, head: String, chunks: Option<(usize, usize)>) -> (u16, String, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    if let Some((n, size)) = chunks {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![0u8; size];
            for _ in 0..n {
                let ok = write!(w, "{size:x}\r\n").is_ok()
                    && w.write_all(&chunk).is_ok()
                    && w.write_all(b"\r\n").is_ok();
                if !ok {
                    return;
                }
            }
            let _ = w.write_all(b"0\r\n\r\n");
        });
    }
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let code: u16 = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (mut len, mut ctype) = (0usize, String::new());
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().unwrap(),
            "content-type" => ctype = v.trim().to_string(),
            _ => {}
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    (
        code,
        ctype,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_uploads_stream_to_disk_check_the_hash_and_the_size_limit() {
    // The real binary: its memory is its own, not shared with this test's buffers.
    let data = TempDir::new("stream");
    let mut server = Command::new(env!("CARGO_BIN_EXE_gust"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("GUST_DATA_DIR", data.path())
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let url = listening_url(&mut server);
    let token = std::fs::read_to_string(data.path().join("admin-token")).unwrap();
    let client = Client::new(&url, Some(token.trim().to_string()));
    let addr = url.trim_start_matches("http://").to_string();
    let pid = server.id();

    // Warm up the upload path, then measure what a 200 MB upload adds to the peak.
    let (_, r) = put_blob(&client, big_bundle(1 << 20)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let before = vm_hwm(pid);
    let big = big_bundle(200 << 20);
    let (sha, r) = put_blob(&client, big).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let grew = vm_hwm(pid).saturating_sub(before);
    eprintln!("a 200 MB upload grew the peak RSS by {} KB", grew >> 10);
    assert!(
        grew < 64 << 20,
        "a 200 MB upload grew the server's peak RSS by {} MB",
        grew >> 20
    );
    assert_eq!(
        std::fs::metadata(data.path().join("code").join(&sha).join("big.bin"))
            .unwrap()
            .len(),
        200 << 20
    );
    assert_eq!(temp_files(data.path()), Vec::<String>::new());

    // A body that does not hash to the URL's sha256: 400, nothing kept.
    let wrong = "c".repeat(64);
    let r = client
        .request(
            Method::PUT,
            &format!("/_gust/v1/blobs/{wrong}"),
            &[],
            Bytes::from(big_bundle(20 << 20)),
        )
        .await
        .unwrap();
    let body = body_json(&r);
    assert_eq!(r.status, 400, "{body}");
    assert_eq!(body["error"]["code"], "BadRequest");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bundle hash mismatch"),
        "{body}"
    );
    assert!(!data.path().join("blobs/sha256").join(&wrong).exists());
    assert_eq!(temp_files(data.path()), Vec::<String>::new());

    // Beyond 256 MB: 413 in the admin API's JSON shape, declared or streamed.
    let auth = format!("Authorization: Bearer {}\r\n", token.trim());
    let (code, ctype, body) = raw_exchange(
        &addr,
        format!(
            "PUT /_gust/v1/blobs/{wrong} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 300000000\r\n\r\n"
        ),
        None,
    );
    assert_eq!((code, ctype.as_str()), (413, "application/json"), "{body}");
    assert_eq!(body["error"]["code"], "PayloadTooLarge", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("256 MB"),
        "{body}"
    );
    let (code, ctype, body) = raw_exchange(
        &addr,
        format!(
            "PUT /_gust/v1/blobs/{wrong} HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
        ),
        Some((260, 1 << 20)),
    );
    assert_eq!((code, ctype.as_str()), (413, "application/json"), "{body}");
    assert_eq!(body["error"]["code"], "PayloadTooLarge", "{body}");
    assert_eq!(temp_files(data.path()), Vec::<String>::new());
    assert!(!data.path().join("blobs/sha256").join(&wrong).exists());
}
