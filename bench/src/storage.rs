//! The storage engines and the farm: ingest at the server on PostgreSQL
//! against SQLite (the same forward path, the same load, in one run,
//! alternating), a farm of two servers behind haproxy against one server
//! on the same PostgreSQL, and how long a farm takes to carry on after
//! the member carrying the traffic is killed.
//!
//! Durability is the product's on both engines: SQLite with WAL and
//! `synchronous=FULL`; PostgreSQL (a throwaway server of the bench's own,
//! tests/src/postgres.rs) with `fsync=on` and `synchronous_commit=on`, on
//! the same disk. CPU per message counts the server's process and, on
//! PostgreSQL, every process of the database server.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use rs_proxy::client::Client;
use rs_tests::deploy::{Deployment, Extra, StoreEngine};
use rs_tests::postgres::Postgres;

use crate::Figure;
use crate::forward::{Settings, cpu_total, exe, load, median, stored, until_stored};

/// The PIDs of a PostgreSQL server's processes (the postmaster and its
/// children), for their CPU time.
fn postgres_pids(pg: &Postgres) -> Vec<u32> {
    let Some(master) = pg.postmaster_pid() else {
        return Vec::new();
    };
    let mut out = vec![master];
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let rest = stat.rsplit(')').next().unwrap_or("");
            if rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok())
                == Some(master)
            {
                out.push(pid);
            }
        }
    }
    out
}

/// One measured run: messages/s and CPU µs per message.
struct Run {
    rate: f64,
    cpu_us: f64,
}

/// The forward path integrator -> proxy -> MLM -> `servers` application
/// servers (one: directly; two: a farm behind haproxy), stored on `engine`.
async fn one_run(
    s: &Settings,
    dir: &Path,
    engine: StoreEngine,
    servers: usize,
    pg: &Postgres,
) -> anyhow::Result<Run> {
    let _ = std::fs::remove_dir_all(dir);
    let mut d = Deployment::plain(dir, exe()?)?;
    d.store = engine;
    let mut balancer = None;
    let (upstream, names): (String, Vec<&str>) = match (engine, servers) {
        (StoreEngine::Sqlite, _) => (
            d.appserver("127.0.0.1:0", "heartbeat_secs = 3600")?,
            vec!["appserver"],
        ),
        (StoreEngine::Postgres, 1) => {
            let url = pg.database("bench");
            (
                d.farm_member("a1", &url, "heartbeat_secs = 3600")?,
                vec!["a1"],
            )
        }
        (StoreEngine::Postgres, _) => {
            let url = pg.database("bench_farm");
            let (_, _, lb) = d.farm(&url, "heartbeat_secs = 3600")?;
            let addr = lb.addr.clone();
            balancer = Some(lb);
            (addr, vec!["a1", "a2"])
        }
    };
    let m = d.mlm(
        "mlm",
        "acme.m1",
        std::slice::from_ref(&upstream),
        &Extra::default(),
    )?;
    let big = Extra {
        upstream: "max_backoff_secs = 1\n".into(),
        tables: "[spool]\nmax_bytes = 8000000000\n".into(),
        ..Extra::default()
    };
    let socket = d.proxy("p1", "acme.p1", std::slice::from_ref(&m), &big)?;
    Client::new(&socket)
        .register_integrator("bench", "1", "linux")
        .await?;
    let mut pids: Vec<u32> = names
        .iter()
        .filter_map(|n| d.node(n).child.as_ref().map(Child::id))
        .collect();
    if engine == StoreEngine::Postgres {
        pids.extend(postgres_pids(pg));
    }
    let base = stored(&upstream).await;
    let cpu0 = cpu_total(&pids);
    let t0 = Instant::now();
    load(&socket, s.messages, s.clients, s.batch).await?;
    let done = until_stored(&upstream, base + s.messages, Duration::from_secs(900)).await?;
    let rate = s.messages as f64 / done.duration_since(t0).as_secs_f64();
    let cpu_us = (cpu_total(&pids) - cpu0) * 1000.0 / s.messages as f64;
    d.stop_all();
    drop(balancer);
    let _ = std::fs::remove_dir_all(dir);
    Ok(Run { rate, cpu_us })
}

/// Seconds from killing the farm member that carries the MLM's envelopes
/// until an alarm sent right after is stored through the other member.
async fn failover(dir: &Path, pg: &Postgres) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    let mut d = Deployment::plain(dir, exe()?)?;
    let url = pg.database("bench_failover");
    let (a1, a2, lb) = d.farm(&url, "heartbeat_secs = 3600")?;
    let m = d.mlm(
        "mlm",
        "acme.m1",
        std::slice::from_ref(&lb.addr),
        &Extra::default(),
    )?;
    let socket = d.proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())?;
    Client::new(&socket)
        .register_integrator("bench", "1", "linux")
        .await?;
    // Traffic first, so the MLM's connections are open (to one member or
    // both), then the busier member dies.
    load(&socket, 2_000, 4, 20).await?;
    until_stored(&lb.addr, 2_000, Duration::from_secs(120)).await?;
    let busy = |a: &str| {
        let a = a.to_owned();
        async move {
            rs_tests::deploy::server_metrics(&a)
                .await
                .ok()
                .and_then(|m| m.get("envelopes.received").copied())
                .unwrap_or(0)
        }
    };
    let (n1, n2) = (busy(&a1).await, busy(&a2).await);
    let (victim, survivor) = if n1 >= n2 { ("a1", a2) } else { ("a2", a1) };
    let before = stored(&survivor).await;
    let t0 = Instant::now();
    d.node(victim).kill();
    load(&socket, 1, 1, 1).await?;
    until_stored(&survivor, before + 1, Duration::from_secs(120)).await?;
    let secs = t0.elapsed().as_secs_f64();
    d.stop_all();
    drop(lb);
    let _ = std::fs::remove_dir_all(dir);
    Ok(secs)
}

pub(crate) fn run(s: &Settings) -> anyhow::Result<Vec<Figure>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pg = Postgres::start().map_err(anyhow::Error::msg)?;
    let tmp = std::env::temp_dir().join(format!("rs-bench-storage-{}", std::process::id()));
    let (mut sq, mut sq_cpu, mut pgr, mut pg_cpu, mut farm, mut one, mut fail) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..s.runs {
        eprintln!("rs-bench storage: run {} of {}: SQLite", i + 1, s.runs);
        crate::forward::quiet_disk(&tmp);
        let r = rt.block_on(one_run(s, &tmp.join("sqlite"), StoreEngine::Sqlite, 1, &pg))?;
        sq.push(r.rate);
        sq_cpu.push(r.cpu_us);
        eprintln!("rs-bench storage: run {} of {}: PostgreSQL", i + 1, s.runs);
        crate::forward::quiet_disk(&tmp);
        let r = rt.block_on(one_run(s, &tmp.join("pg"), StoreEngine::Postgres, 1, &pg))?;
        eprintln!(
            "  SQLite {:.0}/s {:.0} µs; PostgreSQL {:.0}/s {:.0} µs",
            sq[i], sq_cpu[i], r.rate, r.cpu_us
        );
        pgr.push(r.rate);
        pg_cpu.push(r.cpu_us);
        one.push(r.rate);
        eprintln!(
            "rs-bench storage: run {} of {}: a farm of two",
            i + 1,
            s.runs
        );
        crate::forward::quiet_disk(&tmp);
        let r = rt.block_on(one_run(s, &tmp.join("farm"), StoreEngine::Postgres, 2, &pg))?;
        eprintln!("  farm of two {:.0}/s", r.rate);
        farm.push(r.rate);
        eprintln!("rs-bench storage: run {} of {}: failover", i + 1, s.runs);
        let f = rt.block_on(failover(&tmp.join("failover"), &pg))?;
        eprintln!("  failover {f:.2} s");
        fail.push(f);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let command = format!(
        "cargo run --release -p rs-bench -- storage --messages {} --clients {} --batch {} --runs {}",
        s.messages, s.clients, s.batch, s.runs
    );
    let spread = |v: &[f64]| crate::spread(v);
    let path = format!(
        "integrator -> proxy spool -> MLM -> appserver stored, 2 KB alarms, {} messages, {} concurrent integrator clients sending batches of {}",
        s.messages, s.clients, s.batch
    );
    let mut pg_fig = Figure::measured(
        "appserver_pg_msgs_per_s",
        format!(
            "the forward path with the server on PostgreSQL (fsync on, synchronous_commit on, same disk): {path}"
        ),
        median(&mut pgr.clone()),
        "messages/s",
        "higher",
        s.runs,
        spread(&pgr),
        &command,
    );
    pg_fig.peer =
        Some("the same path with the server on SQLite (WAL, synchronous=FULL), same run".into());
    pg_fig.peer_value = Some(median(&mut sq.clone()));
    pg_fig.ratio = pg_fig.peer_value.map(|p| pg_fig.value / p);
    let mut pg_cpu_fig = Figure::measured(
        "appserver_pg_cpu_us_per_msg",
        "CPU time per message of the server and every PostgreSQL process in the appserver_pg_msgs_per_s run".into(),
        median(&mut pg_cpu.clone()),
        "µs",
        "lower",
        s.runs,
        spread(&pg_cpu),
        &command,
    );
    pg_cpu_fig.peer =
        Some("the server's CPU per message on SQLite (its store is in-process), same run".into());
    pg_cpu_fig.peer_value = Some(median(&mut sq_cpu.clone()));
    pg_cpu_fig.ratio = pg_cpu_fig.peer_value.map(|p| pg_cpu_fig.value / p);
    let mut farm_fig = Figure::measured(
        "appserver_farm2_msgs_per_s",
        format!(
            "the forward path into a farm of two servers on one PostgreSQL behind haproxy (packaging/haproxy): {path}; on one 2-core machine the members share the cores with everything else, so this shows the farm's overhead, not its capacity (docs/operations.md, Sizing)"
        ),
        median(&mut farm.clone()),
        "messages/s",
        "higher",
        s.runs,
        spread(&farm),
        &command,
    );
    farm_fig.peer = Some("one server on the same PostgreSQL, same run".into());
    farm_fig.peer_value = Some(median(&mut one.clone()));
    farm_fig.ratio = farm_fig.peer_value.map(|p| farm_fig.value / p);
    let fail_fig = Figure::measured(
        "appserver_failover_s",
        "from SIGKILL of the farm member carrying an MLM's envelopes until an alarm sent right after is stored through the other (haproxy: checks every 1 s, redispatch)".into(),
        median(&mut fail.clone()),
        "s",
        "lower",
        s.runs,
        spread(&fail),
        &command,
    );
    Ok(vec![pg_fig, pg_cpu_fig, farm_fig, fail_fig])
}
