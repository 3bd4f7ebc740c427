//! The read side of the control API: status, stored messages, components.
//! Documents are XML (see docs/operations.md).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use rs_common::codec::{XmlOut, encode_status};
use rs_common::control::{NodeState, StatusNode};
use rs_common::ingress::xml_response;
use rs_common::model::{ContentKind, Detail, Severity};
use rs_common::server::Refusal;
use rs_common::{RsId, Timestamp};
use warp::Filter;

use crate::AppServer;
use crate::store::Query;

pub fn routes(
    app: Arc<AppServer>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let status = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "status")
            .and(warp::get())
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
            .and_then(move |q| {
                let app = app.clone();
                async move { messages(&app, q).await }
            })
    };
    let components = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "components")
            .and(warp::get())
            .and_then(move || {
                let app = app.clone();
                async move { components(&app).await }
            })
    };
    let send = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "send")
            .and(warp::post())
            .and(warp::body::content_length_limit(1 << 20))
            // Bounded: content_length_limit refuses a body over 1 MiB or
            // without a Content-Length.
            .and({
                #[allow(clippy::disallowed_methods)]
                warp::body::bytes()
            })
            .and_then(move |body: bytes::Bytes| {
                let app = app.clone();
                async move { send(&app, &body).await }
            })
    };
    let job = warp::path!("rs" / "v1" / "control" / "jobs" / String)
        .and(warp::get())
        .and_then(move |id: String| {
            let app = app.clone();
            async move { job(&app, id).await }
        });
    status
        .or(messages)
        .unify()
        .or(components)
        .unify()
        .or(send)
        .unify()
        .or(job)
        .unify()
}

fn refuse(status: http::StatusCode, text: impl Into<String>) -> warp::Rejection {
    warp::reject::custom(Refusal::new(status, text))
}

/// The server's own status tree.
pub async fn status_tree(app: &AppServer) -> StatusNode {
    let s = &app.stats;
    let mut metrics = vec![
        ("envelopes.received", s.envelopes.load(Ordering::Relaxed)),
        ("messages.received", s.received.load(Ordering::Relaxed)),
        ("messages.accepted", s.accepted.load(Ordering::Relaxed)),
        ("messages.duplicates", s.duplicates.load(Ordering::Relaxed)),
        ("messages.rejected", s.rejected.load(Ordering::Relaxed)),
        ("messages.expired", s.expired.load(Ordering::Relaxed)),
        ("messages.retried", s.retried.load(Ordering::Relaxed)),
    ];
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

async fn messages(
    app: &AppServer,
    q: HashMap<String, String>,
) -> Result<warp::reply::Response, warp::Rejection> {
    let bad = |t: String| refuse(http::StatusCode::BAD_REQUEST, t);
    let mut query = Query {
        limit: 100,
        ..Query::default()
    };
    for (k, v) in q {
        match k.as_str() {
            "component" => {
                RsId::new(&v).map_err(|e| bad(format!("component {v:?}: {e}")))?;
                query.component = Some(v);
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
            "limit" => {
                query.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| bad(format!("limit {v:?}: a number from 1 to 10000")))?;
            }
            other => return Err(bad(format!("unknown parameter {other:?}"))),
        }
    }
    let rows = app
        .store
        .query(query)
        .await
        .map_err(|e| refuse(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let mut buf = Vec::with_capacity(256 + rows.len() * 1024);
    let mut x = XmlOut::document(&mut buf);
    x.open("messages")
        .attr_num("count", rows.len() as u64)
        .gt()
        .newline();
    for r in &rows {
        let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
        x.open("message")
            .attr("id", &r.id)
            .attr("type", &r.kind)
            .attr("component", &r.component)
            .attr("class", &r.class)
            .attr("sub", &r.subclass)
            .attr_opt("severity", r.severity.map(Severity::as_str))
            .attr_ts("created", ts(r.created))
            .attr_ts("received", ts(r.received))
            .attr("via", &r.via)
            .gt();
        if r.kind == "data" {
            x.open("data")
                .attr("mime", &r.content_type)
                .attr_num("size", r.content.len() as u64);
            match std::str::from_utf8(&r.content) {
                Ok(text) if r.content_type.starts_with("text/") => {
                    x.gt().text(text).close("data");
                }
                _ => {
                    x.attr("encoding", "base64")
                        .gt()
                        .text(&base64::engine::general_purpose::STANDARD.encode(&r.content))
                        .close("data");
                }
            }
        } else {
            // XML contents were validated when stored; embed the document.
            let doc = &r.content[..];
            let body = match memchr_decl_end(doc) {
                Some(i) => &doc[i..],
                None => doc,
            };
            x.buf.extend_from_slice(body.trim_ascii());
        }
        x.close("message").newline();
    }
    x.close("messages").newline();
    Ok(xml_response(buf))
}

/// The offset just after an XML declaration at the start of `doc`.
fn memchr_decl_end(doc: &[u8]) -> Option<usize> {
    if doc.starts_with(b"<?xml") {
        doc.windows(2).position(|w| w == b"?>").map(|i| i + 2)
    } else {
        None
    }
}

async fn components(app: &AppServer) -> Result<warp::reply::Response, warp::Rejection> {
    let rows = app
        .store
        .components()
        .await
        .map_err(|e| refuse(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("components")
        .attr_num("count", rows.len() as u64)
        .gt()
        .newline();
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    for c in &rows {
        x.open("component")
            .attr("id", &c.id)
            .attr("kind", &c.kind)
            .attr_opt("version", c.version.as_deref())
            .attr_ts("first-seen", ts(c.first_seen))
            .attr_ts("last-seen", ts(c.last_seen))
            .attr("via", &c.via)
            .attr_opt("state", c.state.as_deref());
        match &c.status {
            Some(xml) => {
                x.gt();
                let body = memchr_decl_end(xml).map_or(&xml[..], |i| &xml[i..]);
                x.buf.extend_from_slice(body.trim_ascii());
                x.close("component");
            }
            None => {
                x.empty();
            }
        }
        x.newline();
    }
    x.close("components").newline();
    Ok(xml_response(buf))
}

/// `POST /rs/v1/control/send`: answers at once with a job ID; each
/// destination's outcome arrives later (`GET /rs/v1/control/jobs/{id}`).
async fn send(app: &AppServer, body: &[u8]) -> Result<warp::reply::Response, warp::Rejection> {
    let bad = |status, t: String| refuse(status, t);
    let req = rs_common::codec::decode_send_request(body, &rs_common::codec::Limits::default())
        .map_err(|e| bad(http::StatusCode::BAD_REQUEST, format!("send request: {e}")))?;
    let now = app.clock.now();
    // One copy per next hop, listing the destinations behind it.
    let mut by_hop: std::collections::BTreeMap<String, Vec<RsId>> =
        std::collections::BTreeMap::new();
    for d in &req.to {
        match app.store.next_hop(d.clone()).await {
            Ok(Some(hop)) => by_hop.entry(hop).or_default().push(d.clone()),
            Ok(None) => {
                return Err(bad(
                    http::StatusCode::NOT_FOUND,
                    format!(
                        "unknown destination {d}: no such component has reported to this server"
                    ),
                ));
            }
            Err(e) => return Err(bad(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        }
    }
    let message_id = rs_common::MessageId::generate();
    let job_id = rs_common::MessageId::generate().to_string();
    let copies = by_hop
        .into_iter()
        .map(|(hop, dests)| {
            let mut m =
                rs_common::control::control_message(message_id.clone(), dests, &req.action, now);
            m.header.routing.push(rs_common::Hop {
                component: app.id.clone(),
                received: now,
                sent: Some(now),
            });
            (hop, m.to_raw())
        })
        .collect();
    let expiry = now.saturating_add(std::time::Duration::from_secs(
        req.ttl_secs.unwrap_or(86_400),
    ));
    app.store
        .create_job(
            job_id.clone(),
            req.action.name().to_owned(),
            message_id.clone(),
            copies,
            Some(expiry),
            now,
        )
        .await
        .map_err(|e| bad(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    app.outbox_ready.notify_waiters();
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("job")
        .attr("id", &job_id)
        .attr("message", message_id.as_str())
        .attr("action", req.action.name())
        .attr_num("targets", req.to.len() as u64)
        .empty()
        .newline();
    Ok(xml_response(buf))
}

/// `GET /rs/v1/control/jobs/{id}`: each destination's state and result.
async fn job(app: &AppServer, id: String) -> Result<warp::reply::Response, warp::Rejection> {
    let job = app
        .store
        .job(id.clone())
        .await
        .map_err(|e| refuse(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .ok_or_else(|| refuse(http::StatusCode::NOT_FOUND, format!("no job {id:?}")))?;
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    let done = job
        .targets
        .iter()
        .all(|t| matches!(t.state.as_str(), "succeeded" | "failed" | "expired"));
    x.open("job")
        .attr("id", &job.id)
        .attr("message", &job.message)
        .attr("action", &job.action)
        .attr_ts("created", ts(job.created))
        .attr("state", if done { "done" } else { "running" })
        .gt()
        .newline();
    for t in &job.targets {
        x.open("target")
            .attr("id", &t.dest)
            .attr("state", &t.state)
            .attr_ts("updated", ts(t.updated))
            .attr_opt("code", t.code.as_deref());
        match (&t.text, &t.result) {
            (None, None) => {
                x.empty();
            }
            (text, result) => {
                x.gt();
                if let Some(text) = text {
                    x.text_element("text", text);
                }
                if let Some(result) = result {
                    x.text_element("result", result);
                }
                x.close("target");
            }
        }
        x.newline();
    }
    x.close("job").newline();
    Ok(xml_response(buf))
}
