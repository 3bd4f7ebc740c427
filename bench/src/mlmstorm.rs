//! An MLM farm under a reconnect storm, over mutual TLS (`cargo run
//! --release -p rs-bench -- mlmstorm`). Three `rs-mlm` members on one
//! PostgreSQL database; `--proxies` (10,000) simulated proxies (a load
//! generator in this process: one connection, one certificate and one
//! proxy ID each, ECDSA P-256 keys from the deployment's CA) hold 25 s
//! long polls on them, each given the three members' URLs starting with
//! its own (the proxies' failover list); three real proxies send alarms
//! meanwhile. Phases:
//!
//! 1. every simulated poll held: the members' resident memory over their
//!    idle memory is the cost of that many long polls over mutual TLS;
//! 2. a member killed (SIGKILL) and started again: its proxies move to
//!    the others, then
//! 3. the storm: every simulated proxy's connection is dropped and all of
//!    them connect again within one second, each to its own member first
//!    (a new TLS handshake each). Measured: the time until every one is
//!    served (the members' `envelopes.in_hand` add up to every poll), the
//!    peak resident memory of any member meanwhile, and the latency of the
//!    real proxies' alarms created during the storm (server `received`
//!    minus `created`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rs_protocol::codec::EnvelopeWriter;
use rs_protocol::model::EnvelopeMeta;
use rs_protocol::{RsId, Timestamp};
use rs_tests::deploy::{Deployment, Extra, Pki, base, server_metrics};
use rs_tests::postgres::Postgres;

use crate::forward::{exe, median, rss_mb};
use crate::{Figure, percentile};

const MEMBERS: usize = 3;
const REAL: usize = 3;
/// Alarms a second from each real proxy.
const ALARMS_PER_SEC: u64 = 20;
const HOLD: Duration = Duration::from_secs(25);
const STORM_LIMIT: Duration = Duration::from_secs(120);
/// Each member's `memory_limit_mb`: above it a member accepts no new
/// connection (the proxies it defers go to another member).
const BOUND_MB: u64 = 448;

/// Counters of the load generator.
#[derive(Default)]
struct Gen {
    answered: AtomicU64,
    failed: AtomicU64,
    /// The failures by kind (what the simulated proxy saw).
    why: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Gen {
    /// Prints the failures by kind since the last report, and forgets them.
    fn report(&self, when: &str) {
        if let Ok(mut w) = self.why.lock() {
            for (why, n) in w.iter() {
                eprintln!("    {n:>6} failed polls {when}: {why}");
            }
            w.clear();
        }
    }

    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut w) = self.why.lock() {
            *w.entry(why).or_default() += 1;
        }
    }
}

/// What kind of failure a poll met: the HTTP status, or the innermost
/// cause of a transport error (connection refused or reset, a TLS alert,
/// a timeout), shortened so that like failures count together.
fn kind(e: &reqwest::Error) -> String {
    let mut inner: &dyn std::error::Error = e;
    while let Some(s) = inner.source() {
        inner = s;
    }
    let text = inner.to_string();
    let text: String = text
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(60)
        .collect();
    let what = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    format!("{what}: {text}")
}

/// One simulated proxy: long-polls the first of `urls` that answers, as
/// `sender`, until `stop`.
async fn sim(
    http: reqwest::Client,
    urls: Vec<String>,
    sender: RsId,
    g: Arc<Gen>,
    stop: Arc<AtomicBool>,
) {
    let mut k = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut meta = EnvelopeMeta::new(sender.clone(), Timestamp::now());
        meta.poll = Some(HOLD);
        let enc = EnvelopeWriter::new(&meta).finish();
        let r = http
            .post(&urls[k % urls.len()])
            .header("content-type", enc.content_type)
            .body(enc.body)
            .send()
            .await;
        let failed = match r {
            Ok(r) if r.status() == 200 => match r.bytes().await {
                Ok(_) => {
                    g.answered.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(e) => Some(kind(&e)),
            },
            Ok(r) => Some(format!("status {}", r.status().as_u16())),
            Err(e) => Some(kind(&e)),
        };
        match failed {
            None => {}
            Some(why) => {
                g.fail(why);
                // The next member of the list, after a pause.
                k += 1;
                tokio::time::sleep(Duration::from_millis(500 + fastrand::u64(0..500))).await;
            }
        }
    }
}

/// The deployment's CA, to sign the simulated proxies' certificates.
struct Signer {
    cert: openssl::x509::X509,
    key: openssl::pkey::PKey<openssl::pkey::Private>,
    /// One key for every simulated proxy: each has its own certificate
    /// (its own ID), and key generation is not what is measured.
    proxy_key: openssl::pkey::PKey<openssl::pkey::Private>,
}

impl Signer {
    fn open(pki: &Pki) -> anyhow::Result<Self> {
        Ok(Signer {
            cert: openssl::x509::X509::from_pem(&std::fs::read(pki.dir.join("ca.pem"))?)?,
            key: openssl::pkey::PKey::private_key_from_pem(&std::fs::read(
                pki.dir.join("ca.key"),
            )?)?,
            proxy_key: rs_net::pki::generate_key().map_err(anyhow::Error::msg)?,
        })
    }

    /// `id`'s identity: a component certificate as the CA issues them
    /// (`rs_net::pki::Ca::issue`: CN the ID, O the customer, OU
    /// component, client and server use), signed here without the CA's
    /// records: `Ca::issue` records each in `ca.db` with a commit of its
    /// own, minutes for ten thousand, which is not what is measured.
    fn identity(&self, id: &RsId) -> anyhow::Result<reqwest::Identity> {
        use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage};
        let mut name = openssl::x509::X509NameBuilder::new()?;
        name.append_entry_by_nid(openssl::nid::Nid::COMMONNAME, id.as_str())?;
        name.append_entry_by_nid(openssl::nid::Nid::ORGANIZATIONNAME, id.customer().as_str())?;
        name.append_entry_by_nid(openssl::nid::Nid::ORGANIZATIONALUNITNAME, "component")?;
        let name = name.build();
        let mut serial = openssl::bn::BigNum::new()?;
        serial.rand(120, openssl::bn::MsbOption::MAYBE_ZERO, false)?;
        let mut b = openssl::x509::X509Builder::new()?;
        b.set_version(2)?;
        b.set_serial_number(&*serial.to_asn1_integer()?)?;
        b.set_subject_name(&name)?;
        b.set_issuer_name(self.cert.subject_name())?;
        b.set_pubkey(&self.proxy_key)?;
        let now = Timestamp::now().as_millis() / 1000;
        b.set_not_before(&*openssl::asn1::Asn1Time::from_unix(now - 3600)?)?;
        b.set_not_after(&*openssl::asn1::Asn1Time::from_unix(now + 2 * 86_400)?)?;
        b.append_extension(BasicConstraints::new().critical().build()?)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_encipherment()
                .build()?,
        )?;
        b.append_extension(
            ExtendedKeyUsage::new()
                .server_auth()
                .client_auth()
                .build()?,
        )?;
        b.sign(&self.key, openssl::hash::MessageDigest::sha256())?;
        let cert = b.build();
        Ok(reqwest::Identity::from_pkcs8_pem(
            &cert.to_pem()?,
            &self.proxy_key.private_key_to_pem_pkcs8()?,
        )?)
    }
}

/// A client presenting `ident` (its own connection pool: each simulated
/// proxy holds its own connection).
fn client_for(
    root: &reqwest::Certificate,
    ident: reqwest::Identity,
) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_certs_only([root.clone()])
        .identity(ident)
        .pool_max_idle_per_host(1)
        .timeout(HOLD + Duration::from_secs(30))
        .build()?)
}

/// Polls held by the members now (their `envelopes.in_hand`, the real
/// proxies' among them).
async fn in_hand(members: &[String]) -> u64 {
    let mut n = 0;
    for m in members {
        n += server_metrics(m)
            .await
            .ok()
            .and_then(|x| x.get("envelopes.in_hand").copied())
            .unwrap_or(0);
    }
    n
}

fn rss_all(pids: &[u32]) -> Vec<f64> {
    pids.iter().map(|p| rss_mb(*p).unwrap_or(0.0)).collect()
}

fn pids(d: &mut Deployment) -> Vec<u32> {
    (1..=MEMBERS)
        .filter_map(|i| {
            d.node(&format!("m{i}"))
                .child
                .as_ref()
                .map(std::process::Child::id)
        })
        .collect()
}

/// What one run measured.
struct Run {
    per_poll_mb: f64,
    held: u64,
    storm_s: f64,
    peak_mb: f64,
    alarm_p99_ms: f64,
    alarms: usize,
    /// Times a member's memory bound closed the door, all members.
    closed: u64,
}

/// The sum over `members` of a counter in their /metrics.
async fn counter_of(d: &mut Deployment, members: &[&str], name: &str) -> u64 {
    let mut total = 0;
    for m in members {
        let addr = d.metrics_addr(m);
        let Ok(r) = reqwest::get(format!("http://{addr}/metrics")).await else {
            continue;
        };
        let text = r.text().await.unwrap_or_default();
        total += text
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0) as u64;
    }
    total
}

#[allow(clippy::too_many_lines)]
async fn one(n: usize, dir: &std::path::Path, pg: &Postgres) -> anyhow::Result<Run> {
    let _ = std::fs::remove_dir_all(dir);
    let pki = Arc::new(Pki::create(&dir.join("ca"))?);
    let mut d = Deployment::with_pki(dir, exe()?, Some(pki.clone()))?;
    let a = d.appserver("127.0.0.1:0", "heartbeat_secs = 3600")?;
    let url = pg.database("bench_mlmstorm");
    // Room for every poll on any member.
    let room = format!(
        "max_connections = {}\nbusy_envelopes = {}\nmemory_limit_mb = {BOUND_MB}\n",
        n + 1024,
        n + 1024
    );
    let members = d.mlm_farm(MEMBERS, "acme.m1", std::slice::from_ref(&a), &url, |_| {
        Extra {
            top: room.clone(),
            ..Extra::default()
        }
    })?;
    let mut sockets = Vec::new();
    for i in 1..=REAL {
        let mut list = members.clone();
        list.rotate_left(i % MEMBERS);
        sockets.push(d.proxy(
            &format!("p{i}"),
            &format!("acme.p{i}"),
            &list,
            &Extra::default(),
        )?);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle: f64 = rss_all(&pids(&mut d)).iter().sum();

    // Certificates and clients for the simulated proxies (two clients
    // each, with the same certificate: the storm's connections are new
    // ones, new TLS sessions).
    eprintln!("  issuing {n} certificates");
    let issuing = Instant::now();
    let signer = Signer::open(&pki)?;
    let root = reqwest::Certificate::from_pem(&std::fs::read(&pki.admin.ca)?)?;
    let ids: Vec<RsId> = (1..=n)
        .map(|i| RsId::new(format!("acme.s{i}")))
        .collect::<Result<_, _>>()?;
    let urls = |i: usize| -> Vec<String> {
        let mut list: Vec<String> = members
            .iter()
            .map(|m| format!("{}/rs/v1/envelope", base(m)))
            .collect();
        list.rotate_left(i % MEMBERS);
        list
    };
    let mut first = Vec::with_capacity(n);
    let mut second = Vec::with_capacity(n);
    for id in &ids {
        let ident = signer.identity(id)?;
        first.push(client_for(&root, ident.clone())?);
        second.push(client_for(&root, ident)?);
    }
    eprintln!(
        "  {n} certificates and {} clients in {:?}",
        2 * n,
        issuing.elapsed()
    );
    let g = Arc::new(Gen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(n);
    for (i, (c, id)) in first.into_iter().zip(&ids).enumerate() {
        tasks.push(tokio::spawn(sim(
            c,
            urls(i),
            id.clone(),
            g.clone(),
            stop.clone(),
        )));
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let want = n as u64;
    let until_held = |limit: Duration| {
        let members = members.clone();
        async move {
            let t0 = Instant::now();
            loop {
                let h = in_hand(&members).await;
                if h >= want || t0.elapsed() > limit {
                    return (h, t0.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // 1. Every poll held: memory per poll.
    let (held, _) = until_held(Duration::from_secs(120)).await;
    anyhow::ensure!(held >= want, "only {held} of {n} polls held");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded: f64 = rss_all(&pids(&mut d)).iter().sum();
    let per_poll_mb = (loaded - idle) / n as f64;
    eprintln!(
        "  {held} polls held over mutual TLS: members {idle:.0} MB idle, {loaded:.0} MB now ({:.1} KB a poll)",
        per_poll_mb * 1024.0
    );

    // 2. A member killed and started again; its proxies move meanwhile.
    d.node("m1").kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| d.restart("m1"))?;
    let (held, took) = until_held(Duration::from_secs(120)).await;
    eprintln!("  m1 killed and restarted: {held} polls held again after {took:?}");
    g.report("while m1 was killed and restarted");

    // The real proxies' alarms, from just before the storm.
    let alarms_stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = sockets
        .iter()
        .map(|s| {
            let (s, stop) = (s.clone(), alarms_stop.clone());
            tokio::spawn(async move {
                let c = rs_proxy::client::Client::new(&s);
                let _ = c.register_integrator("bench", "1.0", "linux").await;
                let mut tick = tokio::time::interval(Duration::from_millis(1000 / ALARMS_PER_SEC));
                let mut sent = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let mut req = crate::forward::alarm(i);
                    req.text = Some(format!("storm alarm {i}"));
                    if let Ok(id) = c.send("alarm", &req).await {
                        sent.push((id, Timestamp::now()));
                    }
                    i += 1;
                }
                sent
            })
        })
        .collect();

    // 3. The storm: every connection dropped, all back within a second.
    stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    tasks.clear();
    let stop = Arc::new(AtomicBool::new(false));
    let pids_now = pids(&mut d);
    let peak = Arc::new(std::sync::Mutex::new(0f64));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pids_now) = (peak.clone(), sampling.clone(), pids_now.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                let top = rss_all(&pids_now).into_iter().fold(0.0, f64::max);
                if let Ok(mut p) = peak.lock() {
                    *p = p.max(top);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let storm_start = Instant::now();
    let storm_at = Timestamp::now();
    for (i, (c, id)) in second.into_iter().zip(&ids).enumerate() {
        tasks.push(tokio::spawn(sim(
            c,
            urls(i),
            id.clone(),
            g.clone(),
            stop.clone(),
        )));
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let spawned = storm_start.elapsed();
    // The dropped polls leave the members' hands first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (held, _) = until_held(STORM_LIMIT).await;
    let storm_s = storm_start.elapsed().as_secs_f64();
    anyhow::ensure!(
        held >= want,
        "only {held} of {n} polls served {STORM_LIMIT:?} into the storm"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let peak_mb = peak.lock().map(|p| *p).unwrap_or(0.0);
    alarms_stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for s in senders {
        sent.extend(s.await?);
    }
    let storm_end = Timestamp::now();
    stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    eprintln!(
        "  storm: {n} reconnections started within {spawned:?}, all served after {storm_s:.1} s; peak member RSS {peak_mb:.0} MB",
    );
    // The storm's alarms: received at the server minus created.
    let during: std::collections::HashSet<String> = sent
        .iter()
        .filter(|(_, t)| *t >= storm_at && *t <= storm_end)
        .map(|(id, _)| id.clone())
        .collect();
    let admin = rs_tests::deploy::admin(&a);
    let mut lat = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        lat.clear();
        {
            // Alarms are stored as their integrators' support instances'
            // (acme.pN.s1): ask for the customer's.
            let body = admin
                .get(format!(
                    "{}/rs/v1/control/messages?customer=acme&type=alarm&limit=10000",
                    base(&a)
                ))
                .send()
                .await?
                .text()
                .await?;
            for m in body.split("<message ").skip(1) {
                // Every attribute after a space, the first one too.
                let m = format!(" {m}");
                let attr = |name: &str| -> Option<String> {
                    let k = format!(" {name}=\"");
                    let j = m.find(&k)? + k.len();
                    Some(m[j..j + m[j..].find('"')?].to_owned())
                };
                if let (Some(id), Some(c), Some(r)) =
                    (attr("id"), attr("created"), attr("received"))
                    && during.contains(&id)
                {
                    lat.push(
                        (Timestamp::parse(&r)?.as_millis() - Timestamp::parse(&c)?.as_millis())
                            .max(0) as f64,
                    );
                }
            }
        }
        if lat.len() >= during.len() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    anyhow::ensure!(
        lat.len() >= during.len(),
        "{} of the {} alarms sent during the storm were stored",
        lat.len(),
        during.len()
    );
    let alarm_p99_ms = percentile(&mut lat, 0.99);
    let all = ["m1", "m2", "m3"];
    let closed = counter_of(&mut d, &all, "rs_memory_bound_closed_total").await;
    eprintln!("  memory bound ({BOUND_MB} MB a member) closed the door {closed} times");
    // What the members saw (m1's since its restart).
    for reason in ["timeout", "protocol", "untrusted", "identity", "revoked"] {
        let name = format!("rs_tls_handshake_failures_total{{reason=\"{reason}\"}}");
        let n = counter_of(&mut d, &all, &name).await;
        if n > 0 {
            eprintln!("    members: {n} TLS handshakes failed ({reason})");
        }
    }
    let handshakes = counter_of(&mut d, &all, "rs_tls_handshakes_total").await;
    eprintln!("    members: {handshakes} TLS handshakes completed");
    d.stop_all();
    let _ = std::fs::remove_dir_all(dir);
    eprintln!(
        "  {} alarms during the storm, p99 {alarm_p99_ms:.0} ms ({} polls answered, {} failed in all)",
        during.len(),
        g.answered.load(Ordering::Relaxed),
        g.failed.load(Ordering::Relaxed)
    );
    g.report("during and after the storm");
    Ok(Run {
        per_poll_mb,
        held,
        storm_s,
        peak_mb,
        alarm_p99_ms,
        alarms: during.len(),
        closed,
    })
}

/// Set in the process that runs the storm (see [`run`]).
const CHILD: &str = "RS_BENCH_STORM_CHILD";

/// Runs the storm in a child process of this program whose OpenSSL
/// default trust store is empty (`SSL_CERT_FILE=/dev/null`, an empty
/// `SSL_CERT_DIR`): native-tls reads the system's whole store into every
/// client it builds (`SslConnector::builder`), about 50 ms each, and the
/// simulated proxies need 20,000 clients that trust only the deployment's
/// CA. The child prints its figures as JSON.
pub(crate) fn run(runs: usize, n: usize) -> anyhow::Result<Vec<Figure>> {
    if std::env::var_os(CHILD).is_some() {
        let figs = storm(runs, n)?;
        println!("{}", serde_json::to_string(&figs)?);
        // The parent writes the report.
        std::process::exit(0);
    }
    let empty = std::env::temp_dir().join(format!("rs-bench-no-roots-{}", std::process::id()));
    std::fs::create_dir_all(&empty)?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "mlmstorm",
            "--runs",
            &runs.to_string(),
            "--proxies",
            &n.to_string(),
        ])
        .env(CHILD, "1")
        .env("SSL_CERT_FILE", "/dev/null")
        .env("SSL_CERT_DIR", &empty)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let _ = std::fs::remove_dir_all(&empty);
    anyhow::ensure!(
        out.status.success(),
        "the storm's process failed: {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('['))
        .ok_or_else(|| anyhow::anyhow!("no figures from the storm's process"))?;
    Ok(serde_json::from_str(line)?)
}

fn storm(runs: usize, n: usize) -> anyhow::Result<Vec<Figure>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pg = Postgres::start().map_err(anyhow::Error::msg)?;
    let dir = std::env::temp_dir().join(format!("rs-bench-mlmstorm-{}", std::process::id()));
    let mut rs = Vec::new();
    for i in 0..runs {
        eprintln!(
            "rs-bench mlmstorm: run {} of {runs}, {n} simulated proxies",
            i + 1
        );
        rs.push(rt.block_on(one(n, &dir, &pg))?);
    }
    let command =
        format!("cargo run --release -p rs-bench -- mlmstorm --proxies {n} --runs {runs}");
    let col = |f: fn(&Run) -> f64| -> Vec<f64> { rs.iter().map(f).collect() };
    let figure = |id: &str, what: String, v: Vec<f64>, unit: &str, target: &str| {
        let mut f = Figure::measured(
            id,
            what,
            median(&mut v.clone()),
            unit,
            "lower",
            runs,
            crate::spread(&v),
            &command,
        );
        f.target = Some(target.into());
        f
    };
    let alarms: usize = rs.iter().map(|r| r.alarms).sum();
    let held = rs.iter().map(|r| r.held).min().unwrap_or(0);
    Ok(vec![
        figure(
            "mlm_farm_reconnect_storm_s",
            format!(
                "after a member of a farm of {MEMBERS} MLMs (one PostgreSQL) was killed and started again, {n} simulated proxies (one connection, certificate and ID each) drop their connections and all connect again within about one second over mutual TLS, each to its own member first: seconds until the members hold every one's long poll again (their envelopes.in_hand add up; at least {held} in every run)"
            ),
            col(|r| r.storm_s),
            "s",
            "all served within 120 s (issue 24)",
        ),
        figure(
            "mlm_farm_storm_alarm_p99_ms",
            format!(
                "latency p99 (server received minus created) of the alarms {REAL} real proxies sent, {ALARMS_PER_SEC}/s each, while the storm of mlm_farm_reconnect_storm_s ran; {alarms} alarms over the runs"
            ),
            col(|r| r.alarm_p99_ms),
            "ms",
            "alarms during the storm reach the server with p99 under 5 s (issue 24)",
        ),
        figure(
            "mlm_farm_storm_peak_rss_mb",
            format!(
                "the largest resident memory of any of the {MEMBERS} members (sampled every 250 ms) during the storm of mlm_farm_reconnect_storm_s, {n} proxies between them; each member bound by memory_limit_mb = {BOUND_MB}, which closed the door to new connections {} times over the runs",
                rs.iter().map(|r| r.closed).sum::<u64>()
            ),
            col(|r| r.peak_mb),
            "MB",
            &format!("no member exceeds its memory bound (issue 24): under {BOUND_MB} MB"),
        ),
        figure(
            "rss_mlm_farm_10k_longpoll_mtls_mb",
            format!(
                "resident memory the members of an MLM farm add for {n} long polls held over mutual TLS (one connection, certificate and proxy ID each), their summed RSS with every poll held minus their summed idle RSS, scaled to 10,000 polls"
            ),
            col(|r| r.per_poll_mb * 10_000.0),
            "MB",
            "memory per 10,000 long polls over mutual TLS (issue 24)",
        ),
    ])
}
