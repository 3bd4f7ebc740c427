//! Security (docs/security.md), on real daemons over mutual TLS: a site's
//! certificate can neither send as another site nor read its back-channel;
//! bad, expired, revoked and foreign certificates, old protocol versions and
//! weak ciphers are refused at the handshake; enrollment tokens are single
//! use and a re-deployed proxy loses nothing; certificates are renewed
//! before they expire, by their holders only; admins see and command only
//! the customers granted, and everything they do is audited; hostile HTTP
//! is refused.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rs_net::pki::{CertSpec, Role};
use rs_net::tls::TlsConfig;
use rs_protocol::codec::{EnvelopeWriter, Limits, RawEnvelope, decode_headers};
use rs_protocol::model::{EnvelopeMeta, Message, Route};
use rs_protocol::{Outcome, RsId, Timestamp};
use rs_tests::deploy::{
    Deployment, Extra, Pki, admin, base, component_client, component_tls, server_metrics,
    stored_ids,
};

use crate::backchannel::{attr, control_get, exe, job, post, tmp, until_done};
use crate::backchannel_faults::{rsctl, until};
use crate::bulk::components;
use crate::forward::{all_stored, assert_exactly_once, register};

/// Alarms claiming each of `sources`, in an envelope from `sender`.
pub(crate) fn envelope(sender: &str, sources: &[&str]) -> (Vec<Message>, String, Vec<u8>) {
    let msgs: Vec<Message> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut m = rs_protocol::samples::alarm_of_size(i, 512);
            if let Route::Source(src) = &mut m.header.route {
                src.component = RsId::new(*s).unwrap();
                src.qos.expiry = None;
            }
            m.header.created = Timestamp::now();
            m.header.routing.clear();
            m
        })
        .collect();
    let meta = EnvelopeMeta::new(RsId::new(sender).unwrap(), Timestamp::now());
    let mut w = EnvelopeWriter::new(&meta);
    for m in &msgs {
        w.push(m);
    }
    let enc = w.finish();
    (msgs, enc.content_type, enc.body.to_vec())
}

/// POSTs an envelope; the status and, for 200, the reply.
pub(crate) async fn send_env(
    http: &reqwest::Client,
    addr: &str,
    ct: &str,
    body: Vec<u8>,
) -> Result<(u16, Option<RawEnvelope>), String> {
    let r = http
        .post(format!("{}/rs/v1/envelope", base(addr)))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .map_err(|e| rs_net::http::error_chain(&e))?;
    let status = r.status().as_u16();
    if status != 200 {
        return Ok((status, None));
    }
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    let env = decode_headers(&ct, r.bytes().await.unwrap(), &Limits::default()).unwrap();
    Ok((status, Some(env)))
}

fn outcome_of<'a>(env: &'a RawEnvelope, m: &Message) -> &'a Outcome {
    &env.meta
        .outcomes
        .iter()
        .find(|(id, _)| *id == m.header.id)
        .expect("an outcome for every message")
        .1
}

fn is_forbidden(o: &Outcome) -> bool {
    matches!(o, Outcome::Rejected(r) if r.code.as_str() == "spoofed-source")
}

async fn metric(addr: &str, name: &str) -> u64 {
    server_metrics(addr)
        .await
        .unwrap()
        .get(name)
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_certificate_can_neither_send_as_another_site_nor_read_its_back_channel() {
    let dir = tmp("spoof");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, m) = d.server_and_mlm().unwrap();
    d.proxy("p1", "acme.p1", std::slice::from_ref(&m), &Extra::default())
        .unwrap();
    assert!(until(30, || async { components(&a).await.contains("acme.p1") }).await);

    // A control action for acme.p1 waits while the proxy is away.
    d.node("p1").stop(Duration::from_secs(8));
    let (s, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><control action="getStatus"/></send>"#,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let job_id = attr(&body, "id").to_owned();

    // Another customer's proxy, holding its own valid certificate.
    let thief = component_client(&m, "globex.p1").unwrap();
    // Polling as acme.p1: refused whole, nothing handed over.
    let (_, ct, body) = envelope("acme.p1", &[]);
    let (st, reply) = send_env(&thief, &m, &ct, body).await.unwrap();
    assert_eq!(st, 403);
    assert!(reply.is_none());
    // As itself: its own (empty) back-channel, never acme.p1's.
    let (_, ct, body) = envelope("globex.p1", &[]);
    let (st, reply) = send_env(&thief, &m, &ct, body).await.unwrap();
    assert_eq!(st, 200);
    assert!(reply.unwrap().messages.is_empty());

    // Sending as acme.p1 (and as itself in the same envelope): refused at
    // the MLM; its own message the MLM passes on, and the server refuses
    // it too, for acme's MLM does not speak for globex (defence in depth).
    let (msgs, ct, body) = envelope("globex.p1", &["acme.p1", "globex.p1"]);
    let (_, reply) = send_env(&thief, &m, &ct, body).await.unwrap();
    let reply = reply.unwrap();
    assert!(is_forbidden(outcome_of(&reply, &msgs[0])), "{reply:?}");
    assert!(is_forbidden(outcome_of(&reply, &msgs[1])), "{reply:?}");
    // Same customer, another proxy: a proxy speaks only for itself and
    // what it allocated.
    let sibling = component_client(&m, "acme.p2").unwrap();
    let (msgs2, ct, body) = envelope("acme.p2", &["acme.p1", "acme.p2.s1"]);
    let (_, reply) = send_env(&sibling, &m, &ct, body).await.unwrap();
    let reply = reply.unwrap();
    assert!(is_forbidden(outcome_of(&reply, &msgs2[0])));
    assert_eq!(*outcome_of(&reply, &msgs2[1]), Outcome::Accepted);
    // A customer MLM at the server: its own customer's components only.
    let other_mlm = component_client(&a, "globex.m1").unwrap();
    let (msgs3, ct, body) = envelope("globex.m1", &["acme.p1", "globex.p9"]);
    let (_, reply) = send_env(&other_mlm, &a, &ct, body).await.unwrap();
    let reply = reply.unwrap();
    assert!(is_forbidden(outcome_of(&reply, &msgs3[0])));
    assert_eq!(*outcome_of(&reply, &msgs3[1]), Outcome::Accepted);

    // The accepted arrive; the spoofed never do.
    let appdir = dir.join("appserver");
    let want = [&msgs2[1], &msgs3[1]];
    assert!(
        until(30, || async {
            let ids = stored_ids(&appdir).unwrap();
            want.iter().all(|m| ids.contains(&m.header.id.to_string()))
        })
        .await
    );
    let ids = stored_ids(&appdir).unwrap();
    for m in [&msgs[0], &msgs[1], &msgs2[0], &msgs3[0]] {
        assert!(!ids.contains(&m.header.id.to_string()));
    }
    assert!(metric(&m, "auth.spoofed").await >= 2);
    assert!(metric(&m, "auth.envelopes_refused").await >= 1);
    assert!(metric(&a, "auth.spoofed").await >= 2);

    // A sibling reports the waiting action delivered to acme.p1: the MLM
    // passes on deliveries only within the caller's subtree, so the job
    // stays pending until acme.p1 itself takes it.
    let message = attr(&job(&a, &job_id).await, "message").to_owned();
    // With a message of its own, which the MLM forwards at once, the
    // deliveries it was told of riding along.
    let (own, _, _) = envelope("acme.p2", &["acme.p2"]);
    let mut meta = EnvelopeMeta::new(RsId::new("acme.p2").unwrap(), Timestamp::now());
    meta.delivered = vec![(
        rs_protocol::MessageId::new(message).unwrap(),
        RsId::new("acme.p1").unwrap(),
    )];
    let mut w = EnvelopeWriter::new(&meta);
    w.push(&own[0]);
    let enc = w.finish();
    let (st, _) = send_env(&sibling, &m, &enc.content_type, enc.body.to_vec())
        .await
        .unwrap();
    assert_eq!(st, 200);
    let appdir = dir.join("appserver");
    let own_id = own[0].header.id.to_string();
    assert!(
        until(30, || async {
            stored_ids(&appdir).unwrap().contains(&own_id)
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let j = job(&a, &job_id).await;
    assert!(j.contains(r#"state="pending""#), "{j}");

    // The owner comes back and gets its action.
    d.restart("p1").unwrap();
    let j = until_done(&a, &job_id).await;
    assert!(j.contains("state=\"succeeded\""), "{j}");
    d.stop_all();
}

/// A raw TLS client: `configure` narrows what it offers.
pub(crate) fn raw_tls(
    addr: &str,
    ca: &Path,
    id: Option<&TlsConfig>,
    configure: impl FnOnce(&mut openssl::ssl::SslConnectorBuilder),
) -> Result<openssl::ssl::SslStream<std::net::TcpStream>, String> {
    use openssl::ssl::{SslConnector, SslFiletype, SslMethod};
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
    b.set_ca_file(ca).map_err(|e| e.to_string())?;
    if let Some(t) = id {
        b.set_certificate_chain_file(&t.cert)
            .map_err(|e| e.to_string())?;
        b.set_private_key_file(&t.key, SslFiletype::PEM)
            .map_err(|e| e.to_string())?;
    }
    configure(&mut b);
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(20))).ok();
    b.build()
        .connect("127.0.0.1", tcp)
        .map_err(|e| e.to_string())
}

fn issue(pki: &Pki, spec: &CertSpec, out: &Path) -> TlsConfig {
    std::fs::create_dir_all(out).unwrap();
    let ca = pki.ca().unwrap();
    let key = rs_net::pki::generate_key().unwrap();
    let cert = ca.issue(spec, &key).unwrap();
    let t = TlsConfig::in_dir(out);
    std::fs::write(&t.key, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    std::fs::write(&t.cert, cert.to_pem().unwrap()).unwrap();
    std::fs::copy(&pki.admin.ca, &t.ca).unwrap();
    t
}

pub(crate) fn client_of(t: &TlsConfig) -> reqwest::Client {
    rs_net::tls::client(Some(t)).unwrap().build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_old_protocols_and_weak_ciphers_are_refused_at_the_handshake() {
    let dir = tmp("handshake");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, m) = d.server_and_mlm().unwrap();
    let pki = d.pki.clone().unwrap();
    let ca = pki.admin.ca.clone();
    let (_, ct, body) = envelope("acme.p5", &["acme.p5"]);

    // A good certificate gets through (the control for what follows).
    let good = component_tls(&m, "acme.p5").unwrap().unwrap();
    let (st, _) = send_env(&client_of(&good), &m, &ct, body.clone())
        .await
        .unwrap();
    assert_eq!(st, 200);
    // No certificate: the handshake passes, the endpoint refuses.
    let anon = rs_net::tls::client_trusting(&ca).unwrap().build().unwrap();
    assert_eq!(send_env(&anon, &m, &ct, body.clone()).await.unwrap().0, 401);
    assert_eq!(send_env(&anon, &a, &ct, body.clone()).await.unwrap().0, 401);

    let failed_before = metric(&m, "tls.handshakes_failed").await;
    // A certificate from another CA naming the same component.
    let foreign = Pki::create(&dir.join("foreign-ca")).unwrap();
    let fake = foreign.issue("acme.p5", &dir.join("fake")).unwrap();
    let mut fake_here = fake.clone();
    fake_here.ca = ca.clone();
    let e = send_env(&client_of(&fake_here), &m, &ct, body.clone()).await;
    assert!(e.is_err(), "{e:?}");
    // An expired certificate from our CA.
    let mut spec = CertSpec::component(&RsId::new("acme.p6").unwrap(), 0);
    spec.days = 0;
    let expired = issue(&pki, &spec, &dir.join("expired"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let e = send_env(&client_of(&expired), &m, &ct, body.clone()).await;
    assert!(e.is_err(), "{e:?}");
    assert!(metric(&m, "tls.handshakes_failed").await >= failed_before + 2);
    // /metrics says why, by reason.
    let mx = d.metrics_addr("mlm");
    let failures = |s: &crate::metrics::Scrape, reason: &str| {
        crate::metrics::get(
            s,
            &format!("rs_tls_handshake_failures_total{{reason=\"{reason}\"}}"),
        )
    };
    let s = crate::metrics::scrape(&mx).await;
    assert!(failures(&s, "untrusted") >= 1.0, "{s:?}");
    assert!(failures(&s, "expired") >= 1.0, "{s:?}");
    assert!(
        crate::metrics::get(&s, "rs_tls_handshakes_total") >= 1.0,
        "{s:?}"
    );

    // Old protocol versions and weak ciphers, with a valid certificate.
    let (m2, ca2, good2) = (m.clone(), ca.clone(), good.clone());
    let results = tokio::task::spawn_blocking(move || {
        use openssl::ssl::SslVersion;
        let ok = raw_tls(&m2, &ca2, Some(&good2), |_| {}).map(|_| ());
        let tls11 = raw_tls(&m2, &ca2, Some(&good2), |b| {
            b.set_security_level(0);
            b.set_min_proto_version(Some(SslVersion::TLS1)).unwrap();
            b.set_max_proto_version(Some(SslVersion::TLS1_1)).unwrap();
            b.set_cipher_list("ALL:@SECLEVEL=0").unwrap();
        })
        .map(|_| ());
        let tls10 = raw_tls(&m2, &ca2, Some(&good2), |b| {
            b.set_security_level(0);
            b.set_min_proto_version(Some(SslVersion::TLS1)).unwrap();
            b.set_max_proto_version(Some(SslVersion::TLS1)).unwrap();
            b.set_cipher_list("ALL:@SECLEVEL=0").unwrap();
        })
        .map(|_| ());
        let weak = raw_tls(&m2, &ca2, Some(&good2), |b| {
            b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
            b.set_cipher_list("ECDHE-ECDSA-AES128-SHA:AES128-SHA:DES-CBC3-SHA:@SECLEVEL=0")
                .unwrap();
        })
        .map(|_| ());
        (ok, tls11, tls10, weak)
    })
    .await
    .unwrap();
    assert!(results.0.is_ok(), "{:?}", results.0);
    assert!(results.1.is_err(), "TLS 1.1 was accepted");
    assert!(results.2.is_err(), "TLS 1.0 was accepted");
    assert!(results.3.is_err(), "a CBC/SHA-1 cipher was accepted");
    let s = crate::metrics::scrape(&mx).await;
    assert!(failures(&s, "protocol") >= 3.0, "{s:?}");

    // Revoked through the control API: refused by the server at once and
    // by the MLM within its refresh of the list.
    let (code, out, err) = rsctl(
        &a,
        &["revoke", "--serial", &good.identity().unwrap().serial],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 certificate(s) revoked"), "{out}");
    // A second revocation right after (lists are dated to the second):
    // both are in force, here and below.
    let (code, _, err) = rsctl(
        &a,
        &["revoke", "--serial", &expired.identity().unwrap().serial],
    );
    assert_eq!(code, 0, "{err}");
    assert!(metric(&a, "tls.revoked").await >= 2);
    assert!(until(15, || async { metric(&m, "tls.revoked").await >= 2 }).await);
    let e = send_env(&client_of(&good), &a, &ct, body.clone()).await;
    assert!(e.is_err(), "the server still takes a revoked certificate");
    assert!(
        until(15, || async {
            send_env(&client_of(&good), &m, &ct, body.clone())
                .await
                .is_err()
        })
        .await,
        "the MLM still takes a revoked certificate"
    );
    assert!(metric(&m, "tls.revoked_refused").await >= 1);
    assert!(metric(&m, "tls.revoked").await >= 1);
    let s = crate::metrics::scrape(&mx).await;
    assert!(failures(&s, "revoked") >= 1.0, "{s:?}");
    assert!(metric(&a, "certificates.revoked").await >= 1);
    d.stop_all();
}

fn token_of(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("enroll_token"))
        .expect("an enroll_token");
    line.split('"').nth(1).unwrap().to_owned()
}

async fn enroll_raw(
    http: &reqwest::Client,
    addr: &str,
    token: &str,
    csr: Vec<u8>,
) -> (u16, String) {
    let r = http
        .post(format!("{}/rs/v1/enroll", base(addr)))
        .bearer_auth(token)
        .header("content-type", "application/pkcs10")
        .body(csr)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn csr() -> Vec<u8> {
    let key = rs_net::pki::generate_key().unwrap();
    rs_net::pki::csr(&key).unwrap().to_pem().unwrap()
}

fn cn_of(pem: &str) -> String {
    let cert = openssl::x509::X509::from_pem(pem.as_bytes()).unwrap();
    rs_net::pki::Identity::from_cert(&cert).unwrap().name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_single_use_and_a_redeployed_proxy_loses_nothing_from_its_spool() {
    // Its own customer: revocations by component name reach no other
    // test sharing the CA.
    let dir = tmp("enroll");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let m = d
        .mlm(
            "mlm",
            "redeploy.m1",
            std::slice::from_ref(&a),
            &Extra::default(),
        )
        .unwrap();
    let s = d
        .proxy(
            "p1",
            "redeploy.p1",
            std::slice::from_ref(&m),
            &Extra::default(),
        )
        .unwrap();
    let cfg = dir.join("p1.toml");
    let pki = d.pki.clone().unwrap();
    let anon = rs_net::tls::client_trusting(&pki.admin.ca)
        .unwrap()
        .build()
        .unwrap();

    // The token p1 enrolled with is spent; an unknown one never worked.
    let used = token_of(&cfg);
    assert!(until(30, || async { dir.join("p1/tls/cert.pem").exists() }).await);
    assert_eq!(enroll_raw(&anon, &m, &used, csr()).await.0, 401);
    assert_eq!(enroll_raw(&anon, &a, "rse_nonsense", csr()).await.0, 401);
    // A bad request does not spend a token; through the MLM it works once.
    let t = d.enrollment_token("redeploy.p9").unwrap();
    assert_eq!(
        enroll_raw(&anon, &m, &t, b"not a CSR".to_vec()).await.0,
        400
    );
    let (st, pem) = enroll_raw(&anon, &m, &t, csr()).await;
    assert_eq!(st, 200, "{pem}");
    assert_eq!(cn_of(&pem), "redeploy.p9");
    assert_eq!(enroll_raw(&anon, &m, &t, csr()).await.0, 401);
    // A token for a customer gives the next free proxy ID.
    let (code, out, err) = rsctl(&a, &["enroll", "--customer", "redeploy"]);
    assert_eq!(code, 0, "{err}");
    let t = out.trim().to_owned();
    let (st, pem) = enroll_raw(&anon, &a, &t, csr()).await;
    assert_eq!(st, 200, "{pem}");
    assert_eq!(cn_of(&pem), "redeploy.p10");
    assert!(metric(&a, "enroll.issued").await >= 3);
    assert!(metric(&a, "enroll.refused").await >= 3);

    // Traffic before the compromise.
    let c = register(&s).await;
    let mut sent = Vec::new();
    sent.extend(send_alarms(&c, "before", 5).await);
    // The site is cut off (its MLM down) and keeps spooling ...
    d.node("mlm").stop(Duration::from_secs(8));
    sent.extend(send_alarms(&c, "during", 10).await);
    // ... when its key is found compromised: revoke, new token, new key.
    let old = dir.join("old-p1-tls");
    std::fs::create_dir_all(&old).unwrap();
    for f in ["cert.pem", "key.pem", "ca.pem"] {
        std::fs::copy(dir.join("p1/tls").join(f), old.join(f)).unwrap();
    }
    let (code, out, err) = rsctl(&a, &["revoke", "--component", "redeploy.p1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 certificate(s) revoked"), "{out}");
    let fresh = d.enrollment_token("redeploy.p1").unwrap();
    d.node("p1").stop(Duration::from_secs(8));
    std::fs::remove_file(dir.join("p1/tls/cert.pem")).unwrap();
    std::fs::remove_file(dir.join("p1/tls/key.pem")).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace(&used, &fresh)).unwrap();
    // The proxy comes back first: it cannot enroll yet (its MLM is down),
    // so it takes messages meanwhile and enrolls in the background, then
    // starts again with its new certificate.
    d.restart("p1").unwrap();
    let c = register(&s).await;
    sent.push(
        c.send("alarm", &crate::forward::alarm("while enrolling", None))
            .await
            .unwrap(),
    );
    d.restart("mlm").unwrap();

    // Everything the integrator was told is spooled arrives, once.
    let sent: std::collections::HashSet<String> = sent.into_iter().collect();
    assert!(
        all_stored(&dir, &sent, Duration::from_secs(60)),
        "the re-deployed proxy did not deliver its spool"
    );
    assert_exactly_once(&dir, &sent);
    let new_cert = std::fs::read_to_string(dir.join("p1/tls/cert.pem")).unwrap();
    assert_ne!(
        new_cert,
        std::fs::read_to_string(old.join("cert.pem")).unwrap()
    );
    // The stolen certificate no longer gets in anywhere.
    let mut stolen = TlsConfig::in_dir(&old);
    stolen.crl = None;
    let (_, ct, body) = envelope("redeploy.p1", &["redeploy.p1"]);
    assert!(
        until(15, || async {
            send_env(&client_of(&stolen), &m, &ct, body.clone())
                .await
                .is_err()
        })
        .await
    );
    assert!(send_env(&client_of(&stolen), &a, &ct, body).await.is_err());
    d.stop_all();
}

/// Sends `n` alarms labelled `label` through `c`; their message IDs.
async fn send_alarms(c: &rs_proxy::client::Client, label: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let a = crate::forward::alarm(&format!("{label} {i}"), None);
        ids.push(c.send("alarm", &a).await.unwrap());
    }
    ids
}

/// A renewal request (`POST /rs/v1/enroll`, no token): a signing request
/// for a new key, signed with the key and certificate of `t`.
fn renewal(t: &TlsConfig) -> Vec<u8> {
    let cert = openssl::x509::X509::from_pem(&std::fs::read(&t.cert).unwrap()).unwrap();
    let key = openssl::pkey::PKey::private_key_from_pem(&std::fs::read(&t.key).unwrap()).unwrap();
    let new_key = rs_net::pki::generate_key().unwrap();
    let csr = rs_net::pki::csr(&new_key).unwrap().to_pem().unwrap();
    let flags = openssl::pkcs7::Pkcs7Flags::BINARY | openssl::pkcs7::Pkcs7Flags::NOSMIMECAP;
    openssl::pkcs7::Pkcs7::sign(
        &cert,
        &key,
        &openssl::stack::Stack::new().unwrap(),
        &csr,
        flags,
    )
    .unwrap()
    .to_pem()
    .unwrap()
}

async fn post_renewal(client: &reqwest::Client, at: &str, body: Vec<u8>) -> (u16, String) {
    let r = client
        .post(format!("{}/rs/v1/enroll", base(at)))
        .header("content-type", "application/pkcs7-mime")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

fn cert_of(path: &Path) -> openssl::x509::X509 {
    openssl::x509::X509::from_pem(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_before_they_expire_by_their_holders_only() {
    let dir = tmp("renew");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let m = d
        .mlm(
            "mlm",
            "renew.m1",
            std::slice::from_ref(&a),
            &Extra::default(),
        )
        .unwrap();
    let pki = d.pki.clone().unwrap();

    // p1 holds a certificate for one day, and its clock is 17 hours on:
    // less than a third of the lifetime is left, so it is due. Its MLM is
    // down at first, so the proxy spools and tries again.
    let old = issue(
        &pki,
        &CertSpec::component(&RsId::new("renew.p1").unwrap(), 1),
        &dir.join("p1/tls"),
    );
    let old_cert = cert_of(&old.cert);
    let old_key = std::fs::read(&old.key).unwrap();
    d.node("mlm").stop(Duration::from_secs(8));
    let clock = dir.join("p1-clock");
    std::fs::write(&clock, "+61200s\n").unwrap();
    d.env = crate::backchannel_faults::faketime(&clock);
    let s = d
        .proxy(
            "p1",
            "renew.p1",
            std::slice::from_ref(&m),
            &Extra::default(),
        )
        .unwrap();
    d.env.clear();
    let c = register(&s).await;
    let mut sent = Vec::new();
    sent.extend(send_alarms(&c, "before", 5).await);
    // The MLM comes back with a one-day server certificate and its clock
    // 17 hours on: it renews too (keeping its addresses, or p1 could not
    // reach it) and starts again on the same port.
    let mut spec = CertSpec::component(&RsId::new("renew.m1").unwrap(), 1);
    spec.dns = vec!["localhost".into()];
    spec.ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
    let mlm_tls = issue(&pki, &spec, &dir.join("mlm/tls"));
    let mlm_old = cert_of(&mlm_tls.cert);
    d.nodes.get_mut("mlm").unwrap().env = crate::backchannel_faults::faketime(&clock);
    d.restart("mlm").unwrap();

    // Renewed through the MLM (a new key, the same ID, the server's full
    // lifetime), and started again with it: the spool is delivered once.
    assert!(
        until(60, || async {
            std::fs::read(&old.key).is_ok_and(|k| k != old_key)
                && std::fs::read(&old.cert).is_ok_and(|c| {
                    openssl::x509::X509::from_pem(&c)
                        .is_ok_and(|c| c.serial_number() != old_cert.serial_number())
                })
        })
        .await,
        "p1 did not renew its certificate; see {}",
        dir.join("logs/p1.log").display()
    );
    let mlm_serial = rs_net::pki::serial_hex(&mlm_old);
    assert!(
        until(30, || async {
            rs_net::pki::serial_hex(&cert_of(&mlm_tls.cert)) != mlm_serial
        })
        .await,
        "the MLM did not renew its certificate; see {}",
        dir.join("logs/mlm.log").display()
    );
    let mlm_new = cert_of(&mlm_tls.cert);
    assert!(mlm_new.not_after() > mlm_old.not_after());
    let new_cert = cert_of(&old.cert);
    assert_eq!(
        cn_of(&String::from_utf8(new_cert.to_pem().unwrap()).unwrap()),
        "renew.p1"
    );
    assert!(new_cert.not_after() > old_cert.not_after());
    assert!(!dir.join("p1/tls/key.next").exists() && !dir.join("p1/tls/cert.next").exists());
    // It starts again with the new pair.
    assert!(
        until(30, || async {
            rs_proxy::client::Client::new(&s)
                .register_integrator("suite", "1.0", "linux")
                .await
                .is_ok()
        })
        .await
    );
    let c = register(&s).await;
    sent.extend(send_alarms(&c, "after", 5).await);
    let sent: std::collections::HashSet<String> = sent.into_iter().collect();
    assert!(
        all_stored(&dir, &sent, Duration::from_secs(60)),
        "messages from before and after the renewal were not all stored"
    );
    assert_exactly_once(&dir, &sent);
    assert!(metric(&a, "certificates.renewed").await >= 2);
    // Once renewed it is not due again (its clock still 17 hours on).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rs_net::pki::serial_hex(&cert_of(&old.cert)),
        rs_net::pki::serial_hex(&new_cert)
    );

    // Only the holder of a valid certificate of this CA renews: not a
    // revoked one, not an admin's, not another CA's, not a forgery.
    let anon = rs_net::tls::client_trusting(&pki.admin.ca)
        .unwrap()
        .build()
        .unwrap();
    let p8 = issue(
        &pki,
        &CertSpec::component(&RsId::new("renew.p8").unwrap(), 30),
        &dir.join("p8"),
    );
    let (st, pem) = post_renewal(&anon, &m, renewal(&p8)).await;
    assert_eq!(st, 200, "{pem}");
    assert_eq!(cn_of(&pem), "renew.p8");
    let (code, _, err) = rsctl(&a, &["revoke", "--component", "renew.p8"]);
    assert_eq!(code, 0, "{err}");
    let (st, why) = post_renewal(&anon, &a, renewal(&p8)).await;
    assert_eq!((st, why.contains("revoked")), (403, true), "{why}");
    let (st, why) = post_renewal(&anon, &a, renewal(&pki.admin)).await;
    assert_eq!(st, 403, "{why}");
    let foreign = Pki::create(&dir.join("foreign-ca")).unwrap();
    let f = foreign.issue("renew.p1", &dir.join("foreign")).unwrap();
    let (st, why) = post_renewal(&anon, &a, renewal(&f)).await;
    assert_eq!(
        (st, why.contains("not issued by this CA")),
        (403, true),
        "{why}"
    );
    let mut forged = renewal(&p8);
    let n = forged.len() / 2;
    forged[n] = if forged[n] == b'A' { b'B' } else { b'A' };
    assert_eq!(post_renewal(&anon, &a, forged.clone()).await.0, 403);
    // A refusal leaves the connection it came on usable: the request
    // after it on the same kept-alive connection is answered (a refused
    // signature check once left OpenSSL's reason queued on the server's
    // thread, and the next TLS read there closed the connection unanswered).
    let (at, ca) = (a.clone(), pki.admin.ca.clone());
    let bodies = vec![forged, renewal(&f), renewal(&pki.admin), renewal(&p8)];
    let answers = tokio::task::spawn_blocking(move || renewals_on_one_connection(&at, &ca, bodies))
        .await
        .unwrap();
    assert_eq!(answers, [Some(403); 4]);
    d.stop_all();
}

/// Sends renewal requests one after another on one kept-alive TLS
/// connection to `at`: the status of each answer, `None` once the
/// connection closed instead of answering.
fn renewals_on_one_connection(at: &str, ca: &Path, bodies: Vec<Vec<u8>>) -> Vec<Option<u16>> {
    let mut s = raw_tls(at, ca, None, |_| {}).unwrap();
    let mut answers = Vec::new();
    for body in bodies {
        let head = format!(
            "POST /rs/v1/enroll HTTP/1.1\r\nHost: {at}\r\n\
             Content-Type: application/pkcs7-mime\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        if s.write_all(head.as_bytes())
            .and_then(|()| s.write_all(&body))
            .is_err()
        {
            answers.push(None);
            continue;
        }
        answers.push(read_answer(&mut s));
    }
    answers
}

/// Reads one HTTP/1.1 answer with a Content-Length body: its status.
fn read_answer(s: &mut impl std::io::Read) -> Option<u16> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some(status)
}

/// A client presenting the certificate of `alice`, an admin granted
/// customer globex only.
/// A client without a certificate that sends an API token.
pub(crate) fn bearer_client(ca: &Path, token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    rs_net::tls::client_trusting(ca)
        .unwrap()
        .default_headers(h)
        .build()
        .unwrap()
}

fn globex_admin(pki: &Pki, dir: &Path) -> reqwest::Client {
    client_of(&issue(
        pki,
        &CertSpec {
            name: "alice".into(),
            customer: "globex".into(),
            role: Role::Admin,
            dns: Vec::new(),
            ips: Vec::new(),
            days: 1,
        },
        &dir.join("alice"),
    ))
}

/// A server (`server_extra`: more of its TOML) with one proxy of acme and
/// one of globex talking to it directly, both seen; the server's address
/// and acme's socket.
pub(crate) async fn acme_and_globex(d: &mut Deployment, server_extra: &str) -> (String, PathBuf) {
    let a = d.appserver("127.0.0.1:0", server_extra).unwrap();
    let s1 = d
        .proxy("p1", "acme.p1", std::slice::from_ref(&a), &Extra::default())
        .unwrap();
    d.proxy(
        "g1",
        "globex.p1",
        std::slice::from_ref(&a),
        &Extra::default(),
    )
    .unwrap();
    assert!(
        until(30, || async {
            let c = components(&a).await;
            c.contains("acme.p1") && c.contains("globex.p1")
        })
        .await
    );
    (a, s1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_see_and_command_only_their_customers_and_every_request_is_audited() {
    let dir = tmp("admins");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, _) = acme_and_globex(&mut d, "").await;
    let pki = d.pki.clone().unwrap();
    let alice = globex_admin(&pki, &dir);
    let url = |p: &str| format!("{}/rs/v1/control/{p}", base(&a));

    // She sees globex only.
    let list = alice.get(url("components")).send().await.unwrap();
    assert_eq!(list.status(), 200);
    let list = list.text().await.unwrap();
    assert!(
        list.contains("globex.p1") && !list.contains("acme.p1"),
        "{list}"
    );
    let r = alice
        .get(url("messages?customer=acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // She commands globex, not acme; provider-wide settings are not hers.
    let send = |to: &str| format!(r#"<send><to id="{to}"/><control action="ping"/></send>"#);
    let r = alice
        .post(url("send"))
        .body(send("acme.p1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = alice
        .post(url("send"))
        .body(send("globex.p1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let hers = attr(&r.text().await.unwrap(), "id").to_owned();
    let r = alice
        .get(url(&format!("jobs/{hers}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = alice
        .put(url("throttle"))
        .body("<throttle/>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // A component's certificate is not an admin's; no certificate, no API.
    let comp = component_client(&a, "acme.p1").unwrap();
    assert_eq!(
        comp.get(url("components")).send().await.unwrap().status(),
        403
    );
    let anon = rs_net::tls::client_trusting(&pki.admin.ca)
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(
        anon.get(url("components")).send().await.unwrap().status(),
        401
    );
    // The provider's admin commands anyone.
    let (s, body) = post(&a, &send("acme.p1")).await;
    assert_eq!(s, 200);
    // ... and its job is not alice's to see: it is not found (a refusal
    // would name the destination, another customer's component).
    let theirs = attr(&body, "id").to_owned();
    let r = alice
        .get(url(&format!("jobs/{theirs}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let text = r.text().await.unwrap();
    assert!(!text.contains("acme"), "{text}");

    // Every request is in the audit log: who, what, when, the outcome.
    let mut log = String::new();
    for _ in 0..100 {
        log = admin(&a)
            .get(url("audit?limit=100"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if log.contains(r#"admin="alice""#) && log.contains(r#"status="403""#) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        log.contains(r#"admin="alice""#) && log.contains(r#"status="403""#),
        "{log}"
    );
    assert!(log.contains(r#"admin="ops""#));
    assert!(log.contains(r#"admin="(no certificate)""#) || log.contains("status=\"401\""));
    rs_tests::assert_control_api_valid(log.as_bytes(), &dir.join("audit.xml"));
    let hers = alice
        .get(url("audit"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        hers.contains(r#"admin="alice""#) && !hers.contains(r#"admin="ops""#),
        "{hers}"
    );
    d.stop_all();
}

/// Writes `req` on a TLS connection and reads everything that comes back
/// until the server closes (or 20 s pass).
fn exchange(mut s: openssl::ssl::SslStream<std::net::TcpStream>, req: &[u8]) -> String {
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_slow_clients_and_replayed_ids_are_refused_over_tls() {
    let dir = tmp("hostile");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let pki = d.pki.clone().unwrap();
    let me = component_tls(&a, "acme.p3").unwrap().unwrap();
    let ca: PathBuf = pki.admin.ca.clone();

    let (a2, ca2, me2) = (a.clone(), ca.clone(), me.clone());
    let (cl_te, dup_cl, slow_head, no_handshake) = tokio::task::spawn_blocking(move || {
        let conn = || raw_tls(&a2, &ca2, Some(&me2), |_| {}).unwrap();
        // Content-Length and Transfer-Encoding together, the length
        // covering a second request hidden after the chunked body.
        let cl_te = exchange(
            conn(),
            b"POST /rs/v1/envelope HTTP/1.1\r\nhost: x\r\ncontent-length: 57\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /rs/v1/control/components HTTP/1.1\r\nhost: x\r\n\r\n",
        );
        // Two Content-Lengths that disagree.
        let dup_cl = exchange(
            conn(),
            b"POST /rs/v1/envelope HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 50\r\n\r\nhello",
        );
        // A request head that never ends: dropped after the header
        // timeout, not held.
        let started = std::time::Instant::now();
        let slow = exchange(conn(), b"POST /rs/v1/envelope HTTP/1.1\r\nhost: x\r\n");
        let slow_head = (slow, started.elapsed());
        // A TCP connection that never starts its handshake.
        let started = std::time::Instant::now();
        let mut tcp = std::net::TcpStream::connect(&a2).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let mut b = [0u8; 1];
        let r = tcp.read(&mut b);
        let no_handshake = (r.map(|n| n == 0).unwrap_or(true), started.elapsed());
        (cl_te, dup_cl, slow_head, no_handshake)
    })
    .await
    .unwrap();
    // One answer, not 200, and the connection closed: the hidden request
    // was never served.
    assert_eq!(cl_te.matches("HTTP/1.1 ").count(), 1, "{cl_te}");
    assert!(!cl_te.starts_with("HTTP/1.1 200"), "{cl_te}");
    assert!(cl_te.contains("connection: close"), "{cl_te}");
    assert!(!cl_te.contains("<components"), "{cl_te}");
    assert!(dup_cl.starts_with("HTTP/1.1 400"), "{dup_cl}");
    assert!(!slow_head.0.starts_with("HTTP/1.1 200"), "{}", slow_head.0);
    assert!(
        slow_head.1 < Duration::from_secs(19),
        "held {:?}",
        slow_head.1
    );
    assert!(no_handshake.0, "the server kept a silent connection");
    assert!(no_handshake.1 < Duration::from_secs(19));
    assert!(metric(&a, "tls.handshakes_failed").await >= 1);

    // The same message twice (a replay, or a retry after a lost reply):
    // accepted both times, stored once.
    let http = client_of(&me);
    let (msgs, ct, body) = envelope("acme.p3", &["acme.p3"]);
    for _ in 0..2 {
        let (st, reply) = send_env(&http, &a, &ct, body.clone()).await.unwrap();
        assert_eq!(st, 200);
        assert_eq!(*outcome_of(&reply.unwrap(), &msgs[0]), Outcome::Accepted);
    }
    let ids = stored_ids(&dir.join("appserver")).unwrap();
    let id = msgs[0].header.id.to_string();
    assert_eq!(ids.iter().filter(|x| **x == id).count(), 1);
    assert!(
        metric(&a, "store.duplicates_total").await >= 1
            || metric(&a, "messages.duplicates").await >= 1
    );
    d.stop_all();
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Every file under `dir` (databases, their journals) that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| find(&b, needle).is_some()) {
                out.push(p);
            }
        }
    }
    out
}

/// An alarm from `source` carrying `text`, sealed by `sealer` when given.
fn sealed_alarm(
    source: &str,
    text: &str,
    sealer: Option<&rs_net::seal::Sealer>,
) -> rs_protocol::RawMessage {
    let mut m = rs_protocol::samples::alarm_of_size(0, 256);
    if let Route::Source(src) = &mut m.header.route {
        src.component = RsId::new(source).unwrap();
        src.qos.expiry = None;
    }
    m.header.id = rs_protocol::MessageId::generate();
    m.header.created = Timestamp::now();
    m.header.routing.clear();
    if let rs_protocol::Content::Alarm(a) = &mut m.content {
        a.text = text.into();
    }
    let raw = m.to_raw();
    match sealer {
        Some(s) => s.seal(&raw).unwrap(),
        None => raw,
    }
}

/// POSTs raw messages as `sender`; the outcome of each.
async fn post_raw(
    http: &reqwest::Client,
    addr: &str,
    sender: &str,
    msgs: &[rs_protocol::RawMessage],
) -> Vec<Outcome> {
    let meta = EnvelopeMeta::new(RsId::new(sender).unwrap(), Timestamp::now());
    let mut w = EnvelopeWriter::new(&meta);
    for m in msgs {
        w.push_raw(m);
    }
    let enc = w.finish();
    let (st, reply) = send_env(http, addr, &enc.content_type, enc.body.to_vec())
        .await
        .unwrap();
    assert_eq!(st, 200);
    let reply = reply.unwrap();
    msgs.iter()
        .map(|m| {
            reply
                .meta
                .outcomes
                .iter()
                .find(|(id, _)| *id == m.header.id)
                .expect("an outcome for every message")
                .1
                .clone()
        })
        .collect()
}

fn refused_as(o: &Outcome, code: &str) -> bool {
    matches!(o, Outcome::Rejected(r) if r.code.as_str() == code)
}

/// Two sites behind MLM `m`: acme.p1 seals what it sends (signed, and
/// encrypted to the server's certificate `server_cert`), acme.p2 does not;
/// each site's socket and a registered client.
async fn sealed_and_open_sites(
    d: &mut Deployment,
    m: &str,
    server_cert: &Path,
) -> (
    (PathBuf, rs_proxy::client::Client),
    (PathBuf, rs_proxy::client::Client),
) {
    let sealed_site = Extra {
        tables: format!("[seal]\nencrypt_to = \"{}\"\n", server_cert.display()),
        ..Extra::default()
    };
    let up = [m.to_owned()];
    let s1 = d.proxy("p1", "acme.p1", &up, &sealed_site).unwrap();
    let s2 = d.proxy("p2", "acme.p2", &up, &Extra::default()).unwrap();
    let (c1, c2) = (register(&s1).await, register(&s2).await);
    ((s1, c1), (s2, c2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_seals_keep_what_relays_messages_from_reading_or_altering_them() {
    let dir = tmp("seal");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let pki = d.pki.clone().unwrap();
    // The server's certificate exists before the sites that encrypt to it.
    let server_cert = pki
        .issue("rs.a1", &dir.join("appserver").join("tls"))
        .unwrap()
        .cert;
    let port = rs_tests::deploy::held_port();
    // A custody MLM, its upstream down: what it relays sits in its spool.
    // It seals what it makes itself (heartbeats), signed only.
    let m = d
        .mlm(
            "mlm",
            "acme.m1",
            std::slice::from_ref(&port),
            &Extra {
                top: "custody = true".into(),
                tables: "[seal]\n".into(),
                ..Extra::default()
            },
        )
        .unwrap();
    let ((s1, c1), (s2, c2)) = sealed_and_open_sites(&mut d, &m, &server_cert).await;
    let mut sealed_ids = Vec::new();
    let mut open_ids = Vec::new();
    for i in 0..5 {
        let a = crate::forward::alarm(&format!("sealed-secret-{i}"), None);
        sealed_ids.push(c1.send("alarm", &a).await.unwrap());
        let a = crate::forward::alarm(&format!("open-text-{i}"), None);
        open_ids.push(c2.send("alarm", &a).await.unwrap());
    }
    let taken = |s: PathBuf| async move {
        rs_tests::deploy::proxy_metrics(&s)
            .await
            .is_ok_and(|m| m.get("spool.messages") == Some(&0))
    };
    assert!(
        until(30, || taken(s1.clone())).await,
        "the MLM did not take custody"
    );
    assert!(
        until(30, || taken(s2.clone())).await,
        "the MLM did not take custody"
    );
    let p1 = rs_tests::deploy::proxy_metrics(&s1).await.unwrap();
    assert!(p1.get("seal.sealed").copied().unwrap_or(0) >= 5, "{p1:?}");
    // What the MLM holds: the unsealed site's text, never the sealed one's.
    let mlm_dir = dir.join("mlm");
    assert!(!files_holding(&mlm_dir, b"open-text-").is_empty());
    assert_eq!(
        files_holding(&mlm_dir, b"sealed-secret-"),
        Vec::<PathBuf>::new()
    );

    // The server comes up demanding seals.
    let a = d
        .appserver(&port, "[seal]\nrequire = \"signed\"\n")
        .unwrap();
    let appdir = dir.join("appserver");
    assert!(
        until(60, || async {
            // Empty until the server has opened (and migrated) its store.
            let ids = stored_ids(&appdir).unwrap_or_default();
            sealed_ids.iter().all(|i| ids.contains(i))
        })
        .await,
        "sealed messages were not stored"
    );
    // Opened at the server: the text as the site wrote it, marked.
    let body = control_get(&a, "messages?customer=acme&type=alarm&limit=100").await;
    assert!(body.contains("sealed-secret-3"), "{body}");
    assert!(body.contains(r#"seal="encrypted""#), "{body}");
    assert!(metric(&a, "seal.opened_encrypted").await >= 5);
    // The MLM's own heartbeats arrive signed.
    assert!(until(30, || async { metric(&a, "seal.opened_signed").await >= 1 }).await);
    // Unsealed messages are refused by the policy, never stored.
    assert!(
        until(30, || async {
            metric(&a, "seal.unsealed_refused").await >= 5
        })
        .await
    );
    let ids = stored_ids(&appdir).unwrap();
    assert!(open_ids.iter().all(|i| !ids.contains(i)));

    // A relay that terminates HTTPS (here: holding the MLM's certificate)
    // tries its hand at sealed messages from a site.
    let relay = component_client(&a, "acme.m1").unwrap();
    let site_tls = component_tls(&a, "acme.p91").unwrap().unwrap();
    let signer =
        rs_net::seal::Sealer::new(&site_tls, &rs_net::seal::SealConfig::default()).unwrap();
    let encrypter = rs_net::seal::Sealer::new(
        &site_tls,
        &rs_net::seal::SealConfig {
            encrypt_to: Some(server_cert.clone()),
        },
    )
    .unwrap();
    let good = sealed_alarm("acme.p91.s1", "intact", Some(&signer));
    // Content altered inside the signature.
    let mut altered = sealed_alarm("acme.p91", "pay 100 to alice", Some(&signer));
    let mut der = altered.content.to_vec();
    let at = find(&der, b"pay 100").unwrap();
    der[at + 4] = b'9';
    altered.content = der.into();
    // A seal moved onto another message's header (a new ID: a replay).
    let mut moved = sealed_alarm("acme.p91", "once", Some(&signer));
    moved.header.id = rs_protocol::MessageId::generate();
    // Reclassified.
    let mut reclassified = sealed_alarm("acme.p91", "minor thing", Some(&signer));
    reclassified.header.class.subclass = "other".into();
    // Ciphertext altered.
    let mut scrambled = sealed_alarm("acme.p91", "secret", Some(&encrypter));
    let mut der = scrambled.content.to_vec();
    let n = der.len();
    der[n - 20] ^= 0x55;
    scrambled.content = der.into();
    // Signed by another site over a header naming this one.
    let other = rs_net::seal::Sealer::new(
        &component_tls(&a, "acme.p92").unwrap().unwrap(),
        &rs_net::seal::SealConfig::default(),
    )
    .unwrap();
    let claimed = other
        .seal(&sealed_alarm("acme.p91", "as someone else", None))
        .unwrap();
    // An XML content sealed under another media type.
    let mislabelled = {
        let mut m = sealed_alarm("acme.p91", "typed", None);
        m.content_type = "application/json".into();
        signer.seal(&m).unwrap()
    };
    let unsealed = sealed_alarm("acme.p91", "plain", None);
    let all = [
        good.clone(),
        altered,
        moved,
        reclassified,
        scrambled,
        claimed,
        mislabelled,
        unsealed,
    ];
    let refused_before = metric(&a, "seal.refused").await;
    let outcomes = post_raw(&relay, &a, "acme.m1", &all).await;
    assert_eq!(outcomes[0], Outcome::Accepted, "{outcomes:?}");
    for (i, o) in outcomes.iter().enumerate().take(7).skip(1) {
        assert!(refused_as(o, "seal-invalid"), "message {i}: {o:?}");
    }
    assert!(
        refused_as(&outcomes[7], "seal-required"),
        "{:?}",
        outcomes[7]
    );
    assert_eq!(metric(&a, "seal.refused").await - refused_before, 6);
    let ids = stored_ids(&appdir).unwrap();
    assert!(ids.contains(&good.header.id.to_string()));
    for m in &all[1..] {
        assert!(!ids.contains(&m.header.id.to_string()));
    }

    // A revoked site's seals are refused, even when relayed by a tier that
    // never saw its certificate.
    let serial = site_tls.identity().unwrap().serial;
    let (code, _, err) = rsctl(&a, &["revoke", "--serial", &serial]);
    assert_eq!(code, 0, "{err}");
    let late = sealed_alarm("acme.p91", "after revocation", Some(&signer));
    let outcomes = post_raw(&relay, &a, "acme.m1", std::slice::from_ref(&late)).await;
    assert!(refused_as(&outcomes[0], "seal-invalid"), "{outcomes:?}");
    d.stop_all();
}

/// Modules that read or change contents (here an attribute change and an
/// aggregation catching every alarm) cannot read a sealed alarm: it must
/// pass them untouched and be stored opened at the server, never be
/// refused at the MLM (which dead-lettered it at the proxy after its
/// integrator had been told it was accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_alarms_pass_content_reading_modules_untouched_and_are_stored() {
    let dir = tmp("seal-modules");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    let server_cert = dir.join("appserver").join("tls").join("cert.pem");
    let modules = Extra {
        tables: "[[modify]]\ntype = \"alarm\"\nset_subclass = \"renamed\"\nadd_detail = \"seen.by=m1\"\n\n\
                 [[aggregate]]\ntype = \"alarm\"\nwindow_secs = 1\ngroup_by = \"source\"\n"
            .into(),
        ..Extra::default()
    };
    let m = d
        .mlm("mlm", "acme.m1", std::slice::from_ref(&a), &modules)
        .unwrap();
    let ((s1, c1), (_, c2)) = sealed_and_open_sites(&mut d, &m, &server_cert).await;
    let mut sealed = std::collections::HashSet::new();
    let mut open = Vec::new();
    for i in 0..3 {
        let disk = |text: String| rs_proxy::api::SendRequest {
            subclass: Some("disk".into()),
            ..crate::forward::alarm(&text, None)
        };
        sealed.insert(
            c1.send("alarm", &disk(format!("sealed disk {i}")))
                .await
                .unwrap(),
        );
        open.push(
            c2.send("alarm", &disk(format!("open disk {i}")))
                .await
                .unwrap(),
        );
    }
    assert!(
        all_stored(&dir, &sealed, Duration::from_secs(60)),
        "sealed alarms were not stored"
    );
    assert_exactly_once(&dir, &sealed);
    // Stored as the site sealed them: opened, not renamed, not annotated.
    let body = control_get(&a, "messages?component=acme.p1.s1&type=alarm&limit=100").await;
    assert!(body.contains("sealed disk 2"), "{body}");
    assert!(body.contains(r#"seal="encrypted""#), "{body}");
    assert!(
        !body.contains("renamed") && !body.contains("seen.by"),
        "{body}"
    );
    // The unsealed site's alarms were read, changed and aggregated.
    assert!(
        until(30, || async {
            stored_ids(&dir.join("appserver"))
                .unwrap()
                .iter()
                .any(|id| id.starts_with("agg-"))
        })
        .await,
        "no summary of the open site's alarms"
    );
    let stored = stored_ids(&dir.join("appserver")).unwrap();
    assert!(open.iter().all(|id| !stored.contains(id)));
    let mm = server_metrics(&m).await.unwrap();
    assert_eq!(mm.get("messages.aggregated"), Some(&3), "{mm:?}");
    assert_eq!(mm.get("messages.rejected"), Some(&0), "{mm:?}");
    // Nobody was told "accepted" for a message later refused for good.
    let p1 = rs_tests::deploy::proxy_metrics(&s1).await.unwrap();
    assert_eq!(p1.get("spool.dead_letters"), Some(&0), "{p1:?}");
    assert!(p1.get("seal.sealed").copied().unwrap_or(0) >= 3, "{p1:?}");
    d.stop_all();
}

/// An empty envelope from `sender`; with `hold`, asking the tier to hold
/// the reply (a long poll, as a proxy with nothing to send keeps one open).
pub(crate) fn empty_envelope(sender: &str, hold: Option<Duration>) -> (String, Vec<u8>) {
    let mut meta = EnvelopeMeta::new(RsId::new(sender).unwrap(), Timestamp::now());
    meta.poll = hold;
    let enc = EnvelopeWriter::new(&meta).finish();
    (enc.content_type, enc.body.to_vec())
}

/// `openssl s_client` with a client certificate, saving (`-sess_out`) or
/// offering (`-sess_in`) a session; what it printed.
fn s_client(addr: &str, t: &TlsConfig, version: &str, sess: (&str, &Path)) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("openssl")
        .args(["s_client", "-connect", addr, version, "-ign_eof"])
        .arg("-cert")
        .arg(&t.cert)
        .arg("-key")
        .arg(&t.key)
        .arg("-CAfile")
        .arg(&t.ca)
        .arg(sess.0)
        .arg(sess.1)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl (scripts/packages installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET /rs/v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Clients resume TLS sessions (curl and Java do by default): both
/// servers let them, over TLS 1.2 and 1.3. A certificate revoked while
/// its connections are open is cut off on them at once (a held long poll,
/// a kept-alive connection), not only refused on new ones, and a resumed
/// session of it is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_and_a_revoked_certificate_is_cut_off_on_open_connections() {
    let dir = tmp("revoked-open");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, m) = d.server_and_mlm().unwrap();
    let me = component_tls(&a, "acme.p7").unwrap().unwrap();
    // Resumption, at both servers, in both versions.
    let mut sessions = Vec::new();
    for (addr, tier) in [(&a, "server"), (&m, "mlm")] {
        for v in ["-tls1_2", "-tls1_3"] {
            let f = dir.join(format!("session-{tier}{v}.pem"));
            let first = s_client(addr, &me, v, ("-sess_out", &f));
            assert!(first.contains("HTTP/1.1 200"), "{tier} {v}: {first}");
            let again = s_client(addr, &me, v, ("-sess_in", &f));
            assert!(again.contains("Reused,"), "{tier} {v} not resumed: {again}");
            assert!(again.contains("HTTP/1.1 200"), "{tier} {v}: {again}");
            sessions.push((addr.clone(), tier, v, f));
        }
    }

    // Open connections of acme.p7: long polls held at both tiers, and a
    // client with a kept-alive connection to each.
    let http = client_of(&me);
    let mut polls = Vec::new();
    for addr in [&a, &m] {
        let (ct, body) = empty_envelope("acme.p7", None);
        let (st, _) = send_env(&http, addr, &ct, body).await.unwrap();
        assert_eq!(st, 200, "kept-alive connection to {addr}");
        let (ct, body) = empty_envelope("acme.p7", Some(Duration::from_secs(25)));
        let (h, addr, ct) = (http.clone(), addr.clone(), ct.clone());
        polls.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            (send_env(&h, &addr, &ct, body).await, started.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, _, err) = rsctl(&a, &["revoke", "--serial", &me.identity().unwrap().serial]);
    assert_eq!(code, 0, "{err}");
    for (i, p) in polls.into_iter().enumerate() {
        let (r, took) = p.await.unwrap();
        // A held poll is answered 200 when its hold ends: it must have
        // been cut instead.
        assert!(
            !matches!(r, Ok((200, _))),
            "poll {i} answered after {took:?}: {r:?}"
        );
    }
    for addr in [&a, &m] {
        let (ct, body) = empty_envelope("acme.p7", None);
        let r = send_env(&http, addr, &ct, body).await;
        assert!(!matches!(r, Ok((200, _))), "{addr} still serves it: {r:?}");
        assert!(metric(addr, "tls.revoked_cut").await >= 1, "{addr}");
    }
    // A session resumed with the revoked certificate gets nothing.
    for (addr, tier, v, f) in &sessions {
        let again = s_client(addr, &me, v, ("-sess_in", f));
        assert!(!again.contains("HTTP/1.1 200"), "{tier} {v}: {again}");
    }
    d.stop_all();
}

/// Every route of the control API, as docs/control-api.md lists them
/// (`GET /rs/v1/control/jobs/{id}`, query strings and options left out).
fn documented_control_routes() -> std::collections::BTreeSet<String> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/control-api.md"),
    )
    .unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter(|l| l.contains(" /rs/v1/control/"))
        .map(|l| {
            let route = &l[..l.find('`').unwrap()];
            route.split(['?', '[']).next().unwrap().trim().to_owned()
        })
        .collect()
}

/// What an admin of one customer must get from a route aimed at another
/// customer's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Refused (`403`, or `404` as if it did not exist).
    Refused,
    /// Answered, showing only what is granted (nothing of the other).
    Scoped,
}

/// An admin granted one customer (globex) walks every control route
/// against another's (acme's) data: each is refused or answers with
/// globex's part only. Routes checked by path beside the router also
/// hold for the same path with a trailing slash, which the router
/// matches too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_of_one_customer_gets_nothing_of_another_on_any_route() {
    let dir = tmp("grants-walk");
    let mut d = Deployment::new(&dir, exe()).unwrap();
    let (a, s1) = acme_and_globex(&mut d, "[bulk]\nmin_free_disk_mb = 1\n").await;
    let url = |p: &str| format!("{}/rs/v1/control/{p}", base(&a));
    let ops = admin(&a);
    // acme's data, made by the provider's admin and by acme's site.
    let c1 = register(&s1).await;
    let acme_alarm = c1
        .send("alarm", &crate::forward::alarm("acme's own alarm", None))
        .await
        .unwrap();
    let file = dir.join("acme-core.txt");
    std::fs::write(&file, b"acme's core file").unwrap();
    c1.register_integrator("cores", "1.0", "linux")
        .await
        .unwrap();
    let up = c1
        .upload(&rs_proxy::bulk::UploadRequest {
            integrator: "cores".into(),
            path: file.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        until(60, || async {
            c1.upload_state(&up.id)
                .await
                .is_ok_and(|u| u.state == "done")
        })
        .await,
        "acme's upload did not complete: {:?}",
        c1.upload_state(&up.id).await
    );
    for (method, path, body) in [
        (
            "PUT",
            "components/acme.p1/tags",
            r#"<tags><tag name="eu"/></tags>"#,
        ),
        (
            "PUT",
            "groups/acme-all",
            r#"<group name="acme-all" customer="acme"/>"#,
        ),
        (
            "PUT",
            "groups/mixed",
            r#"<group name="mixed"><member id="acme.p1"/><member id="globex.p1"/></group>"#,
        ),
        (
            "PUT",
            "throttle",
            r#"<throttle><rule name="acme-rate" customer="acme" per="customer" messages-per-sec="1000"/></throttle>"#,
        ),
        (
            "POST",
            "subscriptions",
            r#"<subscription name="acme-feed" customer="acme" delivery="feed"/>"#,
        ),
    ] {
        let r = ops
            .request(method.parse().unwrap(), url(path))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "{method} {path}: {}",
            r.text().await.unwrap()
        );
    }
    let (st, body) = post(
        &a,
        r#"<send><to id="acme.p1"/><control action="ping"/></send>"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let acme_job = attr(&body, "id").to_owned();
    let acme_job_message = attr(&body, "message").to_owned();
    let r = ops
        .post(url("rollouts"))
        .body(r#"<rollout name="acme-ping"><to id="acme.p1"/><control action="ping"/></rollout>"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let acme_rollout = attr(&r.text().await.unwrap(), "id").to_owned();
    let r = ops
        .put(url("files/acme-agent.tgz"))
        .body(b"acme's software".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sha = attr(&r.text().await.unwrap(), "sha256").to_owned();
    let serial = component_tls(&a, "acme.p1")
        .unwrap()
        .unwrap()
        .identity()
        .unwrap()
        .serial;

    let pki = d.pki.clone().unwrap();
    let alice = globex_admin(&pki, &dir);
    use Expect::{Refused, Scoped};
    let offer =
        format!(r#"<offer file="{sha}" class="software" sub="package"><to id="acme.p1"/></offer>"#);
    let walk: Vec<(&str, &str, String, String, Expect)> = vec![
        (
            "GET /rs/v1/control/components",
            "GET",
            "components".into(),
            String::new(),
            Scoped,
        ),
        (
            "GET /rs/v1/control/farms",
            "GET",
            "farms".into(),
            String::new(),
            Scoped,
        ),
        (
            "PUT /rs/v1/control/components/{id}/tags",
            "PUT",
            "components/acme.p1/tags".into(),
            r#"<tags><tag name="mine"/></tags>"#.into(),
            Refused,
        ),
        (
            "GET /rs/v1/control/groups",
            "GET",
            "groups".into(),
            String::new(),
            Scoped,
        ),
        (
            "GET /rs/v1/control/groups/{name}",
            "GET",
            "groups/acme-all".into(),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/groups/{name}",
            "GET",
            "groups/mixed".into(),
            String::new(),
            Scoped,
        ),
        (
            "PUT /rs/v1/control/groups/{name}",
            "PUT",
            "groups/mixed".into(),
            r#"<group name="mixed"><member id="globex.p1"/></group>"#.into(),
            Refused,
        ),
        (
            "DELETE /rs/v1/control/groups/{name}",
            "DELETE",
            "groups/acme-all".into(),
            String::new(),
            Refused,
        ),
        (
            "POST /rs/v1/control/send",
            "POST",
            "send".into(),
            r#"<send><to id="acme.p1"/><control action="ping"/></send>"#.into(),
            Refused,
        ),
        (
            "GET /rs/v1/control/jobs/{id}",
            "GET",
            format!("jobs/{acme_job}"),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/jobs",
            "GET",
            "jobs?limit=1000".into(),
            String::new(),
            Scoped,
        ),
        (
            "GET /rs/v1/control/jobs",
            "GET",
            format!("jobs?before={acme_job}"),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/messages",
            "GET",
            "messages?customer=acme".into(),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/messages",
            "GET",
            "messages?limit=1000".into(),
            String::new(),
            Scoped,
        ),
        (
            "GET /rs/v1/control/messages/{id}/trace",
            "GET",
            format!("messages/{acme_alarm}/trace"),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/messages/{id}/trace",
            "GET",
            format!("messages/{acme_job_message}/trace"),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/export",
            "GET",
            "export".into(),
            String::new(),
            Refused,
        ),
        (
            "POST /rs/v1/control/subscriptions",
            "POST",
            "subscriptions".into(),
            r#"<subscription name="peek" customer="acme" delivery="feed"/>"#.into(),
            Refused,
        ),
        (
            "GET /rs/v1/control/subscriptions",
            "GET",
            "subscriptions".into(),
            String::new(),
            Refused,
        ),
        (
            "DELETE /rs/v1/control/subscriptions/{name}",
            "DELETE",
            "subscriptions/acme-feed".into(),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/subscriptions/{name}/feed",
            "GET",
            "subscriptions/acme-feed/feed?wait=0".into(),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/tasks",
            "GET",
            "tasks".into(),
            String::new(),
            Refused,
        ),
        (
            "POST /rs/v1/control/tasks/replay",
            "POST",
            "tasks/replay".into(),
            String::new(),
            Refused,
        ),
        (
            "PUT /rs/v1/control/files/{name}",
            "PUT",
            "files/acme-agent.tgz".into(),
            "replaced".into(),
            Refused,
        ),
        (
            "POST /rs/v1/control/offer",
            "POST",
            "offer".into(),
            offer,
            Refused,
        ),
        (
            "GET /rs/v1/control/uploads",
            "GET",
            "uploads".into(),
            String::new(),
            Scoped,
        ),
        (
            "GET /rs/v1/control/uploads",
            "GET",
            "uploads?component=acme.p1.s1".into(),
            String::new(),
            Scoped,
        ),
        (
            "GET /rs/v1/control/uploads/{request}/file",
            "GET",
            format!("uploads/{}/file", up.request),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/throttle",
            "GET",
            "throttle".into(),
            String::new(),
            Scoped,
        ),
        (
            "PUT /rs/v1/control/throttle",
            "PUT",
            "throttle".into(),
            "<throttle/>".into(),
            Refused,
        ),
        (
            "POST /rs/v1/control/enrollments",
            "POST",
            "enrollments?customer=acme".into(),
            String::new(),
            Refused,
        ),
        (
            "POST /rs/v1/control/revoke",
            "POST",
            "revoke?component=acme.p1".into(),
            String::new(),
            Refused,
        ),
        (
            "POST /rs/v1/control/revoke",
            "POST",
            format!("revoke?serial={serial}"),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/certificates",
            "GET",
            "certificates".into(),
            String::new(),
            Refused,
        ),
        (
            "GET /rs/v1/control/audit",
            "GET",
            "audit?limit=1000".into(),
            String::new(),
            Scoped,
        ),
        (
            "POST /rs/v1/control/rollouts",
            "POST",
            "rollouts".into(),
            r#"<rollout name="peek"><to id="acme.p1"/><control action="ping"/></rollout>"#.into(),
            Refused,
        ),
        (
            "GET /rs/v1/control/rollouts",
            "GET",
            "rollouts".into(),
            String::new(),
            Scoped,
        ),
        (
            "GET /rs/v1/control/rollouts/{id}",
            "GET",
            format!("rollouts/{acme_rollout}"),
            String::new(),
            Refused,
        ),
        (
            "POST /rs/v1/control/rollouts/{id}/{op}",
            "POST",
            format!("rollouts/{acme_rollout}/abort"),
            String::new(),
            Refused,
        ),
        (
            "POST /rs/v1/control/tokens",
            "POST",
            "tokens".into(),
            r#"<token name="acme-backdoor" customers="acme"/>"#.into(),
            Refused,
        ),
        (
            "GET /rs/v1/control/tokens",
            "GET",
            "tokens".into(),
            String::new(),
            Refused,
        ),
        (
            "DELETE /rs/v1/control/tokens/{name}",
            "DELETE",
            "tokens/acme-ops".into(),
            String::new(),
            Refused,
        ),
    ];
    let walked: std::collections::BTreeSet<String> = walk.iter().map(|w| w.0.to_owned()).collect();
    assert_eq!(
        walked,
        documented_control_routes(),
        "every documented control route is walked"
    );
    let anon = rs_net::tls::client_trusting(&pki.admin.ca)
        .unwrap()
        .build()
        .unwrap();
    // The same walk with an API token of globex's (no certificate), and
    // acme's own token, which the walk must not be able to revoke.
    let token_of = |name: &str, customers: &str| {
        let ops = ops.clone();
        let url = url("tokens");
        let body = format!(r#"<token name="{name}" customers="{customers}"/>"#);
        async move {
            let r = ops.post(url).body(body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            attr(&r.text().await.unwrap(), "secret").to_owned()
        }
    };
    let alice_token = bearer_client(&pki.admin.ca, &token_of("alice-t", "globex").await);
    let acme_token = token_of("acme-ops", "acme").await;
    for (alice, (route, method, path, body, expect)) in walk
        .iter()
        .map(|w| (&alice, w))
        .chain(walk.iter().map(|w| (&alice_token, w)))
    {
        let send = |c: &reqwest::Client, p: String| {
            c.request(method.parse().unwrap(), p)
                .body(body.clone())
                .send()
        };
        let r = send(alice, url(path)).await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        match expect {
            Refused => assert!(
                matches!(status, 403 | 404),
                "{route} ({path}): {status} {text}"
            ),
            Scoped => assert_eq!(status, 200, "{route} ({path}): {text}"),
        }
        // A refusal is a line of text (it may repeat what was asked); an
        // answer shows nothing of acme's.
        let leak = match (expect, *route) {
            (Refused, _) => text.starts_with("<?xml") || text.len() > 200,
            (Scoped, "GET /rs/v1/control/audit") => text.contains(r#"admin="ops""#),
            // The list names no destination: acme's job must not be in it.
            (Scoped, "GET /rs/v1/control/jobs") => text.contains(acme_job.as_str()),
            (Scoped, "GET /rs/v1/control/rollouts") => {
                text.contains(acme_rollout.as_str()) || text.contains("acme-ping")
            }
            (Scoped, _) => {
                text.contains("acme.p1")
                    || text.contains("acme-rate")
                    || text.contains("customer=\"acme\"")
            }
        };
        assert!(!leak, "{route} ({path}) shows acme's data: {text}");
        // The same path with a trailing slash is matched by the router
        // too, and must be guarded the same way.
        let (p, q) = path.split_once('?').unwrap_or((path.as_str(), ""));
        let slashed = url(&format!("{p}/{}{q}", if q.is_empty() { "" } else { "?" }));
        let again = send(alice, slashed.clone())
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!(again != 200 || *expect == Scoped, "{slashed}: {again}");
        let anon_status = send(&anon, slashed.clone())
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!(
            matches!(anon_status, 401 | 404),
            "{slashed} without a certificate: {anon_status}"
        );
    }
    // Nothing of acme's changed: its token still works, and no token was
    // made for acme.
    let acme = bearer_client(&pki.admin.ca, &acme_token);
    let r = acme.get(url("components")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let tokens = control_get(&a, "tokens").await;
    assert!(!tokens.contains("acme-backdoor"), "{tokens}");
    let comps = components(&a).await;
    assert!(!comps.contains("mine"), "{comps}");
    let groups = control_get(&a, "groups").await;
    assert!(
        groups.contains("acme-all") && groups.contains("acme.p1"),
        "{groups}"
    );
    let subs = control_get(&a, "subscriptions").await;
    assert!(subs.contains("acme-feed"), "{subs}");
    // The status page needs a certificate, with or without the slash.
    for p in ["/rs/v1/status", "/rs/v1/status/"] {
        let st = anon
            .get(format!("{}{p}", base(&a)))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, 401, "{p}");
    }
    d.stop_all();
}

/// A directory bind-mounted read-only onto itself (what systemd's
/// `ProtectSystem=strict` does to a path not in `ReadWritePaths=`), until
/// dropped.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(dir: &Path) -> ReadOnly {
        let run = |args: &[&str]| {
            let st = std::process::Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .status()
                .unwrap();
            assert!(st.success(), "mount {args:?}");
        };
        run(&["--bind"]);
        let ro = ReadOnly(dir.to_owned());
        run(&["-o", "remount,bind,ro"]);
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The CA directory read-only under the server (a systemd unit with
/// ProtectSystem=strict that does not list it): enrollment and revocation
/// are server faults, answered 5xx and logged (they were 400 with nothing
/// in the log), and a server started that way refuses to start, saying
/// what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_ca_directory_is_a_logged_server_fault_and_refused_at_start() {
    let dir = tmp("ca-read-only");
    let pki = Arc::new(Pki::create(&dir.join("ca")).unwrap());
    let mut d = Deployment::with_pki(&dir, exe(), Some(pki.clone())).unwrap();
    let a = d.appserver("127.0.0.1:0", "").unwrap();
    pki.issue("acme.p1", &dir.join("p1-tls")).unwrap();
    let token = d.enrollment_token("acme.p2").unwrap();
    let ro = ReadOnly::mount(&pki.dir);

    let (code, _, err) = rsctl(&a, &["revoke", "--component", "acme.p1"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("500") && err.contains("the CA failed"),
        "{err}"
    );
    let anon = rs_net::tls::client_trusting(&pki.admin.ca)
        .unwrap()
        .build()
        .unwrap();
    // With its records in the directory (SQLite), enrollment writes there
    // too; a farm's server (PostgreSQL) keeps them in its database and
    // writes the directory only for the revocation list.
    let records_in_dir = rs_tests::deploy::store_engine() == rs_tests::deploy::StoreEngine::Sqlite;
    let log = std::fs::read_to_string(dir.join("logs").join("appserver.log")).unwrap();
    assert!(log.contains("revocation: the CA failed"), "{log}");
    if records_in_dir {
        let (st, text) = enroll_raw(&anon, &a, &token, csr()).await;
        assert_eq!(st, 500, "{text}");
        assert!(
            text.contains("ca.db") || text.contains("Read-only"),
            "{text}"
        );
        let log = std::fs::read_to_string(dir.join("logs").join("appserver.log")).unwrap();
        assert!(log.contains("enrollment: the CA failed"), "{log}");
    }
    // Nothing was spent: the token still works once the CA can write.
    d.node("appserver").stop(Duration::from_secs(10));
    let cfg = dir.join("appserver.toml");
    let (code, out) =
        crate::operations::run_role("appserver", &["--config", cfg.to_str().unwrap()], 30);
    assert_eq!(code, 1, "started with a read-only CA: {out}");
    assert!(
        out.contains("is not writable") && out.contains("ReadWritePaths="),
        "{out}"
    );
    drop(ro);
    d.restart("appserver").unwrap();
    let (st, text) = enroll_raw(&anon, &a, &token, csr()).await;
    assert_eq!(st, 200, "{text}");
    assert_eq!(cn_of(&text), "acme.p2");
    d.stop_all();
}
