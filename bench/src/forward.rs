//! The durable forward path against a mosquitto bridge, in one run.
//!
//! Ours: integrators (concurrent clients of the proxy's socket API, each
//! waiting for the durable acknowledgement) -> rs-proxy -> rs-mlm ->
//! rs-appserver, 2 KB alarms, counted when stored at the server. Peer:
//! mosquitto broker A bridged to broker B at QoS 1 with persistence on
//! (bench/mosquitto/), driven fairly: as many pipelined QoS 1 publishers
//! into A as we have integrator clients, each with as many messages in
//! flight as one of our batches holds, and every message counted at
//! `mosquitto_sub -q 1` (persistent session) out of B; 2 KB messages. Then
//! each drains a backlog held at its first hop while the next was away
//! (ours at the proxy while the MLM is down, the bridge's at broker A while
//! broker B is down) through to the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rs_proxy::api::SendRequest;
use rs_proxy::client::Client;
use rs_tests::deploy::{Deployment, Extra, Pki, server_metrics};

use crate::Figure;

/// Settings of one run.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) messages: u64,
    pub(crate) backlog: u64,
    pub(crate) clients: usize,
    /// Messages per call: 1 sends each with `POST /v1/alarm`, more send
    /// them in batches with `POST /v1/batch`.
    pub(crate) batch: usize,
    pub(crate) runs: usize,
    /// Payload bytes of each message (the alarm's text; the MQTT payload):
    /// `None` for the standard 2 KB message.
    pub(crate) payload: Option<usize>,
}

fn root() -> PathBuf {
    crate::root()
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let s = cmd.status()?;
    anyhow::ensure!(s.success(), "{cmd:?} failed: {s}");
    Ok(())
}

/// Installs mosquitto from Debian if it is missing.
fn ensure_mosquitto() -> anyhow::Result<()> {
    let have = |c: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("mosquitto_sub") && (Path::new("/usr/sbin/mosquitto").exists() || have("mosquitto")) {
        return Ok(());
    }
    eprintln!("rs-bench: installing mosquitto and mosquitto-clients from Debian");
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "mosquitto", "mosquitto-clients"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Resident memory (MB) of the dedicated daemon binary `bin` (`rs-proxy`
/// or `rs-mlm`, built here) idle for 3 s, its upstream `upstream` (which
/// need not answer). Measured on the binary users run, not on the
/// multi-call test executable, whose code pages are larger.
pub(crate) fn idle_rss(bin: &str, upstream: &str) -> anyhow::Result<f64> {
    run_cmd(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        bin,
        "--bin",
        bin,
    ]))?;
    let dir = std::env::temp_dir().join(format!("rs-bench-idle-{bin}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let id = if bin == "rs-mlm" {
        "acme.m9"
    } else {
        "acme.p9"
    };
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "id = \"{id}\"\ndata_dir = \"{d}\"\nsocket = \"{d}/s.sock\"\nlisten = \"127.0.0.1:0\"\n[upstream]\nurls = [\"http://{upstream}\"]\n",
            d = dir.display()
        )
        .replace(if bin == "rs-mlm" { "socket = " } else { "listen = " }, "# "),
    )?;
    let mut cmd = Command::new(root().join("target/release").join(bin));
    if bin == "rs-proxy" {
        cmd.arg("run");
    }
    let mut child = cmd
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_mb(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    rss.ok_or_else(|| anyhow::anyhow!("{bin} did not stay up"))
}

/// The idle daemons' resident memory (`-- idle`).
pub(crate) fn idle(runs: usize) -> anyhow::Result<Vec<Figure>> {
    let command = format!("cargo run --release -p rs-bench -- idle --runs {runs}");
    let mut figs = Vec::new();
    for (bin, id, limit) in [
        ("rs-proxy", "rss_idle_proxy_mb", "<= 15 MB"),
        ("rs-mlm", "rss_idle_mlm_mb", "<= 20 MB"),
    ] {
        let mut v = Vec::new();
        for _ in 0..runs {
            // Its upstream does not answer: idle is idle.
            v.push(idle_rss(bin, "127.0.0.1:9")?);
        }
        eprintln!("rs-bench idle: {bin} {v:?} MB");
        let value = median(&mut v.clone());
        figs.push(Figure {
            target: Some(limit.into()),
            ..Figure::measured(
                id,
                format!("resident memory of an idle {bin} (the daemon binary, 3 s after start)"),
                value,
                "MB",
                "lower",
                v.len(),
                crate::spread(&v),
                &command,
            )
        });
    }
    Ok(figs)
}

pub(crate) fn exe() -> anyhow::Result<PathBuf> {
    run_cmd(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "rs-tests",
        "--bin",
        "rs-demo",
    ]))?;
    Ok(root().join("target/release/rs-demo"))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A 2 KB alarm request.
pub(crate) fn alarm(i: u64) -> SendRequest {
    sized_alarm(i, 1700)
}

/// An alarm request whose text is `text_bytes` long.
pub(crate) fn sized_alarm(i: u64, text_bytes: usize) -> SendRequest {
    let mut text = format!("bench alarm {i}: file system /var/lib/db usage above threshold; ");
    while text.len() < text_bytes {
        text.push_str("inode pressure rising on db01, write latency up; ");
    }
    text.truncate(text_bytes);
    SendRequest {
        integrator: "bench".into(),
        instance: Some("db01".into()),
        severity: Some("major".into()),
        key: Some(format!("disk:{}", i % 64)),
        text: Some(text),
        details: [
            ("mount".to_owned(), "/var/lib/db".to_owned()),
            ("used.pct".to_owned(), "91".to_owned()),
        ]
        .into(),
        ..SendRequest::default()
    }
}

/// Sends `n` alarms through the proxy with `clients` concurrent clients.
pub(crate) async fn load(
    socket: &Path,
    n: u64,
    clients: usize,
    batch: usize,
) -> anyhow::Result<()> {
    load_sized(socket, n, clients, batch, None).await
}

/// [`load`] with alarms of `payload` bytes of text (`None`: 2 KB alarms).
pub(crate) async fn load_sized(
    socket: &Path,
    n: u64,
    clients: usize,
    batch: usize,
    payload: Option<usize>,
) -> anyhow::Result<()> {
    let alarm = move |i: u64| match payload {
        Some(bytes) => sized_alarm(i, bytes),
        None => alarm(i),
    };
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let batch = batch.max(1) as u64;
    for _ in 0..clients {
        let (next, socket) = (next.clone(), socket.to_path_buf());
        tasks.push(tokio::spawn(async move {
            let c = Client::new(&socket);
            loop {
                let i = next.fetch_add(batch, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                if batch == 1 {
                    c.send("alarm", &alarm(i)).await?;
                    continue;
                }
                let items = (i..(i + batch).min(n))
                    .map(|j| rs_proxy::api::BatchItem::Alarm(alarm(j)))
                    .collect();
                for r in c.send_batch(items).await? {
                    if let rs_proxy::api::BatchResult::Failed { status, error } = r {
                        anyhow::bail!("batch item refused ({status}): {error}");
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

pub(crate) async fn stored(app: &str) -> u64 {
    server_metrics(app)
        .await
        .ok()
        .and_then(|m| m.get("store.stored_total").copied())
        .unwrap_or(0)
}

/// Waits until the server has stored `target` messages; returns when.
pub(crate) async fn until_stored(
    app: &str,
    target: u64,
    limit: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if stored(app).await >= target {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {target} stored after {limit:?}",
            stored(app).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// CPU time (user + system, ms) a process has used so far.
pub(crate) fn cpu_ms(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime is the
    // 12th and stime the 13th, in clock ticks (100 per second on Linux).
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) * 10.0
}

pub(crate) fn cpu_total(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_ms(p)).sum()
}

/// Installs perf from Debian if it is missing (it counts the fsyncs).
fn ensure_perf() -> anyhow::Result<()> {
    if Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return Ok(());
    }
    eprintln!("rs-bench: installing linux-perf from Debian");
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "linux-perf",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Counts the `fsync` and `fdatasync` calls of some processes (every
/// thread) while it runs: `perf stat` on the kernel's syscall tracepoints,
/// which counts in the kernel without stopping the processes. Dropped
/// without [`Fsyncs::stop`] (a run that failed), it stops perf.
pub(crate) struct Fsyncs(Option<Child>);

impl Fsyncs {
    pub(crate) fn start(pids: &[u32]) -> anyhow::Result<Fsyncs> {
        ensure_perf()?;
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync",
                "-p",
                &list.join(","),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        // perf attaches to every thread before it counts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Fsyncs(Some(child)))
    }

    /// Stops counting; the calls counted.
    pub(crate) fn stop(mut self) -> anyhow::Result<u64> {
        let child = self
            .0
            .take()
            .ok_or_else(|| anyhow::anyhow!("perf is not running"))?;
        run_cmd(Command::new("kill").args(["-INT", &child.id().to_string()]))?;
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let counts: Vec<u64> = text
            .lines()
            .filter(|l| l.contains("syscalls:sys_enter_f"))
            .filter_map(|l| l.split(',').next()?.trim().parse().ok())
            .collect();
        anyhow::ensure!(counts.len() == 2, "perf stat counted nothing: {text}");
        Ok(counts.iter().sum())
    }
}

impl Drop for Fsyncs {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Removes what earlier runs left under `tmp` and waits until the kernel
/// has written back their dirty pages: a drain leaves gigabytes to write
/// (and to free), which would otherwise slow whichever run comes next.
pub(crate) fn quiet_disk(tmp: &Path) {
    let _ = std::fs::remove_dir_all(tmp);
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_secs(2));
}

/// Integrator clients in the one-message-per-call run.
const SINGLE_CLIENTS: usize = 32;

pub(crate) struct Ours {
    pub(crate) rate: f64,
    pub(crate) drain: f64,
    /// CPU time of the three daemons per message (µs), throughput phase.
    pub(crate) cpu_us: f64,
    /// fsync and fdatasync calls of the three daemons per message,
    /// throughput phase.
    fsyncs: f64,
}

/// The forward path; `tls`: with mutual TLS between the tiers (the demo's
/// and a provider's setting) instead of plain HTTP (as the peers run);
/// `drain`: also the backlog drain.
pub(crate) async fn ours(
    exe: &Path,
    s: &Settings,
    dir: &Path,
    tls: bool,
    drain: bool,
) -> anyhow::Result<Ours> {
    ours_with(exe, s, dir, tls, drain, "", false).await
}

/// [`ours`] with more keys for the proxy's `[upstream]` (a batch size);
/// `seal`: the proxy seals every message (signed, encrypted to the server;
/// needs `tls`).
pub(crate) async fn ours_with(
    exe: &Path,
    s: &Settings,
    dir: &Path,
    tls: bool,
    drain: bool,
    upstream: &str,
    seal: bool,
) -> anyhow::Result<Ours> {
    let _ = std::fs::remove_dir_all(dir);
    let mut d = if tls {
        Deployment::with_pki(dir, exe, Some(Arc::new(Pki::create(&dir.join("ca"))?)))?
    } else {
        Deployment::plain(dir, exe)?
    };
    let a = d.appserver("127.0.0.1:0", "heartbeat_secs = 3600")?;
    let m = d.mlm(
        "mlm",
        "acme.m1",
        std::slice::from_ref(&a),
        &Extra::default(),
    )?;
    // The backoff is capped at 1 s so the drain starts as soon as the MLM
    // is back, whatever point the proxy's backoff had reached.
    let sealing = if seal {
        format!(
            "[seal]\nencrypt_to = \"{}\"\n",
            dir.join("appserver/tls/cert.pem").display()
        )
    } else {
        String::new()
    };
    let big = Extra {
        upstream: format!("max_backoff_secs = 1\n{upstream}"),
        tables: format!("[spool]\nmax_bytes = 8000000000\n{sealing}"),
        ..Extra::default()
    };
    let socket = d.proxy("p1", "acme.p1", std::slice::from_ref(&m), &big)?;
    let c = Client::new(&socket);
    c.register_integrator("bench", "1", "linux").await?;

    // Throughput: from the first send until the last is stored.
    let pids: Vec<u32> = ["appserver", "mlm", "p1"]
        .iter()
        .filter_map(|n| d.node(n).child.as_ref().map(Child::id))
        .collect();
    let base = stored(&a).await;
    let fsyncs = Fsyncs::start(&pids)?;
    let cpu0 = cpu_total(&pids);
    let t0 = Instant::now();
    load_sized(&socket, s.messages, s.clients, s.batch, s.payload).await?;
    let done = until_stored(&a, base + s.messages, Duration::from_secs(600)).await?;
    let rate = s.messages as f64 / done.duration_since(t0).as_secs_f64();
    let cpu_us = (cpu_total(&pids) - cpu0) * 1000.0 / s.messages as f64;
    let fsyncs = fsyncs.stop()? as f64 / s.messages as f64;
    if !drain {
        d.stop_all();
        let _ = std::fs::remove_dir_all(dir);
        return Ok(Ours {
            rate,
            drain: 0.0,
            cpu_us,
            fsyncs,
        });
    }

    // Drain: the MLM is away while the backlog builds up at the proxy.
    d.node("mlm").kill();
    load_sized(&socket, s.backlog, s.clients, s.batch, s.payload).await?;
    let base = stored(&a).await;
    d.restart("mlm")?;
    // Timed from the first message stored: each side's reconnect policy
    // (our proxy's backoff, the bridge's restart timer) is not the drain.
    let first = until_stored(&a, base + 1, Duration::from_secs(60)).await?;
    let done = until_stored(&a, base + s.backlog, Duration::from_secs(3600)).await?;
    let drain = s.backlog as f64 / done.duration_since(first).as_secs_f64();
    d.stop_all();
    let _ = std::fs::remove_dir_all(dir);
    Ok(Ours {
        rate,
        drain,
        cpu_us,
        fsyncs,
    })
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn broker(conf: &str, dir: &Path, pa: u16, pb: u16, name: &str) -> anyhow::Result<Broker> {
    let text = std::fs::read_to_string(root().join("bench/mosquitto").join(conf))?
        .replace("@PORT_A@", &pa.to_string())
        .replace("@PORT_B@", &pb.to_string())
        .replace("@DIR@", &dir.display().to_string());
    std::fs::create_dir_all(dir.join(name))?;
    let path = dir.join(conf);
    std::fs::write(&path, text)?;
    let bin = if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let child = Command::new(bin)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let port = if name == "a" { pa } else { pb };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "mosquitto {name} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Broker(child))
}

/// A message of `bytes` (2 KB, as ours, by default).
fn payload(bytes: Option<usize>) -> String {
    let bytes = bytes.unwrap_or(2048);
    let mut line = String::from("bench alarm: ");
    while line.len() < bytes {
        line.push_str("file system /var/lib/db usage above threshold; ");
    }
    line.truncate(bytes);
    line
}

/// `mosquitto_sub` on broker B at QoS 1 with the persistent session
/// `bench-sub`, exiting after `count` messages.
fn sub_command(pb: u16, count: u64) -> Command {
    let mut c = Command::new("mosquitto_sub");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &pb.to_string(),
        "-t",
        "rs/#",
        "-q",
        "1",
        "-c",
        "-i",
        "bench-sub",
    ])
    .args(["-C", &count.to_string()]);
    c
}

fn sub(pb: u16, count: u64) -> anyhow::Result<Child> {
    Ok(sub_command(pb, count).stdout(Stdio::null()).spawn()?)
}

/// Publishes `count` messages at QoS 1 into broker A from `clients`
/// pipelined publishers (MQTT connections), each keeping up to `window`
/// messages in flight (published, PUBACK not yet back): the same
/// concurrency and in-flight window as our integrators (`clients`
/// connections, each waiting for the durable acknowledgement of a batch of
/// `window` messages). Returns once broker A has acknowledged every one.
/// (`mosquitto_pub --repeat`, which the report used before, publishes the
/// next message only after the previous PUBACK: a window of one.)
async fn publish(
    pa: u16,
    count: u64,
    clients: usize,
    window: usize,
    bytes: Option<usize>,
) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let payload = payload(bytes).into_bytes();
    let clients = clients.max(1) as u64;
    let mut tasks = Vec::new();
    for c in 0..clients {
        // An even share, the first ones taking the remainder.
        let mine = count / clients + u64::from(c < count % clients);
        if mine == 0 {
            continue;
        }
        let mut opts = MqttOptions::new(format!("bench-pub-{c}"), "127.0.0.1", pa);
        opts.set_inflight(u16::try_from(window.max(1)).unwrap_or(u16::MAX))
            .set_keep_alive(Duration::from_secs(60))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, window.max(1));
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let feeder = {
                let client = client.clone();
                tokio::spawn(async move {
                    for _ in 0..mine {
                        client
                            .publish("rs/alarms", QoS::AtLeastOnce, false, payload.clone())
                            .await?;
                    }
                    anyhow::Ok(())
                })
            };
            let mut acked = 0;
            while acked < mine {
                if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
                    acked += 1;
                }
            }
            feeder.await??;
            drop(client);
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Subscribes as [`sub`] does until `count` messages have come; when the
/// first came and when the last did (`mosquitto_sub` prints one byte and a
/// newline per message, read here as they come).
fn first_and_last(pb: u16, count: u64, limit: Duration) -> anyhow::Result<(Instant, Instant)> {
    use std::io::Read as _;
    let mut child = sub_command(pb, count)
        .args(["-F", "x"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("mosquitto_sub has no stdout"))?;
    let reader = std::thread::spawn(move || -> std::io::Result<(Option<Instant>, u64)> {
        let (mut first, mut lines) = (None, 0u64);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = out.read(&mut buf)?;
            if n == 0 {
                return Ok((first, lines));
            }
            first.get_or_insert_with(Instant::now);
            lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        }
    });
    wait_child(child, limit)?;
    let done = Instant::now();
    let (first, lines) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the subscriber's reader failed"))??;
    anyhow::ensure!(lines == count, "the subscriber received {lines} of {count}");
    Ok((first.unwrap_or(done), done))
}

fn wait_child(mut c: Child, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = c.try_wait()? {
            anyhow::ensure!(s.success(), "mosquitto_sub failed: {s}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = c.kill();
            anyhow::bail!("mosquitto_sub did not receive everything within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops a broker as an operator does (SIGTERM): it saves its
/// persistence, so the subscriber's session outlives the restart.
fn stop_broker(b: Broker) -> anyhow::Result<()> {
    let mut b = std::mem::ManuallyDrop::new(b);
    run_cmd(Command::new("kill").args(["-TERM", &b.0.id().to_string()]))?;
    b.0.wait()?;
    Ok(())
}

/// The bridge's figures, as [`Ours`] has ours (CPU and fsyncs of the two
/// brokers).
pub(crate) fn peer(
    rt: &tokio::runtime::Runtime,
    s: &Settings,
    dir: &Path,
    drain: bool,
) -> anyhow::Result<Ours> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let (pa, pb) = (free_port()?, free_port()?);
    let b = broker("broker-b.conf", dir, pa, pb, "b")?;
    let a = broker("broker-a.conf", dir, pa, pb, "a")?;
    std::thread::sleep(Duration::from_millis(500)); // the bridge connects

    // Throughput: the subscriber is online; first publish until last received.
    let subscriber = sub(pb, s.messages)?;
    std::thread::sleep(Duration::from_millis(300));
    let brokers = [a.0.id(), b.0.id()];
    let fsyncs = Fsyncs::start(&brokers)?;
    let cpu0 = cpu_total(&brokers);
    let t0 = Instant::now();
    rt.block_on(publish(pa, s.messages, s.clients, s.batch, s.payload))?;
    wait_child(subscriber, Duration::from_secs(600))?;
    let rate = s.messages as f64 / t0.elapsed().as_secs_f64();
    let cpu_us = (cpu_total(&brokers) - cpu0) * 1000.0 / s.messages as f64;
    let fsyncs = fsyncs.stop()? as f64 / s.messages as f64;
    if !drain {
        drop((a, b));
        let _ = std::fs::remove_dir_all(dir);
        return Ok(Ours {
            rate,
            drain: 0.0,
            cpu_us,
            fsyncs,
        });
    }

    // Drain, like ours: the far end (broker B, holding the subscriber's
    // persistent session) is away while the backlog builds up at broker A,
    // as ours builds up at the proxy while the MLM is away; then B comes
    // back, the bridge reconnects and carries the backlog through B to the
    // subscriber. Timed from the first message received to the last, as
    // ours from the first stored: mosquitto 2.0.11's bridge reconnected
    // about 5 s after B came back whatever `restart_timeout` said, which
    // is its reconnect policy, not its drain.
    stop_broker(b)?;
    rt.block_on(publish(pa, s.backlog, s.clients, s.batch, s.payload))?;
    let b = broker("broker-b.conf", dir, pa, pb, "b")?;
    let (first, done) = first_and_last(pb, s.backlog, Duration::from_secs(3600))?;
    let drain = s.backlog as f64 / done.duration_since(first).as_secs_f64();
    drop((a, b));
    let _ = std::fs::remove_dir_all(dir);
    Ok(Ours {
        rate,
        drain,
        cpu_us,
        fsyncs,
    })
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs both sides `runs` times and returns the figures.
pub(crate) fn run(s: &Settings) -> anyhow::Result<Vec<Figure>> {
    ensure_mosquitto()?;
    let exe = exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-{}", std::process::id()));
    let (mut rate, mut drain, mut prate, mut pdrain) = (vec![], vec![], vec![], vec![]);
    let (mut cpu, mut pcpu, mut fsyncs, mut pfsyncs) = (vec![], vec![], vec![], vec![]);
    let (mut single, mut single_cpu, mut psingle, mut psingle_cpu) =
        (vec![], vec![], vec![], vec![]);
    let one_by_one = Settings {
        clients: SINGLE_CLIENTS,
        batch: 1,
        ..s.clone()
    };
    // The rates first, then the drains: a drain leaves gigabytes of pages
    // to write back and free, which slowed the runs after it even past a
    // sync.
    for i in 0..s.runs {
        let step = |what: &str| eprintln!("rs-bench forward: run {} of {}: {what}", i + 1, s.runs);
        step("ours");
        quiet_disk(&tmp);
        let o = rt.block_on(ours(&exe, s, &tmp.join("ours"), false, false))?;
        step("mosquitto bridge");
        quiet_disk(&tmp);
        let p = peer(&rt, s, &tmp.join("peer"), false)?;
        step("ours, one message per call");
        quiet_disk(&tmp);
        let o1 = rt.block_on(ours(&exe, &one_by_one, &tmp.join("ours1"), false, false))?;
        step("mosquitto bridge, one message in flight per publisher");
        quiet_disk(&tmp);
        let p1 = peer(&rt, &one_by_one, &tmp.join("peer1"), false)?;
        eprintln!(
            "  ours {:.0}/s {:.1} µs CPU/message {:.3} fsyncs/message; mosquitto {:.0}/s {:.1} µs {:.3} fsyncs\n  one per call: ours {:.0}/s {:.1} µs; mosquitto {:.0}/s {:.1} µs",
            o.rate,
            o.cpu_us,
            o.fsyncs,
            p.rate,
            p.cpu_us,
            p.fsyncs,
            o1.rate,
            o1.cpu_us,
            p1.rate,
            p1.cpu_us
        );
        rate.push(o.rate);
        cpu.push(o.cpu_us);
        fsyncs.push(o.fsyncs);
        prate.push(p.rate);
        pcpu.push(p.cpu_us);
        pfsyncs.push(p.fsyncs);
        single.push(o1.rate);
        single_cpu.push(o1.cpu_us);
        psingle.push(p1.rate);
        psingle_cpu.push(p1.cpu_us);
    }
    for i in 0..s.runs {
        eprintln!("rs-bench forward: drain {} of {}: ours", i + 1, s.runs);
        quiet_disk(&tmp);
        let o = rt.block_on(ours(&exe, s, &tmp.join("ours"), false, true))?;
        eprintln!(
            "rs-bench forward: drain {} of {}: mosquitto bridge",
            i + 1,
            s.runs
        );
        quiet_disk(&tmp);
        let p = peer(&rt, s, &tmp.join("peer"), true)?;
        eprintln!("  drain: ours {:.0}/s; mosquitto {:.0}/s", o.drain, p.drain);
        drain.push(o.drain);
        pdrain.push(p.drain);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let command = format!(
        "cargo run --release -p rs-bench -- forward --messages {} --backlog {} --clients {} --batch {} --runs {}",
        s.messages, s.backlog, s.clients, s.batch, s.runs
    );
    let at = crate::now();
    let machine = crate::machine();
    let fig = |id: &str,
               what: String,
               vals: &mut Vec<f64>,
               unit: &str,
               better: &str,
               peer: Option<(&str, &mut Vec<f64>)>,
               target: Option<&str>| {
        let (min, max) = (
            vals.iter().copied().fold(f64::INFINITY, f64::min),
            vals.iter().copied().fold(0.0, f64::max),
        );
        let value = median(vals);
        let (peer, peer_value) = match peer {
            Some((name, pv)) => (Some(name.to_owned()), Some(median(pv))),
            None => (None, None),
        };
        Figure {
            id: id.into(),
            what,
            value,
            unit: unit.into(),
            runs: vals.len() as u32,
            min,
            max,
            peer,
            ratio: peer_value.map(|p| value / p),
            peer_value,
            better: better.into(),
            command: command.clone(),
            measured_at: at.clone(),
            target: target.map(Into::into),
            machine: Some(machine.clone()),
        }
    };
    let bridge = format!(
        "mosquitto bridge A -> B, QoS 1, persistence on (autosave every 60 s, no fsync per message), 2 KB; {} pipelined publishers into A with up to {} messages in flight each (as ours: {} clients, batches of {}), every message counted at a QoS 1 subscriber on B",
        s.clients, s.batch, s.clients, s.batch
    );
    let bridge_single = format!(
        "the same bridge with {SINGLE_CLIENTS} publishers, one message in flight each (as ours: {SINGLE_CLIENTS} clients, one message per call)"
    );
    let mut figs = vec![
        fig(
            "forward_msgs_per_s",
            format!(
                "durable forward path, integrator -> proxy spool -> MLM -> appserver stored (each tier fsyncs before it acknowledges), 2 KB alarms, {} messages, {} concurrent integrator clients each sending batches of {} (POST /v1/batch)",
                s.messages, s.clients, s.batch
            ),
            &mut rate,
            "messages/s",
            "higher",
            Some((&bridge, &mut prate)),
            Some("ratio >= 1"),
        ),
        fig(
            "forward_msgs_per_s_single",
            format!(
                "the same path with each message its own call (POST /v1/alarm), {} messages, {SINGLE_CLIENTS} concurrent integrator clients",
                s.messages
            ),
            &mut single,
            "messages/s",
            "higher",
            Some((&bridge_single, &mut psingle)),
            None,
        ),
        fig(
            "forward_cpu_us_per_msg_single",
            format!(
                "CPU time (user + system) of rs-proxy, rs-mlm and rs-appserver per message in the forward_msgs_per_s_single run ({} messages)",
                s.messages
            ),
            &mut single_cpu,
            "µs",
            "lower",
            Some((
                "the bridge's two mosquitto brokers per message, one message in flight per publisher",
                &mut psingle_cpu,
            )),
            None,
        ),
        fig(
            "forward_cpu_us_per_msg",
            format!(
                "CPU time (user + system) of rs-proxy, rs-mlm and rs-appserver per message in the forward_msgs_per_s run ({} messages)",
                s.messages
            ),
            &mut cpu,
            "µs",
            "lower",
            Some((
                "the bridge's two mosquitto brokers per message in its forward_msgs_per_s run",
                &mut pcpu,
            )),
            Some("ratio <= 1.25"),
        ),
        fig(
            "forward_fsyncs_per_msg",
            "fsync and fdatasync calls of rs-proxy, rs-mlm and rs-appserver per message in the forward_msgs_per_s run (perf stat on the syscall tracepoints): one per group commit of the proxy's spool log (fdatasync) and of the server's SQLite store, which acknowledge nothing before it is on disk, and the checkpoints of each tier's SQLite files".to_owned(),
            &mut fsyncs,
            "calls",
            "lower",
            Some((
                "the bridge's two brokers in the same run (persistence is a snapshot every autosave_interval, never an fsync per message: a crash loses what came since)",
                &mut pfsyncs,
            )),
            None,
        ),
        fig(
            "drain_msgs_per_s",
            format!(
                "drain of a {}-message backlog held at the proxy while the MLM was away, through MLM to the server, timed from the first message stored after the MLM's restart to the last",
                s.backlog
            ),
            &mut drain,
            "messages/s",
            "higher",
            Some((
                "mosquitto bridge: the same backlog held at broker A while broker B was away (published as in forward_msgs_per_s), through B to the subscriber, timed from the first message received after B's restart to the last",
                &mut pdrain,
            )),
            Some("ratio >= 1"),
        ),
    ];
    // A ratio against nothing says nothing: the brokers fsync no message.
    for f in &mut figs {
        if f.peer_value == Some(0.0) {
            f.ratio = None;
        }
    }
    Ok(figs)
}

/// What mutual TLS costs on the forward path: the same path, the same
/// load, with TLS between the tiers and without, alternating, `runs` times;
/// and what payload seals cost on top (the proxy signing every message and
/// encrypting it to the server, which opens and checks each).
pub(crate) fn mtls(s: &Settings) -> anyhow::Result<Vec<Figure>> {
    let exe = exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-mtls-{}", std::process::id()));
    let (mut with, mut without, mut sealed) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..s.runs {
        eprintln!("rs-bench mtls: run {} of {}", i + 1, s.runs);
        quiet_disk(&tmp);
        with.push(
            rt.block_on(ours(&exe, s, &tmp.join("tls"), true, false))?
                .rate,
        );
        quiet_disk(&tmp);
        without.push(
            rt.block_on(ours(&exe, s, &tmp.join("plain"), false, false))?
                .rate,
        );
        quiet_disk(&tmp);
        sealed.push(
            rt.block_on(ours_with(
                &exe,
                s,
                &tmp.join("sealed"),
                true,
                false,
                "",
                true,
            ))?
            .rate,
        );
        eprintln!(
            "  mTLS {:.0}/s, plain {:.0}/s, mTLS + seals {:.0}/s",
            with[i], without[i], sealed[i]
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let range = |v: &[f64]| {
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        )
    };
    let (min, max) = range(&with);
    let (smin, smax) = range(&sealed);
    let value = median(&mut with);
    let peer_value = median(&mut without);
    let sealed_value = median(&mut sealed);
    let command = format!(
        "cargo run --release -p rs-bench -- mtls --messages {} --runs {}",
        s.messages, s.runs
    );
    Ok(vec![
        Figure {
            id: "forward_msgs_per_s_mtls".into(),
            what: format!(
                "durable forward path with mutual TLS between every tier (proxy enrolled, MLM and server certificates, ECDSA P-256), 2 KB alarms, {} messages, {} concurrent integrator clients each sending batches of {}",
                s.messages, s.clients, s.batch
            ),
            value,
            unit: "messages/s".into(),
            runs: with.len() as u32,
            min,
            max,
            peer: Some("the same path on plain HTTP, same run".into()),
            ratio: Some(value / peer_value),
            peer_value: Some(peer_value),
            better: "higher".into(),
            command: command.clone(),
            measured_at: crate::now(),
            target: None,
            machine: Some(crate::machine()),
        },
        Figure {
            id: "forward_msgs_per_s_sealed".into(),
            what: format!(
                "the same path with payload seals: the proxy signs every message (ECDSA P-256) and encrypts it to the server (CMS, ECDH + AES-256), the server decrypts and verifies each before storing; {} messages",
                s.messages
            ),
            value: sealed_value,
            unit: "messages/s".into(),
            runs: sealed.len() as u32,
            min: smin,
            max: smax,
            peer: Some("the same path with mutual TLS and no seals, same run".into()),
            ratio: Some(sealed_value / value),
            peer_value: Some(value),
            better: "higher".into(),
            command,
            measured_at: crate::now(),
            target: None,
            machine: Some(crate::machine()),
        },
    ])
}
