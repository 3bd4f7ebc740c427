//! How rsctl prints what it got: a table for people, or for scripts the
//! control API's document as JSON or as the XML the server answered
//! (`--output table|json|xml`, the same for every command).
//!
//! The JSON is the XML document mapped one way for every document: an
//! element is an object holding its attributes (strings, by name), its
//! child elements as arrays under their names (always arrays, so a script
//! need not care whether there was one), and its text (trimmed, when there
//! is any) as `text`; the whole is `{"<root element>": {...}}`. An
//! element's XML content (an alarm in a `<message>`) comes out the same
//! way. No crate maps XML to JSON like this with quick-xml's limits, so it
//! is written here on quick-xml's reader.

use std::io::Write as _;

use anyhow::Context as _;
use quick_xml::events::Event;
use serde_json::{Map, Value};

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns and sentences, for people.
    Table,
    /// JSON on one line (the document mapped as described in
    /// docs/control-api.md, rsctl), for scripts.
    Json,
    /// The control API's XML document as the server answered it.
    Xml,
}

/// The deepest nesting a document may have.
const MAX_DEPTH: usize = 64;

/// Maps a control API document to JSON (as described above).
pub(crate) fn to_json(xml: &[u8]) -> anyhow::Result<Value> {
    let mut r = quick_xml::Reader::from_reader(xml);
    // The open elements: name and object so far.
    let mut stack: Vec<(String, Map<String, Value>)> = Vec::new();
    let mut root = None;
    let mut buf = Vec::new();
    loop {
        let ev = r
            .read_event_into(&mut buf)
            .with_context(|| format!("the answer is not XML (at byte {})", r.buffer_position()))?;
        match ev {
            Event::Start(_) | Event::Empty(_) if stack.len() >= MAX_DEPTH => {
                anyhow::bail!("the answer nests deeper than {MAX_DEPTH} elements");
            }
            Event::Start(e) => stack.push(element(&e)?),
            Event::Empty(e) => {
                let (name, obj) = element(&e)?;
                close(&mut stack, &mut root, name, obj);
            }
            Event::Text(t) => add_text(&mut stack, &t.xml10_content()),
            Event::CData(t) => add_text(&mut stack, &t.xml10_content()),
            Event::GeneralRef(e) => {
                let name: &str = &e;
                let c = if e.is_char_ref() {
                    e.resolve_char_ref().ok().flatten()
                } else {
                    match name {
                        "lt" => Some('<'),
                        "gt" => Some('>'),
                        "amp" => Some('&'),
                        "apos" => Some('\''),
                        "quot" => Some('"'),
                        _ => None,
                    }
                };
                let c =
                    c.with_context(|| format!("an unknown reference &{name}; in the answer"))?;
                add_text(&mut stack, c.encode_utf8(&mut [0; 4]));
            }
            Event::End(_) => {
                let Some((name, obj)) = stack.pop() else {
                    anyhow::bail!("the answer closes an element it did not open");
                };
                close(&mut stack, &mut root, name, obj);
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    root.context("the answer holds no document")
}

fn element(e: &quick_xml::events::BytesStart<'_>) -> anyhow::Result<(String, Map<String, Value>)> {
    let name = e.name().as_ref().to_owned();
    let mut obj = Map::new();
    for a in e.attributes() {
        let a = a.with_context(|| format!("a bad attribute in <{name}>"))?;
        let key = a.key.as_ref().to_owned();
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .with_context(|| format!("<{name} {key}>: a bad value"))?
            .into_owned();
        obj.insert(key, Value::String(value));
    }
    Ok((name, obj))
}

/// Text as it comes (in pieces between references); trimmed when its
/// element closes.
fn add_text(stack: &mut [(String, Map<String, Value>)], text: &str) {
    if let Some((_, obj)) = stack.last_mut() {
        match obj.get_mut("text") {
            Some(Value::String(s)) => s.push_str(text),
            _ => {
                obj.insert("text".into(), Value::String(text.to_owned()));
            }
        }
    }
}

fn close(
    stack: &mut [(String, Map<String, Value>)],
    root: &mut Option<Value>,
    name: String,
    mut obj: Map<String, Value>,
) {
    if let Some(Value::String(t)) = obj.get("text") {
        let trimmed = t.trim();
        if trimmed.is_empty() {
            obj.remove("text");
        } else if trimmed.len() != t.len() {
            let trimmed = trimmed.to_owned();
            obj.insert("text".into(), Value::String(trimmed));
        }
    }
    match stack.last_mut() {
        Some((_, parent)) => {
            let slot = parent
                .entry(name)
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(items) = slot {
                items.push(Value::Object(obj));
            }
        }
        None => {
            let mut top = Map::new();
            top.insert(name, Value::Object(obj));
            *root = Some(Value::Object(top));
        }
    }
}

/// The elements named `child` under the root of a document mapped by
/// [`to_json`].
pub(crate) fn rows<'a>(doc: &'a Value, child: &str) -> Vec<&'a Map<String, Value>> {
    doc.as_object()
        .and_then(|top| top.values().next())
        .and_then(|root| root.get(child))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

/// An attribute of a row, or `-`.
pub(crate) fn cell<'a>(row: &'a Map<String, Value>, key: &str) -> &'a str {
    row.get(key).and_then(Value::as_str).unwrap_or("-")
}

/// Prints `rows` as aligned columns under `columns` (header, attribute);
/// the last column is not padded.
pub(crate) fn table(rows: &[&Map<String, Value>], columns: &[(&str, &str)]) {
    let widths: Vec<usize> = columns
        .iter()
        .map(|(h, k)| {
            rows.iter()
                .map(|r| cell(r, k).chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(columns.iter().map(|(h, _)| *h).collect());
    for r in rows {
        line(columns.iter().map(|(_, k)| cell(r, k)).collect());
    }
}

/// Where a command's result goes, in the format asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Out(pub(crate) Format);

impl Out {
    /// A control API document: as the server answered it, mapped to JSON,
    /// or as `people` prints it.
    pub(crate) fn doc(self, xml: &[u8], people: impl FnOnce(&Value)) -> anyhow::Result<()> {
        match self.0 {
            Format::Xml => {
                let mut out = std::io::stdout().lock();
                out.write_all(xml)?;
                if !xml.ends_with(b"\n") {
                    out.write_all(b"\n")?;
                }
            }
            Format::Json => println!("{}", to_json(xml)?),
            Format::Table => people(&to_json(xml)?),
        }
        Ok(())
    }

    /// A result the server answers no document for (a deletion, a file
    /// saved, the CA's records): `fields` as a JSON object, as one
    /// `<rsctl>` element with them as attributes, or as `people` prints
    /// it.
    pub(crate) fn fields(self, fields: &[(&str, String)], people: impl FnOnce()) {
        match self.0 {
            Format::Json => {
                let obj: Map<String, Value> = fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), Value::String(v.clone())))
                    .collect();
                println!("{}", Value::Object(obj));
            }
            Format::Xml => {
                let attrs: String = fields
                    .iter()
                    .map(|(k, v)| format!(" {k}=\"{}\"", quick_xml::escape::escape(v.as_str())))
                    .collect();
                println!("<rsctl{attrs}/>");
            }
            Format::Table => people(),
        }
    }

    pub(crate) fn people(self) -> bool {
        self.0 == Format::Table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_maps_to_attributes_child_arrays_and_text() {
        let xml = br#"<?xml version="1.0"?>
<tasks count="2">
<task id="7" state="failed">connection &amp; refused</task>
<task id="8" state="ready"/>
</tasks>"#;
        let v = to_json(xml).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"tasks": {"count": "2", "task": [
                {"id": "7", "state": "failed", "text": "connection & refused"},
                {"id": "8", "state": "ready"}
            ]}})
        );
        let r = rows(&v, "task");
        assert_eq!(cell(r[1], "state"), "ready");
        assert_eq!(cell(r[1], "attempts"), "-");
    }

    #[test]
    fn nested_content_keeps_its_shape_and_bad_xml_is_an_error() {
        let v = to_json(br#"<messages count="1"><message id="m1"><alarm severity="major">disk</alarm></message></messages>"#).unwrap();
        assert_eq!(
            v["messages"]["message"][0]["alarm"][0]["text"],
            serde_json::json!("disk")
        );
        assert!(to_json(b"<a><b></a>").is_err());
        assert!(to_json(b"").is_err());
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(to_json(deep.as_bytes()).is_err());
    }
}
