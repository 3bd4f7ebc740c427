//! Message seals (`docs/protocol.md` §7.7): where HTTPS ends before the
//! application server (a customer's TLS-inspecting web proxy, a relay in
//! a DMZ, an MLM run by someone else), the component that made a message
//! signs it, and may encrypt it to the application server, so that what
//! relays it can neither alter nor read it.
//!
//! The unit is the message, not the envelope: every tier builds new
//! envelopes and appends its routing hop, so only a message survives end
//! to end. A seal covers the content and the header fields that say what
//! the content is (ID, source, type, class, creation time), so it cannot be
//! moved onto another header, reclassified, or replayed under a new ID.
//! Routing hops and QoS stay outside: tiers change those legitimately.
//!
//! Formats are the standard ones, so any CMS library can make a seal: the
//! signature is PKCS #7 / CMS `SignedData` (RFC 5652, signer certificate
//! included, content attached), the encryption CMS `EnvelopedData` to the
//! server's certificate (EC keys: ECDH key agreement; AES-256-CBC), over
//! the DER of the `SignedData` (sign, then encrypt).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use openssl::cms::{CMSOptions, CmsContentInfo};
use openssl::pkcs7::{Pkcs7, Pkcs7Flags};
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::symm::Cipher;
use openssl::x509::X509;
use serde::{Deserialize, Serialize};

use crate::pki::{Identity, Role};
use crate::tls::{Revocations, TlsConfig, asn1_unix};
use rs_protocol::codec::{RawMessage, Seal};
use rs_protocol::ids::{ComponentKind, RsId};
use rs_protocol::outcome::Outcome;

/// First line of the signed document.
const MAGIC: &str = "rs-seal/1";
/// Largest signed document opened (the envelope limit bounds it anyway).
const MAX_SEALED: usize = 64 << 20;

/// `[seal]` of a proxy or MLM: seal the messages this component makes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealConfig {
    /// Also encrypt to this certificate (PEM): the application server's,
    /// issued by the provider's CA. Without it, messages are signed only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypt_to: Option<PathBuf>,
}

/// What an application server demands of the messages it stores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Require {
    /// Seals are opened and checked when present; unsealed messages pass.
    #[default]
    None,
    /// Every forward message must be signed (or signed and encrypted).
    Signed,
    /// Every forward message must be signed and encrypted.
    Encrypted,
}

impl Require {
    /// The refusal of a message sealed as `seal` (`None`: unsealed), if
    /// this policy refuses it.
    pub fn refuses(self, seal: Option<Seal>) -> Option<Outcome> {
        let ok = match self {
            Require::None => true,
            Require::Signed => seal.is_some(),
            Require::Encrypted => seal == Some(Seal::Encrypted),
        };
        (!ok).then(|| {
            Outcome::rejected(
                "seal-required",
                format!(
                    "this server stores only {} messages; this one is {}",
                    match self {
                        Require::Encrypted => "signed and encrypted",
                        _ => "signed",
                    },
                    seal.map_or("unsealed", Seal::as_str)
                ),
            )
        })
    }
}

crate::counters! {
    /// Counters of sealing and opening.
    pub struct SealStats {
        sealed: "seals_total" {result = "sealed"}, "Messages sealed and seals opened, by result.";
        seal_failed: "seals_total" {result = "seal_failed"},
            "Messages sealed and seals opened, by result.";
        opened_signed: "seals_total" {result = "opened_signed"},
            "Messages sealed and seals opened, by result.";
        opened_encrypted: "seals_total" {result = "opened_encrypted"},
            "Messages sealed and seals opened, by result.";
        /// Seals that did not open or verify (counted once per message).
        refused: "seals_total" {result = "refused"}, "Messages sealed and seals opened, by result.";
        /// Unsealed messages refused by the server's policy.
        unsealed_refused: "messages_unsealed_refused_total",
            "Unsealed messages refused (as rejected) by the policy.";
    }
}

/// Seals the messages of one component with its certificate and key.
pub struct Sealer {
    me: RsId,
    cert: X509,
    key: PKey<Private>,
    /// The server's certificate, when encrypting.
    recipient: Option<Stack<X509>>,
    pub stats: Arc<SealStats>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("me", &self.me)
            .field("encrypt", &self.recipient.is_some())
            .finish_non_exhaustive()
    }
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn ossl(what: &str) -> impl Fn(openssl::error::ErrorStack) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Sealer {
    /// The sealer of the component whose certificate and key `tls` names;
    /// `cfg.encrypt_to` must be a component certificate issued by the same
    /// CA (checked here, so a wrong file fails at start, not at the server).
    pub fn new(tls: &TlsConfig, cfg: &SealConfig) -> Result<Sealer, String> {
        let cert = X509::from_pem(&read(&tls.cert)?).map_err(ossl("seal certificate"))?;
        let key = PKey::private_key_from_pem(&read(&tls.key)?).map_err(ossl("seal key"))?;
        if !cert
            .public_key()
            .map(|p| p.public_eq(&key))
            .unwrap_or(false)
        {
            return Err(format!(
                "{} does not match {}",
                tls.key.display(),
                tls.cert.display()
            ));
        }
        let me = Identity::from_cert(&cert)?;
        if me.role != Role::Component {
            return Err("a seal needs a component certificate, not an admin's".into());
        }
        let me = RsId::new(me.name).map_err(|e| e.to_string())?;
        let recipient = match &cfg.encrypt_to {
            None => None,
            Some(p) => {
                let r = X509::from_pem(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))?;
                let ca = X509::from_pem(&read(&tls.ca)?).map_err(ossl("CA certificate"))?;
                let ca_key = ca.public_key().map_err(ossl("CA certificate"))?;
                if !crate::pki::SignedBy::signed_by(&*r, &ca_key) {
                    return Err(format!(
                        "{}: not issued by the CA in {}",
                        p.display(),
                        tls.ca.display()
                    ));
                }
                let who = Identity::from_cert(&r).map_err(|e| format!("{}: {e}", p.display()))?;
                let id = RsId::new(who.name.clone()).map_err(|e| e.to_string())?;
                if who.role != Role::Component || id.kind() != ComponentKind::AppServer {
                    return Err(format!(
                        "{}: {} is not an application server's certificate",
                        p.display(),
                        who.name
                    ));
                }
                let mut s = Stack::new().map_err(ossl("stack"))?;
                s.push(r).map_err(ossl("stack"))?;
                Some(s)
            }
        };
        Ok(Sealer {
            me,
            cert,
            key,
            recipient,
            stats: Arc::default(),
        })
    }

    /// True when this sealer should seal `m`: a forward message this
    /// component (or one of its support instances) made, not sealed yet.
    /// Bulk requests stay open: MLMs read them to enforce upload limits.
    pub fn wants(&self, m: &RawMessage) -> bool {
        m.seal().is_none()
            && m.kind != rs_protocol::model::ContentKind::BulkRequest
            && m.header
                .source()
                .is_some_and(|s| s.component.is_within(&self.me))
    }

    /// The sealed form of `m`: same header, the content replaced by its
    /// seal.
    pub fn seal(&self, m: &RawMessage) -> Result<RawMessage, String> {
        let r = self.seal_inner(m);
        match &r {
            Ok(_) => self.stats.sealed.inc(),
            Err(_) => self.stats.seal_failed.inc(),
        };
        r
    }

    fn seal_inner(&self, m: &RawMessage) -> Result<RawMessage, String> {
        let doc = signed_document(m)?;
        let certs = Stack::new().map_err(ossl("stack"))?;
        let p7 = Pkcs7::sign(
            &self.cert,
            &self.key,
            &certs,
            &doc,
            Pkcs7Flags::BINARY | Pkcs7Flags::NOSMIMECAP,
        )
        .map_err(ossl("signing"))?;
        let der = p7.to_der().map_err(ossl("signing"))?;
        let (seal, content) = match &self.recipient {
            None => (Seal::Signed, der),
            Some(to) => {
                let cms =
                    CmsContentInfo::encrypt(to, &der, Cipher::aes_256_cbc(), CMSOptions::BINARY)
                        .map_err(ossl("encrypting"))?;
                (Seal::Encrypted, cms.to_der().map_err(ossl("encrypting"))?)
            }
        };
        Ok(RawMessage {
            header: m.header.clone(),
            kind: m.kind,
            data: m.data.clone(),
            content_type: seal.content_type().into(),
            content: Bytes::from(content),
        })
    }
}

/// The document a seal signs: the fields that identify the message, one
/// per line, a blank line, then the content exactly as it would be on the
/// wire unsealed (after transfer decoding).
fn signed_document(m: &RawMessage) -> Result<Vec<u8>, String> {
    let src = m
        .header
        .source()
        .ok_or("only forward messages (with a source) are sealed")?;
    if m.content_type.contains(['\r', '\n']) {
        return Err("a content type with a line break".into());
    }
    let mut d = Vec::with_capacity(m.content.len() + 256);
    d.extend_from_slice(
        format!(
            "{MAGIC}\nid: {}\nsource: {}\ntype: {}\nclass: {} {}\ncreated: {}\ncontent-type: {}\n\n",
            m.header.id,
            src.component,
            m.kind.as_str(),
            m.header.class.class,
            m.header.class.subclass,
            m.header.created,
            m.content_type
        )
        .as_bytes(),
    );
    d.extend_from_slice(&m.content);
    Ok(d)
}

/// Opens seals at the application server: decrypts with its key, checks
/// the signature, the signer's certificate (issued by the CA, in its
/// validity period, not revoked, a component that may speak for the
/// message's source) and that the sealed fields match the header.
pub struct Opener {
    ca: X509,
    cert: X509,
    key: PKey<Private>,
    revocations: Arc<Revocations>,
    /// Signer certificates already checked (issued by the CA, a component),
    /// by the SHA-256 of their DER: a site seals every message with the
    /// same certificate, and checking the CA's signature on it each time
    /// would add a third to the server's public-key work per message.
    /// Dates and revocation are checked every time.
    checked: Mutex<HashMap<[u8; 32], Checked>>,
    pub stats: Arc<SealStats>,
}

/// A signer certificate that chains to the CA.
#[derive(Debug, Clone)]
struct Checked {
    id: RsId,
    serial: String,
    not_before: i64,
    not_after: i64,
}

/// Certificates remembered as checked; the map starts over beyond this.
const MAX_CHECKED: usize = 10_000;

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").finish_non_exhaustive()
    }
}

/// A refusal of a seal: the outcome the sender gets.
fn bad(text: impl Into<String>) -> Outcome {
    Outcome::rejected("seal-invalid", text)
}

impl Opener {
    /// The opener of the server whose certificate and key `tls` names,
    /// checking revocation against `revocations` (the TLS listener's, so
    /// both see the same list).
    pub fn new(tls: &TlsConfig, revocations: Arc<Revocations>) -> Result<Opener, String> {
        Ok(Opener {
            ca: X509::from_pem(&read(&tls.ca)?).map_err(ossl("CA certificate"))?,
            cert: X509::from_pem(&read(&tls.cert)?).map_err(ossl("server certificate"))?,
            key: PKey::private_key_from_pem(&read(&tls.key)?).map_err(ossl("server key"))?,
            revocations,
            checked: Mutex::new(HashMap::new()),
            stats: Arc::default(),
        })
    }

    /// The signer's identity, once its certificate is known to chain to
    /// the CA and be a component's.
    fn check_signer(&self, signer: &openssl::x509::X509Ref) -> Result<Checked, Outcome> {
        let der = signer.to_der().map_err(|e| bad(e.to_string()))?;
        let digest = openssl::sha::sha256(&der);
        if let Some(c) = self
            .checked
            .lock()
            .ok()
            .and_then(|m| m.get(&digest).cloned())
        {
            return Ok(c);
        }
        let ca_key = self.ca.public_key().map_err(|e| bad(e.to_string()))?;
        if !crate::pki::SignedBy::signed_by(signer, &ca_key) {
            return Err(bad("the signer's certificate is not issued by this CA"));
        }
        let who = Identity::from_cert(signer).map_err(bad)?;
        if who.role != Role::Component {
            return Err(bad("signed with an admin certificate"));
        }
        let c = Checked {
            id: RsId::new(who.name).map_err(|e| bad(e.to_string()))?,
            serial: who.serial,
            not_before: asn1_unix(signer.not_before()).map_err(bad)?,
            not_after: asn1_unix(signer.not_after()).map_err(bad)?,
        };
        if let Ok(mut m) = self.checked.lock() {
            if m.len() >= MAX_CHECKED {
                m.clear();
            }
            m.insert(digest, c.clone());
        }
        Ok(c)
    }

    /// Opens a sealed message: `Ok` is the message as its maker wrote it
    /// (same header, the content unsealed), its seal and the signer.
    pub fn open(&self, m: RawMessage) -> Result<(RawMessage, Seal, RsId), Outcome> {
        let r = self.open_inner(m);
        match &r {
            Ok((_, Seal::Signed, _)) => &self.stats.opened_signed,
            Ok((_, Seal::Encrypted, _)) => &self.stats.opened_encrypted,
            Err(_) => &self.stats.refused,
        }
        .inc();
        r
    }

    fn open_inner(&self, m: RawMessage) -> Result<(RawMessage, Seal, RsId), Outcome> {
        let seal = m.seal().ok_or_else(|| bad("not sealed"))?;
        let signed = match seal {
            Seal::Signed => m.content.to_vec(),
            Seal::Encrypted => {
                let cms = CmsContentInfo::from_der(&m.content)
                    .map_err(|e| bad(format!("not CMS EnvelopedData: {e}")))?;
                cms.decrypt(&self.key, &self.cert).map_err(|_| {
                    bad("cannot decrypt: not encrypted to this server's certificate, or damaged")
                })?
            }
        };
        let p7 =
            Pkcs7::from_der(&signed).map_err(|e| bad(format!("not PKCS #7 SignedData: {e}")))?;
        let signer = crate::pki::sole_signer(&p7, "seal").map_err(bad)?;
        let checked = self.check_signer(&signer)?;
        let now = rs_protocol::Timestamp::now().as_millis() / 1000;
        if now < checked.not_before || now > checked.not_after {
            return Err(bad("the signer's certificate is not valid now"));
        }
        if self.revocations.is_revoked(&checked.serial) {
            return Err(bad("the signer's certificate is revoked"));
        }
        let signer_id = checked.id;
        let source = m
            .header
            .source()
            .ok_or_else(|| bad("a sealed back-channel message"))?
            .component
            .clone();
        if !source.is_within(&signer_id) {
            return Err(bad(format!(
                "signed by {signer_id}, which does not speak for the source {source}"
            )));
        }
        // The signature itself (the chain was checked above).
        let doc = crate::pki::signed_content(&p7)
            .map_err(bad)?
            .ok_or_else(|| bad("the signature does not verify: the content was altered"))?;
        if doc.len() > MAX_SEALED {
            return Err(bad("the sealed document is too large"));
        }
        let (content_type, content) = check_document(&doc, &m)?;
        Ok((
            RawMessage {
                header: m.header,
                kind: m.kind,
                data: m.data,
                content_type: content_type.into(),
                content: Bytes::copy_from_slice(content),
            },
            seal,
            signer_id,
        ))
    }
}

/// Compares a signed document's fields with the header it came under;
/// returns its content type and content.
fn check_document<'a>(doc: &'a [u8], m: &RawMessage) -> Result<(String, &'a [u8]), Outcome> {
    let end =
        memchr::memmem::find(doc, b"\n\n").ok_or_else(|| bad("a malformed sealed document"))?;
    let head = std::str::from_utf8(&doc[..end]).map_err(|_| bad("a malformed sealed document"))?;
    let mut lines = head.split('\n');
    if lines.next() != Some(MAGIC) {
        return Err(bad(format!(
            "the sealed document does not start with {MAGIC}"
        )));
    }
    let src = m.header.source().map(|s| s.component.to_string());
    let expect = [
        ("id", Some(m.header.id.to_string())),
        ("source", src),
        ("type", Some(m.kind.as_str().to_owned())),
        (
            "class",
            Some(format!(
                "{} {}",
                m.header.class.class, m.header.class.subclass
            )),
        ),
        ("created", Some(m.header.created.to_string())),
    ];
    for (name, want) in expect {
        let line = lines.next().unwrap_or("");
        let got = line
            .strip_prefix(name)
            .and_then(|l| l.strip_prefix(": "))
            .ok_or_else(|| bad(format!("the sealed document lacks {name}")))?;
        if Some(got) != want.as_deref() {
            return Err(bad(format!(
                "the header's {name} differs from the sealed one ({got})"
            )));
        }
    }
    let ct = lines
        .next()
        .and_then(|l| l.strip_prefix("content-type: "))
        .ok_or_else(|| bad("the sealed document lacks content-type"))?;
    if lines.next().is_some() {
        return Err(bad("the sealed document has unknown fields"));
    }
    if Seal::of_content_type(ct).ok().flatten().is_some() {
        return Err(bad("a seal inside a seal"));
    }
    if ct.is_empty() || ct.len() > 255 || ct.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
        return Err(bad(
            "the sealed content-type is not printable ASCII of 1-255 bytes",
        ));
    }
    // An XML content must have been an XML part (as the decoder demands of
    // an unsealed one); a data content's type is its own.
    let base = ct.split(';').next().unwrap_or("").trim();
    if m.data.is_none()
        && !base.eq_ignore_ascii_case("text/xml")
        && !base.eq_ignore_ascii_case("application/xml")
    {
        return Err(bad(format!(
            "a sealed {} content must be text/xml, not {ct}",
            m.kind.as_str()
        )));
    }
    Ok((ct.to_owned(), &doc[end + 2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        assert!(Require::None.refuses(None).is_none());
        assert!(Require::Signed.refuses(None).is_some());
        assert!(Require::Signed.refuses(Some(Seal::Signed)).is_none());
        assert!(Require::Encrypted.refuses(Some(Seal::Signed)).is_some());
        assert!(Require::Encrypted.refuses(Some(Seal::Encrypted)).is_none());
    }
}
