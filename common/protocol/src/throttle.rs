//! The throttle document (`dtd/throttle.dtd`): the rules a tier applies,
//! as configured (`[throttle]` in TOML) and as carried by the control API
//! (`getThrottle`, `setThrottle`). What the rules mean at run time is
//! `rs_node::throttle`.

use serde::{Deserialize, Serialize};

/// Whose allowance a message draws on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// One allowance for everything the rule matches.
    #[default]
    All,
    Customer,
    Component,
    Class,
}

/// The period of a quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    #[default]
    Day,
}

/// One rule, as configured (`[[throttle.rule]]`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Names the rule in status and in the reasons it gives.
    pub name: String,
    /// Match: messages from this customer's components.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Match: from this component or anything allocated under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// Match: of this data class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Match: of this content type (`alarm`, `data`, `bulk-request`, ...).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub per: Per,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<u64>,
    /// How many seconds' worth of the rate may go at once (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_period: Option<Period>,
    /// `HH:MM-HH:MM`, local to `time_zone`: messages pass only inside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// IANA zone name (default `UTC`): for the window and quota periods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exempt_severity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exempt_precedence: Option<u8>,
}

/// A daemon's throttle configuration (`[throttle]`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule: Vec<Rule>,
    /// Refuse (forwarders) or hold (senders) what would be stored while
    /// the data directory's file system has less free space than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_disk_mb: Option<u64>,
    /// Most bulk transfers at once through this tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bulk_transfers: Option<u32>,
}

/// The `<throttle>` document of the control API (`dtd/control-api.dtd`):
/// the same settings as the `[throttle]` TOML table, one attribute per key
/// (dashes for underscores).
pub fn encode_throttle(cfg: &ThrottleConfig) -> Vec<u8> {
    use crate::codec::XmlOut;
    let mut buf = Vec::new();
    let mut x = XmlOut::document(&mut buf);
    x.open("throttle")
        .attr_num_opt("min-free-disk-mb", cfg.min_free_disk_mb)
        .attr_num_opt("max-bulk-transfers", cfg.max_bulk_transfers.map(u64::from))
        .gt()
        .newline();
    for r in &cfg.rule {
        let per = match r.per {
            Per::All => "all",
            Per::Customer => "customer",
            Per::Component => "component",
            Per::Class => "class",
        };
        x.open("rule")
            .attr("name", &r.name)
            .attr_opt("customer", r.customer.as_deref())
            .attr_opt("component", r.component.as_deref())
            .attr_opt("class", r.class.as_deref())
            .attr_opt("type", r.kind.as_deref())
            .attr("per", per)
            .attr_opt(
                "messages-per-sec",
                r.messages_per_sec.map(|v| v.to_string()).as_deref(),
            )
            .attr_num_opt("bytes-per-sec", r.bytes_per_sec)
            .attr_opt("burst-secs", r.burst_secs.map(|v| v.to_string()).as_deref())
            .attr_num_opt("quota-bytes", r.quota_bytes)
            .attr_opt(
                "quota-period",
                r.quota_period.map(|p| match p {
                    Period::Hour => "hour",
                    Period::Day => "day",
                }),
            )
            .attr_opt("window", r.window.as_deref())
            .attr_opt("time-zone", r.time_zone.as_deref())
            .attr_opt("exempt-severity", r.exempt_severity.as_deref())
            .attr_num_opt("exempt-precedence", r.exempt_precedence.map(u64::from))
            .empty()
            .newline();
    }
    x.close("throttle").newline();
    buf
}

/// Decodes a `<throttle>` document (syntax only; [`Throttle::new`]
/// checks the rules' meaning).
pub fn decode_throttle(
    bytes: &[u8],
    limits: &crate::codec::Limits,
) -> Result<ThrottleConfig, crate::codec::ControlError> {
    use crate::codec::xml::XmlIn;
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("throttle")?;
    let mut cfg = ThrottleConfig {
        rule: Vec::new(),
        min_free_disk_mb: root.opt_u64("min-free-disk-mb")?,
        max_bulk_transfers: root.opt_with("max-bulk-transfers", |s| {
            s.parse::<u32>().map_err(|e| e.to_string())
        })?,
    };
    let float = |s: &str| s.parse::<f64>().map_err(|e| e.to_string());
    while let Some(t) = x.child(&root)? {
        if t.name != "rule" {
            return Err(root.unexpected_child(&t));
        }
        let text = |a: &'static str| t.opt(a).map(str::to_owned);
        cfg.rule.push(Rule {
            name: t.req("name")?.to_owned(),
            customer: text("customer"),
            component: text("component"),
            class: text("class"),
            kind: text("type"),
            per: t
                .opt_with("per", |s| match s {
                    "all" => Ok(Per::All),
                    "customer" => Ok(Per::Customer),
                    "component" => Ok(Per::Component),
                    "class" => Ok(Per::Class),
                    _ => Err("one of all, customer, component, class"),
                })?
                .unwrap_or_default(),
            messages_per_sec: t.opt_with("messages-per-sec", float)?,
            bytes_per_sec: t.opt_u64("bytes-per-sec")?,
            burst_secs: t.opt_with("burst-secs", float)?,
            quota_bytes: t.opt_u64("quota-bytes")?,
            quota_period: t.opt_with("quota-period", |s| match s {
                "hour" => Ok(Period::Hour),
                "day" => Ok(Period::Day),
                _ => Err("hour or day"),
            })?,
            window: text("window"),
            time_zone: text("time-zone"),
            exempt_severity: text("exempt-severity"),
            exempt_precedence: t.opt_with("exempt-precedence", |s| {
                s.parse::<u8>().map_err(|e| e.to_string())
            })?,
        });
        x.end(&t)?;
    }
    x.finish()?;
    Ok(cfg)
}
