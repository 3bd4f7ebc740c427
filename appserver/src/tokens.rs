//! API tokens: admins without a client certificate (scripts, and the web
//! portal's login). A provider's admin makes one with its grants and a
//! lifetime (`POST /rs/v1/control/tokens`); the caller sends it as
//! `Authorization: Bearer SECRET` over TLS without a certificate (or on a
//! plain loopback listener, narrowing `local`). The server keeps only its
//! SHA-256, looks it up at every request (a revocation holds at once, in
//! every member of a farm), and the audit log names its requests
//! `token:NAME`.

use std::sync::Arc;

use rs_net::server::Refusal;
use rs_node::ingress::xml_response;
use rs_protocol::Timestamp;
use rs_protocol::codec::api::{ApiToken, decode_token_request, encode_tokens};
use warp::Filter;

use crate::AppServer;
use crate::security::{Admin, random_secret, sha256_hex};
use crate::store::admins::TokenRow;

/// How long a token is good for when the request does not say.
const DEFAULT_DAYS: u64 = 90;

fn listed(t: TokenRow) -> ApiToken {
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    ApiToken {
        name: t.name,
        customers: t.customers,
        created: ts(t.created),
        created_by: t.created_by,
        expires: ts(t.expires),
        revoked: t.revoked.map(ts),
        secret: None,
    }
}

/// `POST`, `GET /rs/v1/control/tokens`, `DELETE /rs/v1/control/tokens/{name}`:
/// for admins of every customer.
pub fn routes(app: Arc<AppServer>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let create = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "tokens")
            .and(warp::post())
            .and(crate::security::provider(&app))
            .and(crate::control::small_body())
            .then(move |a: Admin, body: bytes::Bytes| {
                let app = app.clone();
                async move { create(&app, &a, &body).await }
            })
    };
    let list = {
        let app = app.clone();
        warp::path!("rs" / "v1" / "control" / "tokens")
            .and(warp::get())
            .and(crate::security::provider(&app))
            .then(move |_: Admin| {
                let app = app.clone();
                async move {
                    match app.store.tokens().await {
                        Ok(rows) => {
                            let list: Vec<ApiToken> = rows.into_iter().map(listed).collect();
                            xml_response(encode_tokens(&list))
                        }
                        Err(e) => unavailable(e),
                    }
                }
            })
    };
    let revoke = warp::path!("rs" / "v1" / "control" / "tokens" / String)
        .and(warp::delete())
        .and(crate::security::provider(&app))
        .then(move |name: String, _: Admin| {
            let app = app.clone();
            let name = crate::control::decoded(&name);
            async move {
                let now = app.clock.now().as_millis();
                match app.store.revoke_token(name.clone(), now).await {
                    Ok(true) => {
                        tracing::info!("API token {name} revoked");
                        let mut r = warp::reply::Response::new(Vec::new().into());
                        *r.status_mut() = http::StatusCode::NO_CONTENT;
                        r
                    }
                    Ok(false) => Refusal::new(
                        http::StatusCode::NOT_FOUND,
                        format!("no token {name:?} (or revoked already)"),
                    )
                    .response(),
                    Err(e) => unavailable(e),
                }
            }
        });
    create.or(list).unify().or(revoke).unify().boxed()
}

fn unavailable(e: impl std::fmt::Display) -> warp::reply::Response {
    Refusal::new(http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()).response()
}

async fn create(app: &AppServer, a: &Admin, body: &[u8]) -> warp::reply::Response {
    let req = match decode_token_request(body, &rs_protocol::codec::Limits::default()) {
        Ok(r) => r,
        Err(e) => {
            return Refusal::new(http::StatusCode::BAD_REQUEST, format!("token request: {e}"))
                .response();
        }
    };
    let secret = match random_secret("rst_", 32) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("API token: {e}");
            return Refusal::new(http::StatusCode::INTERNAL_SERVER_ERROR, e).response();
        }
    };
    let now = app.clock.now();
    let days = req.days.unwrap_or(DEFAULT_DAYS);
    let expires = now.saturating_add(std::time::Duration::from_secs(days * 86_400));
    let row = TokenRow {
        name: req.name.clone(),
        customers: req.customers.clone(),
        created: now.as_millis(),
        created_by: a.name.clone(),
        expires: expires.as_millis(),
        revoked: None,
    };
    match app.store.add_token(row.clone(), sha256_hex(&secret)).await {
        Ok(true) => {
            tracing::info!(
                "API token {} made by {} for customers {}",
                req.name,
                a.name,
                req.customers
            );
            let mut t = listed(row);
            t.secret = Some(secret);
            xml_response(encode_tokens(&[t]))
        }
        Ok(false) => Refusal::new(
            http::StatusCode::CONFLICT,
            format!(
                "a token named {:?} exists (names are not reused while listed)",
                req.name
            ),
        )
        .response(),
        Err(e) => unavailable(e),
    }
}
