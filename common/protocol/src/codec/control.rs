//! Control-action and status-tree documents (`dtd/control.dtd`,
//! `dtd/status.dtd`), carried in `text/xml` data messages.

use super::content::url;
use super::header::token;
use super::xml::{Tag, XmlIn, XmlOut};
use super::{Limits, XmlError};
use crate::control::{ActionKind, ControlAction, NodeState, StatusNode};
use crate::ids::{MessageId, RsId};
use crate::model::Detail;

/// Why a control or status payload was refused.
pub type ControlError = XmlError;

/// Encodes a control action as its `<control>` document.
pub fn encode_control(a: &ControlAction) -> Vec<u8> {
    let mut buf = Vec::with_capacity(128);
    let mut x = XmlOut::document(&mut buf);
    x.open("control").attr("action", a.name());
    match a {
        ControlAction::EnableInstance(t)
        | ControlAction::DisableInstance(t)
        | ControlAction::DeregisterIntegrator(t) => {
            x.attr("target", t.as_str()).empty();
        }
        ControlAction::SoftwareUpdate {
            package,
            version,
            url,
        } => {
            x.attr("package", package)
                .attr("version", version)
                .attr_opt("url", url.as_deref())
                .empty();
        }
        ControlAction::ConfigChange { config } => {
            x.gt().text_element("config", config).close("control");
        }
        ControlAction::ReplayDeadLetters(m) | ControlAction::DiscardDeadLetters(m) => {
            x.attr_opt("message", m.as_ref().map(MessageId::as_str))
                .empty();
        }
        ControlAction::GetStatus
        | ControlAction::Ping
        | ControlAction::Shutdown
        | ControlAction::GetConfig
        | ControlAction::EnableForwarding
        | ControlAction::DisableForwarding => {
            x.empty();
        }
    }
    x.newline();
    buf
}

/// Decodes a `<control>` document.
pub fn decode_control(bytes: &[u8], limits: &Limits) -> Result<ControlAction, ControlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("control")?;
    let action = control_body(&mut x, &root)?;
    x.finish()?;
    Ok(action)
}

/// The action of a `<control>` element whose start tag is `root`, through
/// its end tag.
pub(crate) fn control_body(x: &mut XmlIn<'_>, root: &Tag<'_>) -> Result<ControlAction, XmlError> {
    let target = || root.req_with("target", |s| RsId::new(s));
    let name = root.req("action")?;
    let Some(kind) = ActionKind::parse(name) else {
        return Err(root.bad("action", format!("unknown control action {name:?}")));
    };
    let action = match kind {
        ActionKind::GetStatus => ControlAction::GetStatus,
        ActionKind::Ping => ControlAction::Ping,
        ActionKind::Shutdown => ControlAction::Shutdown,
        ActionKind::GetConfig => ControlAction::GetConfig,
        ActionKind::EnableForwarding => ControlAction::EnableForwarding,
        ActionKind::DisableForwarding => ControlAction::DisableForwarding,
        ActionKind::EnableInstance => ControlAction::EnableInstance(target()?),
        ActionKind::DisableInstance => ControlAction::DisableInstance(target()?),
        ActionKind::DeregisterIntegrator => ControlAction::DeregisterIntegrator(target()?),
        ActionKind::ReplayDeadLetters => {
            ControlAction::ReplayDeadLetters(root.opt_with("message", |s| MessageId::new(s))?)
        }
        ActionKind::DiscardDeadLetters => {
            ControlAction::DiscardDeadLetters(root.opt_with("message", |s| MessageId::new(s))?)
        }
        ActionKind::SoftwareUpdate => ControlAction::SoftwareUpdate {
            package: root.req_with("package", token)?,
            version: root.req_with("version", token)?,
            url: root.opt_with("url", url)?,
        },
        ActionKind::ConfigChange => {
            let mut config = None;
            while let Some(tag) = x.child(root)? {
                if tag.name != "config" || config.is_some() {
                    return Err(root.unexpected_child(&tag));
                }
                config = Some(x.text(&tag)?);
            }
            return Ok(ControlAction::ConfigChange {
                config: config.ok_or(XmlError::MissingElement {
                    element: "control".into(),
                    child: "config",
                })?,
            });
        }
    };
    x.end(root)?;
    Ok(action)
}

/// Encodes a status tree as its `<status>` document.
pub fn encode_status(node: &StatusNode) -> Vec<u8> {
    let mut buf = Vec::with_capacity(512);
    let mut x = XmlOut::document(&mut buf);
    write_node(&mut x, node);
    x.newline();
    buf
}

pub(crate) fn write_node(x: &mut XmlOut<'_>, n: &StatusNode) {
    x.open("status")
        .attr("kind", &n.kind)
        .attr_opt("id", n.id.as_ref().map(RsId::as_str))
        .attr_opt("name", n.name.as_deref())
        .attr("state", n.state.as_str())
        .attr_opt("version", n.version.as_deref())
        .attr_ts_opt("since", n.since);
    if n.metrics.is_empty() && n.children.is_empty() {
        x.empty();
        return;
    }
    x.gt();
    for m in &n.metrics {
        x.newline().open("metric").attr("name", &m.name);
        if m.value.is_empty() {
            x.empty();
        } else {
            x.gt().text(&m.value).close("metric");
        }
    }
    for c in &n.children {
        x.newline();
        write_node(x, c);
    }
    x.newline().close("status");
}

/// Decodes a `<status>` document.
pub fn decode_status(bytes: &[u8], limits: &Limits) -> Result<StatusNode, ControlError> {
    let mut x = XmlIn::new(bytes, limits)?;
    let root = x.root("status")?;
    let node = read_node(&mut x, &root)?;
    x.finish()?;
    Ok(node)
}

pub(crate) fn read_node(x: &mut XmlIn<'_>, tag: &Tag<'_>) -> Result<StatusNode, XmlError> {
    let mut n = StatusNode {
        kind: tag.req_with("kind", token)?,
        id: tag.opt_with("id", |s| RsId::new(s))?,
        name: tag.opt("name").map(str::to_owned),
        state: tag.req_with("state", |s| NodeState::parse(s).ok_or("unknown state"))?,
        version: tag.opt("version").map(str::to_owned),
        since: tag.opt_ts("since")?,
        metrics: Vec::new(),
        children: Vec::new(),
    };
    while let Some(child) = x.child(tag)? {
        match child.name {
            "metric" if n.children.is_empty() => {
                let name = child.req_with("name", token)?;
                let value = x.text(&child)?;
                n.metrics.push(Detail { name, value });
            }
            "status" => n.children.push(read_node(x, &child)?),
            _ => return Err(tag.unexpected_child(&child)),
        }
    }
    Ok(n)
}
