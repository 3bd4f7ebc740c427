//! The web portal (docs/control-api.md, "The web portal"): sessions from
//! API tokens, every page scoped by the session's grants, forms that need
//! the session's CSRF token, security headers; and the same in a real
//! browser (Debian's chromium driven by playwright, tests/browser/).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rs_tests::deploy::{Deployment, Extra, admin, base};
use tokio::io::AsyncBufReadExt as _;

use crate::backchannel::{attr, control_get, exe, tmp};
use crate::backchannel_faults::{rsctl, until};
use crate::forward::{alarm, register};
use crate::security::bearer_client;

static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Makes an API token as the provider's admin; its secret.
pub(crate) async fn token(a: &str, name: &str, customers: &str) -> String {
    let r = admin(a)
        .post(format!("{}/rs/v1/control/tokens", base(a)))
        .body(format!(r#"<token name="{name}" customers="{customers}"/>"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    rs_tests::assert_control_api_valid(
        text.as_bytes(),
        // A file of its own: tests make tokens of one name at once.
        &std::env::temp_dir().join(format!(
            "rs-token-{name}-{}-{}.xml",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )),
    );
    attr(&text, "secret").to_owned()
}

/// An HTML form's body (`application/x-www-form-urlencoded`).
pub(crate) fn form_body<V: AsRef<str>>(pairs: &[(&str, V)]) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v.as_ref())))
        .collect::<Vec<_>>()
        .join("&")
}

/// A browser-like client: no certificate, no redirects followed.
pub(crate) fn browser(ca: &Path) -> reqwest::Client {
    rs_net::tls::client_trusting(ca)
        .unwrap()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `POST /portal/login` with a form body, at the portal `portal`
/// (`https://…/portal/`).
pub(crate) async fn post_login(c: &reqwest::Client, portal: &str, body: &str) -> reqwest::Response {
    c.post(format!("{portal}login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// The session cookie (`name=value`) a login answered with.
pub(crate) fn session_of(r: &reqwest::Response) -> String {
    r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// Logs in with a token; the session cookie (`name=value`) and the whole
/// `Set-Cookie` line.
pub(crate) async fn login(c: &reqwest::Client, a: &str, token: &str) -> (String, String) {
    let r = post_login(
        c,
        &format!("{}/portal/", base(a)),
        &form_body(&[("token", token)]),
    )
    .await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/portal/");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    (session_of(&r), set)
}

pub(crate) async fn page(
    c: &reqwest::Client,
    a: &str,
    cookie: &str,
    path: &str,
) -> (u16, http::HeaderMap, String) {
    let r = c
        .get(format!("{}{path}", base(a)))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let h = r.headers().clone();
    (st, h, r.text().await.unwrap())
}

/// The portal's CSRF token on a page.
pub(crate) fn csrf(html: &str) -> String {
    let at = html.find(r#"name="csrf" value=""#).unwrap() + r#"name="csrf" value=""#.len();
    html[at..at + html[at..].find('"').unwrap()].to_owned()
}

const PAGES: &[&str] = &[
    "/portal/",
    "/portal/topology",
    "/portal/alarms?type=any",
    "/portal/jobs",
    "/portal/rollouts",
    "/portal/send",
    "/portal/groups",
    "/portal/throttle",
    "/portal/audit",
];

/// An admin of acme, logged in with an acme token, sees acme's sites,
/// alarms and jobs and nothing of globex on any page; globex's component
/// and job are "not found" or refused; a form without the session's CSRF
/// token or from another origin changes nothing; a configuration change
/// sent from the page completes and is audited under the token's name;
/// revoking the token ends the session at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_shows_an_admin_only_its_customers_and_takes_only_its_own_forms() {
    let dir = tmp("portal");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, s1) = crate::security::acme_and_globex(&mut d, "chart_sample_secs = 1").await;
    let c1 = register(&s1).await;
    c1.send("alarm", &alarm("acme's disk is full", None))
        .await
        .unwrap();
    // Two of globex's, which acme's charts must not count.
    let g1 = register(&dir.join("g1/rs-proxy.sock")).await;
    for text in ["globex's first", "globex's second"] {
        g1.send("alarm", &alarm(text, None)).await.unwrap();
    }
    // rsctl makes the token, and uses it instead of a certificate.
    let (code, out, err) = rsctl(
        &a,
        &[
            "tokens",
            "create",
            "acme-ops",
            "--customers",
            "acme",
            "--days",
            "7",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("not shown again"), "{err}");
    let acme_token = out.trim().to_owned();
    assert!(acme_token.starts_with("rst_"), "{out}");
    let ca = d.pki.clone().unwrap().admin.ca.clone();
    let as_acme = std::process::Command::new(exe())
        .args(["rsctl", "--server", &base(&a), "--ca"])
        .arg(&ca)
        .args(["--token", &acme_token, "components"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&as_acme.stdout);
    assert!(as_acme.status.success(), "{listed}");
    assert!(
        listed.contains("acme.p1") && !listed.contains("globex"),
        "{listed}"
    );
    // A job of globex's, which acme's admin must not see.
    let (st, body) = crate::backchannel::post(
        &a,
        r#"<send><to id="globex.p1"/><control action="ping"/></send>"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let globex_job = attr(&body, "id").to_owned();
    assert!(
        until(30, || async {
            control_get(&a, "messages?type=alarm&customer=acme")
                .await
                .contains("disk is full")
                && control_get(&a, "messages?type=alarm&customer=globex")
                    .await
                    .contains("globex's second")
        })
        .await
    );

    // Throttle rules of both customers; acme's admin sees only its own.
    let r = admin(&a)
        .put(format!("{}/rs/v1/control/throttle", base(&a)))
        .body(
            r#"<throttle><rule name="acme-rate" customer="acme" per="customer" messages-per-sec="1000"/><rule name="acme-quota" customer="acme" per="customer" quota-bytes="100000000" quota-period="day"/><rule name="globex-rate" customer="globex" per="customer" messages-per-sec="5"/></throttle>"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    // An alarm counted in acme's quota.
    c1.send("alarm", &alarm("acme's fan is loud", None))
        .await
        .unwrap();
    assert!(
        until(30, || async {
            control_get(&a, "messages?type=alarm&customer=acme")
                .await
                .contains("fan is loud")
        })
        .await
    );
    let c = browser(&ca);
    // Without a session every page sends to the login; a POST is refused.
    let (st, h, _) = page(&c, &a, "", "/portal/").await;
    assert_eq!(
        (st, h["location"].to_str().unwrap()),
        (303, "/portal/login")
    );
    let (st, _, html) = page(&c, &a, "", "/portal/login").await;
    assert_eq!(st, 200);
    assert!(html.contains(r#"id="token""#), "{html}");
    // A token the server does not know is refused, and audited.
    let r = post_login(
        &c,
        &format!("{}/portal/", base(&a)),
        "token=rst_not-a-token",
    )
    .await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());

    let (cookie, set) = login(&c, &a, &acme_token).await;
    for attr in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/portal/"] {
        assert!(set.contains(attr), "{set} lacks {attr}");
    }
    let mut html_of = std::collections::HashMap::new();
    for p in PAGES
        .iter()
        .copied()
        .chain(["/portal/component?id=acme.p1"])
    {
        let (st, h, html) = page(&c, &a, &cookie, p).await;
        assert_eq!(st, 200, "{p}: {html}");
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .starts_with("default-src 'none'"),
            "{p}"
        );
        assert_eq!(h["x-frame-options"], "DENY", "{p}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{p}");
        assert_eq!(h["cache-control"], "no-store", "{p}");
        assert!(h.contains_key("strict-transport-security"), "{p}");
        assert!(!html.contains("globex"), "{p} shows globex: {html}");
        assert!(
            html.contains("token:acme-ops"),
            "{p} does not name the admin"
        );
        assert!(
            !html.contains(r#"href="/portal/subscriptions""#),
            "{p} links a provider's page"
        );
        html_of.insert(p, html);
    }
    assert!(html_of["/portal/"].contains(r#"data-id="acme.p1""#));
    // The charts: the history's curves, and acme's two major alarms of
    // the day (not globex's two).
    // The stored-rate curve rises off its baseline where acme's alarm was
    // stored (a sample a second here).
    let rate_curve = |html: &str| -> Vec<f64> {
        let at = html.find(r#"<polyline class="curve c1" points=""#).unwrap() + 35;
        html[at..at + html[at..].find('"').unwrap()]
            .split_whitespace()
            .map(|p| p.split_once(',').unwrap().1.parse().unwrap())
            .collect()
    };
    assert!(
        until(20, || async {
            let ys = rate_curve(&page(&c, &a, &cookie, "/portal/").await.2);
            ys.len() >= 2 && ys.iter().any(|y| *y < 110.0)
        })
        .await,
        "{}",
        page(&c, &a, &cookie, "/portal/").await.2
    );
    let alarms = &html_of["/portal/alarms?type=any"];
    assert!(
        alarms.contains(r#"<rect class="bar major""#) && alarms.contains(r#"y="41">2</text>"#),
        "{alarms}"
    );
    assert!(html_of["/portal/throttle"].contains("acme-rate"));
    // Provider-wide pages and changes are refused to a customer's admin,
    // and change nothing.
    for p in ["/portal/subscriptions", "/portal/files"] {
        let (st, _, _) = page(&c, &a, &cookie, p).await;
        assert_eq!(st, 403, "{p}");
    }
    let token_on_page = csrf(&html_of["/portal/groups"]);
    for (path, body) in [
        ("groups", vec![("name", "acme-web"), ("customer", "acme")]),
        ("groups/delete", vec![("name", "acme-web")]),
        ("subscriptions/replay", vec![]),
        ("files/offer", vec![("file", "00"), ("target", "acme.p1")]),
    ] {
        let mut body = body;
        body.push(("csrf", token_on_page.as_str()));
        let r = c
            .post(format!("{}/portal/{path}", base(&a)))
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(&body))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    assert!(!control_get(&a, "groups").await.contains("acme-web"));
    // A proxy's page shows its customer's quota usage (the server writes
    // what it counted to its store every second: until then it reads
    // none).
    let usage = r#"<tr class="usage"><td>acme-quota</td><td>acme</td>"#;
    let mut comp = html_of["/portal/component?id=acme.p1"].clone();
    for _ in 0..60 {
        if comp.contains(usage) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        comp = page(&c, &a, &cookie, "/portal/component?id=acme.p1")
            .await
            .2;
    }
    assert!(comp.contains(usage), "{comp}");
    // A proxy's page lists what its integrators sent.
    assert!(html_of["/portal/component?id=acme.p1"].contains("disk is full"));
    assert!(
        html_of["/portal/alarms?type=any"].contains("acme&#x27;s disk is full")
            || html_of["/portal/alarms?type=any"].contains("acme&#39;s disk is full"),
        "{}",
        html_of["/portal/alarms?type=any"]
    );
    // Another customer's component and job, and its alarms, are not shown.
    for (p, want) in [
        ("/portal/component?id=globex.p1", 404),
        (&*format!("/portal/job?id={globex_job}"), 404),
        ("/portal/alarms?customer=globex", 403),
    ] {
        let (st, _, html) = page(&c, &a, &cookie, p).await;
        assert_eq!(st, want, "{p}: {html}");
        assert!(
            !html.contains("globex.p1") && !html.contains("ping"),
            "{p}: {html}"
        );
    }

    // The send form: without the CSRF token, or from another site,
    // nothing is sent.
    let token_on_page = csrf(&html_of["/portal/send"]);
    let form = |csrf: &str| {
        [
            ("csrf", csrf.to_owned()),
            ("target", "acme.p1".to_owned()),
            ("action", "configChange".to_owned()),
            ("config", "heartbeat_secs = 7".to_owned()),
        ]
    };
    let jobs_before = control_get(&a, "jobs").await;
    for (origin, csrf) in [
        (None, "not-the-token"),
        (None, ""),
        (Some("https://evil.example"), token_on_page.as_str()),
    ] {
        let mut r = c
            .post(format!("{}/portal/send", base(&a)))
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_body(&form(csrf)));
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 403, "origin {origin:?} csrf {csrf:?}");
    }
    // With the right token, but aimed at globex's site: refused the same.
    let r = c
        .post(format!("{}/portal/send", base(&a)))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("csrf", token_on_page.as_str()),
            ("target", "globex.p1"),
            ("action", "ping"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        attr(&control_get(&a, "jobs").await, "count"),
        attr(&jobs_before, "count"),
        "a refused form started a job"
    );
    // With it, the job starts and its page shows it finishing.
    let r = c
        .post(format!("{}/portal/send", base(&a)))
        .header("cookie", &cookie)
        .header("origin", base(&a))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&form(&token_on_page)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "{:?}", r.text().await);
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(to.starts_with("/portal/job?id="), "{to}");
    assert!(
        until(60, || async {
            let (_, _, html) = page(&c, &a, &cookie, &to).await;
            html.contains(r#"id="job-state">done"#)
                && html.contains(r#"data-id="acme.p1""#)
                && html.contains(">succeeded<")
        })
        .await,
        "{}",
        page(&c, &a, &cookie, &to).await.2
    );
    // Audited under the token's name, the login too; a customer's admin
    // reads its own lines on the audit page.
    let audit = control_get(&a, "audit?admin=token:acme-ops").await;
    assert!(
        audit.contains(r#"path="/portal/send""#) && audit.contains(r#"status="303""#),
        "{audit}"
    );
    assert!(audit.contains(r#"path="/portal/login""#), "{audit}");
    let all = control_get(&a, "audit").await;
    assert!(all.contains(r#"admin="(unknown token)""#), "{all}");
    let (_, _, mine) = page(&c, &a, &cookie, "/portal/audit").await;
    assert!(
        mine.contains("/portal/send") && !mine.contains(">ops<"),
        "{mine}"
    );

    // The token also works on the API, scoped the same way.
    let api = bearer_client(&ca, &acme_token);
    let comps = api
        .get(format!("{}/rs/v1/control/components", base(&a)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        comps.contains("acme.p1") && !comps.contains("globex"),
        "{comps}"
    );
    // Revoked: the session ends at once, and the API refuses the token.
    let (code, _, err) = rsctl(&a, &["tokens", "revoke", "acme-ops"]);
    assert_eq!(code, 0, "{err}");
    let (st, h, _) = page(&c, &a, &cookie, "/portal/").await;
    assert_eq!(
        (st, h["location"].to_str().unwrap()),
        (303, "/portal/login")
    );
    let st = api
        .get(format!("{}/rs/v1/control/components", base(&a)))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 401);
    // The provider's admin changes groups and replays tasks from the
    // pages.
    let ops = token(&a, "ops-web", "*").await;
    let (ops_cookie, _) = login(&c, &a, &ops).await;
    let (st, _, html) = page(&c, &a, &ops_cookie, "/portal/groups").await;
    assert_eq!(st, 200);
    let ops_csrf = csrf(&html);
    let post_form = |path: &'static str, body: Vec<(&'static str, String)>| {
        let c = c.clone();
        let a = a.clone();
        let cookie = ops_cookie.clone();
        let csrf = ops_csrf.clone();
        async move {
            let mut body = body;
            body.push(("csrf", csrf));
            c.post(format!("{}/portal/{path}", base(&a)))
                .header("cookie", cookie)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form_body(&body))
                .send()
                .await
                .unwrap()
        }
    };
    let r = post_form(
        "groups",
        vec![
            ("name", "acme-web".into()),
            ("customer", "acme".into()),
            ("kind", "proxy".into()),
            ("tag", String::new()),
            ("members", "globex.p1".into()),
        ],
    )
    .await;
    assert_eq!(r.status(), 303);
    let g = control_get(&a, "groups/acme-web").await;
    assert!(
        g.contains("acme.p1") && g.contains("globex.p1") && !g.contains("acme.p1.s1"),
        "{g}"
    );
    let r = post_form(
        "groups",
        vec![("name", "bad name".into()), ("customer", "acme".into())],
    )
    .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains(r#"id="error""#));
    let r = post_form("groups/delete", vec![("name", "acme-web".into())]).await;
    assert_eq!(r.status(), 303);
    assert!(!control_get(&a, "groups").await.contains("acme-web"));
    let (st, _, html) = page(&c, &a, &ops_cookie, "/portal/subscriptions").await;
    assert_eq!(st, 200, "{html}");
    let r = post_form("subscriptions/replay", vec![]).await;
    assert_eq!(r.status(), 303);
    // A file published from the browser's upload form: only with the
    // session's CSRF token before it.
    let upload = |csrf: String, name: &'static str, bytes: &'static [u8]| {
        let c = c.clone();
        let a = a.clone();
        let cookie = ops_cookie.clone();
        async move {
            let b = "rs-boundary-7d1e";
            let mut body = format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .into_bytes();
            body.extend_from_slice(bytes);
            body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
            c.post(format!("{}/portal/files/upload", base(&a)))
                .header("cookie", cookie)
                .header("content-type", format!("multipart/form-data; boundary={b}"))
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let r = upload("forged".into(), "forged.bin", b"not from the page").await;
    assert_eq!(r.status(), 403);
    let r = upload(
        ops_csrf.clone(),
        "agent-1.2.bin",
        b"agent bytes\x00\x01\x02",
    )
    .await;
    assert_eq!(r.status(), 303, "{:?}", r.text().await);
    let (_, _, html) = page(&c, &a, &ops_cookie, "/portal/files").await;
    let want = openssl::sha::sha256(b"agent bytes\x00\x01\x02")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert!(
        html.contains("agent-1.2.bin") && html.contains(&want),
        "{html}"
    );
    assert!(!html.contains("forged.bin"), "{html}");
    // A published file offered to a site from the files page: the job's
    // page follows it to the end.
    let r = admin(&a)
        .put(format!("{}/rs/v1/control/files/notes.txt", base(&a)))
        .body(b"release notes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sha = attr(&r.text().await.unwrap(), "sha256").to_owned();
    let (st, _, html) = page(&c, &a, &ops_cookie, "/portal/files").await;
    assert!(
        st == 200 && html.contains("notes.txt") && html.contains(&sha),
        "{html}"
    );
    let r = post_form(
        "files/offer",
        vec![
            ("file", sha.clone()),
            ("target", "acme.p1".into()),
            ("class", "data".into()),
            ("sub", "notes".into()),
        ],
    )
    .await;
    assert_eq!(r.status(), 303, "{:?}", r.text().await);
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        until(60, || async {
            let (_, _, html) = page(&c, &a, &ops_cookie, &to).await;
            html.contains(r#"id="job-state">done"#) && html.contains(">succeeded<")
        })
        .await,
        "{}",
        page(&c, &a, &ops_cookie, &to).await.2
    );
    let (_, _, html) = page(&c, &a, &ops_cookie, "/portal/throttle").await;
    assert!(
        html.contains("acme-rate") && html.contains("globex-rate"),
        "{html}"
    );
    // An admin certificate logs in as itself; its session is good only
    // while that certificate is presented.
    let pki = d.pki.clone().unwrap();
    let with_cert = rs_net::tls::client(Some(&pki.admin))
        .unwrap()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (st, _, html) = page(&with_cert, &a, "", "/portal/login").await;
    assert!(st == 200 && html.contains("Continue as ops"), "{html}");
    let (st, _, html) = page(&c, &a, "", "/portal/login").await;
    assert!(st == 200 && !html.contains("Continue as"), "{html}");
    let portal = format!("{}/portal/", base(&a));
    let r = post_login(&with_cert, &portal, "certificate=1").await;
    assert_eq!(r.status(), 303);
    let cert_cookie = session_of(&r);
    let (st, _, html) = page(&with_cert, &a, &cert_cookie, "/portal/").await;
    assert!(
        st == 200 && html.contains(r#"<span id="who">ops</span>"#),
        "{html}"
    );
    let (st, h, _) = page(&c, &a, &cert_cookie, "/portal/").await;
    assert_eq!(
        (st, h["location"].to_str().unwrap()),
        (303, "/portal/login"),
        "a certificate's session without the certificate"
    );
    // Without a certificate, "use my certificate" logs nobody in.
    let r = post_login(&c, &portal, "certificate=1").await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let (code, listed, err) = rsctl(&a, &["tokens", "list", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let t = &v["tokens"]["token"][0];
    assert_eq!(v["tokens"]["count"], "2", "{v}");
    assert_eq!(
        (t["name"].as_str(), t["customers"].as_str()),
        (Some("acme-ops"), Some("acme")),
        "{v}"
    );
    assert!(t["revoked"].is_string() && t["secret"].is_null(), "{v}");
    d.stop_all();
}

/// Where Debian's chromium is.
const CHROMIUM: &str = "/usr/bin/chromium";

/// The portal in Debian's chromium, driven by playwright
/// (tests/browser/portal.py): an admin of acme and one of globex log in
/// with their tokens on the login page and see every page without any of
/// the other's components; the provider's admin sends a configuration
/// change to a group from the send page, and the job's page shows its
/// progress by itself until every destination succeeded (one proxy is
/// held stopped until the page showed the job running). With
/// `RS_BLESS=1` the screenshots are written to docs/portal/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_works_in_a_real_browser_for_each_customer_apart() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: scripts/packages installs Debian's chromium"
    );
    let dir = tmp("portal-browser");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, s1) = crate::security::acme_and_globex(&mut d, "chart_sample_secs = 1").await;
    let s2 = d
        .proxy("p2", "acme.p2", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    for s in [&s1, &s2] {
        register(s)
            .await
            .send("alarm", &alarm("a disk is nearly full", None))
            .await
            .unwrap();
    }
    let r = admin(&a)
        .put(format!("{}/rs/v1/control/groups/acme-all", base(&a)))
        .body(r#"<group name="acme-all" customer="acme" kind="proxy"/>"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        until(30, || async {
            let g = control_get(&a, "groups/acme-all").await;
            g.contains("acme.p1") && g.contains("acme.p2")
        })
        .await
    );
    let shots: PathBuf = if std::env::var_os("RS_BLESS").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/portal")
    } else {
        dir.join("screenshots")
    };
    std::fs::create_dir_all(&shots).unwrap();
    let pages: Vec<String> = PAGES.iter().map(|p| p.to_string()).collect();
    let own = |id: &str| vec![format!("/portal/component?id={id}")];
    let upload = dir.join("agent-2.0.tar.gz");
    let bytes: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&upload, &bytes).unwrap();
    let upload_sha = openssl::sha::sha256(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let cfg = serde_json::json!({
        "base": base(&a),
        "chromium": CHROMIUM,
        "pages": pages,
        "users": [
            {"name": "acme", "token": token(&a, "acme-web", "acme").await, "forbidden": ["globex."], "pages": own("acme.p1")},
            {"name": "globex", "token": token(&a, "globex-web", "globex").await, "forbidden": ["acme."], "pages": own("globex.p1")},
            {"name": "ops", "token": token(&a, "ops-web", "*").await, "forbidden": [], "pages": [own("acme.p1")[0].clone(), "/portal/subscriptions".to_owned(), "/portal/files".to_owned()],
             "screenshots": shots.display().to_string(),
             "upload": {"path": upload.display().to_string(), "name": "agent-2.0.tar.gz", "sha256": upload_sha},
             "send": {"target": "group:acme-all", "config": "heartbeat_secs = 9",
                      "screenshot": shots.join("job.png").display().to_string()}},
        ],
    });
    // acme.p2 is held until the job's page has shown the job running.
    d.node("p2").signal("STOP");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/portal.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(cfg.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 (scripts/packages installs playwright)");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut result = None;
    let mut first_state = None;
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(300), lines.next_line()).await
    {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        if let Some(p) = v.get("progress") {
            first_state = Some(p["state"].as_str().unwrap_or("").to_owned());
            d.node("p2").signal("CONT");
        } else if let Some(r) = v.get("result") {
            result = Some(r.clone());
        }
    }
    d.node("p2").signal("CONT");
    let status = child.wait().await.unwrap();
    assert!(status.success(), "{script:?} failed: {status}");
    let r = result.expect("the script's result");
    assert_eq!(r["leaks"], serde_json::json!([]), "{r:#}");
    for (k, v) in r["pages"].as_object().unwrap() {
        assert_eq!(v, 200, "{k}");
    }
    assert_eq!(
        r["pages"].as_object().unwrap().len(),
        3 * (pages.len() + 1) + 2
    );
    assert_eq!(r["who"]["acme"], "token:acme-web");
    assert_eq!(r["uploaded"], true, "{r:#}");
    for u in ["acme", "globex", "ops"] {
        assert!(
            r["after_logout"][u]
                .as_str()
                .unwrap()
                .ends_with("/portal/login"),
            "{r:#}"
        );
    }
    // Nothing broke the page's policy (a violation is logged to the console).
    let console: Vec<&str> = r["console"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(
        !console
            .iter()
            .any(|c| c.contains("Content Security Policy")),
        "{console:?}"
    );
    // The job ran while the page watched: first running, then done by the
    // page's own updates, every member of the group succeeded.
    assert_eq!(first_state.as_deref(), Some("running"), "{r:#}");
    let job = &r["job"];
    assert_eq!(
        job["states"].as_array().unwrap().last().unwrap(),
        "done",
        "{job:#}"
    );
    assert_eq!(
        job["targets"],
        serde_json::json!({"acme.p1": "succeeded", "acme.p2": "succeeded"}),
        "{job:#}"
    );
    for name in [
        "fleet",
        "alarms",
        "jobs",
        "job",
        "topology",
        "component",
        "throttle",
        "subscriptions",
        "groups",
        "files",
    ] {
        assert!(shots.join(format!("{name}.png")).exists(), "{name}.png");
    }
    d.stop_all();
}

/// On a plain loopback listener (no `[tls]`), as the API is open there,
/// "Continue as local" opens a session of every customer; a token narrows
/// it to the token's grants; the cookie is not marked Secure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_plain_loopback_listener_the_portal_logs_in_as_local_or_with_a_token() {
    let dir = tmp("portal-plain");
    let mut d = Deployment::plain(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let portal = format!("{}/portal/", base(&a));
    assert!(portal.starts_with("http://"), "{portal}");
    let (st, _, html) = page(&c, &a, "", "/portal/login").await;
    assert!(st == 200 && html.contains("Continue as local"), "{html}");
    let r = post_login(&c, &portal, "certificate=1").await;
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.contains("HttpOnly") && !set.contains("Secure"), "{set}");
    let (st, h, html) = page(&c, &a, &session_of(&r), "/portal/").await;
    assert!(
        st == 200 && html.contains(r#"<span id="who">local</span>"#),
        "{html}"
    );
    assert!(!h.contains_key("strict-transport-security"));
    // A token on the plain listener: its grants, not local's.
    let t = token(&a, "acme-local", "acme").await;
    let r = post_login(&c, &portal, &format!("token={t}")).await;
    assert_eq!(r.status(), 303);
    let (st, _, html) = page(&c, &a, &session_of(&r), "/portal/subscriptions").await;
    assert_eq!(st, 403, "{html}");
    let api = admin(&a)
        .get(format!("{}/rs/v1/control/tokens", base(&a)))
        .header("authorization", format!("Bearer {t}"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 403, "a customer's token is not local");
    d.stop_all();
}
