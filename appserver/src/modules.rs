//! Built-in service modules (seed 004, Fig. 3): Rust code inside the
//! appserver that takes stored messages from the collector like any
//! external subscriber, or works on a timer.
//!
//! A module is named in the configuration (`[[modules]]`); a subscription
//! with `delivery="module" module="NAME"` hands it every message it
//! matches, through the same durable tasks as webhooks: in order per
//! subscription, retried with backoff, to the failed-task queue after the
//! configured attempts, and redone after a crash. A module must therefore
//! be idempotent by message ID; the built-in ones are:
//!
//! - `heartbeat` (always present): the heartbeat monitor, a timer module
//!   (see [`crate::monitor`]).
//! - `alarm-notifier`: runs a command for each message (typically alarms
//!   at least `major`), the message's XML on its standard input and its
//!   facts in `RS_*` environment variables; exit status 0 completes the
//!   task, anything else (or the timeout) retries it.
//! - `xml-export`: writes each message as `DIR/YYYY-MM-DD/ID.xml` (the day
//!   it was received, UTC), atomically; doing it twice writes the same
//!   file, so a redone task never leaves a second copy.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::AppServer;
use crate::store::Row;

/// What module hooks return (`dyn` traits cannot have `async fn` yet).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One task handed to a module: the task context of docs/control-api.md
/// (the subscription, the attempt, and the stored message with the core
/// work's results: its route, times and severity).
#[derive(Debug)]
pub struct Delivered<'a> {
    pub task: i64,
    /// 1 on the first attempt.
    pub attempt: u32,
    pub subscription: &'a str,
    pub message: &'a Row,
    /// The message as the `<messages count="1">` document webhooks get.
    pub xml: &'a [u8],
}

/// A built-in service module.
pub trait ServiceModule: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &str;

    /// Takes one message it subscribed to. `Ok` completes the task (once);
    /// `Err` is recorded and the task retried. Called again for the same
    /// message after a crash or a timed-out attempt: be idempotent.
    fn deliver<'a>(
        &'a self,
        app: &'a AppServer,
        d: &'a Delivered<'a>,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// Whether subscriptions may deliver to it (timer-only modules: no).
    fn takes_messages(&self) -> bool {
        true
    }

    /// How often `tick` runs, for modules that work on a timer.
    fn period(&self) -> Option<Duration> {
        None
    }

    /// Timer work.
    fn tick<'a>(&'a self, _app: &'a Arc<AppServer>) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// `[[modules]]` in appserver.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    /// Its name, which subscriptions name in `module="..."`.
    pub name: String,
    pub kind: ModuleKind,
    /// alarm-notifier: the program and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// xml-export: where the files go.
    pub dir: Option<PathBuf>,
    /// A subscription (named like the module) created or updated at start.
    pub subscribe: Option<SubscribeConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleKind {
    AlarmNotifier,
    XmlExport,
}

/// What a module's own subscription takes (every field given must match).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeConfig {
    pub class: Option<String>,
    pub sub: Option<String>,
    pub customer: Option<String>,
    pub source: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub min_severity: Option<String>,
}

impl ModuleConfig {
    /// Checks one module's settings.
    pub fn check(&self) -> Result<(), String> {
        let n = &self.name;
        if n.is_empty()
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "module name {n:?}: letters, digits, '-', '_' and '.' only"
            ));
        }
        if n == "heartbeat" {
            return Err("module name \"heartbeat\" is the built-in heartbeat monitor's".into());
        }
        match self.kind {
            ModuleKind::AlarmNotifier if self.command.is_empty() => {
                Err(format!("module {n}: alarm-notifier needs command = [...]"))
            }
            ModuleKind::XmlExport if self.dir.is_none() => {
                Err(format!("module {n}: xml-export needs dir"))
            }
            _ => Ok(()),
        }?;
        if let Some(s) = &self.subscribe {
            s.to_subscription(n)?;
        }
        Ok(())
    }

    /// The module this configures.
    pub fn build(&self, timeout: Duration) -> Arc<dyn ServiceModule> {
        match self.kind {
            ModuleKind::AlarmNotifier => Arc::new(AlarmNotifier {
                name: self.name.clone(),
                command: self.command.clone(),
                timeout,
            }),
            ModuleKind::XmlExport => Arc::new(XmlExport {
                name: self.name.clone(),
                dir: self.dir.clone().unwrap_or_default(),
            }),
        }
    }
}

impl SubscribeConfig {
    /// The subscription `module` takes at start.
    pub fn to_subscription(
        &self,
        module: &str,
    ) -> Result<crate::subscription::Subscription, String> {
        let severity = match &self.min_severity {
            Some(s) => Some(rs_protocol::model::Severity::parse(s).ok_or_else(|| {
                format!(
                    "module {module}: min_severity {s:?}: critical, major, minor, warning or info"
                )
            })?),
            None => None,
        };
        if let Some(k) = &self.kind
            && rs_protocol::model::ContentKind::parse(k).is_none()
        {
            return Err(format!("module {module}: type {k:?} is not a content type"));
        }
        if let Some(s) = &self.source {
            rs_protocol::RsId::new(s).map_err(|e| format!("module {module}: source {s:?}: {e}"))?;
        }
        Ok(crate::subscription::Subscription {
            id: 0,
            name: module.to_owned(),
            class: self.class.clone(),
            subclass: self.sub.clone(),
            customer: self.customer.clone(),
            source: self.source.clone(),
            kind: self.kind.clone(),
            min_severity: severity,
            delivery: crate::subscription::Delivery::Module(module.to_owned()),
            from_seq: 0,
        })
    }
}

/// Runs a command per message.
#[derive(Debug)]
pub struct AlarmNotifier {
    name: String,
    command: Vec<String>,
    timeout: Duration,
}

impl ServiceModule for AlarmNotifier {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(
        &'a self,
        _app: &'a AppServer,
        d: &'a Delivered<'a>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt as _;
            let m = d.message;
            let text = alarm_text(m);
            let mut cmd = tokio::process::Command::new(&self.command[0]);
            cmd.args(&self.command[1..])
                .env("RS_MESSAGE_ID", &m.id)
                .env("RS_TYPE", &m.kind)
                .env("RS_COMPONENT", &m.component)
                .env("RS_CLASS", &m.class)
                .env("RS_SUBCLASS", &m.subclass)
                .env(
                    "RS_SEVERITY",
                    m.severity.map(|s| s.as_str()).unwrap_or_default(),
                )
                .env("RS_TEXT", text)
                .env("RS_CREATED", ts(m.created))
                .env("RS_RECEIVED", ts(m.received))
                .env("RS_SUBSCRIPTION", d.subscription)
                .env("RS_TASK", d.task.to_string())
                .env("RS_ATTEMPT", d.attempt.to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            let run = async {
                let mut child = cmd
                    .spawn()
                    .map_err(|e| format!("{}: {e}", self.command[0]))?;
                if let Some(mut stdin) = child.stdin.take() {
                    // A command that does not read its input is not an error.
                    let _ = stdin.write_all(d.xml).await;
                }
                let out = child
                    .wait_with_output()
                    .await
                    .map_err(|e| format!("{}: {e}", self.command[0]))?;
                if out.status.success() {
                    Ok(())
                } else {
                    let err = String::from_utf8_lossy(&out.stderr);
                    let err = err.trim();
                    Err(format!(
                        "{} exited with {}{}{}",
                        self.command[0],
                        out.status,
                        if err.is_empty() { "" } else { ": " },
                        err.chars().take(400).collect::<String>()
                    ))
                }
            };
            tokio::time::timeout(self.timeout, run)
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "{} took longer than {:?}",
                        self.command[0], self.timeout
                    ))
                })
        })
    }
}

fn ts(ms: i64) -> String {
    rs_protocol::Timestamp::from_millis(ms)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// An alarm's or event's text (empty for other contents).
fn alarm_text(m: &Row) -> String {
    use rs_protocol::model::{Content, ContentKind};
    let Some(kind) = ContentKind::parse(&m.kind) else {
        return String::new();
    };
    if !matches!(kind, ContentKind::Alarm | ContentKind::Event) {
        return String::new();
    }
    match rs_protocol::codec::decode_content_part(
        kind,
        &m.content,
        &rs_protocol::codec::Limits::default(),
    ) {
        Ok(Content::Alarm(a)) => a.text,
        Ok(Content::Event(e)) => e.text,
        _ => String::new(),
    }
}

/// Writes each message to a file.
#[derive(Debug)]
pub struct XmlExport {
    name: String,
    dir: PathBuf,
}

impl ServiceModule for XmlExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(
        &'a self,
        _app: &'a AppServer,
        d: &'a Delivered<'a>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let day = ts(d.message.received)
                .get(..10)
                .unwrap_or("unknown")
                .to_owned();
            let dir = self.dir.join(day);
            // Message IDs are tokens (no '/'), checked when received.
            let path = dir.join(format!("{}.xml", d.message.id));
            let bytes = d.xml.to_vec();
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)?;
                rs_store::files::write_atomically(&path, &bytes)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{}: {e}", self.dir.display()))
        })
    }
}

/// Runs each timer module's `tick` every `period` until `stop`.
pub async fn run_timers(app: Arc<AppServer>, stop: tokio_util::sync::CancellationToken) {
    let mut tasks = Vec::new();
    for m in app.modules.clone() {
        let Some(period) = m.period() else { continue };
        let (app, stop) = (app.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(period) => {}
                }
                // Once per farm: on its leader.
                if app.is_leader() {
                    m.tick(&app).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn parse(modules: &str) -> Result<Config, String> {
        Config::parse(&format!("id = \"rs.a1\"\ndata_dir = \"/tmp/x\"\n{modules}"))
    }

    #[test]
    fn module_settings_are_checked() {
        let ok = parse(
            "[[modules]]\nname = \"oncall\"\nkind = \"alarm-notifier\"\ncommand = [\"true\"]\n\
             [modules.subscribe]\ntype = \"alarm\"\nmin_severity = \"major\"\n\
             [[modules]]\nname = \"archive\"\nkind = \"xml-export\"\ndir = \"/tmp/e\"\n",
        )
        .unwrap();
        assert_eq!(ok.modules.len(), 2);
        let sub = ok.modules[0]
            .subscribe
            .as_ref()
            .unwrap()
            .to_subscription("oncall")
            .unwrap();
        assert_eq!(
            sub.delivery,
            crate::subscription::Delivery::Module("oncall".into())
        );
        for (bad, why) in [
            (
                "[[modules]]\nname = \"n\"\nkind = \"alarm-notifier\"\n",
                "command",
            ),
            ("[[modules]]\nname = \"n\"\nkind = \"xml-export\"\n", "dir"),
            (
                "[[modules]]\nname = \"heartbeat\"\nkind = \"xml-export\"\ndir = \"/e\"\n",
                "heartbeat",
            ),
            (
                "[[modules]]\nname = \"a b\"\nkind = \"xml-export\"\ndir = \"/e\"\n",
                "letters",
            ),
            (
                "[[modules]]\nname = \"n\"\nkind = \"pager\"\n",
                "unknown variant",
            ),
            (
                "[[modules]]\nname = \"n\"\nkind = \"xml-export\"\ndir = \"/e\"\n\
                 [[modules]]\nname = \"n\"\nkind = \"xml-export\"\ndir = \"/f\"\n",
                "two modules",
            ),
            (
                "[[modules]]\nname = \"n\"\nkind = \"xml-export\"\ndir = \"/e\"\n\
                 [modules.subscribe]\nmin_severity = \"loud\"\n",
                "min_severity",
            ),
            (
                "[[modules]]\nname = \"n\"\nkind = \"xml-export\"\ndir = \"/e\"\n\
                 [modules.subscribe]\ntype = \"fax\"\n",
                "content type",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
