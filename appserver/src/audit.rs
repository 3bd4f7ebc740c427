//! The audit log's writer: every control API request and every action in
//! the portal, after its answer, with who made it (a certificate's CN, an
//! API token's or a portal session's admin). Apart from security.rs,
//! which the portal depends on, so that neither depends on the other.

use std::time::Duration;

use rs_net::server::Peer;

use crate::AppServer;

/// Records control API requests and the portal's actions in the audit
/// log (called by the accept loop after each response).
#[derive(Debug)]
pub struct Auditor(pub std::sync::Weak<AppServer>);

impl rs_net::server::Observer for Auditor {
    fn wants(&self, method: &http::Method, uri: &http::Uri) -> bool {
        let path = uri.path();
        // The portal's pages are reads of what the API shows; its actions
        // are audited, its login by the login itself (it knows the token).
        path.starts_with("/rs/v1/control/")
            || (path.starts_with(crate::portal::ROOT)
                && method != http::Method::GET
                && path != crate::portal::LOGIN)
    }

    fn responded(
        &self,
        peer: &Peer,
        head: &rs_net::server::RequestHead,
        status: http::StatusCode,
        took: Duration,
    ) {
        let Some(app) = self.0.upgrade() else { return };
        let from = match peer {
            Peer::Tls(a, _) | Peer::Tcp(a) => a.to_string(),
            Peer::Local => "local".into(),
        };
        let path = head
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let method = head.method.to_string();
        let now = app.clock.now().as_millis();
        let millis = took.as_millis() as i64;
        let status = i64::from(status.as_u16());
        let peer = peer.clone();
        let authorization = head
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::security::bearer)
            .map(str::to_owned);
        let session = crate::portal::session_cookie(&head.headers);
        tokio::spawn(async move {
            let admin = audited_as(&app, &peer, authorization, session).await;
            let r = app
                .store
                .audit_record(now, admin, from, method, path, status, millis)
                .await;
            if let Err(e) = r {
                tracing::error!("audit log: {e}");
            }
        });
    }
}

/// The name the audit log gives the caller: as [`caller`] decides, and for
/// the portal the admin of its session.
async fn audited_as(
    app: &AppServer,
    peer: &Peer,
    token: Option<String>,
    session: Option<String>,
) -> String {
    match (peer, token, session) {
        (Peer::Tls(_, Some(id)), _, _) => id.name.clone(),
        (_, Some(t), _) => match app.store.token_name(crate::security::sha256_hex(&t)).await {
            Ok(Some(name)) => crate::security::token_admin_name(&name),
            Ok(None) => "(unknown token)".into(),
            Err(e) => format!("(token not looked up: {e})"),
        },
        (_, None, Some(cookie)) => match crate::portal::session_admin(app, &cookie).await {
            Some(name) => name,
            None => "(no session)".into(),
        },
        (Peer::Tls(_, None), None, None) => "(no certificate)".into(),
        (Peer::Tcp(_) | Peer::Local, None, None) => "local".into(),
    }
}
