//! Bulk uploads (seed 004, Figs. 20-21): a multi-GB file through an MLM
//! with a cut in the middle, stored once and verified, the MLM's memory
//! flat; and the receiver's rules at the protocol level: single-use and
//! expiring URLs, a wrong hash refused with nothing stored, resume from the
//! offset, refusal by an MLM's size limit.

use std::path::Path;
use std::time::Duration;

use rs_protocol::codec::EnvelopeWriter;
use rs_protocol::model::*;
use rs_protocol::{MessageId, RsId, Timestamp};
use rs_proxy::client::Client;
use rs_tests::deploy::{Deployment, Extra, admin, base, server_metrics, wait_for};

use crate::backchannel::{exe, tmp};

/// Peak resident memory (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub(crate) fn sha256_file(p: &Path) -> String {
    let (_, h) = rs_net::bulk::hash_file(p, None).unwrap();
    rs_protocol::codec::sha256_hex(&h.finish())
}

/// Writes a sparse core file of `size` bytes at `file` and hands it to the
/// proxy at `socket` to upload (integrator `cores`): the proxy's client,
/// the upload as accepted, and the file's SHA-256.
pub(crate) async fn upload_core(
    socket: &Path,
    file: &Path,
    size: u64,
) -> (Client, rs_proxy::bulk::Upload, String) {
    let want = sparse_core(file, size);
    let client = Client::new(socket).with_timeout(Duration::from_secs(120));
    client
        .register_integrator("cores", "1.0", "linux")
        .await
        .unwrap();
    let up = client
        .upload(&rs_proxy::bulk::UploadRequest {
            integrator: "cores".into(),
            path: file.display().to_string(),
            class: Some("diagnostics".into()),
            subclass: Some("core".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    (client, up, want)
}

/// Waits (up to 300 s) until the proxy reports upload `id` done.
pub(crate) async fn until_uploaded(client: &Client, id: &str) {
    assert!(
        wait_for(Duration::from_secs(300), || block(async {
            client
                .upload_state(id)
                .await
                .is_ok_and(|u| u.state == "done")
        })),
        "upload not done: {:?}",
        client.upload_state(id).await
    );
}

/// A sparse core file of `size` bytes, with some non-zero bytes so a
/// misplaced range would change the hash; returns its SHA-256.
pub(crate) fn sparse_core(file: &Path, size: u64) -> String {
    use std::io::{Seek as _, SeekFrom, Write as _};
    let mut f = std::fs::File::create(file).unwrap();
    f.set_len(size).unwrap();
    for at in [0, size / 3, size / 2 + 7, size - 5] {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(b"rs!").unwrap();
    }
    drop(f);
    sha256_file(file)
}

pub(crate) fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

pub(crate) async fn metric(addr: &str, name: &str) -> u64 {
    server_metrics(addr)
        .await
        .ok()
        .and_then(|m| m.get(name).copied())
        .unwrap_or(0)
}

/// The messages of one kind the application server stored, as
/// (id, content) pairs, read from its database.
fn stored_of_kind(appserver_dir: &Path, kind: &str) -> Vec<(String, String)> {
    rs_tests::deploy::with_appserver_db(appserver_dir, |c| {
        c.rows(
            "SELECT id, content FROM messages WHERE kind = ?1 ORDER BY seq",
            rs_store::params![kind],
            |r| {
                Ok((
                    r.get::<String>(0)?,
                    String::from_utf8_lossy(&r.get::<Vec<u8>>(1)?).into_owned(),
                ))
            },
        )
    })
    .unwrap()
}

/// A deployment under `name`: the application server (with `[bulk]`
/// settings `bulk`) and an MLM `acme.m1` (with `mlm` tables) in front of it.
fn server_and_mlm(
    name: &str,
    bulk: &str,
    mlm: &str,
) -> (Deployment, std::path::PathBuf, String, String) {
    let dir = tmp(name);
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d
        .appserver("127.0.0.1:0", &format!("[bulk]\n{bulk}\n"))
        .unwrap();
    let m = d
        .mlm(
            "m1",
            "acme.m1",
            std::slice::from_ref(&a),
            &Extra {
                tables: mlm.into(),
                ..Extra::default()
            },
        )
        .unwrap();
    (d, dir, a, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2gb_upload_through_an_mlm_survives_a_cut_and_is_stored_once_with_flat_mlm_memory() {
    const SIZE: u64 = 2 << 30;
    let (mut d, dir, a, m) = server_and_mlm("bulk-2gb", "min_free_disk_mb = 256", "");
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let file = dir.join("core.4711");
    let (client, up, want) = upload_core(&s, &file, SIZE).await;
    assert_eq!(up.size, SIZE);
    assert_eq!(up.sha256, want);

    // Cut the transfer in the middle: kill the MLM relaying it.
    // Generous: on a shared 2-core machine the suite's heaviest tests (the
    // farm demo) may run beside this one.
    assert!(
        wait_for(Duration::from_secs(300), || block(async {
            metric(&m, "bulk.bytes_relayed").await > SIZE / 4
        })),
        "the transfer did not get going; see {}",
        dir.display()
    );
    let first_pid = d.node("m1").child.as_ref().unwrap().id();
    let first_peak = peak_rss(first_pid);
    d.node("m1").kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.restart("m1").unwrap();
    let second_pid = d.node("m1").child.as_ref().unwrap().id();

    until_uploaded(&client, &up.id).await;
    let second_peak = peak_rss(second_pid);
    let relayed_after = metric(&m, "bulk.bytes_relayed").await;

    // Resumed, not started over: every byte reached the server once.
    assert!(metric(&a, "bulk.resumed").await >= 1);
    assert_eq!(metric(&a, "bulk.bytes_received").await, SIZE);
    assert!(relayed_after > 0 && relayed_after < SIZE, "{relayed_after}");
    assert_eq!(metric(&a, "bulk.completed").await, 1);
    // The MLM streamed it: memory flat in both of its lives.
    for (life, peak) in [("first", first_peak), ("second", second_peak)] {
        assert!(
            peak > 0 && peak < 64 << 20,
            "MLM peak RSS in its {life} life: {} MB",
            peak >> 20
        );
    }
    // Stored once, verified, and announced once with where to fetch it.
    let stored = dir.join("appserver/bulk/files").join(&up.request);
    assert_eq!(std::fs::metadata(&stored).unwrap().len(), SIZE);
    assert_eq!(sha256_file(&stored), want);
    let _ = std::fs::remove_file(&stored);
    let _ = std::fs::remove_file(&file);
    let bulk = stored_of_kind(&dir.join("appserver"), "bulk-request");
    let announced: Vec<_> = bulk
        .iter()
        .filter(|(_, c)| c.contains("/rs/v1/control/uploads/"))
        .collect();
    assert_eq!(bulk.len(), 2, "the request and its announcement: {bulk:?}");
    assert_eq!(announced.len(), 1, "{bulk:?}");
    assert!(announced[0].1.contains(&up.request));
    eprintln!(
        "2 GiB through the MLM: peak RSS {} MB / {} MB",
        first_peak >> 20,
        second_peak >> 20
    );
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Posts one bulk request as component `from` (talking to the server
/// directly); returns the server's answer from the back-channel.
async fn request_upload(a: &str, from: &str, size: u64, sha: [u8; 32]) -> (MessageId, Grant) {
    let now = Timestamp::now();
    let me = RsId::new(from).unwrap();
    let m = rs_tests::upload_request(&me, size, sha);
    let up = rs_node::upstream::Upstream::new(rs_node::upstream::UpstreamConfig {
        urls: vec![base(a)],
        tls: rs_tests::deploy::component_tls(a, from).unwrap(),
        ..Default::default()
    })
    .unwrap();
    let mut w = EnvelopeWriter::new(&EnvelopeMeta::new(me, now));
    w.push(&m);
    let reply = up.post_on(0, &w.finish()).await.unwrap();
    assert_eq!(reply.meta.outcomes[0].1, rs_protocol::Outcome::Accepted);
    let grant = reply
        .messages
        .iter()
        .find_map(
            |r| match r.clone().decode(&Default::default()).ok()?.content {
                Content::BulkResponse(b) if b.request == m.header.id => Some(b.grant),
                _ => None,
            },
        )
        .expect("the answer rides on the reply");
    (m.header.id, grant)
}

fn url_of(a: &str, g: &Grant) -> String {
    match g {
        Grant::Granted { url, .. } => format!("{}{url}", base(a)),
        Grant::Refused { reason, .. } => panic!("refused: {reason}"),
    }
}

async fn put(url: &str, range: Option<&str>, body: Vec<u8>) -> (u16, String, Option<u64>) {
    let mut r = rs_tests::deploy::admin_for_url(url).put(url).body(body);
    if let Some(range) = range {
        r = r.header("content-range", range);
    }
    let resp = r.send().await.unwrap();
    let off = resp
        .headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (resp.status().as_u16(), resp.text().await.unwrap(), off)
}

async fn head(url: &str) -> (u16, Option<u64>, bool) {
    let resp = rs_tests::deploy::admin_for_url(url)
        .head(url)
        .send()
        .await
        .unwrap();
    let h = resp.headers();
    (
        resp.status().as_u16(),
        h.get("upload-offset")
            .and_then(|v| v.to_str().ok()?.parse().ok()),
        h.contains_key("upload-complete"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_urls_are_single_use_resumable_expiring_and_refuse_a_wrong_hash() {
    let dir = tmp("bulk-rules");
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d
        .appserver(
            "127.0.0.1:0",
            "[bulk]\nmin_free_disk_mb = 1\nmax_upload_bytes = 1000000\n",
        )
        .unwrap();
    let files = dir.join("appserver/bulk/files");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let sha = openssl_sha(&data);

    // Too large: refused for good, nothing granted.
    let (_, g) = request_upload(&a, "acme.p9", 2_000_000, sha).await;
    assert!(
        matches!(&g, Grant::Refused { reason, retry_after: None } if reason.code.as_str() == "too-large"),
        "{g:?}"
    );

    // A wrong hash: refused, nothing stored, the URL spent.
    let (_, g) = request_upload(&a, "acme.p9", data.len() as u64, [7; 32]).await;
    let url = url_of(&a, &g);
    let (st, text, _) = put(&url, None, data.clone()).await;
    assert_eq!(st, 422, "{text}");
    assert_eq!(put(&url, None, data.clone()).await.0, 410);
    assert_eq!(std::fs::read_dir(&files).unwrap().count(), 0);
    assert_eq!(metric(&a, "bulk.completed").await, 0);

    // Cut after half, resumed from the offset the server reports.
    let (req, g) = request_upload(&a, "acme.p9", data.len() as u64, sha).await;
    let url = url_of(&a, &g);
    let half = data.len() / 2;
    {
        // A raw connection: the head and half the body, then the line drops.
        use tokio::io::AsyncWriteExt as _;
        let path = url.trim_start_matches(&base(&a));
        let mut c = tokio::net::TcpStream::connect(&a).await.unwrap();
        let head = format!(
            "PUT {path} HTTP/1.1\r\nhost: {a}\r\ncontent-length: {}\r\n\r\n",
            data.len()
        );
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&data[..half]).await.unwrap();
        c.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(c);
    }
    assert!(
        wait_for(Duration::from_secs(10), || block(async {
            head(&url).await.1 == Some(half as u64)
        })),
        "{:?}",
        head(&url).await
    );
    // A range that does not start at the offset is refused with it.
    let total = data.len();
    let (st, _, off) = put(
        &url,
        Some(&format!("bytes 10-{}/{total}", total - 1)),
        data[10..].to_vec(),
    )
    .await;
    assert_eq!((st, off), (409, Some(half as u64)));
    let (st, text, _) = put(
        &url,
        Some(&format!("bytes {half}-{}/{total}", total - 1)),
        data[half..].to_vec(),
    )
    .await;
    assert_eq!(st, 201, "{text}");
    let stored = std::fs::read(files.join(req.as_str())).unwrap();
    assert_eq!(stored, data);
    // Used: a second transfer is refused, the probe says it is complete.
    assert_eq!(put(&url, None, data.clone()).await.0, 410);
    let (st, _, complete) = head(&url).await;
    assert_eq!((st, complete), (200, true));
    assert_eq!(metric(&a, "bulk.completed").await, 1);

    // Publishing answers a valid <file>; an offer document is valid too,
    // and an offer of an unknown file or to an unknown component is refused.
    let r = admin(&a)
        .put(format!("{}/rs/v1/control/files/tuning%20v2.toml", base(&a)))
        .body("heartbeat_secs = 30\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let file_doc = r.bytes().await.unwrap();
    rs_tests::assert_control_api_valid(&file_doc, &dir.join("file.xml"));
    let file = rs_protocol::codec::api::decode_file(&file_doc, &Default::default()).unwrap();
    assert_eq!((file.name.as_str(), file.size), ("tuning v2.toml", 20));
    let offer = |sha: [u8; 32], to: &str| rs_protocol::codec::api::OfferRequest {
        to: vec![RsId::new(to).unwrap()],
        groups: vec![],
        sha256: sha,
        class: "configuration".into(),
        sub: "proxy".into(),
        ttl_secs: None,
        notify: None,
    };
    let doc = rs_protocol::codec::api::encode_offer_request(&offer(file.sha256, "acme.p9"));
    rs_tests::assert_control_api_valid(&doc, &dir.join("offer.xml"));
    for (req, want) in [
        (offer([1; 32], "acme.p9"), "no published file"),
        (offer(file.sha256, "acme.p77"), "unknown destination"),
    ] {
        let r = admin(&a)
            .post(format!("{}/rs/v1/control/offer", base(&a)))
            .body(rs_protocol::codec::api::encode_offer_request(&req))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert!(r.text().await.unwrap().contains(want));
    }

    // Unknown and malformed tokens.
    assert_eq!(
        put(
            &format!("{}/rs/v1/bulk/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", base(&a)),
            None,
            vec![1]
        )
        .await
        .0,
        404
    );
    assert_eq!(
        put(
            &format!("{}/rs/v1/bulk/..%2F..%2Fetc", base(&a)),
            None,
            vec![1]
        )
        .await
        .0,
        404
    );
    refused_while_writing(&a, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").await;
    d.stop_all();

    // Expired: a server that grants for one second.
    let dir2 = tmp("bulk-expiry");
    let mut d2 = Deployment::new(&dir2, exe()).unwrap();
    let a2 = d2
        .appserver(
            "127.0.0.1:0",
            "[bulk]\nmin_free_disk_mb = 1\ngrant_secs = 1\n",
        )
        .unwrap();
    let (_, g) = request_upload(&a2, "acme.p9", data.len() as u64, sha).await;
    let url = url_of(&a2, &g);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (st, text, _) = put(&url, None, data.clone()).await;
    assert_eq!(st, 410, "{text}");
    assert!(text.contains("expired"), "{text}");
    d2.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

/// Refused before its body is read (`token` is no upload URL there), a
/// sender still writing its body reads the answer rather than a reset: the
/// server at `addr` reads on (within a bound) before it closes. Half the
/// body, a pause in which the server has decided, then the rest; over TLS
/// with a component's certificate where the server runs TLS.
async fn refused_while_writing(addr: &str, token: &str) {
    use std::io::{Read as _, Write as _};
    let tls = rs_tests::deploy::component_tls(addr, "acme.p1").unwrap();
    let (addr, token) = (addr.to_owned(), token.to_owned());
    let answer = tokio::task::spawn_blocking(move || {
        let tcp = std::net::TcpStream::connect(&addr).unwrap();
        let mut c: Box<dyn ReadWrite> = match &tls {
            None => Box::new(tcp),
            Some(t) => {
                use openssl::ssl::{SslConnector, SslFiletype, SslMethod};
                let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
                b.set_ca_file(&t.ca).unwrap();
                b.set_certificate_chain_file(&t.cert).unwrap();
                b.set_private_key_file(&t.key, SslFiletype::PEM).unwrap();
                Box::new(b.build().connect("127.0.0.1", tcp).unwrap())
            }
        };
        let head = format!(
            "PUT /rs/v1/bulk/{token} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 100000\r\n\
             content-range: bytes 0-99999/100000\r\nconnection: close\r\n\r\n"
        );
        c.write_all(head.as_bytes()).unwrap();
        c.write_all(&[7; 50_000]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        c.write_all(&[7; 50_000]).expect("the server still reads");
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).expect("the answer, not a reset");
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
}

trait ReadWrite: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> ReadWrite for T {}

fn openssl_sha(data: &[u8]) -> [u8; 32] {
    let mut h = rs_net::bulk::Sha256::default();
    h.update(data);
    h.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlm_refuses_an_upload_over_its_limit_and_the_proxy_reports_it() {
    let (mut d, dir, a, m) = server_and_mlm(
        "bulk-mlm-limit",
        "min_free_disk_mb = 1",
        "[bulk]\nmax_upload_bytes = 1000\n",
    );
    // The MLM refuses what it will not relay the same way.
    refused_while_writing(&m, "short").await;
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    // A service module subscribed to diagnostics, pulling a feed.
    let r = admin(&a)
        .post(format!("{}/rs/v1/control/subscriptions", base(&a)))
        .body(r#"<subscription name="diag" class="diagnostics" delivery="feed"/>"#)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let small = dir.join("small.log");
    let big = dir.join("big.log");
    std::fs::write(&small, vec![b'a'; 500]).unwrap();
    std::fs::write(&big, vec![b'b'; 5000]).unwrap();
    let client = Client::new(&s);
    client
        .register_integrator("logs", "1.0", "linux")
        .await
        .unwrap();
    let mut ids = Vec::new();
    for f in [&small, &big] {
        ids.push(
            client
                .upload(&rs_proxy::bulk::UploadRequest {
                    integrator: "logs".into(),
                    path: f.display().to_string(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .id,
        );
    }
    let settled = |id: &str| {
        let id = id.to_owned();
        let client = &client;
        move || {
            block(async {
                client
                    .upload_state(&id)
                    .await
                    .is_ok_and(|u| ["done", "refused", "failed"].contains(&u.state.as_str()))
            })
        }
    };
    assert!(wait_for(Duration::from_secs(60), settled(&ids[0])));
    assert!(wait_for(Duration::from_secs(60), settled(&ids[1])));
    let ok = client.upload_state(&ids[0]).await.unwrap();
    let refused = client.upload_state(&ids[1]).await.unwrap();
    assert_eq!(ok.state, "done", "{ok:?}");
    assert_eq!(refused.state, "refused", "{refused:?}");
    assert!(
        refused
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("too-large"),
        "{refused:?}"
    );
    let stored = std::fs::read(dir.join("appserver/bulk/files").join(&ok.request)).unwrap();
    assert_eq!(stored, std::fs::read(&small).unwrap());
    assert_eq!(metric(&m, "bulk.requests_refused").await, 1);
    // The module hears of the stored file once (not of the request), with
    // where to fetch it; the file is there.
    let feed = crate::backchannel::control_get(&a, "subscriptions/diag/feed?wait=20").await;
    assert_eq!(feed.matches("<bulk-request").count(), 1, "{feed}");
    let url = format!("/rs/v1/control/uploads/{}/file", ok.request);
    assert!(feed.contains(&url), "{feed}");
    let got = admin(&a)
        .get(format!("{}{url}", base(&a)))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], &std::fs::read(&small).unwrap()[..]);
    // The uploads list is a valid control API document.
    let list = admin(&a)
        .get(format!("{}/rs/v1/control/uploads", base(&a)))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    rs_tests::assert_control_api_valid(&list, &dir.join("uploads.xml"));
    assert!(String::from_utf8_lossy(&list).contains("state=\"complete\""));
    // Handing over a file that is not there, or a relative path, is refused at once.
    let e = client
        .upload(&rs_proxy::bulk::UploadRequest {
            integrator: "logs".into(),
            path: "relative/core".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An install command for proxy `dir`: copies the file it is given to
/// `dir/installed/NAME` and says so (what the job's result shows).
pub(crate) fn installer(dir: &Path) -> String {
    format!(
        "[bulk]\ninstall_command = [\"sh\", \"-c\", \"mkdir -p \\\"$0/installed\\\" && cp \\\"$RS_FILE\\\" \\\"$0/.installing\\\" && mv \\\"$0/.installing\\\" \\\"$0/installed/$RS_NAME\\\" && echo installed $RS_NAME\", \"{}\"]\n",
        dir.display()
    )
}

/// Once every one of `ids` (proxies `p1`... under `dir`, with
/// [`installer`]) has reported, puts them in `group` and publishes a
/// package `name` of `size` bytes (not all one byte) to it with `rsctl
/// publish --watch`: every proxy installs exactly its bytes. Returns them.
pub(crate) fn publish_to_group(
    a: &str,
    dir: &Path,
    ids: &[String],
    group: &str,
    name: &str,
    size: u32,
) -> Vec<u8> {
    assert!(
        wait_for(Duration::from_secs(60), || block(async {
            let c = components(a).await;
            ids.iter().all(|id| c.contains(&format!("id=\"{id}\"")))
        })),
        "not every proxy reported"
    );
    let mut args = vec!["groups", "set", group];
    for id in ids {
        args.extend(["--member", id.as_str()]);
    }
    let (code, out, err) = crate::backchannel_faults::rsctl(a, &args);
    assert_eq!(code, 0, "{out}{err}");
    let pkg = dir.join(name);
    let bytes: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&pkg, &bytes).unwrap();
    let (code, out, err) = crate::backchannel_faults::rsctl(
        a,
        &[
            "publish",
            pkg.to_str().unwrap(),
            "--group",
            group,
            "--class",
            "software",
            "--subclass",
            "package",
            "--watch",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let n = ids.len();
    assert!(
        out.contains(&format!("{n}/{n} final: {n} succeeded")),
        "{out}"
    );
    for i in 0..n {
        let got = std::fs::read(dir.join(format!("p{}/installed/{name}", i + 1))).unwrap();
        assert!(got == bytes, "p{} installed something else", i + 1);
    }
    bytes
}

pub(crate) async fn components(a: &str) -> String {
    admin(a)
        .get(format!("{}/rs/v1/control/components", base(a)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsctl_publishes_software_to_20_proxies_fetched_once_from_the_server_and_installed_by_each()
{
    const N: usize = 20;
    let (mut d, dir, a, m) = server_and_mlm("bulk-fanout", "min_free_disk_mb = 1", "");
    let mut ids = Vec::new();
    for i in 0..N {
        let name = format!("p{}", i + 1);
        let id = format!("acme.p{}", i + 1);
        let extra = Extra {
            tables: installer(&dir.join(&name)),
            ..Extra::default()
        };
        d.proxy(&name, &id, std::slice::from_ref(&m), &extra)
            .unwrap();
        ids.push(id);
    }
    let bytes = publish_to_group(&a, &dir, &ids, "stores", "agent-2.1.tar.gz", 3_000_000);
    // The file crossed the server's link once, to the MLM; the MLM served
    // it to each of its proxies.
    let size = bytes.len() as u64;
    assert_eq!(metric(&a, "bulk.bytes_served").await, size);
    assert_eq!(
        metric(&m, "bulk.fetched_bytes").await,
        size,
        "{:?}",
        server_metrics(&m).await
    );
    assert_eq!(metric(&m, "bulk.served_bytes").await, size * N as u64);
    // Everyone answered: the server's URL is closed.
    assert!(wait_for(Duration::from_secs(10), || block(async {
        metric(&a, "bulk.unpublished").await == 1
    })));
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The offer's URL on the server, from its offers table (for the test's
/// own fetch).
fn offer_count(appserver_dir: &Path, state: &str) -> i64 {
    rs_tests::deploy::with_appserver_db(appserver_dir, |c| {
        c.one(
            "SELECT COUNT(*) FROM offers WHERE state = ?1",
            rs_store::params![state],
            |r| r.get(0),
        )
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_survives_a_cut_waits_for_a_closed_window_and_reaches_a_direct_proxy() {
    const SIZE: u64 = 512 << 20;
    // The MLM's cache is bounded far below the file: it must still keep
    // the file until every destination behind it has fetched it.
    let (mut d, dir, a, m) = server_and_mlm(
        "bulk-download-cut",
        "min_free_disk_mb = 1",
        "[bulk]\ncache_max_bytes = 1\n",
    );
    // p1 behind the MLM; p2 behind it too, but its clock (moved by the
    // test) is outside its bulk window; p3 talks to the server directly.
    let p1 = d
        .proxy(
            "p1",
            "acme.p1",
            std::slice::from_ref(&m),
            &Extra {
                tables: installer(&dir.join("p1")),
                ..Extra::default()
            },
        )
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let opens = (now / 3600 + 2) * 3600;
    let window = format!(
        "{:02}:00-{:02}:00",
        (opens / 3600) % 24,
        (opens / 3600 + 1) % 24
    );
    let clock = dir.join("p2-clock");
    std::fs::write(&clock, "+0s\n").unwrap();
    d.env = crate::backchannel_faults::faketime(&clock);
    let p2 = d
        .proxy(
            "p2",
            "acme.p2",
            std::slice::from_ref(&m),
            &Extra {
                tables: format!(
                    "{}[[throttle.rule]]\nname = \"night-bulk\"\nclass = \"bulk\"\nwindow = \"{window}\"\n",
                    installer(&dir.join("p2"))
                ),
                ..Extra::default()
            },
        )
        .unwrap();
    d.env.clear();
    let p3 = d
        .proxy(
            "p3",
            "acme.p3",
            std::slice::from_ref(&a),
            &Extra {
                tables: installer(&dir.join("p3")),
                ..Extra::default()
            },
        )
        .unwrap();
    assert!(wait_for(Duration::from_secs(60), || block(async {
        let c = components(&a).await;
        ["acme.p1", "acme.p2", "acme.p3"]
            .iter()
            .all(|id| c.contains(&format!("id=\"{id}\"")))
    })));

    let pkg = dir.join("big.pkg");
    {
        use std::io::{Seek as _, SeekFrom, Write as _};
        let mut f = std::fs::File::create(&pkg).unwrap();
        f.set_len(SIZE).unwrap();
        for at in [1, SIZE / 2, SIZE - 9] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(b"offered").unwrap();
        }
    }
    let want = sha256_file(&pkg);
    let (code, out, err) = crate::backchannel_faults::rsctl(
        &a,
        &[
            "publish",
            pkg.to_str().unwrap(),
            "--to",
            "acme.p1",
            "--to",
            "acme.p2",
            "--to",
            "acme.p3",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let job = out
        .split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .unwrap()
        .to_owned();

    // Cut the MLM's fetch from the server in the middle.
    let part = dir.join(format!("m1/cache/{want}.part"));
    assert!(
        wait_for(Duration::from_secs(120), || std::fs::metadata(&part)
            .is_ok_and(|m| m.len() > SIZE / 2)),
        "the MLM did not start fetching"
    );
    d.node("m1").kill();
    d.restart("m1").unwrap();

    // p1 (behind the MLM) and p3 (direct) install it; p2 waits.
    let installed = |p: &str| dir.join(format!("{p}/installed/big.pkg"));
    assert!(
        wait_for(Duration::from_secs(180), || installed("p1").exists()
            && installed("p3").exists()),
        "not installed: {out}"
    );
    for p in ["p1", "p3"] {
        assert_eq!(sha256_file(&installed(p)), want);
    }
    // Resumed, not fetched again from the start: the server sent the file
    // to the MLM about once (plus what was in flight at the cut), and once
    // to p3.
    let served = metric(&a, "bulk.bytes_served").await;
    assert!(
        (2 * SIZE..2 * SIZE + SIZE / 4).contains(&served),
        "served {served} bytes for 2 fetches of {SIZE}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!installed("p2").exists(), "p2 fetched outside its window");
    assert_eq!(
        metric(&m, "bulk.evicted").await,
        0,
        "evicted while p2 waits"
    );
    assert_eq!(metric(&m, "bulk.cache_files").await, 1);
    let held = Client::new(&p2)
        .call::<()>(http::Method::GET, "/v1/downloads", None)
        .await
        .unwrap();
    assert!(
        held.to_string().contains("night-bulk"),
        "p2's download should wait for its window: {held}"
    );
    // Its window opens: it gets the file then.
    std::fs::write(&clock, format!("+{}s\n", opens - now + 30)).unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || installed("p2").exists()),
        "p2 did not fetch once its window opened"
    );
    assert_eq!(sha256_file(&installed("p2")), want);
    let (_, out, _) = crate::backchannel_faults::rsctl(&a, &["jobs", "show", &job]);
    assert!(out.contains("3/3 final: 3 succeeded"), "{out}");
    // Delivered everywhere and over its bound: the MLM lets it go.
    assert!(wait_for(Duration::from_secs(10), || block(async {
        metric(&m, "bulk.evicted").await == 1 && metric(&m, "bulk.cache_files").await == 0
    })));
    assert!(!dir.join(format!("m1/cache/{want}")).exists());
    assert!(wait_for(Duration::from_secs(10), || offer_count(
        &dir.join("appserver"),
        "unpublished"
    ) == 1));
    let _ = (p1, p3);
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_grant_runs_out_during_an_outage_is_asked_for_again_and_completes() {
    const SIZE: u64 = 256 << 20;
    let (mut d, dir, a, m) =
        server_and_mlm("bulk-regrant", "min_free_disk_mb = 1\ngrant_secs = 2", "");
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let file = dir.join("inventory.tar");
    std::fs::File::create(&file).unwrap().set_len(SIZE).unwrap();
    let client = Client::new(&s).with_timeout(Duration::from_secs(60));
    client
        .register_integrator("inv", "1.0", "linux")
        .await
        .unwrap();
    let up = client
        .upload(&rs_proxy::bulk::UploadRequest {
            integrator: "inv".into(),
            path: file.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The transfer is under way; the MLM goes away for longer than the
    // grant lasts.
    assert!(wait_for(Duration::from_secs(60), || block(async {
        metric(&m, "bulk.bytes_relayed").await > 0
    })));
    d.node("m1").kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.restart("m1").unwrap();
    assert!(
        wait_for(Duration::from_secs(120), || block(async {
            client
                .upload_state(&up.id)
                .await
                .is_ok_and(|u| u.state == "done")
        })),
        "{:?}",
        client.upload_state(&up.id).await
    );
    let done = client.upload_state(&up.id).await.unwrap();
    assert!(done.requests >= 2, "{done:?}");
    assert_ne!(done.request, up.request, "a new request replaced the first");
    assert_eq!(metric(&a, "bulk.completed").await, 1);
    assert!(metric(&a, "bulk.granted").await >= 2);
    let stored = dir.join("appserver/bulk/files").join(&done.request);
    assert_eq!(std::fs::metadata(&stored).unwrap().len(), SIZE);
    // The first grant's URL is spent: it expired unused.
    assert!(
        !dir.join("appserver/bulk/files").join(&up.request).exists(),
        "the expired grant stored nothing"
    );
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_file_offered_to_a_proxy_is_applied_and_the_proxy_restarts_with_it() {
    let (mut d, dir, a, m) = server_and_mlm("bulk-config", "min_free_disk_mb = 1", "");
    let s = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    assert!(wait_for(Duration::from_secs(30), || block(async {
        components(&a).await.contains("id=\"acme.p1\"")
    })));
    let tuning = dir.join("tuning.toml");
    std::fs::write(
        &tuning,
        "heartbeat_secs = 7\n[upstream]\npoll_hold_secs = 11\n",
    )
    .unwrap();
    let (code, out, err) = crate::backchannel_faults::rsctl(
        &a,
        &[
            "publish",
            tuning.to_str().unwrap(),
            "--to",
            "acme.p1",
            "--class",
            "configuration",
            "--subclass",
            "proxy",
            "--watch",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1/1 final: 1 succeeded"), "{out}");
    // The file on disk carries the change, the rest of it kept.
    let cfg = std::fs::read_to_string(dir.join("p1.toml")).unwrap();
    assert!(cfg.contains("heartbeat_secs = 7"), "{cfg}");
    assert!(cfg.contains("poll_hold_secs = 11"), "{cfg}");
    assert!(cfg.contains("acme.p1"), "{cfg}");
    // The proxy came back with it and still takes integrators' messages.
    assert!(wait_for(Duration::from_secs(30), || s.exists()
        && block(async { Client::new(&s).status().await.is_ok() })));
    let st = Client::new(&s)
        .call::<()>(http::Method::GET, "/v1/downloads", None)
        .await
        .unwrap();
    assert!(st.to_string().contains("\"state\":\"done\""), "{st}");
    d.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}
