//! Staged rollouts: one control action sent to destinations wave by wave
//! (docs/control-api.md, Rollouts). The next wave starts only when enough
//! of the one before succeeded (by itself, or once approved); too many
//! destinations of a wave failing, expiring or staying silent halts the
//! rollout, and no later wave is sent. Each wave is an ordinary job.
//!
//! The controller runs on the farm's leader (every member on SQLite is
//! its own): it looks at every running rollout each second and whenever a
//! job changes. Its every step is a conditional update of the rollout's
//! state and wave in the store, so an admin's pause or abort and the
//! controller never both win, and a restarted server carries on from the
//! stored state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rs_net::server::Refusal;
use rs_node::ingress::xml_response;
use rs_protocol::codec::Limits;
use rs_protocol::codec::api::{
    Job, Rollout, RolloutPayload, RolloutRequest, RolloutWave, Waves, decode_rollout_request,
    encode_rollout, encode_rollouts,
};
use rs_protocol::{RsId, Timestamp};
use tokio_util::sync::CancellationToken;
use warp::Filter;

use crate::AppServer;
use crate::control::refuse;
use crate::security::{Admin, Grants};
use crate::store::rollouts::{RolloutRow, WaveRow};

/// How often running rollouts are looked at (besides every job change).
const TICK: Duration = Duration::from_secs(1);

fn unavailable(e: impl std::fmt::Display) -> warp::Rejection {
    refuse(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// Splits the destinations into waves.
async fn waves_of(
    app: &AppServer,
    dests: BTreeSet<RsId>,
    waves: &Waves,
) -> Result<Vec<Vec<RsId>>, warp::Rejection> {
    let total = dests.len();
    let all: Vec<RsId> = dests.into_iter().collect();
    Ok(match waves {
        Waves::Sizes(sizes) => {
            let mut out = Vec::new();
            let mut rest = all.as_slice();
            for (i, s) in sizes.iter().enumerate() {
                if rest.is_empty() {
                    break;
                }
                // The last size takes whatever is left.
                let n = if i + 1 == sizes.len() {
                    rest.len()
                } else {
                    s.of(total).clamp(1, rest.len())
                };
                out.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            out
        }
        Waves::Customer => {
            let mut by: BTreeMap<String, Vec<RsId>> = BTreeMap::new();
            for d in all {
                by.entry(d.customer().as_str().to_owned())
                    .or_default()
                    .push(d);
            }
            by.into_values().collect()
        }
        Waves::Mlm => {
            let (by_hop, unreachable) = rs_node::next_hop::split(all, |d| app.store.next_hop(d))
                .await
                .map_err(unavailable)?;
            // Those reached directly (their hop is themselves), and those
            // not reachable, are one wave after the MLMs' own.
            let mut direct: Vec<RsId> = unreachable;
            let mut out = Vec::new();
            for (hop, dests) in by_hop {
                if dests.len() == 1 && dests[0].as_str() == hop {
                    direct.extend(dests);
                } else {
                    out.push(dests);
                }
            }
            if !direct.is_empty() {
                direct.sort();
                out.push(direct);
            }
            out
        }
    })
}

/// The rollout as the API shows it, each destination with its state.
pub(crate) async fn view(
    app: &AppServer,
    row: &RolloutRow,
    waves: &[WaveRow],
) -> Result<Rollout, warp::Rejection> {
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    let mut out = Vec::new();
    for w in waves {
        let members: Vec<RsId> = w
            .members
            .split_whitespace()
            .filter_map(|m| RsId::new(m).ok())
            .collect();
        let job: Option<Job> = match &w.job {
            Some(j) => app.store.job(j.clone()).await.map_err(unavailable)?,
            None => None,
        };
        let (state, members) = match &job {
            None => (
                "not-sent".to_owned(),
                members
                    .into_iter()
                    .map(|m| (m, "not-sent".to_owned()))
                    .collect(),
            ),
            Some(j) => (
                if !j.is_done() {
                    "running"
                } else if j.targets.iter().all(|t| t.state == "succeeded") {
                    "succeeded"
                } else {
                    "done"
                }
                .to_owned(),
                j.targets
                    .iter()
                    .map(|t| (t.id.clone(), t.state.clone()))
                    .collect(),
            ),
        };
        out.push(RolloutWave {
            n: u32::try_from(w.n + 1).unwrap_or(u32::MAX),
            state,
            job: w.job.clone(),
            started: w.started.map(ts),
            members,
        });
    }
    Ok(Rollout {
        id: row.id.clone(),
        name: row.name.clone(),
        action: row.action.clone(),
        state: row.state.clone(),
        wave: u32::try_from(row.wave + 1).unwrap_or(u32::MAX),
        reason: row.reason.clone(),
        created: ts(row.created),
        created_by: row.created_by.clone(),
        waves: out,
    })
}

/// The rollout `id` if `grants` covers every one of its destinations (one
/// that does not is answered as one that does not exist).
pub(crate) async fn visible(
    app: &AppServer,
    id: &str,
    grants: &Grants,
) -> Result<(RolloutRow, Vec<WaveRow>), warp::Rejection> {
    let found = app
        .store
        .rollout(id.to_owned())
        .await
        .map_err(unavailable)?;
    match found {
        Some((r, waves))
            if waves.iter().all(|w| {
                w.members
                    .split_whitespace()
                    .all(|m| RsId::new(m).is_ok_and(|id| grants.component(&id)))
            }) =>
        {
            Ok((r, waves))
        }
        _ => Err(refuse(
            http::StatusCode::NOT_FOUND,
            format!("no rollout {id:?}"),
        )),
    }
}

/// `POST /rs/v1/control/rollouts`.
pub(crate) async fn create(
    app: &AppServer,
    admin: &Admin,
    body: &[u8],
) -> Result<Rollout, warp::Rejection> {
    let req = decode_rollout_request(body, &Limits::default())
        .map_err(|e| refuse(http::StatusCode::BAD_REQUEST, format!("rollout: {e}")))?;
    let dests = crate::control::destinations_of(app, &admin.grants, &req.to, &req.groups).await?;
    // Every destination must be known: a wave of strangers would only fail.
    for d in &dests {
        if app
            .store
            .next_hop(d.clone())
            .await
            .map_err(unavailable)?
            .is_none()
        {
            return Err(refuse(
                http::StatusCode::NOT_FOUND,
                format!("unknown destination {d}: no such component has reported to this server"),
            ));
        }
    }
    if let RolloutPayload::File { sha256, .. } = &req.payload {
        let hex = rs_protocol::codec::sha256_hex(sha256);
        if app
            .store
            .published_file(hex.clone())
            .await
            .map_err(unavailable)?
            .is_none()
        {
            return Err(refuse(
                http::StatusCode::NOT_FOUND,
                format!("no published file {hex}; PUT it to /rs/v1/control/files/NAME first"),
            ));
        }
    }
    let waves = waves_of(app, dests, &req.waves).await?;
    let now = app.clock.now().as_millis();
    let row = RolloutRow {
        id: rs_protocol::MessageId::generate().to_string(),
        name: req.name.clone(),
        action: req.payload.name().to_owned(),
        request: String::from_utf8_lossy(body).into_owned(),
        created_by: admin.name.clone(),
        state: "running".into(),
        wave: 0,
        reason: None,
        created: now,
    };
    let lists: Vec<String> = waves
        .iter()
        .map(|w| w.iter().map(RsId::as_str).collect::<Vec<_>>().join(" "))
        .collect();
    app.store
        .create_rollout(row.clone(), lists)
        .await
        .map_err(unavailable)?;
    tracing::info!(
        "rollout {} ({}) of {} by {}: {} waves",
        row.id,
        row.name,
        row.action,
        admin.name,
        waves.len()
    );
    // The controller starts the first wave now.
    app.jobs_changed.send_modify(|v| *v += 1);
    let (row, waves) = visible(app, &row.id, &Grants::All).await?;
    view(app, &row, &waves).await
}

/// An admin's step: `pause`, `resume`, `approve` or `abort`.
pub(crate) async fn act(
    app: &AppServer,
    admin: &Admin,
    id: &str,
    op: &str,
) -> Result<Rollout, warp::Rejection> {
    let (row, waves) = visible(app, id, &admin.grants).await?;
    let last = waves.len() as i64 - 1;
    let (state, wave) = (row.state.as_str(), row.wave);
    let to = match (op, state) {
        ("pause", "running" | "waiting") => ("paused", wave),
        ("resume", "paused") => ("running", wave),
        // A halted rollout resumes with its next wave: the halting one
        // stays as it ended.
        ("resume", "halted") if wave < last => ("running", wave + 1),
        ("resume", "halted") => ("completed", wave),
        ("approve", "waiting") => ("running", wave + 1),
        ("abort", "running" | "waiting" | "paused" | "halted") => ("aborted", wave),
        ("pause" | "resume" | "approve" | "abort", _) => {
            return Err(refuse(
                http::StatusCode::CONFLICT,
                format!("rollout {id} is {state}: it cannot {op}"),
            ));
        }
        _ => {
            return Err(refuse(
                http::StatusCode::NOT_FOUND,
                format!("{op:?}: pause, resume, approve or abort"),
            ));
        }
    };
    let now = app.clock.now().as_millis();
    let reason = match op {
        "abort" => Some(format!("aborted by {}", admin.name)),
        "pause" => Some(format!("paused by {}", admin.name)),
        _ => None,
    };
    let moved = app
        .store
        .move_rollout(
            id.to_owned(),
            (row.state.clone(), wave),
            (to.0.to_owned(), to.1),
            reason,
            now,
        )
        .await
        .map_err(unavailable)?;
    if !moved {
        return Err(refuse(
            http::StatusCode::CONFLICT,
            format!("rollout {id} changed meanwhile; look again"),
        ));
    }
    tracing::info!("rollout {id}: {op} by {} ({state} -> {})", admin.name, to.0);
    app.jobs_changed.send_modify(|v| *v += 1);
    let (row, waves) = visible(app, id, &Grants::All).await?;
    view(app, &row, &waves).await
}

/// Advances every running rollout, on the leader, until `stop`.
pub async fn controller(app: Arc<AppServer>, stop: CancellationToken) {
    let mut changes = app.jobs_changed.subscribe();
    loop {
        if app.is_leader() {
            match app.store.rollouts(Some("running".into())).await {
                Ok(list) => {
                    for r in list {
                        if let Err(e) = step(&app, &r.id).await {
                            tracing::warn!("rollout {}: {e}", r.id);
                        }
                    }
                }
                Err(e) => tracing::warn!("rollouts: {e}"),
            }
        }
        changes.borrow_and_update();
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            r = changes.changed() => { if r.is_err() { return; } }
            () = stop.cancelled() => return,
        }
    }
}

/// One look at a running rollout: start its wave, or judge it.
async fn step(app: &AppServer, id: &str) -> Result<(), String> {
    let Some((row, waves)) = app
        .store
        .rollout(id.to_owned())
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    if row.state != "running" {
        return Ok(());
    }
    let req: RolloutRequest = decode_rollout_request(row.request.as_bytes(), &Limits::default())
        .map_err(|e| format!("its request: {e}"))?;
    let Some(wave) = waves.iter().find(|w| w.n == row.wave) else {
        return Err(format!("no wave {}", row.wave + 1));
    };
    let now = app.clock.now();
    let halt = |reason: String| {
        let id = id.to_owned();
        let from = (row.state.clone(), row.wave);
        async move {
            tracing::warn!("rollout {id} halted: {reason}");
            app.store
                .move_rollout(
                    id,
                    from,
                    ("halted".into(), row.wave),
                    Some(reason),
                    now.as_millis(),
                )
                .await
                .map_err(|e| e.to_string())
        }
    };
    // The wave's job is named before it is started: a member that takes
    // over as leader, or this one after a crash, starts that job, never a
    // second one.
    let job_id = match &wave.job {
        Some(j) => j.clone(),
        None => {
            let j = rs_protocol::MessageId::generate().to_string();
            let named = app
                .store
                .wave_started(id.to_owned(), row.wave, j.clone(), now.as_millis())
                .await
                .map_err(|e| e.to_string())?;
            if !named {
                // Another member named it first.
                return Ok(());
            }
            j
        }
    };
    let Some(job) = app
        .store
        .job(job_id.clone())
        .await
        .map_err(|e| e.to_string())?
    else {
        // Named, not started yet (or its start failed): start it now.
        let members: Vec<RsId> = wave
            .members
            .split_whitespace()
            .filter_map(|m| RsId::new(m).ok())
            .collect();
        // The wave's job expires after twice the silence timeout (at
        // least two minutes): by then the rollout has judged it.
        let ttl = Some(req.silence_secs.max(60) * 2);
        let started = match &req.payload {
            RolloutPayload::Action(action) => {
                crate::control::start_job(
                    app,
                    &Grants::All,
                    &members,
                    &[],
                    ttl,
                    None,
                    action.name(),
                    None,
                    |mid, dests, expiry, now| {
                        rs_protocol::control_messages::control_message(
                            mid,
                            dests,
                            Some(expiry),
                            action,
                            now,
                        )
                    },
                    Some(job_id.clone()),
                )
                .await
            }
            RolloutPayload::File { sha256, class, sub } => {
                crate::publish::start_offer(
                    app,
                    &Grants::All,
                    rs_protocol::codec::api::OfferRequest {
                        to: members,
                        groups: Vec::new(),
                        sha256: *sha256,
                        class: class.clone(),
                        sub: sub.clone(),
                        ttl_secs: ttl,
                        notify: None,
                    },
                    Some(job_id.clone()),
                )
                .await
            }
        };
        match started {
            Ok(job) => {
                tracing::info!("rollout {id}: wave {} sent as job {}", row.wave + 1, job.id);
            }
            Err(r) => {
                let why = r
                    .find::<Refusal>()
                    .map(|f| f.text.clone())
                    .unwrap_or_else(|| "refused".into());
                // Storage that failed is tried again (with the same job
                // ID); a refusal halts.
                if r.find::<Refusal>()
                    .is_some_and(|f| f.status.is_server_error())
                {
                    return Err(why);
                }
                halt(format!("wave {} could not be sent: {why}", row.wave + 1)).await?;
            }
        }
        return Ok(());
    };
    let n = job.targets.len();
    let succeeded = job.count("succeeded");
    let failed = job.count("failed") + job.count("expired");
    let silent_since = wave.started.unwrap_or(now.as_millis())
        + i64::try_from(req.silence_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let silent = if now.as_millis() >= silent_since {
        job.targets.iter().filter(|t| !t.is_final()).count()
    } else {
        0
    };
    let w = row.wave + 1;
    if failed + silent > req.max_failed as usize {
        let mut why = format!("wave {w}: {failed} of {n} failed or expired");
        if silent > 0 {
            why.push_str(&format!(", {silent} silent for {} s", req.silence_secs));
        }
        why.push_str(&format!(" (at most {} allowed)", req.max_failed));
        halt(why).await?;
    } else if succeeded * 100 >= usize::from(req.success_pct) * n {
        let last = row.wave + 1 >= waves.len() as i64;
        let to = if last {
            ("succeeded", row.wave)
        } else if req.approve {
            ("waiting", row.wave)
        } else {
            ("running", row.wave + 1)
        };
        app.store
            .move_rollout(
                id.to_owned(),
                (row.state.clone(), row.wave),
                (to.0.into(), to.1),
                None,
                now.as_millis(),
            )
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            "rollout {id}: wave {w} succeeded ({succeeded} of {n}); {}",
            to.0
        );
        if to.0 == "running" {
            // Start the next wave now rather than at the next tick.
            Box::pin(step(app, id)).await?;
        }
    } else if job.is_done() {
        halt(format!(
            "wave {w}: {succeeded} of {n} succeeded, below {}%",
            req.success_pct
        ))
        .await?;
    }
    Ok(())
}

/// `/rs/v1/control/rollouts[/{id}[/{op}]]`.
pub fn routes(app: Arc<AppServer>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let create_route = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "rollouts")
            .and(warp::post())
            .and(crate::control::small_body())
            .and(crate::security::admin(&app))
            .and_then(move |body: bytes::Bytes, admin: Admin| {
                let app = app.clone();
                async move {
                    let r = create(&app, &admin, &body).await?;
                    Ok::<_, warp::Rejection>(xml_response(encode_rollout(&r)))
                }
            })
    };
    let list = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "rollouts")
            .and(warp::get())
            .and(crate::security::admin(&app))
            .and_then(move |admin: Admin| {
                let app = app.clone();
                async move {
                    let rows = app.store.rollouts(None).await.map_err(unavailable)?;
                    let mut out = Vec::new();
                    for r in rows {
                        // Listed when every destination is granted.
                        if let Ok((row, waves)) = visible(&app, &r.id, &admin.grants).await {
                            let mut v = view(&app, &row, &waves).await?;
                            v.waves.iter_mut().for_each(|w| w.members.clear());
                            out.push(v);
                        }
                    }
                    Ok::<_, warp::Rejection>(xml_response(encode_rollouts(&out)))
                }
            })
    };
    let one = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "rollouts" / String)
            .and(warp::get())
            .and(crate::security::admin(&app))
            .and_then(move |id: String, admin: Admin| {
                let app = app.clone();
                async move {
                    let (row, waves) = visible(&app, &id, &admin.grants).await?;
                    let v = view(&app, &row, &waves).await?;
                    Ok::<_, warp::Rejection>(xml_response(encode_rollout(&v)))
                }
            })
    };
    let op = warp::path!("rs" / "v1" / "control" / "rollouts" / String / String)
        .and(warp::post())
        .and(crate::security::admin(&app))
        .and_then(move |id: String, op: String, admin: Admin| {
            let app = app.clone();
            async move {
                let v = act(&app, &admin, &id, &op).await?;
                Ok::<_, warp::Rejection>(xml_response(encode_rollout(&v)))
            }
        });
    create_route
        .or(list)
        .unify()
        .or(one)
        .unify()
        .or(op)
        .unify()
        .boxed()
}
