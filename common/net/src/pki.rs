//! The provider's certificate authority and the identities it binds
//! (docs/security.md). Every component holds a certificate whose subject
//! names its remote services ID (CN), its customer ID (O) and its role (OU:
//! `component` or `admin`); every tier that accepts connections checks the
//! chain against the CA certificate and the serial against the CA's
//! revocation list (a standard X.509 CRL, `crl.pem`).
//!
//! The CA lives in one directory: `ca.pem` (public), `ca.key` (mode 0600)
//! and `crl.pem`, rewritten on every revocation. What it issued (every
//! certificate, when, and whether revoked) is recorded through
//! `rs_store::certs`: `ca.db` in the directory (SQLite, so two processes,
//! an appserver enrolling and an admin revoking, can share it), or a
//! farm's PostgreSQL database, shared by its servers.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use openssl::asn1::{Asn1Integer, Asn1Object, Asn1OctetString, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{HasPublic, PKey, PKeyRef, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{
    X509, X509Builder, X509Crl, X509CrlBuilder, X509Extension, X509NameBuilder, X509Ref, X509Req,
    X509ReqBuilder, X509RevokedBuilder,
};
use rs_store::certs::{CertRecords, Revoked};
use rs_store::sql::Location;

use rs_protocol::RsId;

/// What a certificate's holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A proxy, MLM or application server; CN is its remote services ID.
    Component,
    /// A person or tool driving the control API; CN is the admin's name.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Component => "component",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "component" => Some(Role::Component),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Who an authenticated peer is, read from its (verified) certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// CN: the component's remote services ID, or the admin's name.
    pub name: String,
    /// O: the customer ID (for admins: the customers granted, `*` for all,
    /// several separated by commas).
    pub customer: String,
    pub role: Role,
    /// The certificate's serial number, upper-case hex.
    pub serial: String,
}

impl Identity {
    /// Reads the subject of `cert`; `Err` says what is missing.
    pub fn from_cert(cert: &X509Ref) -> Result<Identity, String> {
        let field = |nid: Nid| -> Result<String, String> {
            let e = cert
                .subject_name()
                .entries_by_nid(nid)
                .next()
                .ok_or_else(|| {
                    format!(
                        "the certificate subject has no {}",
                        nid.short_name().unwrap_or("?")
                    )
                })?;
            e.data()
                .to_string()
                .map_err(|e| format!("certificate subject: {e}"))
        };
        let name = field(Nid::COMMONNAME)?;
        let customer = field(Nid::ORGANIZATIONNAME)?;
        let role_s = field(Nid::ORGANIZATIONALUNITNAME)?;
        let role = Role::parse(&role_s).ok_or_else(|| {
            format!("certificate role (OU) {role_s:?} is neither component nor admin")
        })?;
        if role == Role::Component {
            let id =
                RsId::new(name.clone()).map_err(|e| format!("certificate CN {name:?}: {e}"))?;
            if id.customer().as_str() != customer {
                return Err(format!(
                    "certificate CN {name} does not belong to its customer (O) {customer}"
                ));
            }
        }
        Ok(Identity {
            name,
            customer,
            role,
            serial: serial_hex(cert),
        })
    }

    /// The component ID, for a component certificate.
    pub fn component(&self) -> Option<RsId> {
        match self.role {
            Role::Component => RsId::new(self.name.clone()).ok(),
            Role::Admin => None,
        }
    }
}

/// The serial number of a certificate, upper-case hex.
pub fn serial_hex(cert: &X509Ref) -> String {
    cert.serial_number()
        .to_bn()
        .and_then(|b| b.to_hex_str().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Whether a certificate, signing request or revocation list is signed by
/// `key`, with OpenSSL's reason for a "no" taken off the thread's error
/// queue. `X509_verify` and its kin answer 0 and leave the reason queued,
/// and the openssl crate's bindings return `Ok(false)` without draining
/// it; the next TLS read or write on the same thread, for any connection
/// a tokio worker serves, then reads the stale entry as its own failure
/// and closes that connection (a refused renewal or seal cut the next
/// request on a kept-alive connection with no answer). Every signature
/// check on a certificate goes through here (clippy.toml disallows the
/// bindings).
pub trait SignedBy {
    fn signed_by<T: HasPublic>(&self, key: &PKeyRef<T>) -> bool;
}

/// Drains what `outcome`'s check left queued when it did not verify.
fn settled(outcome: Result<bool, openssl::error::ErrorStack>) -> bool {
    let ok = outcome.unwrap_or(false);
    if !ok {
        drop(openssl::error::ErrorStack::get());
    }
    ok
}

#[allow(clippy::disallowed_methods)]
impl SignedBy for openssl::x509::X509Ref {
    fn signed_by<T: HasPublic>(&self, key: &PKeyRef<T>) -> bool {
        settled(self.verify(key))
    }
}

#[allow(clippy::disallowed_methods)]
impl SignedBy for openssl::x509::X509ReqRef {
    fn signed_by<T: HasPublic>(&self, key: &PKeyRef<T>) -> bool {
        settled(self.verify(key))
    }
}

#[allow(clippy::disallowed_methods)]
impl SignedBy for openssl::x509::X509CrlRef {
    fn signed_by<T: HasPublic>(&self, key: &PKeyRef<T>) -> bool {
        settled(self.verify(key))
    }
}

/// The one signer of a PKCS #7 SignedData that carries its certificate
/// (a payload seal, a renewal request); `what` names the document in the
/// error.
pub fn sole_signer(p7: &openssl::pkcs7::Pkcs7Ref, what: &str) -> Result<X509, String> {
    let none = openssl::stack::Stack::new().map_err(|e| e.to_string())?;
    let signers = p7
        .signers(&none, openssl::pkcs7::Pkcs7Flags::empty())
        .map_err(|_| format!("the signer's certificate is not in the {what}"))?;
    let mut it = signers.iter();
    match (it.next(), it.next()) {
        (Some(signer), None) => Ok(signer.to_owned()),
        _ => Err(format!("a {what} has exactly one signer")),
    }
}

/// The content of a PKCS #7 SignedData once its signature verifies, or
/// `None`. The caller checks the signer's certificate (chain, validity,
/// revocation) against the one CA this deployment has; NOVERIFY skips
/// OpenSSL's S/MIME purpose check, which our component certificates do not
/// carry.
pub fn signed_content(p7: &openssl::pkcs7::Pkcs7Ref) -> Result<Option<Vec<u8>>, String> {
    let none = openssl::stack::Stack::new().map_err(|e| e.to_string())?;
    let store = openssl::x509::store::X509StoreBuilder::new()
        .map_err(|e| e.to_string())?
        .build();
    let mut content = Vec::new();
    let flags = openssl::pkcs7::Pkcs7Flags::BINARY | openssl::pkcs7::Pkcs7Flags::NOVERIFY;
    Ok(p7
        .verify(&none, &store, None, Some(&mut content), flags)
        .ok()
        .map(|()| content))
}

/// A fresh private key (ECDSA P-256: small, fast handshakes).
pub fn generate_key() -> Result<PKey<Private>, String> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(ssl)?;
    let ec = EcKey::generate(&group).map_err(ssl)?;
    PKey::from_ec_key(ec).map_err(ssl)
}

/// A certificate signing request for `key` (the subject is chosen by the
/// CA, not by the request: the request only proves possession of the key).
pub fn csr(key: &PKeyRef<Private>) -> Result<X509Req, String> {
    let mut b = X509ReqBuilder::new().map_err(ssl)?;
    b.set_pubkey(key).map_err(ssl)?;
    let mut name = X509NameBuilder::new().map_err(ssl)?;
    name.append_entry_by_nid(Nid::COMMONNAME, "enrollment")
        .map_err(ssl)?;
    b.set_subject_name(&name.build()).map_err(ssl)?;
    b.sign(key, MessageDigest::sha256()).map_err(ssl)?;
    Ok(b.build())
}

fn ssl(e: openssl::error::ErrorStack) -> String {
    format!("openssl: {e}")
}

/// What to put in a certificate.
#[derive(Debug, Clone)]
pub struct CertSpec {
    pub name: String,
    pub customer: String,
    pub role: Role,
    /// Host names the holder serves on (server certificates).
    pub dns: Vec<String>,
    /// IP addresses the holder serves on.
    pub ips: Vec<IpAddr>,
    pub days: u32,
}

impl CertSpec {
    /// A component's certificate (CN = its ID, O = its customer).
    pub fn component(id: &RsId, days: u32) -> CertSpec {
        CertSpec {
            name: id.as_str().to_owned(),
            customer: id.customer().as_str().to_owned(),
            role: Role::Component,
            dns: Vec::new(),
            ips: Vec::new(),
            days,
        }
    }
}

/// A certificate the CA issued, as its records hold it.
pub use rs_store::certs::Cert as Issued;

/// Why the CA did not do what was asked: the request's fault (it names
/// something unknown or malformed: a client error), or the CA's own (its
/// files or database cannot be read or written, OpenSSL failed: a server
/// fault, to answer 5xx and log).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaError {
    #[error("{0}")]
    Refused(String),
    #[error("the CA failed: {0}")]
    Fault(String),
}

impl CaError {
    fn fault(e: impl std::fmt::Display) -> CaError {
        CaError::Fault(e.to_string())
    }

    fn db(e: rs_store::db::DbError) -> CaError {
        CaError::Fault(format!("the CA's records: {e}"))
    }
}

/// The certificate authority in a directory.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    cert: X509,
    key: PKey<Private>,
    records: CertRecords,
    /// The directory's `ca.db` when the records are elsewhere (a farm's
    /// database): taken in before each read.
    local: Option<CertRecords>,
}

/// Where the records of the CA in `dir` are: the farm's `database`
/// (schema `appserver_ca`) when it is a `postgres://` URL, else `ca.db` in
/// `dir`.
pub fn records_at(dir: &Path, database: Option<&str>) -> Location {
    Location::choose(database, dir.join("ca.db"), "appserver_ca")
}

/// How long a revocation list stays valid: tiers refresh it far more often
/// (docs/security.md), this only bounds how long a stale list is trusted.
const CRL_DAYS: u32 = 30;

impl Ca {
    /// Creates a CA in `dir` (which must not hold one yet), its records in
    /// `ca.db` there.
    pub fn init(dir: &Path, name: &str, days: u32) -> Result<Ca, CaError> {
        Ca::init_with(dir, name, days, records_at(dir, None))
    }

    /// Creates a CA in `dir` (which must not hold one yet), its records
    /// at `records`.
    pub fn init_with(dir: &Path, name: &str, days: u32, records: Location) -> Result<Ca, CaError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| CaError::fault(format!("{}: {e}", dir.display())))?;
        let key_path = dir.join("ca.key");
        if key_path.exists() {
            return Err(CaError::Refused(format!(
                "{} already holds a CA",
                dir.display()
            )));
        }
        let key = generate_key().map_err(CaError::Fault)?;
        let mut name_b = X509NameBuilder::new().map_err(CaError::fault)?;
        name_b
            .append_entry_by_nid(Nid::COMMONNAME, name)
            .map_err(CaError::fault)?;
        name_b
            .append_entry_by_nid(Nid::ORGANIZATIONALUNITNAME, "ca")
            .map_err(CaError::fault)?;
        let subject = name_b.build();
        let mut b = X509Builder::new().map_err(CaError::fault)?;
        b.set_version(2).map_err(CaError::fault)?;
        b.set_serial_number(&*random_serial().map_err(CaError::Fault)?)
            .map_err(CaError::fault)?;
        b.set_subject_name(&subject).map_err(CaError::fault)?;
        b.set_issuer_name(&subject).map_err(CaError::fault)?;
        b.set_pubkey(&key).map_err(CaError::fault)?;
        b.set_not_before(&*Asn1Time::days_from_now(0).map_err(CaError::fault)?)
            .map_err(CaError::fault)?;
        b.set_not_after(&*Asn1Time::days_from_now(days).map_err(CaError::fault)?)
            .map_err(CaError::fault)?;
        b.append_extension(
            BasicConstraints::new()
                .critical()
                .ca()
                .build()
                .map_err(CaError::fault)?,
        )
        .map_err(CaError::fault)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .map_err(CaError::fault)?,
        )
        .map_err(CaError::fault)?;
        let ski = SubjectKeyIdentifier::new()
            .build(&b.x509v3_context(None, None))
            .map_err(CaError::fault)?;
        b.append_extension(ski).map_err(CaError::fault)?;
        b.sign(&key, MessageDigest::sha256())
            .map_err(CaError::fault)?;
        let cert = b.build();
        write_private(
            &key_path,
            &key.private_key_to_pem_pkcs8().map_err(CaError::fault)?,
        )
        .map_err(CaError::Fault)?;
        write_file(&dir.join("ca.pem"), &cert.to_pem().map_err(CaError::fault)?)
            .map_err(CaError::Fault)?;
        let ca = Ca {
            dir: dir.to_owned(),
            cert,
            key,
            records: CertRecords::open(records),
            local: None,
        };
        ca.write_crl()?;
        Ok(ca)
    }

    /// Opens the CA in `dir`, its records in `ca.db` there.
    pub fn open(dir: &Path) -> Result<Ca, CaError> {
        Ca::open_with(dir, records_at(dir, None))
    }

    /// Opens the CA in `dir` with its records at `records`. Records on
    /// PostgreSQL that hold no certificate yet first take in what `ca.db`
    /// in `dir` holds (a server joining a farm), so every certificate the
    /// CA issued stays known and revocable.
    pub fn open_with(dir: &Path, records: Location) -> Result<Ca, CaError> {
        let read = |f: &str| read_file(&dir.join(f)).map_err(CaError::Fault);
        let cert = X509::from_pem(&read("ca.pem")?).map_err(CaError::fault)?;
        let key = PKey::private_key_from_pem(&read("ca.key")?).map_err(CaError::fault)?;
        let shared = matches!(records, Location::Postgres { .. });
        let ca = Ca {
            dir: dir.to_owned(),
            cert,
            key,
            records: CertRecords::open(records),
            local: shared.then(|| CertRecords::open(Location::Sqlite(dir.join("ca.db")))),
        };
        ca.take_in_local();
        Ok(ca)
    }

    /// With records on PostgreSQL: takes in what the directory's `ca.db`
    /// holds that they do not (certificates issued, or revoked, with
    /// `rsctl ca` on the directory without `--database`, or before the
    /// server joined a farm). Run before every read of the records; a
    /// `ca.db` that cannot be read is logged and left alone.
    fn take_in_local(&self) {
        let Some(local) = &self.local else { return };
        if !self.dir.join("ca.db").exists() {
            return;
        }
        match self.records.take_in(local) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                "the CA's records: {n} certificate record(s) taken in from {}",
                local.describe()
            ),
            Err(e) => tracing::warn!("the CA's records: reading {}: {e}", local.describe()),
        }
    }

    /// How many certificates are revoked and the latest revocation (see
    /// `CertRecords::revocations`), after taking in the directory's own.
    pub fn revocations(&self) -> Result<(i64, i64), CaError> {
        self.take_in_local();
        self.records.revocations().map_err(CaError::db)
    }

    /// Where its records are.
    pub fn records(&self) -> &CertRecords {
        &self.records
    }

    pub fn cert(&self) -> &X509 {
        &self.cert
    }

    /// Checks that issuing and revoking can write what they write (its
    /// records; `crl.pem` here, a file beside it while it is replaced), so a
    /// server whose CA directory is read-only (a service manager's
    /// `ProtectSystem=strict` without it in `ReadWritePaths=`) says so at
    /// start instead of failing every enrollment later.
    pub fn check_writable(&self) -> Result<(), CaError> {
        // A name of this process's own: servers sharing the directory (a
        // farm's members on one host) start at once.
        let probe = self
            .dir
            .join(format!(".rs-write-check-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| CaError::Fault(format!("{}: {e}", self.dir.display())))?;
        self.records.check_writable().map_err(CaError::db)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a certificate for `pubkey` as `spec` says, and records it.
    pub fn issue<T: HasPublic>(
        &self,
        spec: &CertSpec,
        pubkey: &PKeyRef<T>,
    ) -> Result<X509, CaError> {
        if spec.role == Role::Component {
            let id = RsId::new(spec.name.clone())
                .map_err(|e| CaError::Refused(format!("{}: {e}", spec.name)))?;
            if id.customer().as_str() != spec.customer {
                return Err(CaError::Refused(format!(
                    "{} is not of customer {}",
                    spec.name, spec.customer
                )));
            }
        }
        let mut name_b = X509NameBuilder::new().map_err(CaError::fault)?;
        name_b
            .append_entry_by_nid(Nid::COMMONNAME, &spec.name)
            .map_err(CaError::fault)?;
        name_b
            .append_entry_by_nid(Nid::ORGANIZATIONNAME, &spec.customer)
            .map_err(CaError::fault)?;
        name_b
            .append_entry_by_nid(Nid::ORGANIZATIONALUNITNAME, spec.role.as_str())
            .map_err(CaError::fault)?;
        let subject = name_b.build();
        let serial = random_serial().map_err(CaError::Fault)?;
        let mut b = X509Builder::new().map_err(CaError::fault)?;
        b.set_version(2).map_err(CaError::fault)?;
        b.set_serial_number(&serial).map_err(CaError::fault)?;
        b.set_subject_name(&subject).map_err(CaError::fault)?;
        b.set_issuer_name(self.cert.subject_name())
            .map_err(CaError::fault)?;
        b.set_pubkey(pubkey).map_err(CaError::fault)?;
        // An hour's slack for clocks a little behind.
        let now = now_secs();
        b.set_not_before(&*Asn1Time::from_unix(now - 3600).map_err(CaError::fault)?)
            .map_err(CaError::fault)?;
        let not_after = now + i64::from(spec.days) * 86_400;
        b.set_not_after(&*Asn1Time::from_unix(not_after).map_err(CaError::fault)?)
            .map_err(CaError::fault)?;
        b.append_extension(
            BasicConstraints::new()
                .critical()
                .build()
                .map_err(CaError::fault)?,
        )
        .map_err(CaError::fault)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_encipherment()
                .build()
                .map_err(CaError::fault)?,
        )
        .map_err(CaError::fault)?;
        b.append_extension(
            ExtendedKeyUsage::new()
                .server_auth()
                .client_auth()
                .build()
                .map_err(CaError::fault)?,
        )
        .map_err(CaError::fault)?;
        if !spec.dns.is_empty() || !spec.ips.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for d in &spec.dns {
                san.dns(d);
            }
            for ip in &spec.ips {
                san.ip(&ip.to_string());
            }
            let ext = san
                .build(&b.x509v3_context(Some(&self.cert), None))
                .map_err(CaError::fault)?;
            b.append_extension(ext).map_err(CaError::fault)?;
        }
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(Some(&self.cert), None))
            .map_err(CaError::fault)?;
        b.append_extension(aki).map_err(CaError::fault)?;
        b.sign(&self.key, MessageDigest::sha256())
            .map_err(CaError::fault)?;
        let cert = b.build();
        self.records
            .record(&Issued {
                serial: serial_hex(&cert),
                name: spec.name.clone(),
                customer: spec.customer.clone(),
                role: spec.role.as_str().into(),
                issued_at: now,
                not_after,
                revoked_at: None,
                reason: None,
            })
            .map_err(CaError::db)?;
        Ok(cert)
    }

    /// Issues a certificate for the key in a signing request (whose
    /// signature proves the requester holds the key).
    pub fn sign_request(&self, spec: &CertSpec, req: &X509Req) -> Result<X509, CaError> {
        let key = req.public_key().map_err(CaError::fault)?;
        if !req.signed_by(&key) {
            return Err(CaError::Refused(
                "the signing request's signature does not match its key".into(),
            ));
        }
        self.issue(spec, &key)
    }

    /// Revokes a certificate by serial (hex) and rewrites the CRL. `Ok(false)`
    /// when it was already revoked.
    pub fn revoke(&self, serial: &str, reason: &str) -> Result<bool, CaError> {
        self.take_in_local();
        let serial = serial.trim().to_ascii_uppercase();
        match self
            .records
            .revoke(&serial, now_secs(), reason)
            .map_err(CaError::db)?
        {
            Revoked::Unknown => Err(CaError::Refused(format!(
                "this CA issued no certificate with serial {serial}"
            ))),
            Revoked::Already => Ok(false),
            Revoked::Now => {
                self.write_crl()?;
                Ok(true)
            }
        }
    }

    /// Every certificate issued (newest first), optionally only `name`'s.
    pub fn list(&self, name: Option<&str>) -> Result<Vec<Issued>, CaError> {
        self.take_in_local();
        self.records.list(name).map_err(CaError::db)
    }

    /// A freshly signed CRL listing every revoked certificate.
    pub fn crl(&self) -> Result<X509Crl, CaError> {
        self.take_in_local();
        let (revoked, number) = self.records.for_crl().map_err(CaError::db)?;
        let mut b = X509CrlBuilder::new().map_err(CaError::fault)?;
        b.set_issuer_name(self.cert.subject_name())
            .map_err(CaError::fault)?;
        let now = now_secs();
        b.set_last_update(&*Asn1Time::from_unix(now).map_err(CaError::fault)?)
            .map_err(CaError::fault)?;
        b.set_next_update(&*Asn1Time::days_from_now(CRL_DAYS).map_err(CaError::fault)?)
            .map_err(CaError::fault)?;
        for (serial, at) in &revoked {
            let mut r = X509RevokedBuilder::new().map_err(CaError::fault)?;
            let bn = BigNum::from_hex_str(serial).map_err(CaError::fault)?;
            r.set_serial_number(&*Asn1Integer::from_bn(&bn).map_err(CaError::fault)?)
                .map_err(CaError::fault)?;
            r.set_revocation_date(&*Asn1Time::from_unix(*at).map_err(CaError::fault)?)
                .map_err(CaError::fault)?;
            b.add_revoked(r.build()).map_err(CaError::fault)?;
        }
        // The context of a throwaway certificate builder yields the CA's
        // key identifier (the CRL builder has no v3 context of its own).
        let ctx_owner = X509Builder::new().map_err(CaError::fault)?;
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&ctx_owner.x509v3_context(Some(&self.cert), None))
            .map_err(CaError::fault)?;
        b.append_extension(aki).map_err(CaError::fault)?;
        let oid = Asn1Object::from_str("2.5.29.20").map_err(CaError::fault)?;
        let value =
            Asn1OctetString::new_from_bytes(&der_integer(number as u64)).map_err(CaError::fault)?;
        b.append_extension(
            X509Extension::new_from_der(&oid, false, &value).map_err(CaError::fault)?,
        )
        .map_err(CaError::fault)?;
        b.sort().map_err(CaError::fault)?;
        b.sign(&self.key, MessageDigest::sha256())
            .map_err(CaError::fault)?;
        b.build().map_err(CaError::fault)
    }

    /// Signs a fresh CRL and writes it to `crl.pem` (atomically).
    pub fn write_crl(&self) -> Result<PathBuf, CaError> {
        let crl = self.crl()?;
        let path = self.dir.join("crl.pem");
        write_file(&path, &crl.to_pem().map_err(CaError::fault)?).map_err(CaError::Fault)?;
        Ok(path)
    }
}

/// DER encoding of a non-negative INTEGER (the CRL number's value).
fn der_integer(n: u64) -> Vec<u8> {
    let mut bytes: Vec<u8> = n
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    if bytes.first().is_none_or(|b| b & 0x80 != 0) {
        bytes.insert(0, 0);
    }
    let mut out = vec![0x02, bytes.len() as u8];
    out.extend(bytes);
    out
}

/// A positive 127-bit serial: unguessable, never repeated in practice.
fn random_serial() -> Result<Asn1Integer, String> {
    let mut bn = BigNum::new().map_err(ssl)?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false).map_err(ssl)?;
    Asn1Integer::from_bn(&bn).map_err(ssl)
}

pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new
/// one, whole ([`rs_store::files::write_atomically`]).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    rs_store::files::write_atomically(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a private key readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    rename(&tmp, path)
}

/// Renames `from` to `to` and syncs the directory, so that the rename
/// outlasts a power loss (and comes before any later one).
pub fn rename(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::rename(from, to)
        .and_then(|()| rs_store::files::sync_parent(to))
        .map_err(|e| format!("{}: {e}", to.display()))
}

/// A file's bytes; errors name the file.
pub fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A PEM certificate from a file; errors name the file.
pub fn read_cert(path: &Path) -> Result<X509, String> {
    X509::from_pem(&read_file(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

/// A PEM private key from a file; errors name the file.
pub fn read_key(path: &Path) -> Result<PKey<Private>, String> {
    PKey::private_key_from_pem(&read_file(path)?).map_err(|e| format!("{}: {e}", path.display()))
}
