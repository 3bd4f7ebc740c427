//! `rs-demo`: a complete local deployment on loopback, and the multi-call
//! executable behind every daemon of the test suite.
//!
//! With no role (`rs-demo [--duration S] [--proxies N] [--data DIR]`) it
//! starts an application server, one MLM, N proxies (three by default),
//! each with the example integrator watching this host, plus a writer of
//! log lines for the integrators to tail; prints what flows through each
//! tier every two seconds; and stops cleanly on Ctrl-C or after the
//! duration, printing what was stored. Every daemon is a real process
//! (this executable in a role), everything on SQLite under the data
//! directory.

#![allow(clippy::print_stdout)]

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rs_node::daemon;
use rs_tests::deploy::{Deployment, Extra, proxy_metrics, server_metrics, stored_ids};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    about = "Remote Services: a complete local deployment (appserver, MLM, proxies, integrators)"
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
    /// Number of proxies, each with its own integrator.
    #[arg(long, default_value_t = 3)]
    proxies: usize,
    /// Where state and logs go (wiped at start).
    #[arg(long, default_value = "target/rs-demo")]
    data: PathBuf,
    /// The application server's address (the commands the demo prints
    /// for rsctl and curl name it).
    #[arg(long, default_value = "127.0.0.1:8440")]
    listen: String,
    /// Run the upper tiers as farms on a PostgreSQL server the demo sets
    /// up itself (initdb in a temporary directory, removed when the demo
    /// ends): two application servers behind haproxy on `--listen`, and
    /// three MLMs behind haproxy of their own, one of which the demo kills
    /// (SIGKILL) under load and restarts. Needs Debian's postgresql and
    /// haproxy (scripts/packages installs them).
    #[arg(long)]
    farm: bool,
    /// Alarms per second sent through the proxies (round-robin, through
    /// their integrator sockets) besides what the integrators report;
    /// each is checked stored once at the end. Default: 0, or 200 with
    /// `--farm`.
    #[arg(long)]
    load: Option<u32>,
}

/// When, in the running phase of `--farm`, an MLM member is killed and
/// when it is started again.
const FARM_KILL_AT: Duration = Duration::from_secs(6);
const FARM_RESTART_AT: Duration = Duration::from_secs(14);

#[derive(Debug, Subcommand)]
enum Role {
    /// Run the application server.
    Appserver {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        addr_file: Option<PathBuf>,
        /// Check the configuration and exit (as `rs-appserver --check-config`).
        #[arg(long)]
        check_config: bool,
    },
    /// Run an MLM.
    Mlm {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        addr_file: Option<PathBuf>,
        /// Check the configuration and exit (as `rs-mlm --check-config`).
        #[arg(long)]
        check_config: bool,
    },
    /// Run a proxy.
    Proxy {
        #[arg(long)]
        config: PathBuf,
        /// Check the configuration and exit (as `rs-proxy check-config`).
        #[arg(long)]
        check_config: bool,
    },
    /// Run the example integrator.
    Hostwatch(rs_proxy::hostwatch::Args),
    /// The proxy's command line (the same as the `rs-proxy` program).
    #[command(name = "rs-proxy", disable_help_flag = true)]
    ProxyCli {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// The admin command line (the same as the `rsctl` program).
    #[command(disable_help_flag = true)]
    Rsctl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

async fn serve_role(role: Role) -> anyhow::Result<()> {
    match &role {
        Role::Appserver {
            config,
            check_config: true,
            ..
        } => std::process::exit(daemon::check_config(config, rs_appserver::Config::parse)),
        Role::Mlm {
            config,
            check_config: true,
            ..
        } => std::process::exit(daemon::check_config(config, rs_mlm::Config::parse)),
        Role::Proxy {
            config,
            check_config: true,
        } => std::process::exit(daemon::check_config(config, rs_proxy::Config::parse)),
        _ => {}
    }
    daemon::init_logging();
    match role {
        Role::Appserver {
            config, addr_file, ..
        } => rs_appserver::daemon(config, addr_file).await,
        Role::Mlm {
            config, addr_file, ..
        } => rs_mlm::daemon(config, addr_file).await,
        Role::Proxy { config, .. } => rs_proxy::daemon(config).await,
        Role::Rsctl { .. } | Role::ProxyCli { .. } => Ok(()),
        Role::Hostwatch(args) => {
            let shutdown = daemon::signals::<()>(None, |_| Ok(()));
            tokio::select! {
                () = rs_proxy::hostwatch::run(args) => {}
                () = shutdown.cancelled() => {}
            }
            Ok(())
        }
    }
}

const LOG_LINES: &[&str] = &[
    "INFO nginx: 200 GET /health",
    "INFO cron: job backup started",
    "ERROR postgres: could not write block 1234 of relation base/16384: No space left on device",
    "INFO systemd: Started Daily apt upgrade",
    "WARN kernel: ata1.00: exception Emask 0x0 SAct 0x0",
    "ERROR app: payment service timeout after 30s",
    "INFO sshd: Accepted publickey for deploy",
    "CRITICAL raid: md0 degraded, disk sdb failed",
];

async fn demo(cli: Cli) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let _ = std::fs::remove_dir_all(&cli.data);
    // The deployment's own CA: every tier talks mutual TLS, and the
    // proxies enroll with one-time tokens on their first start.
    let pki = std::sync::Arc::new(rs_tests::deploy::Pki::create(&cli.data.join("ca"))?);
    let mut d = Deployment::with_pki(&cli.data, exe, Some(pki.clone()))?;
    // The farm's PostgreSQL and balancer live as long as the demo.
    let mut farm = None;
    let (a, members, server_dir) = if cli.farm {
        let pg = rs_tests::postgres::Postgres::start().map_err(anyhow::Error::msg)?;
        let url = pg.database("rs_demo");
        let a1 = d.farm_member("a1", &url, "heartbeat_secs = 5")?;
        let a2 = d.farm_member("a2", &url, "heartbeat_secs = 5")?;
        let lb = d
            .farm_balancer_at(&cli.listen, [&a1, &a2])
            .map_err(|e| anyhow::anyhow!("{e:#} (is {} in use? give --listen)", cli.listen))?;
        let a = lb.addr.clone();
        println!(
            "farm: application servers a1 ({a1}) and a2 ({a2}) on PostgreSQL {} behind haproxy ({a})",
            rs_store::sql::redact(&url)
        );
        farm = Some((pg, lb));
        (a, vec![a1, a2], cli.data.join("a1"))
    } else {
        let a = d
            .appserver(&cli.listen, "heartbeat_secs = 5")
            .map_err(|e| anyhow::anyhow!("{e:#} (is {} in use? give --listen)", cli.listen))?;
        (a.clone(), vec![a], cli.data.join("appserver"))
    };
    let mlm_tables = Extra {
        tables: "[[drop_repeats]]\nclass = \"inventory\"\nwindow_secs = 600\n\n\
                 [[aggregate]]\ntype = \"alarm\"\nsubclass = \"disk\"\nwindow_secs = 10\ngroup_by = \"class\"\n"
            .into(),
        ..Extra::default()
    };
    // In farm mode the MLM is three members on one database behind
    // haproxy; `m` is where the proxies connect either way.
    let mut mlm_lb = None;
    let (m, mlms) = if let Some((pg, _)) = &farm {
        let url = pg.database("rs_demo_mlm");
        // One cache directory for the farm: a download leaves the server
        // once, and any member serves it.
        let cache = std::path::absolute(cli.data.join("mlm-cache"))?;
        let addrs = d.mlm_farm(3, "acme.m1", std::slice::from_ref(&a), &url, |_| Extra {
            tables: format!(
                "{}[bulk]\ncache_dir = \"{}\"\n",
                mlm_tables.tables,
                cache.display()
            ),
            ..Extra::default()
        })?;
        let mlms: Vec<(String, String)> = addrs
            .into_iter()
            .enumerate()
            .map(|(i, a)| (format!("m{}", i + 1), a))
            .collect();
        let addrs: Vec<&str> = mlms.iter().map(|(_, a)| a.as_str()).collect();
        let lb = d.balancer_at("127.0.0.1:0", &addrs)?;
        println!(
            "farm: MLMs {} (all acme.m1) on PostgreSQL {} behind haproxy ({})",
            mlms.iter()
                .map(|(n, a)| format!("{n} ({a})"))
                .collect::<Vec<_>>()
                .join(", "),
            rs_store::sql::redact(&url),
            lb.addr
        );
        let m = lb.addr.clone();
        mlm_lb = Some(lb);
        (m, mlms)
    } else {
        let m = d.mlm("mlm", "acme.m1", std::slice::from_ref(&a), &mlm_tables)?;
        (m.clone(), vec![("mlm".to_owned(), m)])
    };
    let mlm_addrs: Vec<String> = mlms.iter().map(|(_, a)| a.clone()).collect();
    let mut sockets = Vec::new();
    // The first proxy seals what it sends (signed, and encrypted to the
    // server): the MLM relays it without reading it (so it is never
    // aggregated there), the server opens and checks it.
    let seal = format!(
        "[seal]\nencrypt_to = \"{}\"\n",
        cli.data
            .join(if cli.farm { "farm" } else { "appserver" })
            .join("tls")
            .join("cert.pem")
            .display()
    );
    for i in 1..=cli.proxies.max(1) {
        let name = format!("proxy{i}");
        let socket = d.proxy(
            &name,
            &format!("acme.p{i}"),
            std::slice::from_ref(&m),
            &Extra {
                // Software offered to the proxies is "installed" by this.
                tables: format!(
                    "[bulk]\ninstall_command = [\"sh\", \"-c\", \"echo installed $RS_NAME, $RS_SIZE bytes, SHA-256 $RS_SHA256\"]\n{}",
                    if i == 1 { seal.as_str() } else { "" }
                ),
                ..Extra::default()
            },
        )?;
        let log = cli.data.join(&name).join("app.log");
        std::fs::write(&log, "")?;
        d.integrator(
            &format!("hostwatch{i}"),
            &socket,
            &[
                "--interval".into(),
                "1".into(),
                "--disk-threshold".into(),
                "1".into(),
                "--instance".into(),
                format!("host{i}.acme.example"),
                "--log".into(),
                log.display().to_string(),
                "--inventory-every".into(),
                "15".into(),
            ],
        )?;
        sockets.push((socket, log));
    }
    println!(
        "Remote Services demo: proxies {} -> MLM acme.m1 ({m}) -> application server rs.a1 ({a})",
        (1..=cli.proxies.max(1))
            .map(|i| format!("acme.p{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "each proxy has an rs-hostwatch integrator; state and logs in {}",
        cli.data.display()
    );
    let t = &pki.admin;
    println!(
        "mutual TLS between every tier; the CA is in {}, the admin's certificate in {}",
        pki.dir.display(),
        t.cert
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    println!(
        "try: curl -s --cacert {} --cert {} --key {} 'https://{a}/rs/v1/control/messages?type=alarm&limit=5'",
        t.ca.display(),
        t.cert.display(),
        t.key.display()
    );
    match admin_demo(&a, cli.proxies.max(1)).await {
        Ok(line) => println!("{line}"),
        Err(e) => println!("back-channel check failed: {e:#}"),
    }
    match bulk_demo(&a, &members, &mlm_addrs, &sockets[0].0, &cli.data).await {
        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
        Err(e) => println!("bulk transfer check failed: {e:#}"),
    }
    // The demo's own program is rsctl too (`rs-demo rsctl ...`), so these
    // run at once, with nothing more to build.
    let me = std::env::current_exe()?;
    println!("administer it with rsctl (from another shell, in this directory):");
    for line in admin_commands(&a, t, &me) {
        println!("  {line}");
    }
    match portal_token(&a).await {
        Ok(token) => {
            println!("web portal: https://{a}/portal/");
            println!("  log in with the API token {token}");
            println!(
                "  (made for this run, good for a day; the browser warns of the demo's own CA: import {} or accept it)",
                t.ca.display()
            );
        }
        Err(e) => println!("web portal: no login token: {e:#}"),
    }
    println!(
        "{}",
        match cli.duration {
            Some(s) => format!("running for {s} s (Ctrl-C stops sooner)"),
            None => "running until Ctrl-C".into(),
        }
    );
    println!();
    println!(
        "  time | proxies: spooled delivered queued dead | MLM: received forwarded aggregated filtered | appserver: stored components"
    );

    let stop = rs_node::daemon::signals::<()>(None, |_| Ok(()));
    let rate = cli.load.unwrap_or(if cli.farm { 200 } else { 0 });
    let stop_load = CancellationToken::new();
    let loader = tokio::spawn(load(
        sockets.iter().map(|(s, _)| s.clone()).collect(),
        rate,
        stop_load.clone(),
    ));
    if rate > 0 {
        println!("load: {rate} alarms/s through the proxies besides the integrators'");
    }
    let start = Instant::now();
    let mut tick = 0u64;
    // The MLM member killed in farm mode, while it is down.
    let mut killed: Option<String> = None;
    let mut restarted = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        tick += 1;
        // Something for the integrators to find in their logs.
        let (_, log) = &sockets[(tick as usize) % sockets.len()];
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(log) {
            let _ = writeln!(f, "{}", LOG_LINES[(tick as usize * 7) % LOG_LINES.len()]);
        }
        if cli.farm && killed.is_none() && start.elapsed() >= FARM_KILL_AT {
            // The member carrying the most envelopes goes, mid-load.
            let busiest = rs_tests::deploy::busiest(&mlm_addrs).await;
            let name = mlms[busiest.0].0.clone();
            d.node(&name).kill();
            println!(
                "farm: killed MLM member {name} (SIGKILL) after {} envelopes; its proxies go on through the others",
                busiest.1
            );
            killed = Some(name);
        }
        if let Some(name) = killed.as_ref().filter(|_| !restarted)
            && start.elapsed() >= FARM_RESTART_AT
        {
            match tokio::task::block_in_place(|| d.restart(name)) {
                Ok(()) => println!("farm: MLM member {name} started again"),
                Err(e) => println!("farm: MLM member {name} did not start again: {e:#}"),
            }
            restarted = true;
        }
        if tick.is_multiple_of(4) {
            print_line(start, &sockets, &mlm_addrs, &a).await;
        }
        if cli
            .duration
            .is_some_and(|s| start.elapsed() >= Duration::from_secs(s))
        {
            break;
        }
    }
    stop_load.cancel();
    let (loaded, refused) = loader.await.unwrap_or_default();
    println!();
    println!("stopping: integrators, then proxies (each sends its shutdown message), MLM, server");
    for (name, n) in d.nodes.iter_mut() {
        if name.starts_with("hostwatch") {
            n.stop(Duration::from_secs(5));
        }
    }
    // Let the spools drain before the proxies go.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut drained = false;
    while !drained && Instant::now() < deadline {
        let mut all = true;
        for (s, _) in &sockets {
            all &= proxy_metrics(s)
                .await
                .is_ok_and(|m| m.get("spool.messages") == Some(&0));
        }
        drained = all;
        if !drained {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    print_line(start, &sockets, &mlm_addrs, &a).await;
    let totals = spools(&sockets).await;
    // Each server counts what it opened itself.
    let mut opened = 0;
    for member in &members {
        opened += server_metrics(member)
            .await
            .ok()
            .and_then(|m| m.get("seal.opened_encrypted").copied())
            .unwrap_or(0);
    }
    d.stop_all();
    let ids = stored_ids(&server_dir)?;
    drop(mlm_lb);
    drop(farm);
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    if rate > 0 {
        let missing = loaded.iter().filter(|id| !unique.contains(id)).count();
        println!(
            "load: the proxies accepted {} alarms ({} calls refused while a proxy restarted); {}",
            loaded.len(),
            refused,
            if missing == 0 {
                "every one stored".to_owned()
            } else {
                format!("{missing} NOT STORED")
            }
        );
    }
    println!();
    println!(
        "stored {} messages at the application server ({} distinct IDs: {}); proxy spools {}",
        ids.len(),
        unique.len(),
        if unique.len() == ids.len() {
            "each exactly once"
        } else {
            "DUPLICATES"
        },
        if drained {
            "drained"
        } else {
            "not drained (see the logs)"
        }
    );
    println!(
        "proxies: {} spooled = {} delivered + {} queued + {} dead letters + {} expired or dropped",
        totals.spooled, totals.delivered, totals.queued, totals.dead, totals.dropped
    );
    if totals.dead > 0 {
        println!(
            "DEAD LETTERS: {} messages were refused for good (see GET /v1/dead-letters on each proxy)",
            totals.dead
        );
    }
    println!(
        "{opened} messages of acme.p1 came sealed (signed, encrypted to rs.a1) and were opened and checked at the server"
    );
    println!(
        "the data stays in {} (logs in logs/); run again to start afresh",
        cli.data.display()
    );
    Ok(())
}

/// Groups the demo's proxies (`acme-proxies`: every proxy of customer
/// acme) and asks the group for its status through the back-channel,
/// waiting for every answer: the control path working end to end.
async fn admin_demo(a: &str, proxies: usize) -> anyhow::Result<String> {
    use rs_protocol::codec::Limits;
    use rs_protocol::codec::api::{GroupDef, decode_components, decode_job, encode_group};
    let http = rs_tests::deploy::admin(a);
    let base = format!("{}/rs/v1/control", rs_tests::deploy::base(a));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let b = http
            .get(format!("{base}/components"))
            .send()
            .await?
            .bytes()
            .await?;
        let known = decode_components(&b, &Limits::default())?
            .iter()
            .filter(|c| c.id.kind() == rs_protocol::ComponentKind::Proxy)
            .count();
        if known >= proxies {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {known} proxies reported in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let group = GroupDef {
        name: "acme-proxies".into(),
        customer: Some(rs_protocol::CustomerId::new("acme")?),
        kind: Some(rs_protocol::ComponentKind::Proxy),
        ..GroupDef::default()
    };
    let r = http
        .put(format!("{base}/groups/acme-proxies"))
        .body(encode_group(&group))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "group: {}", r.text().await?);
    let started = Instant::now();
    let r = http
        .post(format!("{base}/send"))
        .body(r#"<send><to group="acme-proxies"/><control action="getStatus"/></send>"#)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "send: {}", r.text().await?);
    let job = decode_job(&r.bytes().await?, &Limits::default())?;
    let job = until_done(&http, &base, job, deadline + Duration::from_secs(30)).await?;
    Ok(format!(
        "group acme-proxies: getStatus answered by {}/{} proxies through the MLM in {} ms (job {})",
        job.count("succeeded"),
        job.targets.len(),
        started.elapsed().as_millis(),
        job.id
    ))
}

/// Bulk transfers: one proxy uploads a 32 MB diagnostics bundle through
/// the MLM; the server publishes an 8 MB package to the group, which the
/// MLM fetches once and every proxy installs.
async fn bulk_demo(
    a: &str,
    members: &[String],
    mlms: &[String],
    socket: &std::path::Path,
    data: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    use rs_protocol::codec::Limits;
    use rs_protocol::codec::api::{OfferRequest, decode_file, decode_job, encode_offer_request};
    let mut out = Vec::new();
    // Upload.
    let bundle = std::path::absolute(data.join("diag-bundle.tar"))?;
    let bytes: Vec<u8> = (0..32_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&bundle, &bytes)?;
    let client = rs_proxy::client::Client::new(socket).with_timeout(Duration::from_secs(120));
    client.register_integrator("diag", "1.0", "linux").await?;
    let started = Instant::now();
    let up = client
        .upload(&rs_proxy::bulk::UploadRequest {
            integrator: "diag".into(),
            path: bundle.display().to_string(),
            class: Some("diagnostics".into()),
            subclass: Some("bundle".into()),
            ..Default::default()
        })
        .await?;
    // A release build moves the 32 MB in about a second; a debug build
    // among the test suite's other daemons on two cores can take minutes.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let u = client.upload_state(&up.id).await?;
        if u.state == "done" {
            break;
        }
        anyhow::ensure!(
            !["refused", "failed"].contains(&u.state.as_str()) && Instant::now() < deadline,
            "upload {}: {} {:?}",
            u.id,
            u.state,
            u.reason
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out.push(format!(
        "upload: acme.p1 sent a 32 MB bundle through the MLM, stored and SHA-256 verified at the server in {} ms (rsctl uploads)",
        started.elapsed().as_millis()
    ));
    // Download to the group.
    let http = rs_tests::deploy::admin(a);
    let base = format!("{}/rs/v1/control", rs_tests::deploy::base(a));
    let pkg: Vec<u8> = (0..8_000_000u32).map(|i| (i ^ (i >> 7)) as u8).collect();
    let started = Instant::now();
    let r = http
        .put(format!("{base}/files/agent-1.1.pkg"))
        .body(pkg.clone())
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "publish: {}", r.text().await?);
    let file = decode_file(&r.bytes().await?, &Limits::default())?;
    let offer = OfferRequest {
        to: Vec::new(),
        groups: vec!["acme-proxies".into()],
        sha256: file.sha256,
        class: "software".into(),
        sub: "package".into(),
        ttl_secs: Some(3600),
        notify: None,
    };
    let r = http
        .post(format!("{base}/offer"))
        .body(encode_offer_request(&offer))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "offer: {}", r.text().await?);
    let job = decode_job(&r.bytes().await?, &Limits::default())?;
    let job = until_done(&http, &base, job, started + Duration::from_secs(90)).await?;
    // Each server (a farm's members) counts what it served itself.
    let mut served = 0;
    for member in members {
        served += server_metrics(member)
            .await?
            .get("bulk.bytes_served")
            .copied()
            .unwrap_or(0);
    }
    // And each MLM (a farm's members) what it served from its cache.
    let mut from_cache = 0;
    for m in mlms {
        from_cache += server_metrics(m)
            .await?
            .get("bulk.served_bytes")
            .copied()
            .unwrap_or(0);
    }
    out.push(format!(
        "software: agent-1.1.pkg (8 MB) installed by {}/{} proxies in {} ms; {} bytes left the server, the MLM served {} from its cache (job {})",
        job.count("succeeded"),
        job.targets.len(),
        started.elapsed().as_millis(),
        served,
        from_cache,
        job.id
    ));
    Ok(out)
}

/// Sends `rate` alarms a second, round-robin through the proxies'
/// integrator sockets, until `stop`: the IDs the proxies accepted (each
/// spooled durably before the answer) and the number of calls refused
/// (a proxy restarting; refused is not accepted, so not lost).
async fn load(sockets: Vec<PathBuf>, rate: u32, stop: CancellationToken) -> (Vec<String>, u64) {
    let mut accepted = Vec::new();
    let mut refused = 0;
    if rate == 0 || sockets.is_empty() {
        return (accepted, refused);
    }
    let clients: Vec<_> = sockets
        .iter()
        .map(|s| rs_proxy::client::Client::new(s).with_timeout(Duration::from_secs(10)))
        .collect();
    for c in &clients {
        let _ = c.register_integrator("load", "1.0", "linux").await;
    }
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while !stop.is_cancelled() {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Catch up to the rate since the start (calls take time too).
        let due = started.elapsed().as_millis() as u64 * u64::from(rate) / 1000;
        while sent < due && !stop.is_cancelled() {
            let c = &clients[(sent as usize) % clients.len()];
            let req = rs_proxy::api::SendRequest {
                integrator: "load".into(),
                instance: Some("loadgen".into()),
                severity: Some("minor".into()),
                key: Some(format!("load:{}", sent % 50)),
                text: Some(format!("demo load alarm {sent}")),
                ..rs_proxy::api::SendRequest::default()
            };
            match c.send("alarm", &req).await {
                Ok(id) => accepted.push(id),
                Err(_) => {
                    refused += 1;
                    // Registered again once the proxy is back.
                    let _ = c.register_integrator("load", "1.0", "linux").await;
                }
            }
            sent += 1;
        }
    }
    (accepted, refused)
}

/// Follows a job (long polls on its version) until it is done.
async fn until_done(
    http: &reqwest::Client,
    base: &str,
    mut job: rs_protocol::codec::api::Job,
    deadline: Instant,
) -> anyhow::Result<rs_protocol::codec::api::Job> {
    use rs_protocol::codec::{Limits, api::decode_job};
    while !job.is_done() {
        let b = http
            .get(format!(
                "{base}/jobs/{}?after={}&wait=25",
                job.id, job.version
            ))
            .send()
            .await?
            .bytes()
            .await?;
        job = decode_job(&b, &Limits::default())?;
        anyhow::ensure!(Instant::now() < deadline, "job {} did not finish", job.id);
    }
    Ok(job)
}

/// An API token of every customer for the web portal's login, named
/// after this run (a demo started again on the same data keeps the
/// tokens of earlier runs).
async fn portal_token(a: &str) -> anyhow::Result<String> {
    let name = format!(
        "demo-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    let r = rs_tests::deploy::admin(a)
        .post(format!(
            "{}/rs/v1/control/tokens",
            rs_tests::deploy::base(a)
        ))
        .body(rs_protocol::codec::api::encode_token_request(
            &rs_protocol::codec::api::TokenRequest {
                name,
                customers: "*".into(),
                days: Some(1),
            },
        ))
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "{}: {}",
        r.status(),
        r.text().await?
    );
    let list = rs_protocol::codec::api::decode_tokens(
        &r.bytes().await?,
        &rs_protocol::codec::Limits::default(),
    )?;
    list.into_iter()
        .next()
        .and_then(|t| t.secret)
        .ok_or_else(|| anyhow::anyhow!("the answer has no token"))
}

/// The commands the demo prints for administering it: exactly what the
/// README shows, with this run's address and certificate paths.
fn admin_commands(a: &str, t: &rs_net::tls::TlsConfig, exe: &std::path::Path) -> Vec<String> {
    let rsctl = exe
        .strip_prefix(std::env::current_dir().unwrap_or_default())
        .unwrap_or(exe)
        .display()
        .to_string();
    vec![
        format!(
            "export RSCTL_SERVER=https://{a} RSCTL_CA={} RSCTL_CERT={} RSCTL_KEY={}",
            t.ca.display(),
            t.cert.display(),
            t.key.display()
        ),
        format!("{rsctl} rsctl components"),
        format!(
            "{rsctl} rsctl send configChange --group acme-proxies --set heartbeat_secs=10 --watch"
        ),
        "curl -s --cacert \"$RSCTL_CA\" --cert \"$RSCTL_CERT\" --key \"$RSCTL_KEY\" \"$RSCTL_SERVER/rs/v1/control/messages?type=alarm&limit=5\"".into(),
    ]
}

/// The proxies' counters, from their spools (which outlive restarts: a
/// proxy starts again after it enrolls and after a configChange, and an
/// in-memory counter would start again from 0).
#[derive(Debug, Default)]
struct Spools {
    /// Every message the integrators handed over.
    spooled: u64,
    /// Accepted upstream.
    delivered: u64,
    /// Waiting to go.
    queued: u64,
    /// Refused for good (the proxies' dead letters).
    dead: u64,
    /// Expired, evicted or aged out before they could go.
    dropped: u64,
}

async fn spools(sockets: &[(PathBuf, PathBuf)]) -> Spools {
    let mut t = Spools::default();
    for (s, _) in sockets {
        if let Ok(p) = proxy_metrics(s).await {
            let g = |k: &str| p.get(k).copied().unwrap_or(0);
            t.delivered += g("spool.delivered_total");
            t.queued += g("spool.messages");
            t.dead += g("spool.dead_letters");
            t.dropped +=
                g("spool.expired_total") + g("spool.evicted_total") + g("spool.aged_out_total");
        }
    }
    t.spooled = t.delivered + t.queued + t.dead + t.dropped;
    t
}

/// One line of what flows through each tier; an MLM farm's counters are
/// its members' own, summed (a member killed or restarted counts from 0).
async fn print_line(start: Instant, sockets: &[(PathBuf, PathBuf)], mlms: &[String], app: &str) {
    let t = spools(sockets).await;
    let mut mm = std::collections::BTreeMap::<String, u64>::new();
    for m in mlms {
        for (k, v) in server_metrics(m).await.unwrap_or_default() {
            *mm.entry(k).or_default() += v;
        }
    }
    let am = server_metrics(app).await.unwrap_or_default();
    let g = |m: &std::collections::BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    println!(
        "{:>5}s | {:>16} {:>9} {:>6} {:>4} | {:>13} {:>9} {:>10} {:>8} | {:>17} {:>10}",
        start.elapsed().as_secs(),
        t.spooled,
        t.delivered,
        t.queued,
        t.dead,
        g(&mm, "messages.received"),
        g(&mm, "messages.forwarded"),
        g(&mm, "messages.aggregated"),
        g(&mm, "messages.filtered"),
        g(&am, "store.messages"),
        g(&am, "store.components"),
    );
}

fn main() {
    let cli = Cli::parse();
    if let Some(Role::Rsctl { args }) = &cli.role {
        let argv = std::iter::once(std::ffi::OsString::from("rsctl")).chain(args.iter().cloned());
        std::process::exit(rs_ctl::main_with(argv));
    }
    if let Some(Role::ProxyCli { args }) = &cli.role {
        let argv =
            std::iter::once(std::ffi::OsString::from("rs-proxy")).chain(args.iter().cloned());
        std::process::exit(rs_proxy::cli::main_with(argv));
    }
    // Each role runs on the runtime its own program uses: rs-proxy and
    // rs-hostwatch on one thread, the servers on one worker per core.
    let built = match cli.role {
        Some(Role::Proxy { .. } | Role::Hostwatch(_)) => {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        Some(Role::Appserver { .. } | Role::Mlm { .. }) => {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
        }
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rs-demo: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.role {
            Some(role) => serve_role(role).await,
            None => demo(cli).await,
        }
    });
    if let Err(e) = result {
        eprintln!("rs-demo: {e:#}");
        std::process::exit(1);
    }
}
