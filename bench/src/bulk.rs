//! Bulk transfers against nginx, in one run (issue 6's benchmark).
//!
//! - Upload: a 1 GiB `PUT` to a granted URL, through rs-mlm (streaming
//!   relay) and through nginx `proxy_pass` with `proxy_request_buffering
//!   off` (bench/nginx/relay.conf, 64 KiB buffers), to the same application
//!   server, from the same client. MB/s from the first byte sent to the
//!   `201` (stored and SHA-256 verified at the server).
//! - Download: a 1 GiB `GET` of a published file: from rs-mlm's cache (what
//!   every destination behind an MLM fetches) and from nginx's own cache
//!   (`proxy_cache`, bench/nginx/cache.conf, filled by one GET first).
//! - The MLM's peak resident memory over a 2 GiB upload.
//! - Fan-out: bytes on the application server -> MLM link to offer a 4 MiB
//!   file to N = 1, 20, 100 proxies behind the MLM, against N unicast copies.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rs_protocol::codec::EnvelopeWriter;
use rs_protocol::model::*;
use rs_protocol::{RsId, Timestamp};
use rs_tests::deploy::{Deployment, Extra, server_metrics};

use crate::{Figure, spread};

const GIB: u64 = 1 << 30;

fn have(c: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {c}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn nginx_bin() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

/// Installs nginx from Debian if it is missing (without starting the
/// system service: the benchmark runs its own).
pub(crate) fn ensure_nginx() -> anyhow::Result<()> {
    if Path::new("/usr/sbin/nginx").exists() || have("nginx") {
        return Ok(());
    }
    eprintln!("rs-bench: installing nginx from Debian");
    let ok = |c: &mut Command| -> anyhow::Result<()> {
        let s = c.status()?;
        anyhow::ensure!(s.success(), "{c:?}: {s}");
        Ok(())
    };
    ok(Command::new("apt-get").args(["update", "-qq"]))?;
    ok(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", "nginx"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("RUNLEVEL", "1"))
}

/// nginx relaying to `upstream`, listening on a free loopback port.
pub(crate) struct Nginx {
    child: Child,
    pub(crate) addr: String,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers first (a SIGKILL of the
        // master leaves them running, orphaned, after the benchmark).
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start_nginx(prefix: &Path, upstream: &str) -> anyhow::Result<Nginx> {
    start_nginx_with("relay.conf", prefix, upstream)
}

/// nginx with the configuration `conf` of bench/nginx/.
pub(crate) fn start_nginx_with(conf: &str, prefix: &Path, upstream: &str) -> anyhow::Result<Nginx> {
    std::fs::create_dir_all(prefix)?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let addr = format!("127.0.0.1:{port}");
    let conf = std::fs::read_to_string(crate::root().join("bench/nginx").join(conf))?
        .replace("@PREFIX@", &prefix.display().to_string())
        .replace("@LISTEN@", &addr)
        .replace("@UPSTREAM@", upstream);
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf)?;
    std::fs::create_dir_all(prefix.join("cache"))?;
    let child = Command::new(nginx_bin())
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(prefix)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Nginx { child, addr })
}

/// A file of `size` bytes, sparse but for a few marks.
fn make_file(path: &Path, size: u64, seed: u8) -> anyhow::Result<String> {
    use std::io::{Seek as _, SeekFrom, Write as _};
    let mut f = std::fs::File::create(path)?;
    f.set_len(size)?;
    for at in [0, size / 3, size / 2, size - 8] {
        f.seek(SeekFrom::Start(at))?;
        f.write_all(&[seed, 1, 2, 3, 4, 5, 6, 7])?;
    }
    drop(f);
    let (_, h) = rs_net::bulk::hash_file(path, None)?;
    Ok(rs_protocol::codec::sha256_hex(&h.finish()))
}

/// Posts `m` from component `from` straight to the server `a` (empty for
/// a pure poll); returns the back-channel messages on the reply.
async fn post_as(a: &str, from: &str, m: Option<Message>) -> anyhow::Result<Vec<Message>> {
    let up = rs_node::upstream::Upstream::new(rs_node::upstream::UpstreamConfig {
        urls: vec![format!("http://{a}")],
        ..Default::default()
    })
    .map_err(anyhow::Error::msg)?;
    let mut w = EnvelopeWriter::new(&EnvelopeMeta::new(RsId::new(from)?, Timestamp::now()));
    if let Some(m) = &m {
        w.push(m);
    }
    let reply = up.post_on(0, &w.finish()).await?;
    Ok(reply
        .messages
        .into_iter()
        .filter_map(|r| r.decode(&Default::default()).ok())
        .collect())
}

/// Asks the server for an upload grant of `size` bytes; returns its path.
async fn grant(a: &str, size: u64, sha: &str) -> anyhow::Result<String> {
    let from = "acme.p9";
    let m = rs_tests::upload_request(
        &RsId::new(from)?,
        size,
        rs_protocol::codec::parse_sha256(sha).map_err(anyhow::Error::msg)?,
    );
    let id = m.header.id.clone();
    for b in post_as(a, from, Some(m)).await? {
        if let Content::BulkResponse(r) = b.content
            && r.request == id
        {
            return match r.grant {
                Grant::Granted { url, .. } => Ok(url),
                Grant::Refused { reason, .. } => anyhow::bail!("upload refused: {reason}"),
            };
        }
    }
    anyhow::bail!("no grant on the reply")
}

/// Seconds for one PUT of `file` to `url` (201 expected).
async fn put(url: &str, file: &Path, size: u64) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let answer = rs_net::bulk::Client::new(None)
        .map_err(anyhow::Error::msg)?
        .put_file(url, file, 0, size)
        .await;
    anyhow::ensure!(
        answer == rs_net::bulk::Answer::Complete,
        "upload to {url}: {answer}"
    );
    Ok(t0.elapsed().as_secs_f64())
}

/// Seconds for one GET of `url`, checking the length.
async fn get(url: &str, size: u64) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut r = reqwest::get(url).await?;
    anyhow::ensure!(r.status().is_success(), "GET {url}: {}", r.status());
    let mut n = 0u64;
    while let Some(c) = r.chunk().await? {
        n += c.len() as u64;
    }
    anyhow::ensure!(n == size, "GET {url}: {n} of {size} bytes");
    Ok(t0.elapsed().as_secs_f64())
}

/// Announces components to the tier at `m` (a cold start from each), so
/// the server routes offers to them through it.
async fn simulate(m: &str, ids: &[RsId]) -> anyhow::Result<()> {
    crate::backchannel::simulate(&reqwest::Client::new(), m, ids).await
}

/// Publishes `file` at the server; returns its SHA-256.
async fn publish(a: &str, file: &Path, name: &str) -> anyhow::Result<[u8; 32]> {
    let size = std::fs::metadata(file)?.len();
    let f = tokio::fs::File::open(file).await?;
    let r = reqwest::Client::new()
        .put(format!("http://{a}/rs/v1/control/files/{name}"))
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(
            tokio_util::io::ReaderStream::with_capacity(f, 256 << 10),
        ))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "publish: {}", r.status());
    let f = rs_protocol::codec::api::decode_file(&r.bytes().await?, &Default::default())?;
    Ok(f.sha256)
}

/// Offers a published file to `to` (ids) or a group.
async fn offer(a: &str, sha: [u8; 32], to: &[RsId], groups: &[String]) -> anyhow::Result<()> {
    let req = rs_protocol::codec::api::OfferRequest {
        to: to.to_vec(),
        groups: groups.to_vec(),
        sha256: sha,
        class: "data".into(),
        sub: "bench".into(),
        ttl_secs: Some(3600),
        notify: None,
    };
    let r = reqwest::Client::new()
        .post(format!("http://{a}/rs/v1/control/offer"))
        .body(rs_protocol::codec::api::encode_offer_request(&req))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "offer: {}", r.text().await?);
    Ok(())
}

/// The URL in the download offer waiting for `who` at `at` (it polls).
async fn offered_url(at: &str, who: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for m in post_as(at, who, None).await? {
            if let Content::BulkRequest(b) = m.content
                && let Some(u) = b.url
            {
                return Ok(format!("http://{at}{u}"));
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no offer reached {who}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn metric(v: &std::collections::BTreeMap<String, u64>, k: &str) -> u64 {
    v.get(k).copied().unwrap_or(0)
}

fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn mbps(size: u64, secs: &[f64]) -> Vec<f64> {
    secs.iter().map(|s| size as f64 / 1e6 / s).collect()
}

pub(crate) fn run(runs: usize) -> anyhow::Result<Vec<Figure>> {
    ensure_nginx()?;
    let exe = crate::forward::exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-bulk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let r = rt.block_on(measure(&exe, &tmp, runs));
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

async fn measure(exe: &Path, dir: &Path, runs: usize) -> anyhow::Result<Vec<Figure>> {
    let mut d = Deployment::plain(dir, exe)?; // plain HTTP, as the peers run
    let a = d.appserver(
        "127.0.0.1:0",
        "[bulk]\nmin_free_disk_mb = 256\nmax_upload_bytes = 4294967296\n",
    )?;
    let (relay, link) = rs_tests::relay::start(a.clone()).await?;
    let m = d.mlm(
        "mlm",
        "acme.m1",
        std::slice::from_ref(&relay),
        &Extra::default(),
    )?;
    let nginx = start_nginx(&dir.join("nginx"), &a)?;
    let files = dir.join("appserver/bulk/files");

    // Uploads, alternating ours and nginx's.
    let up_file = dir.join("upload.bin");
    let up_sha = make_file(&up_file, GIB, 1)?;
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("rs-bench bulk: upload run {} of {runs}", i + 1);
        let path = grant(&a, GIB, &up_sha).await?;
        ours.push(put(&format!("http://{m}{path}"), &up_file, GIB).await?);
        let path = grant(&a, GIB, &up_sha).await?;
        peer.push(put(&format!("http://{}{path}", nginx.addr), &up_file, GIB).await?);
        // Keep the disk free between runs.
        for e in std::fs::read_dir(&files)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let (up_ours, up_peer) = (mbps(GIB, &ours), mbps(GIB, &peer));
    eprintln!("  upload MB/s: ours {up_ours:?}, nginx {up_peer:?}");

    // The MLM's memory over a 2 GiB upload.
    let big = dir.join("upload2.bin");
    let big_sha = make_file(&big, 2 * GIB, 2)?;
    let mlm_pid = d
        .nodes
        .get("mlm")
        .and_then(|n| n.child.as_ref())
        .map(Child::id)
        .ok_or_else(|| anyhow::anyhow!("no MLM process"))?;
    let path = grant(&a, 2 * GIB, &big_sha).await?;
    put(&format!("http://{m}{path}"), &big, 2 * GIB).await?;
    let rss_2g = peak_rss(mlm_pid) as f64 / 1e6;
    let _ = std::fs::remove_file(&big);
    for e in std::fs::read_dir(&files)?.flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    eprintln!("  MLM peak RSS over a 2 GiB upload: {rss_2g:.1} MB");

    // Downloads: one component behind the MLM, one direct.
    let down_file = dir.join("download.bin");
    make_file(&down_file, GIB, 3)?;
    let sha = publish(&a, &down_file, "download.bin").await?;
    let behind = RsId::new("acme.p7")?;
    simulate(&m, std::slice::from_ref(&behind)).await?;
    simulate(&a, &[RsId::new("acme.p8")?]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    offer(&a, sha, &[behind.clone(), RsId::new("acme.p8")?], &[]).await?;
    let at_mlm = offered_url(&m, "acme.p7").await?;
    let at_server = offered_url(&a, "acme.p8").await?;
    // The peer serves the file from its own cache, as the MLM does: one
    // GET fills it, and every timed one must be a hit.
    let cache = start_nginx_with("cache.conf", &dir.join("nginx-cache"), &a)?;
    let via_cache = at_server.replace(&a, &cache.addr);
    get(&via_cache, GIB).await?;
    let hit = reqwest::get(&via_cache).await?;
    let status = hit
        .headers()
        .get("x-cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    drop(hit);
    anyhow::ensure!(
        status == "HIT",
        "nginx did not cache the file (X-Cache-Status {status:?})"
    );
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("rs-bench bulk: download run {} of {runs}", i + 1);
        ours.push(get(&at_mlm, GIB).await?);
        peer.push(get(&via_cache, GIB).await?);
    }
    drop(cache);
    let (down_ours, down_peer) = (mbps(GIB, &ours), mbps(GIB, &peer));
    eprintln!("  download MB/s: ours {down_ours:?}, nginx from its cache {down_peer:?}");
    let _ = std::fs::remove_file(&down_file);

    // Fan-out: one offer to N proxies behind the MLM.
    let mut fan = Vec::new();
    for (k, n) in [1usize, 20, 100].into_iter().enumerate() {
        let customer = format!("f{n}");
        let ids: Vec<RsId> = (1..=n)
            .map(|i| RsId::new(format!("{customer}.p{i}")))
            .collect::<Result<_, _>>()?;
        simulate(&m, &ids).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let f = dir.join(format!("fan{n}.bin"));
        let size = 4u64 << 20;
        make_file(&f, size, 10 + k as u8)?;
        let sha = publish(&a, &f, &format!("fan{n}.bin")).await?;
        let fetched0 = metric(&server_metrics(&m).await?, "bulk.fetched_bytes");
        let pending0 = metric(&server_metrics(&m).await?, "backchannel.pending");
        let b0 = link.down_bytes.load(Ordering::Relaxed);
        offer(&a, sha, &ids, &[]).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mm = server_metrics(&m).await?;
            if metric(&mm, "bulk.fetched_bytes") >= fetched0 + size
                && metric(&mm, "backchannel.pending") >= pending0 + n as u64
            {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "fan-out to {n} did not settle");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let bytes = link.down_bytes.load(Ordering::Relaxed) - b0;
        eprintln!(
            "  fan-out to {n}: {bytes} bytes on the link; unicast {}",
            n as u64 * size
        );
        fan.push((n, bytes, n as u64 * size));
    }
    drop(nginx);
    d.stop_all();

    let command = format!("cargo run --release -p rs-bench -- bulk --runs {runs}");
    let fig = |id: &str, what: &str, v: Vec<f64>, p: Vec<f64>, peer: &str, target: &str| {
        let (value, pv) = (
            crate::forward::median(&mut v.clone()),
            crate::forward::median(&mut p.clone()),
        );
        Figure {
            peer: Some(peer.into()),
            peer_value: Some(pv),
            ratio: Some(value / pv),
            target: Some(target.into()),
            ..Figure::measured(
                id,
                what.into(),
                value,
                "MB/s",
                "higher",
                v.len(),
                spread(&v),
                &command,
            )
        }
    };
    let mut figs = vec![
        fig(
            "bulk_upload_mb_per_s",
            "a 1 GiB upload (PUT to a granted URL) through rs-mlm to the application server, stored and SHA-256 verified there, median",
            up_ours,
            up_peer,
            "nginx proxy_pass, proxy_request_buffering off, 64 KiB buffers, to the same server",
            ">= 1.0x nginx",
        ),
        fig(
            "bulk_download_mb_per_s",
            "a 1 GiB published file fetched from rs-mlm's cache (what each destination behind the MLM does), median",
            down_ours,
            down_peer,
            "nginx serving it from its own cache (proxy_cache, filled by one GET from the application server before the timed ones, each a HIT; sendfile), bench/nginx/cache.conf",
            ">= 1.0x nginx",
        ),
        Figure {
            target: Some("< 64 MB".into()),
            ..Figure::measured(
                "rss_mlm_during_2gb_upload_mb",
                "rs-mlm peak resident memory (VmHWM) over a 2 GiB upload relayed through it".into(),
                rss_2g,
                "MB",
                "lower",
                1,
                (rss_2g, rss_2g),
                &command,
            )
        },
    ];
    for (n, bytes, unicast) in fan {
        let b = bytes as f64;
        figs.push(Figure {
            peer: Some(format!("{n} unicast copies of the file")),
            peer_value: Some(unicast as f64),
            ratio: Some(b / unicast as f64),
            target: Some("one copy of the file on the link".into()),
            ..Figure::measured(
                &format!("bulk_fanout_link_bytes_n{n}"),
                format!(
                    "bytes on the application server -> MLM link to offer a 4 MiB file to {n} proxies behind the MLM (offer, the MLM's one fetch, long-poll traffic)"
                ),
                b,
                "bytes",
                "lower",
                1,
                (b, b),
                &command,
            )
        });
    }
    Ok(figs)
}
