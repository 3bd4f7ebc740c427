//! The `<messages>` document of stored messages, written by the control
//! API (queries, exports, feeds) and by the collector (webhook deliveries).

use base64::Engine as _;
use rs_protocol::codec::XmlOut;
use rs_protocol::model::Severity;
use rs_protocol::time::Timestamp;

/// The `<messages>` document of stored messages (the query answer, and
/// each webhook delivery with one message).
pub(crate) fn messages_doc(rows: &[crate::store::Row]) -> Vec<u8> {
    let tagged: Vec<(Option<i64>, &crate::store::Row)> = rows.iter().map(|r| (None, r)).collect();
    messages_doc_tagged(&tagged, None)
}

/// `<messages>` with each message's task ID (a feed) and the feed's cursor.
pub(crate) fn messages_doc_tagged(
    rows: &[(Option<i64>, &crate::store::Row)],
    cursor: Option<i64>,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256 + rows.len() * 1024);
    let mut x = XmlOut::document(&mut buf);
    x.open("messages").attr_num("count", rows.len() as u64);
    if let Some(c) = cursor {
        x.attr_num("cursor", u64::try_from(c).unwrap_or(0));
    }
    x.gt().newline();
    for (task, r) in rows {
        write_message(&mut x, *task, None, r);
    }
    x.close("messages").newline();
    buf
}

/// One stored `<message>`, with its task ID (a feed) or its storage
/// sequence number (an export).
pub(crate) fn write_message(
    x: &mut XmlOut<'_>,
    task: Option<i64>,
    seq: Option<i64>,
    r: &crate::store::Row,
) {
    let ts = |ms: i64| Timestamp::from_millis(ms).unwrap_or_else(Timestamp::now);
    x.open("message")
        .attr_num_opt("task", task.and_then(|t| u64::try_from(t).ok()))
        .attr_num_opt("seq", seq.and_then(|t| u64::try_from(t).ok()))
        .attr("id", &r.id)
        .attr("type", &r.kind)
        .attr("component", &r.component)
        .attr("class", &r.class)
        .attr("sub", &r.subclass)
        .attr_opt("severity", r.severity.map(Severity::as_str))
        .attr_ts("created", ts(r.created))
        .attr_ts("received", ts(r.received))
        .attr("via", &r.via)
        .attr_opt("seal", r.seal.as_deref())
        .gt();
    if r.kind == "data" {
        x.open("data")
            .attr("mime", &r.content_type)
            .attr_num("size", r.content.len() as u64);
        match std::str::from_utf8(&r.content) {
            Ok(text) if r.content_type.starts_with("text/") => {
                x.gt().text(text).close("data");
            }
            _ => {
                x.attr("encoding", "base64")
                    .gt()
                    .text(&base64::engine::general_purpose::STANDARD.encode(&r.content))
                    .close("data");
            }
        }
    } else {
        // XML contents were validated when stored; embed the document.
        let doc = &r.content[..];
        let body = match memchr_decl_end(doc) {
            Some(i) => &doc[i..],
            None => doc,
        };
        x.buf.extend_from_slice(body.trim_ascii());
    }
    x.close("message").newline();
}

/// The offset just after an XML declaration at the start of `doc`.
fn memchr_decl_end(doc: &[u8]) -> Option<usize> {
    if doc.starts_with(b"<?xml") {
        doc.windows(2).position(|w| w == b"?>").map(|i| i + 2)
    } else {
        None
    }
}
