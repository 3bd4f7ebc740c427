//! `/metrics` of every tier: what Prometheus scrapes, checked by Debian's
//! `promtool`, counting what really went through the tiers, agreeing with
//! the status trees, and showing a spool filling while its upstream is
//! away and draining when it is back.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use rs_tests::deploy::{Deployment, Extra, proxy_metrics, server_metrics, wait_for};

use crate::backchannel::{exe, tmp};
use crate::forward::{alarm, all_stored, assert_exactly_once, register};

/// A scrape: each series (`name{labels}`) and its value.
pub(crate) type Scrape = BTreeMap<String, f64>;

/// Scrapes `http://addr/metrics`; fails the test if `promtool check
/// metrics` finds anything wrong with it (format or naming), or if a
/// family is missing from docs/operations.md's table of every metric.
pub(crate) async fn scrape(addr: &str) -> Scrape {
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{addr}");
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.text().await.unwrap();
    promtool(&text);
    let documented = documented();
    for family in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
    {
        assert!(
            documented.contains(family),
            "{family} is not in docs/operations.md's table of metrics"
        );
    }
    parse(&text)
}

/// The metric names docs/operations.md's Monitoring section documents.
fn documented() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(rs_tests::repo_root().join("docs/operations.md")).unwrap();
    let start = doc
        .find("## Monitoring with Prometheus")
        .expect("the section");
    let section = &doc[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
    names(&section[..end])
}

/// Every `rs_...` name in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("rs_") {
        let tail = &rest[i..];
        let n = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
            .unwrap_or(tail.len());
        let before = rest[..i].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..n].to_owned());
        }
        rest = &tail[n..];
    }
    out
}

/// The alerting rules load in Prometheus (`promtool check rules`) and
/// name only metrics the daemons serve (as documented).
#[test]
fn the_alerting_rules_load_and_name_only_documented_metrics() {
    let rules = rs_tests::repo_root().join("packaging/prometheus/rs-alerts.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let documented = documented();
    let used = names(&std::fs::read_to_string(&rules).unwrap());
    assert!(used.len() >= 10, "{used:?}");
    for n in used {
        // Histogram series are named after their family.
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(&n);
        assert!(
            documented.contains(family),
            "{n} is not a documented metric"
        );
    }
}

/// `promtool check metrics` on `text`: its lint too (names, units, help).
pub(crate) fn promtool(text: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/packages installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn parse(text: &str) -> Scrape {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            Some((series.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// The value of `series`, 0 if absent.
pub(crate) fn get(s: &Scrape, series: &str) -> f64 {
    s.get(series).copied().unwrap_or(0.0)
}

/// The sum of every series of the family `name` (all label values).
fn sum(s: &Scrape, name: &str) -> f64 {
    s.iter()
        .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tier_serves_metrics_promtool_accepts_counting_what_went_through() {
    let dir = tmp("metrics");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    // Each tier on a port of the kernel's choosing, read back from its log.
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let m = d
        .mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&a),
            &Extra::default(),
        )
        .unwrap();
    let sock = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    let (pa, pm, pp) = (
        d.metrics_addr("appserver"),
        d.metrics_addr("mlm"),
        d.metrics_addr("p1"),
    );
    let c = register(&sock).await;
    let mut ids = HashSet::new();
    for i in 0..20 {
        ids.insert(
            c.send("alarm", &alarm(&format!("m{i}"), None))
                .await
                .unwrap(),
        );
    }
    assert!(all_stored(&dir, &ids, Duration::from_secs(30)));

    // The proxy: what integrators handed in, what the next hop accepted,
    // the spool's life, round trips; the status tree reads the same
    // counters (a scrape before and one after bracket it).
    let before = scrape(&pp).await;
    let status = proxy_metrics(&sock).await.unwrap();
    let p = scrape(&pp).await;
    assert!(get(&p, "rs_messages_received_total") >= 20.0, "{p:?}");
    let accepted = "rs_upstream_messages_total{outcome=\"accepted\"}";
    assert!(get(&p, accepted) >= 20.0, "{p:?}");
    let shown = status["upstream.accepted"] as f64;
    assert!(
        get(&before, accepted) <= shown && shown <= get(&p, accepted),
        "{shown} {p:?}"
    );
    assert!(
        get(&p, "rs_spool_messages_total{fate=\"delivered\"}") >= 20.0,
        "{p:?}"
    );
    assert!(
        get(&p, "rs_upstream_post_duration_seconds_count") >= 1.0,
        "{p:?}"
    );
    assert!(get(&p, "rs_spool_wait_seconds_count") >= 20.0, "{p:?}");
    assert_eq!(get(&p, "rs_upstream_connected"), 1.0, "{p:?}");
    assert!(get(&p, "rs_spool_max_bytes") > 0.0, "{p:?}");
    assert_eq!(get(&p, "rs_forwarding_enabled"), 1.0, "{p:?}");

    // The MLM: what it received and forwarded; the proxy's long poll.
    let ml = scrape(&pm).await;
    assert!(get(&ml, "rs_messages_received_total") >= 20.0, "{ml:?}");
    assert!(get(&ml, "rs_messages_forwarded_total") >= 20.0, "{ml:?}");
    assert!(get(&ml, "rs_envelopes_received_total") >= 1.0, "{ml:?}");
    assert!(ml.contains_key("rs_longpolls_held"), "{ml:?}");
    assert!(ml.contains_key("rs_backchannel_pending"), "{ml:?}");

    // The server: what it stored, and the hop times the messages carried.
    let before = scrape(&pa).await;
    let status = server_metrics(&a).await.unwrap();
    let s = scrape(&pa).await;
    let shown = status["messages.accepted"] as f64;
    assert!(
        get(&before, "rs_messages_accepted_total") <= shown
            && shown <= get(&s, "rs_messages_accepted_total"),
        "{shown} {s:?}"
    );
    assert!(get(&s, "rs_messages_accepted_total") >= 20.0, "{s:?}");
    assert!(
        get(&s, "rs_messages_stored_total{outcome=\"new\"}") >= 20.0,
        "{s:?}"
    );
    assert!(get(&s, "rs_message_transit_seconds_count") >= 20.0, "{s:?}");
    assert!(
        get(&s, "rs_message_held_seconds_count{tier=\"mlm\"}") >= 20.0,
        "the MLM's hop times: {s:?}"
    );

    assert!(get(&s, "rs_store_messages") >= 20.0, "{s:?}");
    assert!(get(&s, "rs_components") >= 2.0, "{s:?}");

    // Anything but GET /metrics is not found.
    let r = reqwest::get(format!("http://{pp}/other")).await.unwrap();
    assert_eq!(r.status(), 404);

    // With the MLM gone, the proxy's spool fills: depth and oldest age by
    // precedence, the next hop marked unreachable.
    d.node("mlm").kill();
    let mut later = HashSet::new();
    for i in 0..10 {
        later.insert(
            c.send("alarm", &alarm(&format!("w{i}"), Some(6)))
                .await
                .unwrap(),
        );
    }
    assert!(
        wait_for(Duration::from_secs(30), || {
            let p = futures_block(scrape(&pp));
            get(&p, "rs_upstream_connected") == 0.0
                && get(&p, "rs_spool_messages{precedence=\"6\"}") >= 10.0
        }),
        "{:?}",
        scrape(&pp).await
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let p = scrape(&pp).await;
    assert!(
        get(&p, "rs_spool_oldest_age_seconds{precedence=\"6\"}") >= 1.0,
        "{p:?}"
    );
    assert!(get(&p, "rs_spool_bytes") > 0.0, "{p:?}");
    assert!(
        get(&p, "rs_upstream_posts_total{result=\"failed\"}") >= 1.0,
        "{p:?}"
    );

    // Back: the spool drains, and the gauge of the precedence goes.
    d.restart("mlm").unwrap();
    ids.extend(later);
    assert!(all_stored(&dir, &ids, Duration::from_secs(60)));
    assert_exactly_once(&dir, &ids);
    assert!(
        wait_for(Duration::from_secs(30), || {
            let p = futures_block(scrape(&pp));
            !p.contains_key("rs_spool_messages{precedence=\"6\"}")
                && get(&p, "rs_spool_messages_total{fate=\"delivered\"}") >= 30.0
        }),
        "{:?}",
        scrape(&pp).await
    );
    assert!(sum(&scrape(&pp).await, "rs_messages_received_total") >= 30.0);
}

/// Runs `f` to completion from a synchronous closure inside the test's
/// runtime (`wait_for` polls synchronously).
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
