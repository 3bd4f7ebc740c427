//! The read side of the control API: status, stored messages, components.
//! Documents are XML (see docs/operations.md).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rs_net::server::Refusal;
use rs_node::ingress::xml_response;
use rs_protocol::codec::{XmlOut, encode_status};
use rs_protocol::control::{NodeState, StatusNode};
use rs_protocol::model::{ContentKind, Detail, Severity};
use rs_protocol::{RsId, Timestamp};
use warp::Filter;

use crate::AppServer;
use crate::store::{NewJob, Query};
use rs_protocol::codec::api::{
    Component, decode_group, decode_tags, encode_components, encode_groups, encode_job, encode_tags,
};

pub fn routes(app: Arc<AppServer>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let status = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "status")
            .and(warp::get())
            .and(rs_net::server::authenticated())
            .then(move || {
                let app = app.clone();
                async move { status(&app).await }
            })
    };
    let messages = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "messages")
            .and(warp::get())
            .and(warp::query::<HashMap<String, String>>())
            .and(crate::security::admin(&app))
            .and_then(move |q, admin: crate::security::Admin| {
                let app = app.clone();
                async move { messages(&app, q, &admin.grants).await }
            })
    };
    let trace = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "messages" / String / "trace")
            .and(warp::get())
            .and(crate::security::admin(&app))
            .and_then(move |id: String, admin: crate::security::Admin| {
                let app = app.clone();
                async move { trace(&app, decoded(&id), &admin.grants).await }
            })
    };
    let export = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "export")
            .and(warp::get())
            .and(crate::security::provider(&app))
            .and(warp::query::<HashMap<String, String>>())
            .and_then(move |_: crate::security::Admin, q| {
                let app = app.clone();
                async move { export(&app, q).await }
            })
    };
    let components = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "components")
            .and(warp::get())
            .and(crate::security::admin(&app))
            .and(warp::query::<HashMap<String, String>>())
            .and_then(
                move |admin: crate::security::Admin, q: HashMap<String, String>| {
                    let app = app.clone();
                    async move { components(&app, &admin.grants, q).await }
                },
            )
    };
    let farms = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "farms")
            .and(warp::get())
            .and(crate::security::admin(&app))
            .and_then(move |admin: crate::security::Admin| {
                let app = app.clone();
                async move { farms(&app, &admin.grants).await }
            })
    };
    let send = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "send")
            .and(warp::post())
            .and(small_body())
            .and(crate::security::admin(&app))
            .and_then(move |body: bytes::Bytes, admin: crate::security::Admin| {
                let app = app.clone();
                async move { send(&app, &body, &admin.grants).await }
            })
    };
    let jobs = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "jobs")
            .and(warp::get())
            .and(warp::query::<HashMap<String, String>>())
            .and(crate::security::admin(&app))
            .and_then(move |q, admin: crate::security::Admin| {
                let app = app.clone();
                async move { jobs(&app, q, &admin.grants).await }
            })
    };
    let job = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "jobs" / String)
            .and(warp::get())
            .and(warp::query::<HashMap<String, String>>())
            .and(crate::security::admin(&app))
            .and_then(move |id: String, q, admin: crate::security::Admin| {
                let app = app.clone();
                async move { job(&app, id, q, &admin.grants).await }
            })
    };
    let group_list = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "groups")
            .and(warp::get())
            .and(crate::security::admin(&app))
            .and_then(move |admin: crate::security::Admin| {
                let app = app.clone();
                async move { groups(&app, None, &admin.grants).await }
            })
    };
    let group_get = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "groups" / String)
            .and(warp::get())
            .and(crate::security::admin(&app))
            .and_then(move |name: String, admin: crate::security::Admin| {
                let app = app.clone();
                async move { groups(&app, Some(name), &admin.grants).await }
            })
    };
    let group_put = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "groups" / String)
            .and(warp::put())
            .and(crate::security::provider(&app))
            .and(small_body())
            .and_then(
                move |name: String, _: crate::security::Admin, body: bytes::Bytes| {
                    let app = app.clone();
                    async move { put_group(&app, name, &body).await }
                },
            )
    };
    let group_delete = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "groups" / String)
            .and(warp::delete())
            .and(crate::security::provider(&app))
            .and_then(move |name: String, _: crate::security::Admin| {
                let app = app.clone();
                async move { delete_group(&app, name).await }
            })
    };
    let throttle_get = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "throttle")
            .and(warp::get())
            .and(crate::security::admin(&app))
            .map(move |admin: crate::security::Admin| {
                xml_response(rs_node::throttle::encode_throttle(&visible_throttle(
                    &app,
                    &admin.grants,
                )))
            })
    };
    let throttle_put = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "throttle")
            .and(warp::put())
            .and(crate::security::provider(&app))
            .and(small_body())
            .and_then(move |_: crate::security::Admin, body: bytes::Bytes| {
                let app = app.clone();
                async move { put_throttle(&app, &body).await }
            })
    };
    let subs_post = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "subscriptions")
            .and(warp::post())
            .and(crate::security::provider(&app))
            .and(small_body())
            .and_then(move |_: crate::security::Admin, body: bytes::Bytes| {
                let app = app.clone();
                async move { subscribe(&app, &body).await }
            })
    };
    let subs_get = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "subscriptions")
            .and(warp::get())
            .and(crate::security::provider(&app))
            .and_then(move |_: crate::security::Admin| {
                let app = app.clone();
                async move { subscriptions(&app).await }
            })
    };
    let subs_delete = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "subscriptions" / String)
            .and(warp::delete())
            .and(crate::security::provider(&app))
            .and_then(move |name: String, _: crate::security::Admin| {
                let app = app.clone();
                let name = decoded(&name);
                async move {
                    match app.store.unsubscribe(name.clone()).await {
                        Ok(true) => Ok(warp::reply::Reply::into_response(
                            http::StatusCode::NO_CONTENT,
                        )),
                        Ok(false) => Err(refuse(
                            http::StatusCode::NOT_FOUND,
                            format!("no subscription {name:?}"),
                        )),
                        Err(e) => Err(unavailable(e)),
                    }
                }
            })
    };
    let feed = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "subscriptions" / String / "feed")
            .and(warp::get())
            .and(crate::security::provider(&app))
            .and(warp::query::<HashMap<String, String>>())
            .and_then(move |name: String, _: crate::security::Admin, q| {
                let app = app.clone();
                async move { feed(&app, decoded(&name), q).await }
            })
    };
    let tasks = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "tasks")
            .and(warp::get())
            .and(crate::security::provider(&app))
            .and(warp::query::<HashMap<String, String>>())
            .and_then(move |_: crate::security::Admin, q| {
                let app = app.clone();
                async move { tasks(&app, q).await }
            })
    };
    let replay = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "tasks" / "replay")
            .and(warp::post())
            .and(crate::security::provider(&app))
            .and(warp::query::<HashMap<String, String>>())
            .and_then(move |_: crate::security::Admin, q| {
                let app = app.clone();
                async move { replay(&app, q).await }
            })
    };
    let tags = warp::path!("rs" / "v1" / "control" / "components" / String / "tags")
        .and(warp::put())
        .and(crate::security::admin(&app))
        .and(small_body())
        .and_then(
            move |id: String, admin: crate::security::Admin, body: bytes::Bytes| {
                let app = app.clone();
                async move { put_tags(&app, id, &body, &admin.grants).await }
            },
        );
    // Each route is boxed before they are joined: a chain of twenty
    // unboxed `or`s nests its types twenty deep, and type-checking that
    // took rustc minutes.
    let mut all = status.boxed();
    for r in [
        messages.boxed(),
        trace.boxed(),
        export.boxed(),
        components.boxed(),
        farms.boxed(),
        send.boxed(),
        job.boxed(),
        jobs.boxed(),
        group_list.boxed(),
        group_get.boxed(),
        group_put.boxed(),
        group_delete.boxed(),
        tags.boxed(),
        throttle_get.boxed(),
        throttle_put.boxed(),
        subs_post.boxed(),
        subs_get.boxed(),
        subs_delete.boxed(),
        feed.boxed(),
        tasks.boxed(),
        replay.boxed(),
    ] {
        all = all.or(r).unify().boxed();
    }
    all
}

pub(crate) fn def_of(
    s: &crate::collector::Subscription,
) -> rs_protocol::codec::api::SubscriptionDef {
    rs_protocol::codec::api::SubscriptionDef {
        name: s.name.clone(),
        class: s.class.clone(),
        subclass: s.subclass.clone(),
        customer: s.customer.clone(),
        source: s.source.as_deref().and_then(|x| RsId::new(x).ok()),
        kind: s.kind.clone(),
        min_severity: s.min_severity,
        delivery: s.delivery.clone(),
    }
}

/// `GET /rs/v1/control/subscriptions`: each with its task counts.
async fn subscriptions(app: &AppServer) -> Result<warp::reply::Response, warp::Rejection> {
    let list = app.store.subscriptions().await.map_err(unavailable)?;
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("subscriptions")
        .attr_num("count", list.len() as u64)
        .gt()
        .newline();
    for (s, c) in &list {
        rs_protocol::codec::api::write_subscription(
            &mut x,
            &def_of(s),
            Some((c.pending, c.done, c.failed)),
        );
        x.newline();
    }
    x.close("subscriptions").newline();
    Ok(xml_response(buf))
}

/// `POST /rs/v1/control/subscriptions`: creates or replaces one (by name);
/// messages stored from then on are delivered to it.
async fn subscribe(app: &AppServer, body: &[u8]) -> Result<warp::reply::Response, warp::Rejection> {
    let d =
        rs_protocol::codec::api::decode_subscription(body, &rs_protocol::codec::Limits::default())
            .map_err(|e| refuse(http::StatusCode::BAD_REQUEST, format!("subscription: {e}")))?;
    let s = crate::collector::Subscription {
        id: 0,
        name: d.name.clone(),
        class: d.class.clone(),
        subclass: d.subclass.clone(),
        customer: d.customer.clone(),
        source: d.source.as_ref().map(|x| x.to_string()),
        kind: d.kind.clone(),
        min_severity: d.min_severity,
        delivery: d.delivery.clone(),
        // Set by the store: what is stored by then.
        from_seq: 0,
    };
    if let crate::collector::Delivery::Module(m) = &d.delivery
        && !app.module(m).is_some_and(|m| m.takes_messages())
    {
        return Err(refuse(
            http::StatusCode::BAD_REQUEST,
            format!(
                "no service module named {m:?} takes messages (modules that do: {})",
                app.module_names().join(", ")
            ),
        ));
    }
    app.store
        .subscribe(s, app.clock.now())
        .await
        .map_err(unavailable)?;
    subscriptions(app).await
}

fn num(q: &HashMap<String, String>, k: &str, max: i64) -> Result<Option<i64>, warp::Rejection> {
    q.get(k)
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|n| (0..=max).contains(n))
                .ok_or_else(|| {
                    refuse(
                        http::StatusCode::BAD_REQUEST,
                        format!("{k} {v:?}: a number from 0 to {max}"),
                    )
                })
        })
        .transpose()
}

/// `GET .../subscriptions/{name}/feed?after=CURSOR&limit=N&wait=S`: the
/// messages after the cursor, oldest first; passing a cursor acknowledges
/// everything up to it. Held up to `wait` seconds while there is nothing.
async fn feed(
    app: &AppServer,
    name: String,
    q: HashMap<String, String>,
) -> Result<warp::reply::Response, warp::Rejection> {
    for k in q.keys() {
        if !["after", "limit", "wait"].contains(&k.as_str()) {
            return Err(refuse(
                http::StatusCode::BAD_REQUEST,
                format!("unknown parameter {k:?}"),
            ));
        }
    }
    let after = num(&q, "after", i64::MAX)?;
    let limit = num(&q, "limit", 1000)?.unwrap_or(100).max(1) as usize;
    let wait = num(&q, "wait", 60)?.unwrap_or(25);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait as u64);
    let mut changes = app.feed_ready.subscribe();
    loop {
        changes.borrow_and_update();
        let rows = app
            .store
            .feed(name.clone(), after, limit, app.clock.now())
            .await
            .map_err(unavailable)?
            .ok_or_else(|| {
                refuse(
                    http::StatusCode::NOT_FOUND,
                    format!("no feed subscription {name:?}"),
                )
            })?;
        let held = rows.is_empty() && tokio::time::Instant::now() < deadline;
        if !held {
            let mut msgs = Vec::with_capacity(rows.len());
            for (task, id) in &rows {
                if let Some(r) = app
                    .store
                    .query(Query {
                        id: Some(id.clone()),
                        limit: 1,
                        ..Query::default()
                    })
                    .await
                    .map_err(unavailable)?
                    .pop()
                {
                    msgs.push((Some(*task), r));
                }
            }
            let tagged: Vec<(Option<i64>, &crate::store::Row)> =
                msgs.iter().map(|(t, r)| (*t, r)).collect();
            let cursor = rows.last().map(|(t, _)| *t).or(after);
            return Ok(xml_response(crate::documents::messages_doc_tagged(
                &tagged, cursor,
            )));
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return Err(unavailable("stopping")) },
            () = tokio::time::sleep_until(deadline) => {}
            () = app.stopping.cancelled() => {}
        }
    }
}

/// `GET /rs/v1/control/tasks?state=failed&limit=N`: the collector's tasks.
async fn tasks(
    app: &AppServer,
    q: HashMap<String, String>,
) -> Result<warp::reply::Response, warp::Rejection> {
    let state = q.get("state").cloned().unwrap_or_else(|| "failed".into());
    if !["ready", "taken", "done", "failed"].contains(&state.as_str()) {
        return Err(refuse(
            http::StatusCode::BAD_REQUEST,
            format!("state {state:?}: ready, taken, done or failed"),
        ));
    }
    let limit = num(&q, "limit", 10_000)?.unwrap_or(100).max(1) as usize;
    let rows = app.store.tasks(state, limit).await.map_err(unavailable)?;
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("tasks")
        .attr_num("count", rows.len() as u64)
        .gt()
        .newline();
    for t in &rows {
        x.open("task")
            .attr_num("id", u64::try_from(t.id).unwrap_or(0))
            .attr("subscription", &t.sub)
            .attr("message", &t.message)
            .attr("state", &t.state)
            .attr_num("attempts", u64::from(t.attempts))
            .attr_ts("created", ts(t.created));
        match &t.last_error {
            Some(e) => {
                x.gt().text(e).close("task");
            }
            None => {
                x.empty();
            }
        }
        x.newline();
    }
    x.close("tasks").newline();
    Ok(xml_response(buf))
}

/// `POST /rs/v1/control/tasks/replay[?id=N]`: failed tasks become ready.
async fn replay(
    app: &AppServer,
    q: HashMap<String, String>,
) -> Result<warp::reply::Response, warp::Rejection> {
    let n = replay_tasks(app, num(&q, "id", i64::MAX)?).await?;
    let mut buf = Vec::new();
    XmlOut::document(&mut buf)
        .open("replayed")
        .attr_num("count", n)
        .empty()
        .newline();
    Ok(xml_response(buf))
}

/// Puts failed tasks back in the queue: this one, or every one; how many.
pub(crate) async fn replay_tasks(app: &AppServer, id: Option<i64>) -> Result<u64, warp::Rejection> {
    let n = app
        .store
        .replay(id, app.clock.now())
        .await
        .map_err(unavailable)?;
    app.tasks_ready.notify_waiters();
    Ok(n)
}

/// `PUT /rs/v1/control/throttle`: replaces this server's throttle, checked
/// first (a bad document changes nothing), kept across restarts.
/// This server's throttle as `grants` may see it: a customer's admin sees
/// the rules that can apply to its customers, not those naming another.
pub(crate) fn visible_throttle(
    app: &AppServer,
    grants: &crate::security::Grants,
) -> rs_node::throttle::ThrottleConfig {
    let mut cfg = app
        .throttle_cfg
        .read()
        .map(|c| c.clone())
        .unwrap_or_default();
    cfg.rule.retain(|r| {
        r.customer.as_deref().is_none_or(|c| grants.customer(c))
            && r.component
                .as_deref()
                .is_none_or(|c| RsId::new(c).is_ok_and(|id| grants.component(&id)))
    });
    cfg
}

async fn put_throttle(
    app: &AppServer,
    body: &[u8],
) -> Result<warp::reply::Response, warp::Rejection> {
    let bad = |t: String| refuse(http::StatusCode::BAD_REQUEST, t);
    let cfg = rs_node::throttle::decode_throttle(body, &rs_protocol::codec::Limits::default())
        .map_err(|e| bad(format!("throttle: {e}")))?;
    rs_node::throttle::Throttle::new(&cfg, app.clock.clone(), None, None).map_err(bad)?;
    let doc = rs_node::throttle::encode_throttle(&cfg);
    app.store
        .set_setting("throttle", doc.clone())
        .await
        .map_err(unavailable)?;
    app.set_throttle(cfg).map_err(unavailable)?;
    Ok(xml_response(doc))
}

/// A request body of at most 1 MiB.
pub(crate) fn small_body() -> impl Filter<Extract = (bytes::Bytes,), Error = warp::Rejection> + Clone
{
    warp::body::content_length_limit(1 << 20).and({
        // Bounded: content_length_limit refuses a body over 1 MiB or
        // without a Content-Length.
        #[allow(clippy::disallowed_methods)]
        warp::body::bytes()
    })
}

/// A path segment as sent: percent-encoded by clients that encode every
/// character but letters and digits (rsctl), or not at all.
pub(crate) fn decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

pub(crate) fn refuse(status: http::StatusCode, text: impl Into<String>) -> warp::Rejection {
    warp::reject::custom(Refusal::new(status, text))
}

/// The server's own status tree.
pub async fn status_tree(app: &AppServer) -> StatusNode {
    let s = &app.stats;
    let mut metrics = app.counts.status().to_vec();
    metrics.extend([
        ("messages.duplicates", s.duplicates.get()),
        (
            "replies.advised_wait",
            app.load.advised.load(Ordering::Relaxed),
        ),
        ("tasks.done", s.tasks_done.get()),
        ("tasks.failed_attempts", s.tasks_failed.get()),
    ]);
    let b = &app.uploads.stats;
    metrics.extend([
        ("bulk.granted", b.granted.get()),
        ("bulk.refused", b.refused.get()),
        ("bulk.completed", b.completed.get()),
        ("bulk.mismatched", b.mismatched.get()),
        ("bulk.resumed", b.resumed.get()),
        ("bulk.bytes_received", b.bytes_received.get()),
        ("bulk.transfers_refused", b.transfers_refused.get()),
    ]);
    let d = &app.downloads;
    metrics.extend([
        ("bulk.published", d.published.get()),
        ("bulk.offers", d.offers.get()),
        ("bulk.unpublished", d.unpublished.get()),
        ("bulk.bytes_served", d.bytes_served.get()),
        ("bulk.fetches_refused", d.fetches_refused.get()),
    ]);
    metrics.extend(rs_net::auth::metrics(app.tls.as_deref(), &app.auth));
    if let Some(o) = &app.opener {
        let s = &o.stats;
        metrics.extend([
            ("seal.opened_signed", s.opened_signed.get()),
            ("seal.opened_encrypted", s.opened_encrypted.get()),
            ("seal.refused", s.refused.get()),
            ("seal.unsealed_refused", s.unsealed_refused.get()),
        ]);
    }
    metrics.extend([
        ("enroll.issued", app.stats.enrolled.get()),
        ("enroll.refused", app.stats.enroll_refused.get()),
        ("certificates.revoked", app.stats.revoked.get()),
        ("certificates.renewed", app.stats.renewed.get()),
    ]);
    let throttle = app.current_throttle();
    let share = u64::from(throttle.share());
    let throttle = throttle.metrics();
    metrics.extend(throttle.iter().map(|(k, v)| (k.as_str(), *v)));
    if app.in_farm() {
        metrics.push(("farm.rate_share", share));
    }
    let state = match app.store.stats().await {
        Ok(st) => {
            metrics.push(("store.messages", st.messages));
            metrics.push(("store.components", st.components));
            metrics.push(("store.stored_total", st.stored_total));
            NodeState::Ok
        }
        Err(e) => {
            tracing::error!("store stats: {e}");
            NodeState::Degraded
        }
    };
    StatusNode {
        id: Some(app.id.clone()),
        version: Some(env!("CARGO_PKG_VERSION").into()),
        since: Some(app.started),
        metrics: metrics
            .into_iter()
            .map(|(k, v)| Detail::new(k, v.to_string()))
            .collect(),
        ..StatusNode::new("appserver", state)
    }
}

async fn status(app: &AppServer) -> warp::reply::Response {
    xml_response(encode_status(&status_tree(app).await))
}

fn parse_time(v: &str) -> Result<i64, warp::Rejection> {
    Timestamp::parse(v).map(Timestamp::as_millis).map_err(|_| {
        refuse(
            http::StatusCode::BAD_REQUEST,
            format!("{v:?} is not a time like 2026-11-24T22:56:37Z"),
        )
    })
}

/// The filters of `GET /messages` and `GET /export`; for an export also
/// `after` (the cursor) and `limit` (none by default). Unknown names are
/// refused.
fn query_of(q: HashMap<String, String>, export: bool) -> Result<Query, warp::Rejection> {
    let bad = |t: String| refuse(http::StatusCode::BAD_REQUEST, t);
    let mut query = Query {
        limit: if export { usize::MAX } else { 100 },
        after: export.then_some(0),
        ..Query::default()
    };
    for (k, v) in q {
        match k.as_str() {
            "component" => {
                RsId::new(&v).map_err(|e| bad(format!("component {v:?}: {e}")))?;
                query.component = Some(v);
            }
            "customer" => {
                rs_protocol::CustomerId::new(&v)
                    .map_err(|e| bad(format!("customer {v:?}: {e}")))?;
                query.customer = Some(v);
            }
            "class" => query.class = Some(v),
            "sub" | "subclass" => query.subclass = Some(v),
            "severity" => {
                query.severity = Some(Severity::parse(&v).ok_or_else(|| {
                    bad(format!(
                        "severity {v:?}: one of critical, major, minor, warning, info"
                    ))
                })?);
            }
            "type" => {
                query.kind =
                    Some(ContentKind::parse(&v).ok_or_else(|| bad(format!("unknown type {v:?}")))?);
            }
            "since" => query.since = Some(parse_time(&v)?),
            "until" => query.until = Some(parse_time(&v)?),
            "after" if export => {
                query.after = Some(
                    v.parse::<i64>()
                        .ok()
                        .filter(|n| *n >= 0)
                        .ok_or_else(|| bad(format!("after {v:?}: a cursor (a number)")))?,
                );
            }
            "limit" => {
                let max = if export { 1_000_000_000 } else { 10_000 };
                query.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| bad(format!("limit {v:?}: a number from 1 to {max}")))?;
            }
            other => return Err(bad(format!("unknown parameter {other:?}"))),
        }
    }
    Ok(query)
}

async fn messages(
    app: &AppServer,
    q: HashMap<String, String>,
    grants: &crate::security::Grants,
) -> Result<warp::reply::Response, warp::Rejection> {
    let mut query = query_of(q, false)?;
    scope(&mut query, grants)?;
    let rows = app
        .store
        .query(query)
        .await
        .map_err(|e| refuse(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(xml_response(crate::documents::messages_doc(&rows)))
}

/// Keeps a query of stored messages within the customers `grants`
/// covers: one named must be granted; with none named, an admin of one
/// customer asks within it, an admin of several must name one.
pub(crate) fn scope(
    query: &mut Query,
    grants: &crate::security::Grants,
) -> Result<(), warp::Rejection> {
    if let crate::security::Grants::Some(list) = grants {
        let of_component = query
            .component
            .as_deref()
            .and_then(|c| RsId::new(c).ok())
            .map(|c| c.customer().as_str().to_owned());
        match (query.customer.clone(), of_component) {
            (Some(c), _) | (None, Some(c)) if !grants.customer(&c) => {
                return Err(refuse(
                    http::StatusCode::FORBIDDEN,
                    format!("not granted: customer {c}"),
                ));
            }
            (Some(_), _) | (None, Some(_)) => {}
            (None, None) if list.len() == 1 => query.customer = Some(list[0].clone()),
            (None, None) => {
                return Err(refuse(
                    http::StatusCode::FORBIDDEN,
                    "name one of the customers granted (customer=...)",
                ));
            }
        }
    }
    Ok(())
}

/// `GET /rs/v1/control/messages/{id}/trace`: the hops and times of a
/// message (its header's routing, its storage here), or, for one sent
/// down, its job's destinations and the next hops it still waits for.
/// An admin sees a stored message of a customer granted, a job whose
/// destinations are all granted.
async fn trace(
    app: &AppServer,
    id: String,
    grants: &crate::security::Grants,
) -> Result<warp::reply::Response, warp::Rejection> {
    use rs_protocol::codec::api::{Trace, TraceEvent, TraceWait};
    let id = rs_protocol::MessageId::new(id)
        .map_err(|e| refuse(http::StatusCode::BAD_REQUEST, format!("message ID: {e}")))?;
    let rows = app
        .store
        .trace(id.as_str().to_owned())
        .await
        .map_err(unavailable)?;
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    let event = |at, component: &RsId, what: &str| TraceEvent {
        at,
        component: component.clone(),
        what: what.into(),
        detail: None,
    };
    let mut t = Trace {
        id: id.as_str().to_owned(),
        state: "unknown".into(),
        job: None,
        events: Vec::new(),
        waiting: Vec::new(),
    };
    if let Some((header, received, customer)) = rows.stored {
        if !grants.customer(&customer) {
            return Err(refuse(
                http::StatusCode::FORBIDDEN,
                format!("not granted: customer {customer}"),
            ));
        }
        let (h, _, _) =
            rs_protocol::codec::decode_header_part(&header, &rs_protocol::codec::Limits::default())
                .map_err(|e| {
                    tracing::error!(message_id = %id, "stored header does not decode: {e}");
                    refuse(
                        http::StatusCode::INTERNAL_SERVER_ERROR,
                        format!("the stored header of {id} does not decode"),
                    )
                })?;
        if let Some(src) = h.source() {
            t.events.push(event(h.created, &src.component, "created"));
        }
        for hop in &h.routing {
            t.events
                .push(event(hop.received, &hop.component, "received"));
            if let Some(sent) = hop.sent {
                t.events.push(event(sent, &hop.component, "sent"));
            }
        }
        t.events.push(event(ts(received), &app.id, "stored"));
        t.state = "stored".into();
    }
    if let Some(job_id) = rows.job {
        let job = app
            .store
            .job(job_id.clone())
            .await
            .map_err(unavailable)?
            .ok_or_else(|| unavailable(format!("job {job_id} went away")))?;
        if let Some(d) = job.targets.iter().find(|d| !grants.component(&d.id)) {
            return Err(refuse(
                http::StatusCode::FORBIDDEN,
                format!("not granted: {} (a destination of job {job_id})", d.id),
            ));
        }
        t.events.push(TraceEvent {
            detail: Some(job.action.clone()),
            ..event(job.created, &app.id, "queued")
        });
        for d in job.targets.iter().filter(|d| d.state != "pending") {
            let detail = match (&d.code, &d.text) {
                (Some(c), Some(x)) => Some(format!("{c}: {x}")),
                (Some(c), None) => Some(c.clone()),
                (None, x) => x.clone(),
            };
            t.events.push(TraceEvent {
                detail,
                ..event(d.updated, &d.id, &d.state)
            });
        }
        t.state = if job.is_done() { "done" } else { "on-its-way" }.into();
        t.job = Some(job_id);
    }
    // Copies still queued here (a job's, or an offer's and a response's,
    // which only a provider admin sees).
    if t.job.is_some() || grants.is_all() {
        for (hop, since, offered) in rows.queued {
            let Ok(next_hop) = RsId::new(&hop) else {
                continue;
            };
            t.waiting.push(TraceWait {
                component: app.id.clone(),
                next_hop,
                since: ts(since),
                offered: offered.map(ts),
            });
        }
        if t.state == "unknown" && !t.waiting.is_empty() {
            t.state = "on-its-way".into();
        }
    }
    t.events.sort_by_key(|e| e.at);
    Ok(xml_response(rs_protocol::codec::api::encode_trace(&t)))
}

/// Rows an export reads from the database at a time.
const EXPORT_PAGE: usize = 500;

/// `GET /rs/v1/control/export?...`: every stored message the filters
/// match, after the cursor `after`, in storage order, at most `limit`,
/// streamed: the body is written page by page as the database is read
/// (memory stays bounded whatever the size), and ends with `<end>` giving
/// the cursor to continue from. A body that stops before `</export>` was
/// cut: continue from the last `seq` received.
async fn export(
    app: &Arc<AppServer>,
    q: HashMap<String, String>,
) -> Result<warp::reply::Response, warp::Rejection> {
    let query = query_of(q, true)?;
    let start = query.after.unwrap_or(0);
    // Fail before the 200 if the database cannot be read at all.
    let first = app
        .store
        .query(Query {
            limit: EXPORT_PAGE.min(query.limit),
            ..query.clone()
        })
        .await
        .map_err(unavailable)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let app = app.clone();
    tokio::spawn(async move {
        let mut head = Vec::new();
        XmlOut::document(&mut head)
            .open("export")
            .attr_num("after", u64::try_from(start).unwrap_or(0))
            .gt()
            .newline();
        if tx.send(Ok(head.into())).await.is_err() {
            return;
        }
        let (mut count, mut cursor, mut page) = (0usize, start, first);
        loop {
            let full = page.len() == EXPORT_PAGE.min(query.limit - count);
            let mut buf = Vec::with_capacity(page.len() * 1024);
            let mut x = XmlOut::fragment(&mut buf);
            for r in &page {
                crate::documents::write_message(&mut x, None, Some(r.seq), r);
                cursor = r.seq;
            }
            count += page.len();
            if tx.send(Ok(buf.into())).await.is_err() {
                return;
            }
            let more = full && count < query.limit;
            if !more || count == query.limit {
                let mut tail = Vec::new();
                XmlOut::fragment(&mut tail)
                    .open("end")
                    .attr_num("count", count as u64)
                    .attr_num("next", u64::try_from(cursor).unwrap_or(0))
                    .attr("complete", if full { "no" } else { "yes" })
                    .empty()
                    .newline()
                    .close("export")
                    .newline();
                let _ = tx.send(Ok(tail.into())).await;
                return;
            }
            page = match app
                .store
                .query(Query {
                    after: Some(cursor),
                    limit: EXPORT_PAGE.min(query.limit - count),
                    ..query.clone()
                })
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    // Cut the body: the client sees no </export> and
                    // continues from the last seq it received.
                    tracing::error!("export: {e}");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
        }
    });
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut r = warp::reply::Reply::into_response(warp::reply::stream(body));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    Ok(r)
}

/// The components the admin's grants let it see, with their latest status
/// trees.
pub(crate) async fn visible_components(
    app: &AppServer,
    grants: &crate::security::Grants,
) -> Result<Vec<Component>, warp::Rejection> {
    let mut rows = app.store.components().await.map_err(unavailable)?;
    rows.retain(|c| RsId::new(&c.id).is_ok_and(|id| grants.component(&id)));
    let limits = rs_protocol::codec::Limits::default();
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    Ok(rows
        .into_iter()
        .filter_map(|c| {
            let status = c
                .status
                .and_then(|x| rs_protocol::codec::decode_status(&x, &limits).ok());
            Some(Component {
                id: RsId::new(&c.id).ok()?,
                version: c.version,
                first_seen: ts(c.first_seen),
                last_seen: ts(c.last_seen),
                via: c
                    .via
                    .split_whitespace()
                    .filter_map(|v| RsId::new(v).ok())
                    .collect(),
                state: c.state,
                tags: c.tags,
                at_risk: status
                    .as_ref()
                    .and_then(rs_protocol::control::queue_health::at_risk),
                // Stored when it arrived, so it decodes; a tree that does
                // not (an older format) is left out rather than failing
                // the whole list.
                status,
            })
        })
        .collect())
}

/// `GET /components`; `?at_risk=1` keeps the components whose latest
/// status puts them at risk of losing what they hold.
async fn components(
    app: &AppServer,
    grants: &crate::security::Grants,
    q: HashMap<String, String>,
) -> Result<warp::reply::Response, warp::Rejection> {
    if let Some(k) = q.keys().find(|k| *k != "at_risk") {
        return Err(refuse(
            http::StatusCode::BAD_REQUEST,
            format!("unknown parameter {k:?} (at_risk)"),
        ));
    }
    let mut list = visible_components(app, grants).await?;
    match q.get("at_risk").map(String::as_str) {
        None | Some("0" | "false") => {}
        Some("1" | "true") => list.retain(|c| c.at_risk.is_some()),
        Some(other) => {
            return Err(refuse(
                http::StatusCode::BAD_REQUEST,
                format!("at_risk={other}: 1 or 0"),
            ));
        }
    }
    Ok(xml_response(encode_components(&list)))
}

/// `GET /rs/v1/control/farms`: the MLM farms among the components the
/// admin may see, each with its members and their load as the farm's
/// latest status reported them (every member lists them all, from the
/// farm's database).
async fn farms(
    app: &AppServer,
    grants: &crate::security::Grants,
) -> Result<warp::reply::Response, warp::Rejection> {
    use rs_protocol::codec::api::{Farm, FarmMember, encode_farms};
    // The servers' own farm, for the provider's admins.
    let mut servers = Vec::new();
    if app.in_farm() && grants.is_all() {
        let members: Vec<FarmMember> = crate::farm::members(app)
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|(m, state)| FarmMember {
                name: m.name,
                state: state.as_str().into(),
                since: Some(m.started),
                seen: Some(m.seen),
                in_hand: m.in_hand,
                envelopes: m.envelopes,
                forwarded: m.forwarded,
            })
            .collect();
        servers.push(Farm {
            id: app.id.clone(),
            last_seen: members
                .iter()
                .filter_map(|m| m.seen)
                .max()
                .unwrap_or_else(|| app.clock.now()),
            state: Some(
                if members.iter().any(|m| m.state == "ok") {
                    "ok"
                } else {
                    "failed"
                }
                .into(),
            ),
            via: Vec::new(),
            members,
        });
    }
    let mlms = visible_components(app, grants).await?;
    let list: Vec<Farm> = servers
        .into_iter()
        .chain(mlms.into_iter().filter_map(|c| {
            let members: Vec<FarmMember> = c
                .status?
                .children
                .iter()
                .filter_map(FarmMember::from_status)
                .collect();
            (!members.is_empty()).then_some(Farm {
                id: c.id,
                last_seen: c.last_seen,
                state: c.state,
                via: c.via,
                members,
            })
        }))
        .collect();
    Ok(xml_response(encode_farms(&list)))
}

fn unavailable(e: impl std::fmt::Display) -> warp::Rejection {
    refuse(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// The longest a control action may wait: every tier remembers the IDs of
/// back-channel messages it handled for 30 days, so nothing older can come
/// again and be taken for new.
const MAX_TTL_SECS: u64 = 30 * 86_400;

/// `POST /rs/v1/control/send`: answers at once with a job ID; each
/// destination's outcome arrives later (`GET /rs/v1/control/jobs/{id}`).
async fn send(
    app: &AppServer,
    body: &[u8],
    grants: &crate::security::Grants,
) -> Result<warp::reply::Response, warp::Rejection> {
    let req = rs_protocol::codec::decode_send_request(body, &rs_protocol::codec::Limits::default())
        .map_err(|e| refuse(http::StatusCode::BAD_REQUEST, format!("send request: {e}")))?;
    let action = req.action.clone();
    let job = start_job(
        app,
        grants,
        &req.to,
        &req.groups,
        req.ttl_secs,
        req.notify.clone(),
        action.name(),
        None,
        |id, dests, expiry, now| {
            rs_protocol::control_messages::control_message(id, dests, Some(expiry), &action, now)
        },
        None,
    )
    .await?;
    Ok(xml_response(encode_job(&job)))
}

/// The destinations of a send, an offer or a rollout: the IDs named and
/// every member of the groups named (a group must exist and have
/// members), each granted to the admin.
pub(crate) async fn destinations_of(
    app: &AppServer,
    grants: &crate::security::Grants,
    to: &[RsId],
    groups: &[String],
) -> Result<std::collections::BTreeSet<RsId>, warp::Rejection> {
    let bad = |status, t: String| refuse(status, t);
    let mut dests: std::collections::BTreeSet<RsId> = std::collections::BTreeSet::new();
    for g in groups {
        let found = app
            .store
            .groups(Some(g.clone()))
            .await
            .map_err(unavailable)?;
        let Some((_, members)) = found.into_iter().next() else {
            return Err(bad(
                http::StatusCode::NOT_FOUND,
                format!("unknown group {g:?}"),
            ));
        };
        if members.is_empty() {
            return Err(bad(
                http::StatusCode::BAD_REQUEST,
                format!("group {g:?} has no members"),
            ));
        }
        dests.extend(members);
    }
    dests.extend(to.iter().cloned());
    // An admin commands only the customers granted, groups included.
    if let Some(d) = dests.iter().find(|d| !grants.component(d)) {
        return Err(bad(
            http::StatusCode::FORBIDDEN,
            format!("not granted: {d} (customer {})", d.customer().as_str()),
        ));
    }
    Ok(dests)
}

/// Starts a job: expands `groups`, splits the destinations by next hop,
/// and records the job with one copy per hop of the message `build` makes
/// (given the message ID, all the destinations, the expiry and now; each
/// copy lists those behind its hop), and with `offer` the download URL it
/// offers (see
/// [`NewJob::offer`]), under `job_id` if given. Returns the job as
/// recorded.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_job(
    app: &AppServer,
    grants: &crate::security::Grants,
    to: &[RsId],
    groups: &[String],
    ttl_secs: Option<u64>,
    notify: Option<String>,
    action: &str,
    offer: Option<(String, String)>,
    build: impl Fn(
        rs_protocol::MessageId,
        Vec<RsId>,
        Timestamp,
        Timestamp,
    ) -> rs_protocol::model::Message,
    job_id: Option<String>,
) -> Result<rs_protocol::codec::api::Job, warp::Rejection> {
    let bad = |status, t: String| refuse(status, t);
    if ttl_secs.is_some_and(|t| t == 0 || t > MAX_TTL_SECS) {
        return Err(bad(
            http::StatusCode::BAD_REQUEST,
            format!("ttl-secs: from 1 to {MAX_TTL_SECS} (30 days)"),
        ));
    }
    let now = app.clock.now();
    let dests = destinations_of(app, grants, to, groups).await?;
    let named: std::collections::BTreeSet<RsId> = to.iter().cloned().collect();
    // One copy per next hop, listing the destinations behind it.
    let all: Vec<RsId> = dests.into_iter().collect();
    let (by_hop, unreachable) = rs_node::next_hop::split(all.clone(), |d| app.store.next_hop(d))
        .await
        .map_err(unavailable)?;
    if let Some(d) = unreachable.iter().find(|d| named.contains(*d)) {
        return Err(bad(
            http::StatusCode::NOT_FOUND,
            format!("unknown destination {d}: no such component has reported to this server"),
        ));
    }
    let message_id = rs_protocol::MessageId::generate();
    // A rollout names its wave's job before it starts it (rollouts.rs).
    let job_id = job_id.unwrap_or_else(|| rs_protocol::MessageId::generate().to_string());
    let expiry = now.saturating_add(std::time::Duration::from_secs(ttl_secs.unwrap_or(86_400)));
    let whole = build(message_id.clone(), all, expiry, now);
    let copies = by_hop
        .into_iter()
        .map(|(hop, dests)| {
            let copy = rs_protocol::model::Message {
                header: whole.header.copy_for_hop(dests, &app.id, now),
                content: whole.content.clone(),
            };
            (hop, copy.to_raw())
        })
        .collect();
    app.store
        .create_job(
            NewJob {
                id: job_id.clone(),
                action: action.to_owned(),
                message: message_id.clone(),
                copies,
                unreachable,
                expiry: Some(expiry),
                notify,
                offer,
            },
            now,
        )
        .await
        .map_err(unavailable)?;
    app.outbox_ready.notify_waiters();
    app.jobs_changed.send_modify(|v| *v += 1);
    app.store
        .job(job_id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| unavailable("the job just recorded is gone"))
}

/// `GET /rs/v1/control/jobs/{id}[?after=V&wait=S]`: each destination's
/// state and result. With `after`, holds the answer up to `wait` seconds
/// (default 25, at most 60) until the job's version exceeds `after`.
async fn job(
    app: &AppServer,
    id: String,
    q: HashMap<String, String>,
    grants: &crate::security::Grants,
) -> Result<warp::reply::Response, warp::Rejection> {
    let bad = |t: String| refuse(http::StatusCode::BAD_REQUEST, t);
    let mut after = None;
    let mut wait = 25u64;
    for (k, v) in &q {
        match k.as_str() {
            "after" => {
                after = Some(
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("after {v:?}: a version number")))?,
                )
            }
            "wait" => {
                wait = v
                    .parse::<u64>()
                    .ok()
                    .filter(|w| *w <= 60)
                    .ok_or_else(|| bad(format!("wait {v:?}: seconds from 0 to 60")))?;
            }
            other => return Err(bad(format!("unknown parameter {other:?}"))),
        }
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    let mut changes = app.jobs_changed.subscribe();
    loop {
        changes.borrow_and_update();
        let job = visible_job(app, &id, grants).await?;
        let hold = after.is_some_and(|a| job.version <= a) && !job.is_done();
        if !hold {
            return Ok(xml_response(encode_job(&job)));
        }
        tokio::select! {
            r = changes.changed() => { if r.is_err() { return Ok(xml_response(encode_job(&job))); } }
            () = tokio::time::sleep_until(deadline) => return Ok(xml_response(encode_job(&job))),
            () = app.stopping.cancelled() => return Ok(xml_response(encode_job(&job))),
        }
    }
}

/// The job `id` if `grants` covers every one of its destinations.
pub(crate) async fn visible_job(
    app: &AppServer,
    id: &str,
    grants: &crate::security::Grants,
) -> Result<rs_protocol::codec::api::Job, warp::Rejection> {
    let job = app
        .store
        .job(id.to_owned())
        .await
        .map_err(unavailable)?
        .ok_or_else(|| refuse(http::StatusCode::NOT_FOUND, format!("no job {id:?}")))?;
    // Answered as a job that does not exist: naming the destination not
    // granted would tell another customer's component.
    if job.targets.iter().any(|t| !grants.component(&t.id)) {
        return Err(refuse(
            http::StatusCode::NOT_FOUND,
            format!("no job {id:?}"),
        ));
    }
    Ok(job)
}

/// `GET /rs/v1/control/jobs[?state=running|done&before=JOB&limit=N]`:
/// the newest jobs first, those of which `grants` covers every
/// destination, with how many destinations are in each state; `before`
/// pages on from a job (the last of the page before).
async fn jobs(
    app: &AppServer,
    q: HashMap<String, String>,
    grants: &crate::security::Grants,
) -> Result<warp::reply::Response, warp::Rejection> {
    let bad = |t: String| refuse(http::StatusCode::BAD_REQUEST, t);
    let mut limit = 50usize;
    let mut state = None;
    let mut before = None;
    for (k, v) in &q {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=1000).contains(l))
                    .ok_or_else(|| bad(format!("limit {v:?}: from 1 to 1000")))?;
            }
            "state" => match v.as_str() {
                "running" => state = Some(false),
                "done" => state = Some(true),
                _ => return Err(bad(format!("state {v:?}: running or done"))),
            },
            "before" => before = Some(v.clone()),
            other => return Err(bad(format!("unknown parameter {other:?}"))),
        }
    }
    let page = job_page(app, grants, state, before, limit).await?;
    Ok(xml_response(rs_protocol::codec::api::encode_jobs(&page)))
}

/// The newest jobs (before the job `before`) whose every destination
/// `grants` covers, finished (`state` true) or running (false) or both.
pub(crate) async fn job_page(
    app: &AppServer,
    grants: &crate::security::Grants,
    state: Option<bool>,
    before: Option<String>,
    limit: usize,
) -> Result<Vec<rs_protocol::codec::api::Job>, warp::Rejection> {
    // A job this admin may not see is answered as one that does not
    // exist: the answer tells nothing of another customer's jobs.
    if let Some(b) = &before {
        let seen = app.store.job(b.clone()).await.map_err(unavailable)?;
        if !seen.is_some_and(|j| j.targets.iter().all(|t| grants.component(&t.id))) {
            return Err(refuse(
                http::StatusCode::NOT_FOUND,
                format!("before {b:?}: no such job"),
            ));
        }
    }
    // Read in chunks until the page is full of jobs this admin may see.
    let mut page = Vec::new();
    let mut from = before;
    loop {
        let chunk = app
            .store
            .jobs(200, from.clone())
            .await
            .map_err(unavailable)?;
        let last = chunk.last().map(|j| j.id.clone());
        for j in chunk {
            if j.targets.iter().all(|t| grants.component(&t.id))
                && state.is_none_or(|done| j.is_done() == done)
            {
                page.push(j);
                if page.len() == limit {
                    return Ok(page);
                }
            }
        }
        match last {
            Some(l) => from = Some(l),
            None => return Ok(page),
        }
    }
}

/// `GET /rs/v1/control/groups[/{name}]`: definitions and members now.
/// Groups as `grants` may see them: a group selecting another customer is
/// not shown, and of the others only the members of granted customers.
async fn groups(
    app: &AppServer,
    name: Option<String>,
    grants: &crate::security::Grants,
) -> Result<warp::reply::Response, warp::Rejection> {
    let list = visible_groups(app, name, grants).await?;
    Ok(xml_response(encode_groups(&list)))
}

/// Groups (all, or the one named) as `grants` may see them.
pub(crate) async fn visible_groups(
    app: &AppServer,
    name: Option<String>,
    grants: &crate::security::Grants,
) -> Result<Vec<(rs_protocol::codec::api::GroupDef, Vec<RsId>)>, warp::Rejection> {
    let mut list = app.store.groups(name.clone()).await.map_err(unavailable)?;
    list.retain(|(g, _)| {
        g.customer
            .as_ref()
            .is_none_or(|c| grants.customer(c.as_str()))
    });
    for (g, members) in &mut list {
        g.members.retain(|m| grants.component(m));
        members.retain(|m| grants.component(m));
    }
    if let (Some(n), true) = (&name, list.is_empty()) {
        return Err(refuse(
            http::StatusCode::NOT_FOUND,
            format!("no group {n:?}"),
        ));
    }
    Ok(list)
}

/// `PUT /rs/v1/control/groups/{name}`: creates or replaces a group.
async fn put_group(
    app: &AppServer,
    name: String,
    body: &[u8],
) -> Result<warp::reply::Response, warp::Rejection> {
    let bad = |t: String| refuse(http::StatusCode::BAD_REQUEST, t);
    let g = decode_group(body, &rs_protocol::codec::Limits::default())
        .map_err(|e| bad(format!("group: {e}")))?;
    if g.name != name {
        return Err(bad(format!(
            "the document names group {:?} but the URL {name:?}",
            g.name
        )));
    }
    save_group(app, g).await?;
    groups(app, Some(name), &crate::security::Grants::All).await
}

/// Creates or replaces a group (for an admin of every customer).
pub(crate) async fn save_group(
    app: &AppServer,
    g: rs_protocol::codec::api::GroupDef,
) -> Result<(), warp::Rejection> {
    if g.members.is_empty() && !g.has_selector() {
        return Err(refuse(
            http::StatusCode::BAD_REQUEST,
            format!(
                "group {:?}: give members, a selector (customer, kind, tag) or both",
                g.name
            ),
        ));
    }
    app.store
        .put_group(g, app.clock.now())
        .await
        .map_err(unavailable)
}

async fn delete_group(
    app: &AppServer,
    name: String,
) -> Result<warp::reply::Response, warp::Rejection> {
    remove_group(app, name).await?;
    Ok(warp::reply::Reply::into_response(
        http::StatusCode::NO_CONTENT,
    ))
}

/// Deletes a group (for an admin of every customer).
pub(crate) async fn remove_group(app: &AppServer, name: String) -> Result<(), warp::Rejection> {
    if app
        .store
        .delete_group(name.clone())
        .await
        .map_err(unavailable)?
    {
        Ok(())
    } else {
        Err(refuse(
            http::StatusCode::NOT_FOUND,
            format!("no group {name:?}"),
        ))
    }
}

/// `PUT /rs/v1/control/components/{id}/tags`: replaces a component's tags.
async fn put_tags(
    app: &AppServer,
    id: String,
    body: &[u8],
    grants: &crate::security::Grants,
) -> Result<warp::reply::Response, warp::Rejection> {
    let bad = |t: String| refuse(http::StatusCode::BAD_REQUEST, t);
    let component = RsId::new(&id).map_err(|e| bad(format!("component {id:?}: {e}")))?;
    // Tags move components into and out of groups other admins use.
    if !grants.component(&component) {
        return Err(crate::security::Grants::refuse(component.as_str()));
    }
    let tags = decode_tags(body, &rs_protocol::codec::Limits::default())
        .map_err(|e| bad(format!("tags: {e}")))?;
    if !app
        .store
        .set_tags(component, tags.clone())
        .await
        .map_err(unavailable)?
    {
        return Err(refuse(
            http::StatusCode::NOT_FOUND,
            format!("unknown component {id}: no such component has reported to this server"),
        ));
    }
    Ok(xml_response(encode_tags(&tags)))
}
