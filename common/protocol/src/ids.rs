//! Remote services IDs and message IDs: validated newtypes, so a string that
//! reaches routing or storage code has already been checked.
//!
//! A remote services ID (`RsId`) is a dotted path. Its first segment is the
//! customer ID, given at customer registration; every further segment is one
//! letter naming the kind of component and a number allocated by the parent:
//! `acme` (customer) -> `acme.p3` (proxy 3, allocated at component
//! registration) -> `acme.p3.s12` (support instance 12, allocated by that
//! proxy). The customer of any component is therefore its first segment, and
//! the component that allocated an ID is its parent.

use std::fmt;
use std::str::FromStr;

use arrayvec::ArrayString;
use compact_str::CompactString;

/// Longest remote services ID accepted, in bytes.
pub const MAX_RS_ID_LEN: usize = 64;
/// Longest message ID accepted, in bytes.
pub const MAX_MESSAGE_ID_LEN: usize = 64;
/// Longest customer ID accepted, in bytes.
pub const MAX_CUSTOMER_ID_LEN: usize = 32;

/// Why a string is not a valid ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("empty ID")]
    Empty,
    #[error("ID longer than {max} bytes")]
    TooLong { max: usize },
    #[error("invalid character {ch:?} at byte {at}")]
    BadChar { ch: char, at: usize },
    #[error("customer ID must start with a lower-case letter")]
    BadCustomerStart,
    #[error("segment {segment:?} must be a kind letter (a, m, p, i, s) followed by a number")]
    BadSegment { segment: String },
}

/// The kind of component an ID names, from its last segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ComponentKind {
    /// The ID is a bare customer ID.
    Customer,
    /// `a`: an application server.
    AppServer,
    /// `m`: a mid-level manager (customer MLM or farm member).
    Mlm,
    /// `p`: a customer-site proxy.
    Proxy,
    /// `i`: an integrator registered with a proxy.
    Integrator,
    /// `s`: a support instance registered through a proxy.
    SupportInstance,
}

impl ComponentKind {
    pub const ALL: [ComponentKind; 6] = [
        ComponentKind::Customer,
        ComponentKind::AppServer,
        ComponentKind::Mlm,
        ComponentKind::Proxy,
        ComponentKind::Integrator,
        ComponentKind::SupportInstance,
    ];

    /// The kind named by [`ComponentKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The segment letter, or `None` for [`ComponentKind::Customer`].
    pub fn letter(self) -> Option<char> {
        match self {
            ComponentKind::Customer => None,
            ComponentKind::AppServer => Some('a'),
            ComponentKind::Mlm => Some('m'),
            ComponentKind::Proxy => Some('p'),
            ComponentKind::Integrator => Some('i'),
            ComponentKind::SupportInstance => Some('s'),
        }
    }

    fn from_letter(b: u8) -> Option<Self> {
        Some(match b {
            b'a' => ComponentKind::AppServer,
            b'm' => ComponentKind::Mlm,
            b'p' => ComponentKind::Proxy,
            b'i' => ComponentKind::Integrator,
            b's' => ComponentKind::SupportInstance,
            _ => return None,
        })
    }

    /// Lower-case name used in status trees and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Customer => "customer",
            ComponentKind::AppServer => "appserver",
            ComponentKind::Mlm => "mlm",
            ComponentKind::Proxy => "proxy",
            ComponentKind::Integrator => "integrator",
            ComponentKind::SupportInstance => "instance",
        }
    }
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn check_customer(s: &str) -> Result<(), IdError> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err(IdError::Empty);
    }
    if b.len() > MAX_CUSTOMER_ID_LEN {
        return Err(IdError::TooLong {
            max: MAX_CUSTOMER_ID_LEN,
        });
    }
    if !b[0].is_ascii_lowercase() {
        return Err(IdError::BadCustomerStart);
    }
    for (at, &c) in b.iter().enumerate() {
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-') {
            return Err(IdError::BadChar { ch: c as char, at });
        }
    }
    Ok(())
}

fn check_segment(seg: &str) -> Result<ComponentKind, IdError> {
    let b = seg.as_bytes();
    let bad = || IdError::BadSegment {
        segment: seg.to_owned(),
    };
    let kind = b.first().and_then(|&c| ComponentKind::from_letter(c));
    let digits = &b[b.len().min(1)..];
    match kind {
        Some(kind)
            if !digits.is_empty()
                && digits.len() <= 10
                && digits.iter().all(u8::is_ascii_digit)
                && (digits[0] != b'0' || digits.len() == 1) =>
        {
            Ok(kind)
        }
        _ => Err(bad()),
    }
}

/// A customer ID: `[a-z][a-z0-9-]{0,31}`, given at customer registration.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CustomerId(CompactString);

impl CustomerId {
    pub fn new(s: impl AsRef<str>) -> Result<Self, IdError> {
        let s = s.as_ref();
        check_customer(s)?;
        Ok(CustomerId(CompactString::new(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The remote services ID of the customer itself (the root of its tree).
    pub fn to_rs_id(&self) -> RsId {
        RsId(self.0.clone())
    }
}

/// A remote services ID: a customer ID followed by zero or more
/// `.<kind letter><number>` segments.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RsId(CompactString);

impl RsId {
    pub fn new(s: impl AsRef<str>) -> Result<Self, IdError> {
        let s = s.as_ref();
        Self::validate(s)?;
        Ok(RsId(CompactString::new(s)))
    }

    /// Checks `s` without allocating.
    pub fn validate(s: &str) -> Result<(), IdError> {
        if s.len() > MAX_RS_ID_LEN {
            return Err(IdError::TooLong { max: MAX_RS_ID_LEN });
        }
        // Split at each `.` by hand: IDs are short, and a `str::split`
        // searcher costs more to set up than these few bytes take to scan
        // (every tier checks the RsIds of every header).
        let b = s.as_bytes();
        let dot = |from: usize| {
            b[from..]
                .iter()
                .position(|&c| c == b'.')
                .map_or(b.len(), |i| from + i)
        };
        let mut end = dot(0);
        check_customer(&s[..end])?;
        while end < b.len() {
            let start = end + 1;
            end = dot(start);
            check_segment(&s[start..end])?;
        }
        Ok(())
    }

    /// Derives the ID of a child component (`parent.<letter><n>`).
    pub fn child(&self, kind: ComponentKind, n: u32) -> Result<RsId, IdError> {
        let Some(letter) = kind.letter() else {
            return Err(IdError::BadSegment {
                segment: n.to_string(),
            });
        };
        RsId::new(format!("{}.{letter}{n}", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The customer this component belongs to.
    pub fn customer(&self) -> CustomerId {
        CustomerId(self.customer_str().into())
    }

    /// [`RsId::customer`] without a copy: the ID's first segment.
    pub fn customer_str(&self) -> &str {
        self.0.split('.').next().unwrap_or_default()
    }

    /// The kind of component, from the last segment.
    pub fn kind(&self) -> ComponentKind {
        match self.0.rfind('.') {
            None => ComponentKind::Customer,
            Some(i) => ComponentKind::from_letter(self.0.as_bytes()[i + 1])
                .unwrap_or(ComponentKind::Customer),
        }
    }

    /// The component that allocated this ID, if any.
    pub fn parent(&self) -> Option<RsId> {
        self.0.rfind('.').map(|i| RsId(self.0[..i].into()))
    }

    /// The tier that sends and polls for this component: itself for a
    /// proxy, an MLM or a server; for an integrator or a support instance,
    /// the proxy that allocated it (they never call in themselves).
    pub fn tier(&self) -> RsId {
        let mut id = self.clone();
        while matches!(
            id.kind(),
            ComponentKind::Integrator | ComponentKind::SupportInstance
        ) {
            match id.parent() {
                Some(p) => id = p,
                None => break,
            }
        }
        id
    }

    /// True when `self` is `other` or was allocated (directly or not) under it.
    pub fn is_within(&self, other: &RsId) -> bool {
        self.0 == other.0
            || (self.0.len() > other.0.len()
                && self.0.starts_with(other.0.as_str())
                && self.0.as_bytes()[other.0.len()] == b'.')
    }
}

/// A globally unique message ID: 1 to 64 bytes of `[A-Za-z0-9._-]`.
///
/// IDs this suite generates are UUIDv7 in simple (32 hex digit) form, so they
/// sort by creation time; other implementations may use any scheme that is
/// globally unique within the character set.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(IdRepr);

impl MessageId {
    pub fn new(s: impl AsRef<str>) -> Result<Self, IdError> {
        let s = s.as_ref();
        Self::validate(s)?;
        Ok(MessageId(IdRepr::new(s)))
    }

    /// Checks `s` without allocating.
    pub fn validate(s: &str) -> Result<(), IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_MESSAGE_ID_LEN {
            return Err(IdError::TooLong {
                max: MAX_MESSAGE_ID_LEN,
            });
        }
        if all_token_bytes(s.as_bytes()) {
            return Ok(());
        }
        let at = s.bytes().position(|c| !is_token_byte(c)).unwrap_or(0);
        Err(IdError::BadChar {
            ch: char::from(s.as_bytes()[at]),
            at,
        })
    }

    /// An ID already checked with [`validate`](Self::validate) (the codec
    /// checks a Content-ID's ID without allocating, and makes the ID only
    /// when it needs one).
    pub(crate) fn from_validated(s: &str) -> Self {
        debug_assert!(Self::validate(s).is_ok(), "{s:?} was not validated");
        MessageId(IdRepr::new(s))
    }

    /// A fresh, time-ordered, globally unique ID (UUIDv7).
    pub fn generate() -> Self {
        MessageId(IdRepr::new(
            uuid::Uuid::now_v7()
                .simple()
                .encode_lower(&mut uuid::Uuid::encode_buffer()),
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A message ID's text: inline up to 32 bytes (a UUID in simple form, what
/// this suite generates), boxed beyond. Every tier reads the ID of every
/// header it routes, so reading one should not allocate. Compares, orders
/// and hashes as the string (so `MessageId: Borrow<str>` holds).
#[derive(Clone)]
enum IdRepr {
    Inline(ArrayString<32>),
    Boxed(Box<str>),
}

impl IdRepr {
    fn new(s: &str) -> Self {
        match ArrayString::from(s) {
            Ok(a) => IdRepr::Inline(a),
            Err(_) => IdRepr::Boxed(s.into()),
        }
    }
}

impl std::ops::Deref for IdRepr {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            IdRepr::Inline(a) => a.as_str(),
            IdRepr::Boxed(b) => b,
        }
    }
}

impl PartialEq for IdRepr {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for IdRepr {}

impl PartialOrd for IdRepr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IdRepr {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

impl std::hash::Hash for IdRepr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl fmt::Debug for IdRepr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl From<IdRepr> for String {
    fn from(r: IdRepr) -> String {
        match r {
            IdRepr::Inline(a) => a.as_str().to_owned(),
            IdRepr::Boxed(b) => b.into(),
        }
    }
}

/// True for the bytes message IDs and tokens are made of, `[A-Za-z0-9._-]`.
#[inline]
pub(crate) const fn is_token_byte(c: u8) -> bool {
    // `| 0x20` folds upper case onto lower and moves nothing else into
    // a-z. Comparisons only, no table: see `all_token_bytes`.
    (c | 0x20).wrapping_sub(b'a') < 26
        || c.wrapping_sub(b'0') < 10
        || c == b'.'
        || c == b'_'
        || c == b'-'
}

/// True when every byte is a token byte. Every tier checks several IDs and
/// tokens in every header, so this is written to run without an early
/// exit, which the compiler turns into a vector loop; an error's position
/// is looked for only once there is one.
#[inline]
pub(crate) fn all_token_bytes(b: &[u8]) -> bool {
    b.iter().fold(true, |ok, &c| ok & is_token_byte(c))
}

macro_rules! string_id_impls {
    ($($t:ident),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($t), self.0)
            }
        }
        impl FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $t::new(s)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        // Hashes and compares as the string it wraps (derived on the one
        // field), so sets of IDs can be searched by `&str`.
        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl From<$t> for String {
            fn from(id: $t) -> String {
                id.0.into()
            }
        }
    )*};
}
string_id_impls!(CustomerId, RsId, MessageId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rs_ids() {
        let p = RsId::new("acme.p3").unwrap();
        assert_eq!(p.kind(), ComponentKind::Proxy);
        assert_eq!(p.customer().as_str(), "acme");
        let s = p.child(ComponentKind::SupportInstance, 12).unwrap();
        assert_eq!(s.as_str(), "acme.p3.s12");
        assert_eq!(s.parent(), Some(p.clone()));
        // Integrators and instances are polled for by their proxy.
        assert_eq!(s.tier(), p);
        assert_eq!(
            RsId::new("acme.m1.p3.i2").unwrap().tier().as_str(),
            "acme.m1.p3"
        );
        assert_eq!(p.tier(), p);
        assert_eq!(RsId::new("acme.m1").unwrap().tier().as_str(), "acme.m1");
        assert!(s.is_within(&p));
        assert!(!RsId::new("acme.p31").unwrap().is_within(&p));
        assert_eq!(RsId::new("acme").unwrap().kind(), ComponentKind::Customer);
        for bad in [
            "",
            ".p1",
            "Acme",
            "1acme",
            "acme.",
            "acme.x1",
            "acme.p",
            "acme.p01",
            "acme.p1.",
            "acme..p1",
            "ac me",
            "acme.p12345678901",
        ] {
            assert!(RsId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RsId::new(format!("a{}", "b".repeat(64))).is_err());
    }

    #[test]
    fn token_bytes_are_letters_digits_dot_underscore_and_hyphen() {
        for c in 0..=255u8 {
            let want = c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
            assert_eq!(is_token_byte(c), want, "{c:#x}");
            let mut id = *b"0123456789abcdefghijklmnopqrstuvwxyz-_.ABCDEFGHIJKLMNOPQRSTUVWXYZ";
            for at in [0, 17, 63] {
                let keep = id[at];
                id[at] = c;
                assert_eq!(all_token_bytes(&id), want, "{c:#x} at {at}");
                let s = String::from_utf8_lossy(&id[..64]);
                if c.is_ascii() {
                    match MessageId::validate(&s) {
                        Ok(()) => assert!(want),
                        Err(IdError::BadChar { at: got, .. }) => {
                            assert_eq!((got, want), (at, false))
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                id[at] = keep;
            }
        }
    }

    #[test]
    fn message_ids() {
        let a = MessageId::generate();
        let b = MessageId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert!(MessageId::new("abc-DEF_1.2").is_ok());
        for bad in ["", "a b", "a@b", "<a>", &"x".repeat(65)] {
            assert!(MessageId::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
