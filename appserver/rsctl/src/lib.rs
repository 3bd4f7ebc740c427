//! `rsctl`: the administrator's command line over the application server's
//! XML control API (docs/control-api.md): components, tags, groups,
//! sending control actions, and watching jobs finish.
//!
//! Exit status: 0 on success; 1 when the server refused a request or a
//! watched job ended with a destination failed or expired; 2 for usage
//! errors (from clap).

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod output;

use output::{Out, cell, rows, table};

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use rs_protocol::codec::Limits;
use rs_protocol::codec::api::{
    GroupDef, Job, SendRequest, decode_components, decode_groups, decode_job, encode_group,
    encode_send_request, encode_tags,
};
use rs_protocol::control::{ActionKind, ControlAction, StatusNode};
use rs_protocol::{ComponentKind, CustomerId, RsId};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Administer Remote Services through the application server's control API"
)]
struct Cli {
    /// The application server's base URL.
    #[arg(
        long,
        short,
        env = "RSCTL_SERVER",
        default_value = "http://127.0.0.1:8440",
        global = true,
        help_heading = "Global options"
    )]
    server: String,
    /// The provider's CA certificate: the only one trusted for an https
    /// server (docs/security.md).
    #[arg(long, env = "RSCTL_CA", global = true, help_heading = "Global options")]
    ca: Option<PathBuf>,
    /// This admin's certificate (issued with `rsctl ca issue --role admin`).
    #[arg(
        long,
        env = "RSCTL_CERT",
        global = true,
        requires = "key",
        help_heading = "Global options"
    )]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(
        long,
        env = "RSCTL_KEY",
        global = true,
        requires = "cert",
        help_heading = "Global options"
    )]
    key: Option<PathBuf>,
    /// An API token instead of a certificate (`rsctl tokens create`; sent
    /// as `Authorization: Bearer`; a certificate given too wins).
    #[arg(
        long,
        env = "RSCTL_TOKEN",
        global = true,
        hide_env_values = true,
        help_heading = "Global options"
    )]
    token: Option<String>,
    /// How results are printed: `table` for people; `json` or `xml` for
    /// scripts (the control API's document, mapped to JSON or as the
    /// server answered it; docs/control-api.md, rsctl).
    #[arg(
        long,
        short,
        value_enum,
        env = "RSCTL_OUTPUT",
        default_value = "table",
        global = true,
        help_heading = "Global options"
    )]
    output: output::Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the components the server knows: state, last seen, route, tags,
    /// and why one is at risk of losing what it holds (its spool 80% full,
    /// dropping or dead-lettering, as its last heartbeat said).
    Components {
        /// Only those at risk.
        #[arg(long)]
        at_risk: bool,
    },
    /// Show one component's status tree.
    Component {
        /// The component's ID (acme.p1).
        id: String,
    },
    /// Where a message went: the hops and times it took through the tiers
    /// to the server, or, for one sent down, each destination's state and
    /// the next hops it still waits for.
    Trace {
        /// The message ID (as `rs-proxy send` printed it, or a job's
        /// message).
        id: String,
    },
    /// MLM farms: each farm's members, their state and load (envelopes in
    /// hand, received, messages forwarded), as the farm last reported.
    Farms,
    /// Replace a component's tags (none: remove them all).
    Tag {
        /// The component's ID.
        id: String,
        /// Its tags from now on (none: remove them all).
        tags: Vec<String>,
    },
    /// Groups of components.
    #[command(subcommand)]
    Groups(GroupCmd),
    /// Send a control action; prints the job and, with --watch, follows it.
    Send(Box<SendArgs>),
    /// Publish a file and offer it to components and groups (software is
    /// installed, configuration applied); shows the upload's progress, the
    /// job, and with --watch each destination as it fetches and processes it.
    Publish(Box<PublishArgs>),
    /// Files uploaded by components (newest first).
    Uploads {
        /// Only from this component.
        #[arg(long)]
        component: Option<String>,
    },
    /// Save an uploaded file (by its request ID).
    Fetch {
        /// The upload request's ID (`rsctl uploads` lists them).
        request: String,
        /// Where to write it.
        file: PathBuf,
    },
    /// Stored messages, newest first (at most --limit).
    Messages {
        #[command(flatten)]
        filter: MessageFilter,
        /// At most this many (1-10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Every stored message matching the filters, oldest first, in pages
    /// from a cursor: what a script exports (one line, or JSON object, a
    /// message; the cursor to go on from at the end).
    Export {
        #[command(flatten)]
        filter: MessageFilter,
        /// Only messages stored after this cursor (the `next` of a
        /// previous export).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many in all (default: every one).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Subscriptions: service modules' and webhooks' share of the stored
    /// messages, with their tasks pending, done and failed.
    #[command(subcommand)]
    Subscriptions(SubscriptionCmd),
    /// The collector's tasks (failed ones, to replay).
    #[command(subcommand)]
    Tasks(TaskCmd),
    /// Rollouts: a control action sent wave by wave, halted by failures
    /// and silence.
    #[command(subcommand)]
    Rollouts(RolloutCmd),
    /// API tokens: for scripts without a certificate and the web portal's
    /// login (an admin of every customer makes and revokes them).
    #[command(subcommand)]
    Tokens(TokenCmd),
    /// Every certificate the server's CA issued (newest first).
    Certificates {
        /// Only those of this component or admin.
        #[arg(long)]
        name: Option<String>,
    },
    /// Jobs: one control action and its destinations.
    #[command(subcommand)]
    Jobs(JobCmd),
    /// Throttle rules: the server's own, or pushed to components.
    #[command(subcommand)]
    Throttle(ThrottleCmd),
    /// The certificate authority, on its directory (no server needed):
    /// create it, issue and revoke certificates, list them.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Make a one-time enrollment token for a new (or re-deployed) proxy
    /// or MLM; prints the token.
    Enroll(EnrollArgs),
    /// Revoke a component's certificates through the server (in force at
    /// once there, and at every tier within its refresh interval).
    Revoke {
        /// Every live certificate of this component.
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        component: Option<String>,
        /// One certificate, by serial (hex).
        #[arg(long)]
        serial: Option<String>,
    },
    /// The audit log of the control API (newest first).
    Audit {
        /// Only this admin's requests.
        #[arg(long)]
        admin: Option<String>,
        /// Only entries older than this one (its `seq`): the next page.
        #[arg(long)]
        before: Option<u64>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// The filters of `messages` and `export` (all optional, combined).
#[derive(Debug, Args)]
struct MessageFilter {
    /// Sent by this component exactly.
    #[arg(long)]
    component: Option<String>,
    /// Of this customer's components.
    #[arg(long)]
    customer: Option<String>,
    /// Of this data class.
    #[arg(long)]
    class: Option<String>,
    /// Of this subclass.
    #[arg(long)]
    sub: Option<String>,
    /// Of this content type (alarm, event, response, data, ...).
    #[arg(long = "type")]
    kind: Option<String>,
    /// Alarms and events at least this severe (critical, major, minor,
    /// warning, info).
    #[arg(long)]
    severity: Option<String>,
    /// Received at or after this time (2026-11-24T22:56:37Z).
    #[arg(long)]
    since: Option<String>,
    /// Received before this time.
    #[arg(long)]
    until: Option<String>,
}

impl MessageFilter {
    /// The query string's filter part.
    fn query(&self) -> Vec<String> {
        [
            ("component", &self.component),
            ("customer", &self.customer),
            ("class", &self.class),
            ("sub", &self.sub),
            ("type", &self.kind),
            ("severity", &self.severity),
            ("since", &self.since),
            ("until", &self.until),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect()
    }
}

/// A query-string value.
fn enc(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Every token (never its secret): grants, who made it, expiry,
    /// revocation.
    List,
    /// Make a token; prints it (the only time it is shown).
    Create {
        /// Its name: the audit log names its requests token:NAME.
        name: String,
        /// The customers it grants: `*` for every one, or IDs separated by
        /// commas.
        #[arg(long)]
        customers: String,
        /// How long it is good for, 1 to 366 days.
        #[arg(long, default_value_t = 90)]
        days: u64,
    },
    /// Revoke a token at once, ending its portal sessions.
    Revoke {
        /// The token's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum SubscriptionCmd {
    /// Every subscription with its tasks pending, done and failed.
    List,
    /// Create a subscription or replace the one of this name; it receives
    /// what is stored from then on. The filters given must all match.
    Set {
        /// The subscription's name.
        name: String,
        /// webhook (each message POSTed to --url), feed (pulled with
        /// `subscriptions feed`) or module (a built-in module, --module).
        #[arg(long)]
        delivery: String,
        /// webhook: where to POST.
        #[arg(long)]
        url: Option<String>,
        /// module: the `[[modules]]` name in appserver.toml.
        #[arg(long)]
        module: Option<String>,
        /// Filter: this data class.
        #[arg(long)]
        class: Option<String>,
        /// Filter: this subclass.
        #[arg(long)]
        sub: Option<String>,
        /// Filter: this customer's components.
        #[arg(long)]
        customer: Option<String>,
        /// Filter: this component and what is allocated under it.
        #[arg(long)]
        source: Option<String>,
        /// Filter: this content type.
        #[arg(long = "type")]
        kind: Option<String>,
        /// Filter: alarms and events at least this severe.
        #[arg(long)]
        min_severity: Option<String>,
    },
    /// Delete a subscription and its tasks.
    Delete {
        /// The subscription's name.
        name: String,
    },
    /// The next messages of a feed subscription, in storage order;
    /// --after acknowledges everything up to that cursor.
    Feed {
        /// The feed subscription's name.
        name: String,
        /// The cursor of the last messages handled (acknowledges them).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// With nothing new, wait up to this many seconds (at most 60).
        #[arg(long, default_value_t = 0)]
        wait: u32,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCmd {
    /// Tasks in one state.
    List {
        /// ready, taken, done or failed.
        #[arg(long, default_value = "failed")]
        state: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Make failed tasks ready again (one, or all).
    Replay {
        /// Only this task.
        #[arg(long)]
        id: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum CaCmd {
    /// Create a CA in a new directory.
    Init {
        /// The CA's directory (ca.pem, ca.key, crl.pem).
        #[arg(long)]
        dir: PathBuf,
        /// The farm's PostgreSQL database (`postgres://...`, as the
        /// servers' `database`) holding the CA's records; without it,
        /// `ca.db` in --dir.
        #[arg(long)]
        database: Option<String>,
        /// The CA's name (its certificate's CN).
        #[arg(long, default_value = "Remote Services CA")]
        name: String,
        /// How long the CA's certificate is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate with a fresh key: writes NAME.pem and NAME.key
    /// (mode 0600) to --out. For servers give their --dns names and --ip
    /// addresses; for an admin, --role admin and --customers.
    Issue {
        /// The CA's directory (ca.pem, ca.key, crl.pem).
        #[arg(long)]
        dir: PathBuf,
        /// The farm's PostgreSQL database (`postgres://...`, as the
        /// servers' `database`) holding the CA's records; without it,
        /// `ca.db` in --dir.
        #[arg(long)]
        database: Option<String>,
        /// A component ID (e.g. rs.a1, acme.m1) or an admin's name.
        name: String,
        /// component or admin.
        #[arg(long, default_value = "component")]
        role: String,
        /// Admins only: the customers granted, comma-separated, or `*`.
        #[arg(long)]
        customers: Option<String>,
        /// Servers: the host names it serves on, comma-separated.
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// Servers: the addresses it serves on, comma-separated.
        #[arg(long, value_delimiter = ',')]
        ip: Vec<std::net::IpAddr>,
        /// How long the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Where to write the files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Revoke by serial, or every certificate of a name; rewrites crl.pem.
    Revoke {
        /// The CA's directory (ca.pem, ca.key, crl.pem).
        #[arg(long)]
        dir: PathBuf,
        /// The farm's PostgreSQL database (`postgres://...`, as the
        /// servers' `database`) holding the CA's records; without it,
        /// `ca.db` in --dir.
        #[arg(long)]
        database: Option<String>,
        /// One certificate, by serial (hex).
        #[arg(long, conflicts_with = "name", required_unless_present = "name")]
        serial: Option<String>,
        /// Every live certificate of this name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Every certificate issued.
    List {
        /// The CA's directory (ca.pem, ca.key, crl.pem).
        #[arg(long)]
        dir: PathBuf,
        /// The farm's PostgreSQL database (`postgres://...`, as the
        /// servers' `database`) holding the CA's records; without it,
        /// `ca.db` in --dir.
        #[arg(long)]
        database: Option<String>,
    },
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// The customer the new component belongs to.
    #[arg(long, required_unless_present = "component")]
    customer: Option<String>,
    /// The ID it gets (re-deployment after a compromise, or an MLM);
    /// without it a new proxy gets the next free ID.
    #[arg(long)]
    component: Option<String>,
    /// proxy or mlm.
    #[arg(long)]
    kind: Option<String>,
    /// Host names it serves on (MLMs), comma-separated.
    #[arg(long, value_delimiter = ',')]
    dns: Vec<String>,
    /// Addresses it serves on (MLMs), comma-separated.
    #[arg(long, value_delimiter = ',')]
    ip: Vec<String>,
    /// How long the token may be used.
    #[arg(long, default_value_t = 7 * 86_400)]
    ttl_secs: u64,
}

#[derive(Debug, Subcommand)]
enum ThrottleCmd {
    /// The server's throttle rules.
    Show,
    /// Add or replace a rule. Without --to/--group: the server's (other
    /// rules kept). With them: sent as a configChange that makes this the
    /// destinations' only rule.
    Set(Box<RuleArgs>),
    /// Remove the server's rule of this name.
    Remove {
        /// The rule's name.
        name: String,
    },
    /// Remove every rule of the destinations (or, without --to/--group,
    /// of the server).
    Clear {
        #[command(flatten)]
        targets: Targets,
    },
}

#[derive(Debug, Args)]
struct Targets {
    /// Push to this component (repeatable).
    #[arg(long = "to")]
    to: Vec<String>,
    /// Push to this group (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Follow the push until it finishes.
    #[arg(long, short)]
    watch: bool,
}

#[derive(Debug, Args)]
struct RuleArgs {
    /// The rule's name (a rule of that name is replaced).
    name: String,
    /// Match: this customer's components.
    #[arg(long)]
    customer: Option<String>,
    /// Match: this component and what is allocated under it.
    #[arg(long)]
    component: Option<String>,
    /// Match: this data class.
    #[arg(long)]
    class: Option<String>,
    /// Match: this content type (alarm, event, data, ...).
    #[arg(long = "type")]
    kind: Option<String>,
    /// Separate allowances per: all, customer, component, class.
    #[arg(long, default_value = "all")]
    per: String,
    /// Rate: messages per second (token bucket).
    #[arg(long)]
    messages_per_sec: Option<f64>,
    /// Rate: bytes per second.
    #[arg(long)]
    bytes_per_sec: Option<u64>,
    /// How many seconds of the rate may come at once.
    #[arg(long)]
    burst_secs: Option<f64>,
    /// Quota: bytes per --quota-period.
    #[arg(long)]
    quota_bytes: Option<u64>,
    /// hour or day.
    #[arg(long)]
    quota_period: Option<String>,
    /// HH:MM-HH:MM, local to --time-zone.
    #[arg(long)]
    window: Option<String>,
    /// IANA zone name (default UTC).
    #[arg(long)]
    time_zone: Option<String>,
    /// Alarms at least this severe pass regardless (critical, major, ...).
    #[arg(long)]
    exempt_severity: Option<String>,
    /// Messages of at least this precedence pass regardless.
    #[arg(long)]
    exempt_precedence: Option<u8>,
    #[command(flatten)]
    targets: Targets,
}

fn rule_of(a: &RuleArgs) -> anyhow::Result<rs_protocol::throttle::Rule> {
    use rs_protocol::throttle::{Per, Period, Rule};
    Ok(Rule {
        name: a.name.clone(),
        customer: a.customer.clone(),
        component: a.component.clone(),
        class: a.class.clone(),
        kind: a.kind.clone(),
        per: match a.per.as_str() {
            "all" => Per::All,
            "customer" => Per::Customer,
            "component" => Per::Component,
            "class" => Per::Class,
            other => bail!("--per {other}: one of all, customer, component, class"),
        },
        messages_per_sec: a.messages_per_sec,
        bytes_per_sec: a.bytes_per_sec,
        burst_secs: a.burst_secs,
        quota_bytes: a.quota_bytes,
        quota_period: match a.quota_period.as_deref() {
            None => None,
            Some("hour") => Some(Period::Hour),
            Some("day") => Some(Period::Day),
            Some(other) => bail!("--quota-period {other}: hour or day"),
        },
        window: a.window.clone(),
        time_zone: a.time_zone.clone(),
        exempt_severity: a.exempt_severity.clone(),
        exempt_precedence: a.exempt_precedence,
    })
}

fn print_throttle(cfg: &rs_protocol::throttle::ThrottleConfig) {
    if cfg.rule.is_empty() {
        println!("no throttle rules");
    }
    for r in &cfg.rule {
        let doc = rs_protocol::throttle::encode_throttle(&rs_protocol::throttle::ThrottleConfig {
            rule: vec![r.clone()],
            ..Default::default()
        });
        let text = String::from_utf8_lossy(&doc);
        let line = text
            .lines()
            .find(|l| l.starts_with("<rule"))
            .unwrap_or("")
            .trim_start_matches("<rule ")
            .trim_end_matches("/>");
        println!("{line}");
    }
}

#[derive(Debug, Subcommand)]
enum GroupCmd {
    /// Every group with its size.
    List,
    /// A group's definition and its members now.
    Show {
        /// The group's name.
        name: String,
    },
    /// Create or replace a group: members, a selector, or both.
    Set {
        /// The group's name.
        name: String,
        /// A static member (repeatable).
        #[arg(long = "member")]
        members: Vec<String>,
        /// Selector: components of this customer.
        #[arg(long)]
        customer: Option<String>,
        /// Selector: components of this kind (proxy, mlm, instance, ...).
        #[arg(long)]
        kind: Option<String>,
        /// Selector: components with this tag.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Delete a group.
    Delete {
        /// The group's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum JobCmd {
    /// The newest jobs first, with how many destinations are in each
    /// state (those whose every destination this admin is granted).
    List {
        /// Only running (some destination not final yet) or done ones.
        #[arg(long)]
        state: Option<String>,
        /// Older than this job (the last of the page before).
        #[arg(long)]
        before: Option<String>,
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// A job's destinations and their states.
    Show {
        /// The job's ID (as `send` or `jobs list` printed it).
        id: String,
    },
    /// Follow a job until every destination is final.
    Watch {
        /// The job's ID.
        id: String,
    },
}

#[derive(Debug, Args)]
struct SendArgs {
    #[command(flatten)]
    act: ActionArgs,
    /// A destination component (repeatable).
    #[arg(long = "to")]
    to: Vec<String>,
    /// A destination group (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// How long the action may wait to be delivered, seconds.
    #[arg(long)]
    ttl: Option<u64>,
    /// POST the job document here at each change.
    #[arg(long)]
    notify: Option<String>,
    /// Follow the job until it finishes.
    #[arg(long, short)]
    watch: bool,
}

/// A control action and what it carries (`send` and `rollouts create`).
#[derive(Debug, Args)]
struct ActionArgs {
    /// getStatus, ping, shutdown, getConfig, configChange, enableInstance,
    /// disableInstance, enableForwarding, disableForwarding,
    /// deregisterIntegrator, softwareUpdate, replayDeadLetters,
    /// discardDeadLetters.
    action: String,
    /// configChange: a TOML file laid over each destination's configuration.
    #[arg(long)]
    config: Option<PathBuf>,
    /// configChange: one TOML setting (`heartbeat_secs=60`,
    /// `upstream.poll_hold_secs=20`); repeatable, after --config.
    #[arg(long = "set")]
    set: Vec<String>,
    /// enableInstance, disableInstance, deregisterIntegrator: the target.
    #[arg(long)]
    target: Option<String>,
    /// replayDeadLetters, discardDeadLetters: only this message (by ID);
    /// left out, every dead letter of each destination.
    #[arg(long)]
    message: Option<String>,
    /// softwareUpdate: the package's name.
    #[arg(long)]
    package: Option<String>,
    /// softwareUpdate: the version to install.
    #[arg(long = "package-version")]
    package_version: Option<String>,
    /// softwareUpdate: where to fetch it (a bulk URL; optional).
    #[arg(long)]
    url: Option<String>,
}

/// `rollouts create`.
#[derive(Debug, Args)]
struct RolloutArgs {
    /// The rollout's name.
    name: String,
    #[command(flatten)]
    act: ActionArgs,
    /// A destination component (repeatable).
    #[arg(long = "to")]
    to: Vec<String>,
    /// A destination group (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Wave sizes in order, each a count or a percentage of all the
    /// destinations (`1,10%,100%`; the last takes the rest).
    #[arg(long, conflicts_with = "by")]
    waves: Option<String>,
    /// One wave per `customer`, or per `mlm` the destinations are reached
    /// through.
    #[arg(long)]
    by: Option<String>,
    /// The share of a wave (percent) that must succeed before the next
    /// starts.
    #[arg(long, default_value_t = 100)]
    success_pct: u8,
    /// More destinations of a wave failed, expired or silent than this
    /// halt the rollout.
    #[arg(long, default_value_t = 0)]
    max_failed: u32,
    /// A destination unfinished this long after its wave started counts
    /// as failed.
    #[arg(long, default_value_t = 600)]
    silence_secs: u64,
    /// Each next wave waits for `rsctl rollouts approve ID`.
    #[arg(long)]
    approve: bool,
    /// With the action `offer`: the published file to offer (its SHA-256,
    /// as `rsctl publish` printed it).
    #[arg(long)]
    file: Option<String>,
    /// With `offer`: what the file is (`software` is installed,
    /// `configuration` applied, anything else kept).
    #[arg(long, default_value = "software")]
    class: String,
    /// With `offer`: its subclass.
    #[arg(long, default_value = "package")]
    subclass: String,
    /// Follow the rollout wave by wave until it ends.
    #[arg(long, short)]
    watch: bool,
}

#[derive(Debug, Subcommand)]
enum RolloutCmd {
    /// Every rollout, newest first.
    List,
    /// Send a control action to its destinations wave by wave; halted by
    /// failures and by silence (docs/control-api.md, Rollouts).
    Create(Box<RolloutArgs>),
    /// A rollout's waves and each destination's state.
    Show {
        /// The rollout's ID.
        id: String,
        /// Follow it until it ends.
        #[arg(long, short)]
        watch: bool,
    },
    /// No next wave starts (the running one goes on).
    Pause {
        /// The rollout's ID.
        id: String,
    },
    /// Paused: go on; halted: go on with the next wave.
    Resume {
        /// The rollout's ID.
        id: String,
    },
    /// Start the next wave of a rollout waiting for approval.
    Approve {
        /// The rollout's ID.
        id: String,
    },
    /// Stop it for good: no later wave is sent.
    Abort {
        /// The rollout's ID.
        id: String,
    },
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// The file to publish.
    file: PathBuf,
    /// A destination component (repeatable).
    #[arg(long = "to")]
    to: Vec<String>,
    /// A destination group (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// What it is: `software` (installed by each proxy's install command),
    /// `configuration` (applied as a configuration change), or anything
    /// else (kept).
    #[arg(long, default_value = "software")]
    class: String,
    /// Its subclass (for configuration: the kind of component it is for).
    #[arg(long = "subclass", default_value = "package")]
    subclass: String,
    /// The name to publish it under (default: the file's name).
    #[arg(long)]
    name: Option<String>,
    /// How long the offer stands, seconds.
    #[arg(long)]
    ttl: Option<u64>,
    /// POST the job document here at each change.
    #[arg(long)]
    notify: Option<String>,
    /// Follow the job until every destination has answered.
    #[arg(long, short)]
    watch: bool,
}

/// Streams a file to `PUT /files/{name}` with a progress bar on a terminal.
async fn publish_file(api: &Api, path: &std::path::Path, name: &str) -> anyhow::Result<Vec<u8>> {
    use futures_util::StreamExt as _;
    let f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("{}", path.display()))?;
    let size = f.metadata().await?.len();
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(size)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .progress_chars("=> "),
    );
    bar.set_message(format!("publishing {name}"));
    let b = bar.clone();
    let body = tokio_util::io::ReaderStream::with_capacity(f, 256 << 10).map(move |c| {
        if let Ok(chunk) = &c {
            b.inc(chunk.len() as u64);
        }
        c
    });
    let enc = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
    let url = format!("{}/rs/v1/control/files/{enc}", api.base);
    let resp = api
        .stream_http
        .put(&url)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    bar.finish_and_clear();
    let status = resp.status();
    let bytes = resp.bytes().await?.to_vec();
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&bytes).trim());
    }
    Ok(bytes)
}

/// The `--to` destinations, each a component ID.
fn to_ids(to: &[String]) -> anyhow::Result<Vec<RsId>> {
    to.iter()
        .map(|t| RsId::new(t).map_err(|e| anyhow!("--to {t}: {e}")))
        .collect()
}

fn action_of(a: &ActionArgs) -> anyhow::Result<ControlAction> {
    let target = || -> anyhow::Result<RsId> {
        let t = a
            .target
            .as_deref()
            .with_context(|| format!("{} needs --target", a.action))?;
        RsId::new(t).map_err(|e| anyhow::anyhow!("--target {t}: {e}"))
    };
    let Some(kind) = ActionKind::parse(&a.action) else {
        let names: Vec<_> = ActionKind::ALL.iter().map(|k| k.name()).collect();
        bail!("unknown action {:?}; one of {}", a.action, names.join(", "));
    };
    let only = || {
        a.message
            .as_deref()
            .map(|m| {
                rs_protocol::MessageId::new(m).map_err(|e| anyhow::anyhow!("--message {m}: {e}"))
            })
            .transpose()
    };
    Ok(match kind {
        ActionKind::GetStatus => ControlAction::GetStatus,
        ActionKind::Ping => ControlAction::Ping,
        ActionKind::Shutdown => ControlAction::Shutdown,
        ActionKind::GetConfig => ControlAction::GetConfig,
        ActionKind::EnableForwarding => ControlAction::EnableForwarding,
        ActionKind::DisableForwarding => ControlAction::DisableForwarding,
        ActionKind::EnableInstance => ControlAction::EnableInstance(target()?),
        ActionKind::DisableInstance => ControlAction::DisableInstance(target()?),
        ActionKind::DeregisterIntegrator => ControlAction::DeregisterIntegrator(target()?),
        ActionKind::ReplayDeadLetters => ControlAction::ReplayDeadLetters(only()?),
        ActionKind::DiscardDeadLetters => ControlAction::DiscardDeadLetters(only()?),
        ActionKind::ConfigChange => {
            let mut config = match &a.config {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("--config {}", f.display()))?,
                None => String::new(),
            };
            for s in &a.set {
                if !config.is_empty() && !config.ends_with('\n') {
                    config.push('\n');
                }
                config.push_str(s);
                config.push('\n');
            }
            if config.trim().is_empty() {
                bail!("configChange needs --config FILE or --set KEY=VALUE");
            }
            ControlAction::ConfigChange { config }
        }
        ActionKind::SoftwareUpdate => ControlAction::SoftwareUpdate {
            package: a
                .package
                .clone()
                .context("softwareUpdate needs --package")?,
            version: a
                .package_version
                .clone()
                .context("softwareUpdate needs --package-version")?,
            url: a.url.clone(),
        },
    })
}

struct Api {
    base: String,
    http: reqwest::Client,
    /// Without a whole-request timeout: file transfers.
    stream_http: reqwest::Client,
}

/// An HTTP client for the server: with --ca, trusting only that CA; with
/// --cert/--key presenting the admin's certificate; with --token sending
/// the API token.
fn http_client(cli: &Cli) -> anyhow::Result<reqwest::ClientBuilder> {
    let builder = tls_client(cli)?;
    Ok(match &cli.token {
        Some(t) => {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .context("--token: not a header value")?;
            v.set_sensitive(true);
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::AUTHORIZATION, v);
            builder.default_headers(h)
        }
        None => builder,
    })
}

/// The TLS part of [`http_client`].
fn tls_client(cli: &Cli) -> anyhow::Result<reqwest::ClientBuilder> {
    match (&cli.ca, &cli.cert, &cli.key) {
        (Some(ca), Some(cert), Some(key)) => {
            let t = rs_net::tls::TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                crl: None,
                crl_refresh_secs: 60,
                renew_before_days: 30,
            };
            rs_net::tls::client(Some(&t)).map_err(anyhow::Error::msg)
        }
        (Some(ca), _, _) => rs_net::tls::client_trusting(ca).map_err(anyhow::Error::msg),
        (None, _, _) => Ok(reqwest::Client::builder()),
    }
}

impl Api {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        Ok(Api {
            base: cli.server.trim_end_matches('/').to_owned(),
            // Long enough for a held watch (the server holds up to 25 s).
            http: http_client(cli)?.timeout(Duration::from_secs(60)).build()?,
            stream_http: http_client(cli)?.build()?,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}/rs/v1/control/{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8")
                .body(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await?.to_vec();
        if !status.is_success() {
            bail!(
                "{status}: {}",
                String::from_utf8_lossy(&bytes).trim().trim_end_matches('.')
            );
        }
        Ok(bytes)
    }

    /// A GET whose answer is read as it comes (a file, an export), with
    /// no whole-request timeout.
    async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}/rs/v1/control/{path}", self.base);
        let resp = self
            .stream_http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        if !resp.status().is_success() {
            bail!(
                "{}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default().trim()
            );
        }
        Ok(resp)
    }

    async fn job(&self, id: &str, after: Option<u64>) -> anyhow::Result<Job> {
        let path = match after {
            Some(v) => format!("jobs/{id}?after={v}&wait=25"),
            None => format!("jobs/{id}"),
        };
        let b = self.call(reqwest::Method::GET, &path, None).await?;
        Ok(decode_job(&b, &Limits::default())?)
    }
}

fn ago(t: rs_protocol::Timestamp) -> String {
    let s = (rs_protocol::Timestamp::now().as_millis() - t.as_millis()).max(0) / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn print_tree(n: &StatusNode, depth: usize) {
    let label =
        n.id.as_ref()
            .map(|i| i.to_string())
            .or_else(|| n.name.clone())
            .unwrap_or_default();
    println!(
        "{:indent$}{} {} [{}]{}",
        "",
        n.kind,
        label,
        n.state.as_str(),
        n.version
            .as_deref()
            .map(|v| format!(" v{v}"))
            .unwrap_or_default(),
        indent = depth * 2
    );
    for m in &n.metrics {
        println!(
            "{:indent$}{} = {}",
            "",
            m.name,
            m.value,
            indent = depth * 2 + 4
        );
    }
    for c in &n.children {
        print_tree(c, depth + 1);
    }
}

fn summary(j: &Job) -> String {
    let mut parts = Vec::new();
    for s in ["succeeded", "failed", "expired", "delivered", "pending"] {
        let n = j.count(s);
        if n > 0 {
            parts.push(format!("{n} {s}"));
        }
    }
    let done = j.targets.iter().filter(|t| t.is_final()).count();
    format!(
        "job {} ({}): {done}/{} final: {}",
        j.id,
        j.action,
        j.targets.len(),
        parts.join(", ")
    )
}

/// A trace as a timeline: each step with the time since the one before
/// and since the first, then where the message waits.
fn trace_text(t: &rs_protocol::codec::api::Trace) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let state = match t.state.as_str() {
        "stored" => "stored at the server",
        "on-its-way" => "on its way down",
        "done" => "sent down; every destination is final",
        _ => {
            "not at this server: it waits at its source's proxy (`rs-proxy trace ID` there \
             says where) or in a custody MLM's spool, or was never sent"
        }
    };
    let _ = writeln!(out, "message {}: {state}", t.id);
    if let Some(j) = &t.job {
        let _ = writeln!(out, "job {j}");
    }
    let first = t.events.first().map(|e| e.at);
    let mut last = first;
    for e in &t.events {
        let ms = |from: Option<rs_protocol::Timestamp>| {
            from.map_or(0, |f| e.at.as_millis() - f.as_millis())
        };
        let _ = writeln!(
            out,
            "  {}  {:<24} {:<10} {:>+9} ms {:>+10} ms{}",
            e.at,
            e.component.as_str(),
            e.what,
            ms(last),
            ms(first),
            e.detail
                .as_deref()
                .map(|d| format!("  {d}"))
                .unwrap_or_default()
        );
        last = Some(e.at);
    }
    for w in &t.waiting {
        let _ = writeln!(
            out,
            "  waits at {} for {} since {}, {}",
            w.component.as_str(),
            w.next_hop.as_str(),
            w.since,
            w.offered.map_or_else(
                || "not offered yet (no poll from it since)".to_owned(),
                |o| format!("last offered {o}, not acknowledged")
            )
        );
    }
    out
}

fn print_job(j: &Job) {
    println!("{}", summary(j));
    for t in &j.targets {
        println!("  {:<24} {:<10} {}", t.id.as_str(), t.state, detail(t));
    }
}

fn detail(t: &rs_protocol::codec::api::JobTarget) -> String {
    let mut d = String::new();
    if let Some(c) = &t.code {
        d.push_str(c);
    }
    if let Some(x) = &t.text {
        if !d.is_empty() {
            d.push_str(": ");
        }
        d.push_str(x);
    }
    if let Some(r) = &t.result {
        let first = r.lines().next().unwrap_or("");
        if !d.is_empty() {
            d.push_str("; ");
        }
        d.push_str(first);
        if r.lines().nth(1).is_some() {
            d.push_str(" ...");
        }
    }
    d
}

/// Follows a job, printing each destination as it changes and a progress
/// line (on stdout for people, on stderr when the result is for a
/// script); returns the final job.
async fn watch(api: &Api, id: &str, to_stdout: bool) -> anyhow::Result<Job> {
    use std::io::Write as _;
    let tty = if to_stdout {
        std::io::stdout().is_terminal()
    } else {
        std::io::stderr().is_terminal()
    };
    let say = |text: &str, end: bool| {
        let mut w: Box<dyn std::io::Write> = if to_stdout {
            Box::new(std::io::stdout().lock())
        } else {
            Box::new(std::io::stderr().lock())
        };
        let _ = if end {
            writeln!(w, "{text}")
        } else {
            write!(w, "{text}")
        };
        let _ = w.flush();
    };
    let mut job = api.job(id, None).await?;
    let mut seen: std::collections::HashMap<String, String> = Default::default();
    loop {
        for t in &job.targets {
            if seen.get(t.id.as_str()) != Some(&t.state) {
                seen.insert(t.id.to_string(), t.state.clone());
                if tty {
                    say("\r\x1b[2K", false);
                }
                say(
                    &format!("  {:<24} {:<10} {}", t.id.as_str(), t.state, detail(t)),
                    true,
                );
            }
        }
        if tty {
            say(&format!("\r\x1b[2K{}", summary(&job)), false);
        } else {
            say(&summary(&job), true);
        }
        if job.is_done() {
            if tty {
                say("", true);
            }
            return Ok(job);
        }
        job = api.job(id, Some(job.version)).await?;
    }
}

fn finished_well(j: &Job) -> bool {
    j.targets.iter().all(|t| t.state == "succeeded")
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let api = Api::new(&cli)?;
    let out = Out(cli.output);
    let limits = Limits::default();
    match cli.cmd {
        Cmd::Components { at_risk } => {
            let path = if at_risk {
                "components?at_risk=1"
            } else {
                "components"
            };
            let b = api.call(reqwest::Method::GET, path, None).await?;
            let list = decode_components(&b, &limits)?;
            out.doc(&b, |_| print_components(&list))?;
        }
        Cmd::Farms => {
            let b = api.call(reqwest::Method::GET, "farms", None).await?;
            let list = rs_protocol::codec::api::decode_farms(&b, &limits)?;
            out.doc(&b, |_| print_farms(&list))?;
        }
        Cmd::Component { id } => {
            let b = api.call(reqwest::Method::GET, "components", None).await?;
            let list = decode_components(&b, &limits)?;
            let c = list
                .iter()
                .find(|c| c.id.as_str() == id)
                .with_context(|| format!("no component {id}"))?;
            // Its own <components> document, of one.
            let one = rs_protocol::codec::api::encode_components(std::slice::from_ref(c));
            out.doc(&one, |_| {
                println!(
                    "{} (last seen {}, via {})",
                    c.id,
                    ago(c.last_seen),
                    if c.via.is_empty() {
                        "direct".to_owned()
                    } else {
                        c.via
                            .iter()
                            .map(RsId::as_str)
                            .collect::<Vec<_>>()
                            .join(" > ")
                    }
                );
                match &c.status {
                    Some(s) => print_tree(s, 0),
                    None => println!("no status tree yet"),
                }
            })?;
        }
        Cmd::Tag { id, tags } => {
            let b = api
                .call(
                    reqwest::Method::PUT,
                    &format!("components/{id}/tags"),
                    Some(encode_tags(&tags)),
                )
                .await?;
            out.doc(&b, |_| println!("{id}: tags {}", tags.join(",")))?;
        }
        Cmd::Groups(g) => match g {
            GroupCmd::List => {
                let b = api.call(reqwest::Method::GET, "groups", None).await?;
                let groups = decode_groups(&b, &limits)?;
                out.doc(&b, |_| {
                    for g in &groups {
                        println!(
                            "{:<24} {:>6} members  {}",
                            g.name,
                            g.members.len(),
                            selector(g)
                        );
                    }
                })?;
            }
            GroupCmd::Show { name } => {
                let b = api
                    .call(reqwest::Method::GET, &format!("groups/{name}"), None)
                    .await?;
                let groups = decode_groups(&b, &limits)?;
                out.doc(&b, |_| {
                    for g in &groups {
                        println!("{} ({} members) {}", g.name, g.members.len(), selector(g));
                        for m in &g.members {
                            println!("  {m}");
                        }
                    }
                })?;
            }
            GroupCmd::Set {
                name,
                members,
                customer,
                kind,
                tag,
            } => {
                let def = GroupDef {
                    name: name.clone(),
                    members: members
                        .iter()
                        .map(|m| RsId::new(m).map_err(|e| anyhow::anyhow!("--member {m}: {e}")))
                        .collect::<anyhow::Result<_>>()?,
                    customer: customer
                        .map(|c| {
                            CustomerId::new(&c).map_err(|e| anyhow::anyhow!("--customer {c}: {e}"))
                        })
                        .transpose()?,
                    kind: kind
                        .map(|k| {
                            ComponentKind::parse(&k)
                                .with_context(|| format!("--kind {k}: not a component kind"))
                        })
                        .transpose()?,
                    tag,
                };
                let b = api
                    .call(
                        reqwest::Method::PUT,
                        &format!("groups/{name}"),
                        Some(encode_group(&def)),
                    )
                    .await?;
                let groups = decode_groups(&b, &limits)?;
                out.doc(&b, |_| {
                    for g in &groups {
                        println!(
                            "{}: {} members now {}",
                            g.name,
                            g.members.len(),
                            selector(g)
                        );
                    }
                })?;
            }
            GroupCmd::Delete { name } => {
                api.call(reqwest::Method::DELETE, &format!("groups/{name}"), None)
                    .await?;
                out.fields(&[("deleted", name.clone())], || println!("deleted {name}"));
            }
        },
        Cmd::Publish(a) => {
            let name = match &a.name {
                Some(n) => n.clone(),
                None => a
                    .file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .context("the file has no name; give --name")?,
            };
            let b = publish_file(&api, &a.file, &name).await?;
            let file = rs_protocol::codec::api::decode_file(&b, &limits)?;
            // The job is the result; the file's line is for people.
            let said = format!(
                "published {} ({} bytes, SHA-256 {})",
                file.name,
                file.size,
                rs_protocol::codec::sha256_hex(&file.sha256)
            );
            if out.people() {
                println!("{said}");
            } else {
                eprintln!("{said}");
            }
            let req = rs_protocol::codec::api::OfferRequest {
                to: to_ids(&a.to)?,
                groups: a.groups.clone(),
                sha256: file.sha256,
                class: a.class.clone(),
                sub: a.subclass.clone(),
                ttl_secs: a.ttl,
                notify: a.notify.clone(),
            };
            let b = api
                .call(
                    reqwest::Method::POST,
                    "offer",
                    Some(rs_protocol::codec::api::encode_offer_request(&req)),
                )
                .await?;
            let job = decode_job(&b, &limits)?;
            if a.watch {
                return follow(&api, out, &job).await;
            }
            out.doc(&b, |_| print_job(&job))?;
        }
        Cmd::Uploads { component } => {
            let path = match component {
                Some(c) => format!("uploads?component={}", enc(&c)),
                None => "uploads".to_owned(),
            };
            list(
                &api,
                out,
                &path,
                "upload",
                &[
                    ("REQUEST", "request"),
                    ("COMPONENT", "component"),
                    ("NAME", "name"),
                    ("SIZE", "size"),
                    ("STATE", "state"),
                    ("RECEIVED", "received"),
                    ("REASON", "reason"),
                ],
            )
            .await?;
        }
        Cmd::Fetch { request, file } => {
            let mut resp = api
                .stream(&format!("uploads/{}/file", enc(&request)))
                .await?;
            let sha = resp
                .headers()
                .get("x-rs-sha256")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            use tokio::io::AsyncWriteExt as _;
            let mut f = tokio::fs::File::create(&file)
                .await
                .with_context(|| format!("{}", file.display()))?;
            let mut n = 0u64;
            while let Some(chunk) = resp.chunk().await? {
                f.write_all(&chunk).await?;
                n += chunk.len() as u64;
            }
            f.sync_all().await?;
            out.fields(
                &[
                    ("request", request.clone()),
                    ("file", file.display().to_string()),
                    ("bytes", n.to_string()),
                    ("sha256", sha),
                ],
                || println!("{n} bytes written to {}", file.display()),
            );
        }
        Cmd::Send(a) => {
            let req = SendRequest {
                to: to_ids(&a.to)?,
                groups: a.groups.clone(),
                action: action_of(&a.act)?,
                ttl_secs: a.ttl,
                notify: a.notify.clone(),
            };
            if req.to.is_empty() && req.groups.is_empty() {
                bail!("give at least one --to or --group");
            }
            let b = api
                .call(
                    reqwest::Method::POST,
                    "send",
                    Some(encode_send_request(&req)),
                )
                .await?;
            let job = decode_job(&b, &limits)?;
            if a.watch {
                return follow(&api, out, &job).await;
            }
            out.doc(&b, |_| {
                println!(
                    "job {} ({}, {} destinations)",
                    job.id,
                    job.action,
                    job.targets.len()
                );
            })?;
        }
        Cmd::Jobs(JobCmd::List {
            state,
            before,
            limit,
        }) => {
            let mut q = vec![format!("limit={limit}")];
            if let Some(st) = state {
                q.push(format!("state={}", enc(&st)));
            }
            if let Some(b) = before {
                q.push(format!("before={}", enc(&b)));
            }
            list(
                &api,
                out,
                &format!("jobs?{}", q.join("&")),
                "job",
                &[
                    ("ID", "id"),
                    ("ACTION", "action"),
                    ("CREATED", "created"),
                    ("STATE", "state"),
                    ("TARGETS", "targets"),
                    ("PENDING", "pending"),
                    ("DELIVERED", "delivered"),
                    ("SUCCEEDED", "succeeded"),
                    ("FAILED", "failed"),
                    ("EXPIRED", "expired"),
                ],
            )
            .await?;
        }
        Cmd::Jobs(JobCmd::Show { id }) => {
            let job = api.job(&id, None).await?;
            out.doc(&rs_protocol::codec::api::encode_job(&job), |_| {
                print_job(&job);
            })?;
        }
        Cmd::Jobs(JobCmd::Watch { id }) => {
            let job = api.job(&id, None).await?;
            return follow(&api, out, &job).await;
        }
        Cmd::Trace { id } => {
            let path = format!("messages/{}/trace", enc(&id));
            let b = api.call(reqwest::Method::GET, &path, None).await?;
            let trace = rs_protocol::codec::api::decode_trace(&b, &limits)?;
            out.doc(&b, |_| print!("{}", trace_text(&trace)))?;
        }
        Cmd::Throttle(t) => return throttle(&api, out, t).await,
        Cmd::Ca(_) => unreachable!("handled before the API is set up"),
        Cmd::Enroll(e) => {
            let mut q = vec![format!("ttl-secs={}", e.ttl_secs)];
            for (k, v) in [
                ("customer", &e.customer),
                ("component", &e.component),
                ("kind", &e.kind),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", enc(v)));
                }
            }
            if !e.dns.is_empty() {
                q.push(format!("dns={}", enc(&e.dns.join(","))));
            }
            if !e.ip.is_empty() {
                q.push(format!("ip={}", enc(&e.ip.join(","))));
            }
            let b = api
                .call(
                    reqwest::Method::POST,
                    &format!("enrollments?{}", q.join("&")),
                    None,
                )
                .await?;
            out.doc(&b, |d| {
                // The token alone on stdout, for scripts; the rest on stderr.
                let e = d["enrollment"].as_object();
                let get = |k: &str| e.and_then(|e| e.get(k)).and_then(|v| v.as_str());
                eprintln!(
                    "enrollment token for {} {} of customer {}, usable until {}",
                    get("kind").unwrap_or("-"),
                    get("component").unwrap_or("(next free ID)"),
                    get("customer").unwrap_or("-"),
                    get("expires").unwrap_or("-")
                );
                println!("{}", get("token").unwrap_or(""));
            })?;
        }
        Cmd::Revoke { component, serial } => {
            let q = match (component, serial) {
                (Some(c), _) => format!("component={}", enc(&c)),
                (None, Some(s)) => format!("serial={}", enc(&s)),
                (None, None) => bail!("--component or --serial"),
            };
            let b = api
                .call(reqwest::Method::POST, &format!("revoke?{q}"), None)
                .await?;
            out.doc(&b, |d| {
                let r = rows(d, "certificate");
                println!("{} certificate(s) revoked", r.len());
                table(&r, CERTIFICATE_COLUMNS);
            })?;
        }
        Cmd::Certificates { name } => {
            let path = match name {
                Some(n) => format!("certificates?name={}", enc(&n)),
                None => "certificates".to_owned(),
            };
            list(&api, out, &path, "certificate", CERTIFICATE_COLUMNS).await?;
        }
        Cmd::Audit {
            admin,
            before,
            limit,
        } => {
            let mut path = format!("audit?limit={limit}");
            if let Some(a) = admin {
                path.push_str(&format!("&admin={}", enc(&a)));
            }
            if let Some(b) = before {
                path.push_str(&format!("&before={b}"));
            }
            list(
                &api,
                out,
                &path,
                "entry",
                &[
                    ("SEQ", "seq"),
                    ("AT", "at"),
                    ("ADMIN", "admin"),
                    ("PEER", "peer"),
                    ("METHOD", "method"),
                    ("STATUS", "status"),
                    ("MS", "millis"),
                    ("PATH", "path"),
                ],
            )
            .await?;
        }
        Cmd::Messages { filter, limit } => {
            let mut q = filter.query();
            q.push(format!("limit={limit}"));
            let path = format!("messages?{}", q.join("&"));
            list(&api, out, &path, "message", MESSAGE_COLUMNS).await?;
        }
        Cmd::Export {
            filter,
            after,
            limit,
        } => return export(&api, out, &filter, after, limit).await,
        Cmd::Subscriptions(c) => subscriptions(&api, out, c).await?,
        Cmd::Tokens(c) => tokens(&api, out, c).await?,
        Cmd::Rollouts(c) => return rollouts(&api, out, c).await,
        Cmd::Tasks(TaskCmd::List { state, limit }) => {
            list(
                &api,
                out,
                &format!("tasks?state={}&limit={limit}", enc(&state)),
                "task",
                &[
                    ("ID", "id"),
                    ("SUBSCRIPTION", "subscription"),
                    ("MESSAGE", "message"),
                    ("STATE", "state"),
                    ("ATTEMPTS", "attempts"),
                    ("CREATED", "created"),
                    ("LAST ERROR", "text"),
                ],
            )
            .await?;
        }
        Cmd::Tasks(TaskCmd::Replay { id }) => {
            let path = match id {
                Some(i) => format!("tasks/replay?id={i}"),
                None => "tasks/replay".to_owned(),
            };
            let b = api.call(reqwest::Method::POST, &path, None).await?;
            out.doc(&b, |d| {
                println!(
                    "{} task(s) ready again",
                    d["replayed"]["count"].as_str().unwrap_or("0")
                );
            })?;
        }
    }
    Ok(true)
}

/// A GET answered by a list document: printed as a table of its
/// `element`s under `columns`, or as the document (`--output`).
async fn list(
    api: &Api,
    out: Out,
    path: &str,
    element: &str,
    columns: &[(&str, &str)],
) -> anyhow::Result<()> {
    let b = api.call(reqwest::Method::GET, path, None).await?;
    out.doc(&b, |d| table(&rows(d, element), columns))
}

const CERTIFICATE_COLUMNS: &[(&str, &str)] = &[
    ("SERIAL", "serial"),
    ("NAME", "name"),
    ("CUSTOMER", "customer"),
    ("ROLE", "role"),
    ("ISSUED", "issued"),
    ("NOT AFTER", "not-after"),
    ("REVOKED", "revoked"),
];

const MESSAGE_COLUMNS: &[(&str, &str)] = &[
    ("RECEIVED", "received"),
    ("ID", "id"),
    ("TYPE", "type"),
    ("COMPONENT", "component"),
    ("CLASS", "class"),
    ("SUB", "sub"),
    ("SEVERITY", "severity"),
];

fn print_components(list: &[rs_protocol::codec::api::Component]) {
    println!(
        "{:<24} {:<10} {:<9} {:>4} {:<10} {:<20} {:<12} AT RISK",
        "ID", "KIND", "STATE", "DEAD", "LAST SEEN", "VIA", "TAGS"
    );
    for c in list {
        let via: Vec<&str> = c.via.iter().map(RsId::as_str).collect();
        // Dead letters, as the component's last status reported.
        let dead = c
            .status
            .as_ref()
            .and_then(|s| s.metrics.iter().find(|d| d.name == "spool.dead_letters"))
            .map_or_else(|| "-".to_owned(), |d| d.value.clone());
        println!(
            "{:<24} {:<10} {:<9} {:>4} {:<10} {:<20} {:<12} {}",
            c.id.as_str(),
            c.id.kind().as_str(),
            c.state.as_deref().unwrap_or("-"),
            dead,
            ago(c.last_seen),
            if via.is_empty() {
                "direct".to_owned()
            } else {
                via.join(" > ")
            },
            if c.tags.is_empty() {
                "-".to_owned()
            } else {
                c.tags.join(",")
            },
            c.at_risk.as_deref().unwrap_or("-")
        );
    }
    println!("{} components", list.len());
}

fn print_farms(list: &[rs_protocol::codec::api::Farm]) {
    println!(
        "{:<24} {:<16} {:<7} {:<10} {:>8} {:>10} {:>10}",
        "FARM", "MEMBER", "STATE", "SEEN", "IN HAND", "ENVELOPES", "FORWARDED"
    );
    for f in list {
        for m in &f.members {
            println!(
                "{:<24} {:<16} {:<7} {:<10} {:>8} {:>10} {:>10}",
                f.id.as_str(),
                m.name,
                m.state,
                m.seen.map_or_else(|| "-".to_owned(), ago),
                m.in_hand,
                m.envelopes,
                m.forwarded
            );
        }
    }
    let members: usize = list.iter().map(|f| f.members.len()).sum();
    println!("farms: {}, members: {members}", list.len());
}

/// `--watch`: follows `job` to its end (progress on stdout for people, on
/// stderr otherwise), then prints the final job; true when every
/// destination succeeded.
async fn follow(api: &Api, out: Out, job: &Job) -> anyhow::Result<bool> {
    if out.people() {
        println!(
            "job {} ({}, {} destinations)",
            job.id,
            job.action,
            job.targets.len()
        );
    }
    let j = watch(api, &job.id, out.people()).await?;
    if !out.people() {
        out.doc(&rs_protocol::codec::api::encode_job(&j), |_| {})?;
    }
    Ok(finished_well(&j))
}

/// `rsctl export`: pages of at most 1,000 from `after` until the export is
/// complete or `limit` is reached; a line (or a JSON object) per message,
/// then the cursor to go on from. With `--output xml`, one request,
/// streamed through as the server sends it.
async fn export(
    api: &Api,
    out: Out,
    filter: &MessageFilter,
    mut after: u64,
    limit: Option<u64>,
) -> anyhow::Result<bool> {
    const PAGE: u64 = 1000;
    if out.0 == output::Format::Xml {
        let mut q = filter.query();
        q.push(format!("after={after}"));
        if let Some(l) = limit {
            q.push(format!("limit={l}"));
        }
        let mut resp = api.stream(&format!("export?{}", q.join("&"))).await?;
        use std::io::Write as _;
        let mut so = std::io::stdout().lock();
        while let Some(chunk) = resp.chunk().await? {
            so.write_all(&chunk)?;
        }
        return Ok(true);
    }
    let mut left = limit;
    let mut count = 0u64;
    if out.people() {
        println!(
            "{:<8} {:<26} {:<38} {:<9} {:<20} {:<20} SEVERITY",
            "SEQ", "RECEIVED", "ID", "TYPE", "COMPONENT", "CLASS/SUB"
        );
    }
    loop {
        let page = left.map_or(PAGE, |l| l.min(PAGE));
        let mut q = filter.query();
        q.push(format!("after={after}&limit={page}"));
        let b = api
            .call(
                reqwest::Method::GET,
                &format!("export?{}", q.join("&")),
                None,
            )
            .await?;
        let d = output::to_json(&b)?;
        for m in rows(&d, "message") {
            if out.people() {
                println!(
                    "{:<8} {:<26} {:<38} {:<9} {:<20} {:<20} {}",
                    cell(m, "seq"),
                    cell(m, "received"),
                    cell(m, "id"),
                    cell(m, "type"),
                    cell(m, "component"),
                    format!("{}/{}", cell(m, "class"), cell(m, "sub")),
                    cell(m, "severity")
                );
            } else {
                println!("{}", serde_json::json!({ "message": m }));
            }
        }
        let end = rows(&d, "end");
        let end = end.first().context("the export has no <end>: it was cut")?;
        let n: u64 = cell(end, "count").parse().unwrap_or(0);
        count += n;
        after = cell(end, "next").parse().unwrap_or(after);
        left = left.map(|l| l.saturating_sub(n));
        let complete = cell(end, "complete") == "yes";
        if complete || n == 0 || left == Some(0) {
            if out.people() {
                println!(
                    "{count} messages; {}; go on with --after {after}",
                    if complete {
                        "complete"
                    } else {
                        "there may be more"
                    }
                );
            } else {
                println!(
                    "{}",
                    serde_json::json!({"end": {
                        "count": count.to_string(),
                        "next": after.to_string(),
                        "complete": if complete { "yes" } else { "no" },
                    }})
                );
            }
            return Ok(true);
        }
    }
}

/// `rsctl rollouts ...`; false when a watched rollout halted or was
/// aborted.
async fn rollouts(api: &Api, out: Out, cmd: RolloutCmd) -> anyhow::Result<bool> {
    use rs_protocol::codec::api::{
        RolloutPayload, RolloutRequest, WaveSize, Waves, encode_rollout_request,
    };
    let (id, watch) = match cmd {
        RolloutCmd::List => {
            list(
                api,
                out,
                "rollouts",
                "rollout",
                &[
                    ("ID", "id"),
                    ("NAME", "name"),
                    ("ACTION", "action"),
                    ("STATE", "state"),
                    ("WAVE", "wave"),
                    ("WAVES", "waves"),
                    ("CREATED", "created"),
                    ("REASON", "reason"),
                ],
            )
            .await?;
            return Ok(true);
        }
        RolloutCmd::Create(a) => {
            let waves = match (a.waves.as_deref(), a.by.as_deref()) {
                (_, Some("customer")) => Waves::Customer,
                (_, Some("mlm")) => Waves::Mlm,
                (_, Some(other)) => bail!("--by {other}: customer or mlm"),
                (Some(w), None) => Waves::Sizes(
                    rs_protocol::codec::api::parse_waves(w).map_err(|e| anyhow!("--waves {e}"))?,
                ),
                (None, None) => Waves::Sizes(vec![WaveSize::Percent(100)]),
            };
            let req = RolloutRequest {
                name: a.name.clone(),
                to: to_ids(&a.to)?,
                groups: a.groups.clone(),
                waves,
                success_pct: a.success_pct,
                max_failed: a.max_failed,
                silence_secs: a.silence_secs,
                approve: a.approve,
                payload: match (a.act.action.as_str(), &a.file) {
                    ("offer", Some(hex)) => RolloutPayload::File {
                        sha256: rs_protocol::codec::parse_sha256(hex)
                            .map_err(|e| anyhow!("--file {hex}: {e}"))?,
                        class: a.class.clone(),
                        sub: a.subclass.clone(),
                    },
                    ("offer", None) => bail!("offer needs --file SHA256 (a published file)"),
                    (_, Some(_)) => bail!("--file goes with the action offer"),
                    _ => RolloutPayload::Action(action_of(&a.act)?),
                },
            };
            if req.to.is_empty() && req.groups.is_empty() {
                bail!("give at least one --to or --group");
            }
            let b = api
                .call(
                    reqwest::Method::POST,
                    "rollouts",
                    Some(encode_rollout_request(&req)),
                )
                .await?;
            let r = rs_protocol::codec::api::decode_rollout(&b, &Limits::default())?;
            if !a.watch {
                out.doc(&b, |_| print_rollout(&r))?;
                return Ok(true);
            }
            (r.id, true)
        }
        RolloutCmd::Show { id, watch } => (id, watch),
        RolloutCmd::Pause { id } => return rollout_step(api, out, &id, "pause").await,
        RolloutCmd::Resume { id } => return rollout_step(api, out, &id, "resume").await,
        RolloutCmd::Approve { id } => return rollout_step(api, out, &id, "approve").await,
        RolloutCmd::Abort { id } => return rollout_step(api, out, &id, "abort").await,
    };
    let path = format!("rollouts/{}", enc(&id));
    if !watch {
        let b = api.call(reqwest::Method::GET, &path, None).await?;
        let r = rs_protocol::codec::api::decode_rollout(&b, &Limits::default())?;
        out.doc(&b, |_| print_rollout(&r))?;
        return Ok(true);
    }
    // Watched: a line per wave whenever it changes, until the rollout
    // ends; one that halts (or is aborted) fails the command.
    let mut seen: Vec<String> = Vec::new();
    let mut waiting_said = false;
    loop {
        let b = api.call(reqwest::Method::GET, &path, None).await?;
        let r = rs_protocol::codec::api::decode_rollout(&b, &Limits::default())?;
        if out.people() {
            let lines = wave_lines(&r);
            for (i, l) in lines.iter().enumerate() {
                if seen.get(i) != Some(l) {
                    println!("{l}");
                }
            }
            seen = lines;
            if r.state == "waiting" && !waiting_said {
                println!("waiting for approval: rsctl rollouts approve {}", r.id);
                waiting_said = true;
            }
        }
        if r.state != "waiting" {
            waiting_said = false;
        }
        match r.state.as_str() {
            "succeeded" | "completed" | "halted" | "aborted" => {
                let good = matches!(r.state.as_str(), "succeeded" | "completed");
                out.doc(&b, |_| {
                    println!(
                        "rollout {} {}{}",
                        r.id,
                        r.state,
                        r.reason
                            .as_deref()
                            .map(|w| format!(": {w}"))
                            .unwrap_or_default()
                    );
                })?;
                return Ok(good);
            }
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// One line per wave: its state and how many destinations are in each.
fn wave_lines(r: &rs_protocol::codec::api::Rollout) -> Vec<String> {
    r.waves
        .iter()
        .map(|w| {
            let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
            for (_, s) in &w.members {
                *counts.entry(s.as_str()).or_default() += 1;
            }
            let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
            format!(
                "wave {}/{} {}: {}",
                w.n,
                r.waves.len(),
                w.state,
                counts.join(", ")
            )
        })
        .collect()
}

fn print_rollout(r: &rs_protocol::codec::api::Rollout) {
    println!(
        "rollout {} ({}, {}): {} at wave {}/{}{}",
        r.id,
        r.name,
        r.action,
        r.state,
        r.wave,
        r.waves.len(),
        r.reason
            .as_deref()
            .map(|w| format!(": {w}"))
            .unwrap_or_default()
    );
    for w in &r.waves {
        println!("  wave {} {}", w.n, w.state);
        for (id, s) in &w.members {
            println!("    {:<24} {s}", id.as_str());
        }
    }
}

async fn rollout_step(api: &Api, out: Out, id: &str, op: &str) -> anyhow::Result<bool> {
    let b = api
        .call(
            reqwest::Method::POST,
            &format!("rollouts/{}/{op}", enc(id)),
            None,
        )
        .await?;
    let r = rs_protocol::codec::api::decode_rollout(&b, &Limits::default())?;
    out.doc(&b, |_| print_rollout(&r))?;
    Ok(true)
}

async fn tokens(api: &Api, out: Out, cmd: TokenCmd) -> anyhow::Result<()> {
    use rs_protocol::codec::api::{TokenRequest, encode_token_request};
    let columns: &[(&str, &str)] = &[
        ("NAME", "name"),
        ("CUSTOMERS", "customers"),
        ("CREATED", "created"),
        ("BY", "created-by"),
        ("EXPIRES", "expires"),
        ("REVOKED", "revoked"),
    ];
    match cmd {
        TokenCmd::List => list(api, out, "tokens", "token", columns).await?,
        TokenCmd::Create {
            name,
            customers,
            days,
        } => {
            let body = encode_token_request(&TokenRequest {
                name,
                customers,
                days: Some(days),
            });
            let b = api
                .call(reqwest::Method::POST, "tokens", Some(body))
                .await?;
            out.doc(&b, |d| {
                let t = &rows(d, "token")[0];
                println!("{}", cell(t, "secret"));
                eprintln!(
                    "token {} for {} until {}: send it as \"Authorization: Bearer TOKEN\", or log in to the portal with it; it is not shown again",
                    cell(t, "name"),
                    cell(t, "customers"),
                    cell(t, "expires")
                );
            })?;
        }
        TokenCmd::Revoke { name } => {
            api.call(
                reqwest::Method::DELETE,
                &format!("tokens/{}", enc(&name)),
                None,
            )
            .await?;
            out.fields(&[("revoked", name.clone())], || println!("revoked {name}"));
        }
    }
    Ok(())
}

async fn subscriptions(api: &Api, out: Out, cmd: SubscriptionCmd) -> anyhow::Result<()> {
    use rs_protocol::codec::api::{Delivery, SubscriptionDef, encode_subscription};
    let columns: &[(&str, &str)] = &[
        ("NAME", "name"),
        ("DELIVERY", "delivery"),
        ("PENDING", "pending"),
        ("DONE", "done"),
        ("FAILED", "failed"),
        ("CLASS", "class"),
        ("SUB", "sub"),
        ("CUSTOMER", "customer"),
        ("SOURCE", "source"),
        ("TYPE", "type"),
        ("MIN SEVERITY", "min-severity"),
        ("TO", "url"),
    ];
    match cmd {
        SubscriptionCmd::List => {
            list(api, out, "subscriptions", "subscription", columns).await?;
        }
        SubscriptionCmd::Set {
            name,
            delivery,
            url,
            module,
            class,
            sub,
            customer,
            source,
            kind,
            min_severity,
        } => {
            let delivery = match (delivery.as_str(), url, module) {
                ("webhook", Some(u), None) => Delivery::Webhook(u),
                ("module", None, Some(m)) => Delivery::Module(m),
                ("feed", None, None) => Delivery::Feed,
                ("webhook", ..) => bail!("--delivery webhook needs --url (and no --module)"),
                ("module", ..) => bail!("--delivery module needs --module (and no --url)"),
                ("feed", ..) => bail!("--delivery feed takes neither --url nor --module"),
                (other, ..) => bail!("--delivery {other}: webhook, feed or module"),
            };
            let def = SubscriptionDef {
                name,
                class,
                subclass: sub,
                customer,
                source: source
                    .map(|s| RsId::new(&s).map_err(|e| anyhow!("--source {s}: {e}")))
                    .transpose()?,
                kind,
                min_severity: min_severity
                    .map(|s| {
                        rs_protocol::model::Severity::parse(&s).with_context(|| {
                            format!("--min-severity {s}: critical, major, minor, warning or info")
                        })
                    })
                    .transpose()?,
                delivery,
            };
            let b = api
                .call(
                    reqwest::Method::POST,
                    "subscriptions",
                    Some(encode_subscription(&def)),
                )
                .await?;
            out.doc(&b, |d| table(&rows(d, "subscription"), columns))?;
        }
        SubscriptionCmd::Delete { name } => {
            api.call(
                reqwest::Method::DELETE,
                &format!("subscriptions/{}", enc(&name)),
                None,
            )
            .await?;
            out.fields(&[("deleted", name.clone())], || println!("deleted {name}"));
        }
        SubscriptionCmd::Feed {
            name,
            after,
            limit,
            wait,
        } => {
            let b = api
                .call(
                    reqwest::Method::GET,
                    &format!(
                        "subscriptions/{}/feed?after={after}&limit={limit}&wait={wait}",
                        enc(&name)
                    ),
                    None,
                )
                .await?;
            out.doc(&b, |d| {
                let r = rows(d, "message");
                let mut cols = vec![("TASK", "task")];
                cols.extend_from_slice(MESSAGE_COLUMNS);
                table(&r, &cols);
                let cursor = d["messages"]["cursor"].as_str().unwrap_or("-");
                println!(
                    "{} messages; acknowledge them with --after {cursor}",
                    r.len()
                );
            })?;
        }
    }
    Ok(())
}

async fn server_throttle(api: &Api) -> anyhow::Result<rs_protocol::throttle::ThrottleConfig> {
    let b = api.call(reqwest::Method::GET, "throttle", None).await?;
    Ok(rs_protocol::throttle::decode_throttle(
        &b,
        &Limits::default(),
    )?)
}

async fn put_throttle(
    api: &Api,
    out: Out,
    cfg: &rs_protocol::throttle::ThrottleConfig,
) -> anyhow::Result<()> {
    let b = api
        .call(
            reqwest::Method::PUT,
            "throttle",
            Some(rs_protocol::throttle::encode_throttle(cfg)),
        )
        .await?;
    let now = rs_protocol::throttle::decode_throttle(&b, &Limits::default())?;
    out.doc(&b, |_| print_throttle(&now))
}

/// Sends `[throttle]` settings to components as a configChange.
async fn push_throttle(
    api: &Api,
    out: Out,
    t: &Targets,
    cfg: rs_protocol::throttle::ThrottleConfig,
) -> anyhow::Result<bool> {
    #[derive(serde::Serialize)]
    struct Doc {
        throttle: ThrottleDoc,
    }
    #[derive(serde::Serialize)]
    struct ThrottleDoc {
        rule: Vec<rs_protocol::throttle::Rule>,
    }
    let config = toml::to_string(&Doc {
        throttle: ThrottleDoc { rule: cfg.rule },
    })?;
    let req = SendRequest {
        to: t
            .to
            .iter()
            .map(|x| RsId::new(x).map_err(|e| anyhow::anyhow!("--to {x}: {e}")))
            .collect::<anyhow::Result<_>>()?,
        groups: t.groups.clone(),
        action: ControlAction::ConfigChange { config },
        ttl_secs: None,
        notify: None,
    };
    let b = api
        .call(
            reqwest::Method::POST,
            "send",
            Some(encode_send_request(&req)),
        )
        .await?;
    let job = decode_job(&b, &Limits::default())?;
    if t.watch {
        return follow(api, out, &job).await;
    }
    out.doc(&b, |_| {
        println!(
            "job {} (configChange, {} destinations)",
            job.id,
            job.targets.len()
        );
    })?;
    Ok(true)
}

async fn throttle(api: &Api, out: Out, cmd: ThrottleCmd) -> anyhow::Result<bool> {
    match cmd {
        ThrottleCmd::Show => {
            let b = api.call(reqwest::Method::GET, "throttle", None).await?;
            let cfg = rs_protocol::throttle::decode_throttle(&b, &Limits::default())?;
            out.doc(&b, |_| print_throttle(&cfg))?;
        }
        ThrottleCmd::Set(a) => {
            let rule = rule_of(&a)?;
            if a.targets.to.is_empty() && a.targets.groups.is_empty() {
                let mut cfg = server_throttle(api).await?;
                cfg.rule.retain(|r| r.name != rule.name);
                cfg.rule.push(rule);
                put_throttle(api, out, &cfg).await?;
            } else {
                let cfg = rs_protocol::throttle::ThrottleConfig {
                    rule: vec![rule],
                    ..Default::default()
                };
                return push_throttle(api, out, &a.targets, cfg).await;
            }
        }
        ThrottleCmd::Remove { name } => {
            let mut cfg = server_throttle(api).await?;
            let before = cfg.rule.len();
            cfg.rule.retain(|r| r.name != name);
            if cfg.rule.len() == before {
                bail!("no rule {name:?}");
            }
            put_throttle(api, out, &cfg).await?;
        }
        ThrottleCmd::Clear { targets } => {
            if targets.to.is_empty() && targets.groups.is_empty() {
                let mut cfg = server_throttle(api).await?;
                cfg.rule.clear();
                put_throttle(api, out, &cfg).await?;
            } else {
                return push_throttle(api, out, &targets, Default::default()).await;
            }
        }
    }
    Ok(true)
}

fn selector(g: &GroupDef) -> String {
    let mut s = Vec::new();
    if let Some(c) = &g.customer {
        s.push(format!("customer={c}"));
    }
    if let Some(k) = g.kind {
        s.push(format!("kind={}", k.as_str()));
    }
    if let Some(t) = &g.tag {
        s.push(format!("tag={t}"));
    }
    if s.is_empty() {
        String::new()
    } else {
        format!("[{}]", s.join(" "))
    }
}

/// Runs `rsctl` with these arguments (the first is the program name) and
/// returns the exit status.
fn ca_command(c: &CaCmd, out: Out) -> anyhow::Result<()> {
    use rs_net::pki::{Ca, CertSpec, Role, records_at};
    let m = anyhow::Error::msg;
    match c {
        CaCmd::Init {
            dir,
            database,
            name,
            days,
        } => {
            let ca = Ca::init_with(dir, name, *days, records_at(dir, database.as_deref()))?;
            let serial = rs_net::pki::serial_hex(ca.cert());
            out.fields(
                &[
                    ("created", dir.join("ca.pem").display().to_string()),
                    ("name", name.clone()),
                    ("serial", serial.clone()),
                ],
                || {
                    println!(
                        "CA {name:?} created in {} (ca.pem to every component, ca.key stays here; serial {serial})",
                        dir.display(),
                    );
                },
            );
        }
        CaCmd::Issue {
            dir,
            database,
            name,
            role,
            customers,
            dns,
            ip,
            days,
            out: out_dir,
        } => {
            let ca = Ca::open_with(dir, records_at(dir, database.as_deref()))?;
            let role = Role::parse(role).ok_or_else(|| anyhow!("--role: component or admin"))?;
            let customer = match role {
                Role::Admin => customers
                    .clone()
                    .ok_or_else(|| anyhow!("an admin needs --customers (comma-separated, or *)"))?,
                Role::Component => RsId::new(name.clone())
                    .map_err(|e| anyhow!("{name}: {e}"))?
                    .customer()
                    .as_str()
                    .to_owned(),
            };
            let spec = CertSpec {
                name: name.clone(),
                customer,
                role,
                dns: dns.clone(),
                ips: ip.clone(),
                days: *days,
            };
            let key = rs_net::pki::generate_key().map_err(m)?;
            let cert = ca.issue(&spec, &key)?;
            std::fs::create_dir_all(out_dir)?;
            let (cp, kp) = (
                out_dir.join(format!("{name}.pem")),
                out_dir.join(format!("{name}.key")),
            );
            rs_net::pki::write_private(&kp, &key.private_key_to_pem_pkcs8()?).map_err(m)?;
            rs_net::pki::write_file(&cp, &cert.to_pem()?).map_err(m)?;
            let serial = rs_net::pki::serial_hex(&cert);
            out.fields(
                &[
                    ("issued", name.clone()),
                    ("role", role.as_str().to_owned()),
                    ("serial", serial.clone()),
                    ("cert", cp.display().to_string()),
                    ("key", kp.display().to_string()),
                ],
                || {
                    println!(
                        "issued {} to {name} (serial {serial}): {}, {}",
                        role.as_str(),
                        cp.display(),
                        kp.display()
                    );
                },
            );
        }
        CaCmd::Revoke {
            dir,
            database,
            serial,
            name,
        } => {
            let ca = Ca::open_with(dir, records_at(dir, database.as_deref()))?;
            let serials: Vec<String> = match (serial, name) {
                (Some(s), _) => vec![s.clone()],
                (None, Some(n)) => ca
                    .list(Some(n))?
                    .into_iter()
                    .filter(|c| c.revoked_at.is_none())
                    .map(|c| c.serial)
                    .collect(),
                (None, None) => bail!("--serial or --name"),
            };
            if serials.is_empty() {
                bail!("nothing to revoke");
            }
            let mut now = Vec::new();
            for s in &serials {
                if ca.revoke(s, "revoked with rsctl ca revoke")? {
                    now.push(s.clone());
                    if out.people() {
                        println!("revoked {s}");
                    }
                } else if out.people() {
                    println!("{s} was revoked already");
                }
            }
            let crl = dir.join("crl.pem");
            out.fields(
                &[
                    ("revoked", now.join(",")),
                    ("crl", crl.display().to_string()),
                ],
                || println!("{} rewritten", crl.display()),
            );
        }
        CaCmd::List { dir, database } => {
            let ca = Ca::open_with(dir, records_at(dir, database.as_deref()))?;
            let day = |s: i64| {
                rs_protocol::Timestamp::from_millis(s * 1000)
                    .map(|t| t.to_string().chars().take(10).collect::<String>())
                    .unwrap_or_default()
            };
            // The server's <certificates> document, made here from the
            // records (no server needed).
            let list = ca.list(None)?;
            let mut doc = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<certificates count=\"{}\">\n",
                list.len()
            );
            for c in &list {
                let esc = |v: &str| quick_xml::escape::escape(v).into_owned();
                doc.push_str(&format!(
                    "<certificate serial=\"{}\" name=\"{}\" customer=\"{}\" role=\"{}\" not-after=\"{}\"{}/>\n",
                    esc(&c.serial),
                    esc(&c.name),
                    esc(&c.customer),
                    esc(&c.role),
                    day(c.not_after),
                    c.revoked_at
                        .map(|r| format!(" revoked=\"{}\"", day(r)))
                        .unwrap_or_default()
                ));
            }
            doc.push_str("</certificates>\n");
            out.doc(doc.as_bytes(), |d| {
                table(
                    &rows(d, "certificate"),
                    &[
                        ("SERIAL", "serial"),
                        ("NAME", "name"),
                        ("CUSTOMER", "customer"),
                        ("ROLE", "role"),
                        ("NOT AFTER", "not-after"),
                        ("REVOKED", "revoked"),
                    ],
                );
            })?;
        }
    }
    Ok(())
}

pub fn main_with<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    // The CA's commands work on its directory (and database) directly,
    // synchronously: no runtime, so its records' blocking PostgreSQL
    // client runs on a plain thread.
    if let Cmd::Ca(c) = &cli.cmd {
        return match ca_command(c, Out(cli.output)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("rsctl: {e:#}");
                1
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rsctl: {e}");
            return 1;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("rsctl: {e:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// Every command and argument says what it is, and the global options
    /// stand apart from each command's own in its help.
    #[test]
    fn every_command_and_argument_is_described_and_global_options_stand_apart() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
                if a.is_global_set() {
                    assert_eq!(
                        a.get_help_heading(),
                        Some("Global options"),
                        "{path} {id}: a global option under its own heading"
                    );
                }
            }
            for s in c.get_subcommands() {
                if s.get_name() == "help" {
                    continue;
                }
                let p = format!("{path} {}", s.get_name());
                if s.get_about().is_none() {
                    missing.push(format!("{p} (the command)"));
                }
                walk(s, &p, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "rsctl", &mut missing);
        assert!(missing.is_empty(), "not described: {missing:#?}");
    }
}
