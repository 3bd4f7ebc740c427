//! The segment log that holds the embedded spool's waiting messages: each
//! message is written once, appended to the current segment file, and
//! fsynced with everything else appended in the same group commit; the
//! index of what is waiting lives in memory and is rebuilt from the log at
//! start ([`scan`]).
//!
//! Written by hand because no well-kept crate offers an embedded,
//! fsync-per-group-commit log with these rules (the SQLite rows it
//! replaces cost about 10 µs of CPU per message in six B-trees, written
//! twice through the WAL and written again to delete them).
//!
//! A segment is a sequence of records, each `magic (u32) | length (u32) |
//! crc32 of the body (u32) | body`, all little endian. The body is one of:
//!
//! - **put** (kind 1): a message waiting, with its order and delivery
//!   state: `seq u64, precedence u8, flags u8 (1 persistent, 2 control or
//!   infrastructure class, 4 has an expiry), expiry i64, created i64,
//!   attempts u32, next_attempt i64, id (u16 length + bytes), content type
//!   (u16 + bytes), header part (u32 + bytes), content (the rest)`. A
//!   second put of the same `seq` (a compaction's copy) replaces the first.
//! - **remove** (kind 2): `seq u64`: the message left the spool.
//! - **update** (kind 3): `seq u64, attempts u32, next_attempt i64`.
//!
//! Rules that keep it correct (the spool's invariants in ARCHITECTURE.md):
//! - puts reach the disk (`fdatasync`) before the commit that acknowledges
//!   them; removes and updates are written after the batch commits, without
//!   an fsync (losing them to a power failure only sends a message again,
//!   and receivers drop duplicates);
//! - a remove or update names a put in its own segment or an older one, so
//!   segments are deleted only from the oldest on, and only when none of
//!   their puts is still waiting; a segment kept by a few long-waiting
//!   messages is compacted (they are put again at the head, fsynced, then
//!   the segment goes);
//! - a torn record at the end of a segment (a crash mid-write) ends that
//!   segment; a damaged record inside one is skipped up to the next record
//!   whose checksum holds, and reported.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;

const MAGIC: u32 = 0x3153_5352;
/// Magic, length, checksum.
const HEAD: usize = 12;
/// No record is larger (a message is far smaller: the codec's limits).
const MAX_RECORD: usize = 256 << 20;
/// A segment is closed and a new one begun once it reaches this size.
/// Space comes back a segment at a time (the one appended to only once
/// the spool is empty): on a site whose disk is nearly full, a small
/// segment gives it back sooner. Creating one costs a file and a sync of
/// the directory.
pub const SEGMENT_BYTES: u64 = 16 << 20;

const PUT: u8 = 1;
const REMOVE: u8 = 2;
const UPDATE: u8 = 3;

/// Where a put record is: segment number, offset and length of the whole
/// record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub seg: u64,
    pub off: u64,
    pub len: u32,
}

/// A waiting message's order and delivery state, as a put records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub seq: u64,
    pub precedence: u8,
    pub persistent: bool,
    /// Class `control` or `infrastructure` (sent while forwarding is off).
    pub infra: bool,
    pub expiry: Option<i64>,
    pub created: i64,
    pub attempts: u32,
    pub next_attempt: i64,
    /// Header part and content, in bytes (the spool's size accounting).
    pub bytes: u64,
}

/// A put record read back whole.
#[derive(Debug, Clone)]
pub struct Stored {
    pub meta: Meta,
    pub id: String,
    pub content_type: String,
    pub header: Bytes,
    pub content: Bytes,
}

/// What a segment holds, for deciding when it can go.
#[derive(Debug, Clone, Default)]
pub struct Seg {
    /// Bytes written.
    pub size: u64,
    /// Its puts still waiting, and their record bytes.
    pub live: u64,
    pub live_bytes: u64,
}

fn seg_name(n: u64) -> String {
    format!("{n:016x}.seg")
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", path.display())
}

/// The directory beside a spool file that holds its log.
pub fn dir_of(spool_file: &Path) -> PathBuf {
    spool_file.with_extension("log")
}

/// The log's files and what is waiting to be written to them.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    /// The segment appended to (none after a write it could not undo:
    /// the next append begins a new one).
    active: Option<(u64, File)>,
    next_segno: u64,
    /// Closing size of a segment.
    segment_bytes: u64,
    pub segs: BTreeMap<u64, Seg>,
    /// Puts of the current batch: written and fsynced before it commits.
    puts: Vec<u8>,
    /// Removes and updates of the current batch: written after it commits.
    after: Vec<u8>,
}

/// Where the current batch's buffers stood (a failed job is cut back to it).
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    puts: usize,
    after: usize,
}

impl Log {
    /// Opens the log in `dir` (creating it): the segments found are kept
    /// as they are (read them with [`scan`]) and appends go to a new one.
    pub fn open(dir: &Path, found: &[(u64, u64)], segment_bytes: u64) -> Result<Log, String> {
        std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        let mut segs = BTreeMap::new();
        for &(n, size) in found {
            segs.insert(
                n,
                Seg {
                    size,
                    ..Seg::default()
                },
            );
        }
        let next_segno = found.iter().map(|f| f.0 + 1).max().unwrap_or(1);
        let mut log = Log {
            dir: dir.to_owned(),
            active: None,
            next_segno,
            segment_bytes: segment_bytes.max(1),
            segs,
            puts: Vec::new(),
            after: Vec::new(),
        };
        log.begin_segment()?;
        Ok(log)
    }

    fn begin_segment(&mut self) -> Result<(), String> {
        let n = self.next_segno;
        let path = self.dir.join(seg_name(n));
        let f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("creating", &path, e))?;
        // The new name must outlive a power failure before anything in
        // the file is acknowledged.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("syncing", &self.dir, e))?;
        self.next_segno = n + 1;
        self.segs.insert(n, Seg::default());
        self.active = Some((n, f));
        Ok(())
    }

    /// The segment appended to, begun anew if the last write failed.
    fn active_no(&mut self) -> Result<u64, String> {
        if self.active.is_none() {
            self.begin_segment()?;
        }
        Ok(self.active.as_ref().map_or(0, |a| a.0))
    }

    pub fn active_segment(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.0)
    }

    pub fn mark(&self) -> Mark {
        Mark {
            puts: self.puts.len(),
            after: self.after.len(),
        }
    }

    pub fn cut_back(&mut self, m: Mark) {
        self.puts.truncate(m.puts);
        self.after.truncate(m.after);
    }

    /// Appends a put; returns where it will be once written.
    pub fn put(
        &mut self,
        meta: &Meta,
        id: &str,
        content_type: &str,
        header: &[u8],
        content: &[u8],
    ) -> Result<Loc, String> {
        let seg = self.active_no()?;
        let start = self.puts.len();
        let b = &mut self.puts;
        b.extend_from_slice(&[0; HEAD]);
        b.push(PUT);
        b.extend_from_slice(&meta.seq.to_le_bytes());
        b.push(meta.precedence);
        let flags = u8::from(meta.persistent)
            | (u8::from(meta.infra) << 1)
            | (u8::from(meta.expiry.is_some()) << 2);
        b.push(flags);
        b.extend_from_slice(&meta.expiry.unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&meta.created.to_le_bytes());
        b.extend_from_slice(&meta.attempts.to_le_bytes());
        b.extend_from_slice(&meta.next_attempt.to_le_bytes());
        let id = &id.as_bytes()[..id.len().min(u16::MAX as usize)];
        b.extend_from_slice(&(id.len() as u16).to_le_bytes());
        b.extend_from_slice(id);
        let ct = &content_type.as_bytes()[..content_type.len().min(u16::MAX as usize)];
        b.extend_from_slice(&(ct.len() as u16).to_le_bytes());
        b.extend_from_slice(ct);
        b.extend_from_slice(
            &u32::try_from(header.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        b.extend_from_slice(header);
        b.extend_from_slice(content);
        let len = seal(b, start);
        let file_len = self.segs.get(&seg).map_or(0, |s| s.size);
        Ok(Loc {
            seg,
            off: file_len + start as u64,
            len,
        })
    }

    pub fn remove(&mut self, seq: u64) {
        let start = self.after.len();
        self.after.extend_from_slice(&[0; HEAD]);
        self.after.push(REMOVE);
        self.after.extend_from_slice(&seq.to_le_bytes());
        seal(&mut self.after, start);
    }

    pub fn update(&mut self, seq: u64, attempts: u32, next_attempt: i64) {
        let start = self.after.len();
        self.after.extend_from_slice(&[0; HEAD]);
        self.after.push(UPDATE);
        self.after.extend_from_slice(&seq.to_le_bytes());
        self.after.extend_from_slice(&attempts.to_le_bytes());
        self.after.extend_from_slice(&next_attempt.to_le_bytes());
        seal(&mut self.after, start);
    }

    /// Whether the batch has puts to write before it commits.
    pub fn has_puts(&self) -> bool {
        !self.puts.is_empty()
    }

    /// Writes the batch's puts and fsyncs them (before the commit that
    /// acknowledges them). On failure nothing of them counts: the file is
    /// cut back (or, if it cannot be, left for a new segment) and the
    /// caller undoes the batch.
    pub fn write_puts(&mut self) -> Result<(), String> {
        if self.puts.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.puts);
        let r = self.append(&buf, true);
        self.puts = buf;
        self.puts.clear();
        r
    }

    /// After the batch committed: writes its removes and updates (no
    /// fsync), then begins a new segment if this one is full. After a
    /// failed commit: forgets them.
    pub fn after_commit(&mut self, committed: bool) {
        self.puts.clear();
        if !committed || self.after.is_empty() {
            self.after.clear();
        } else {
            let buf = std::mem::take(&mut self.after);
            if let Err(e) = self.append(&buf, false) {
                // Only a repeat of work is at stake: the messages they
                // settled are offered again after a restart.
                tracing::warn!("spool log: settlements not written: {e}");
            }
            self.after = buf;
            self.after.clear();
        }
        if let Some((n, _)) = &self.active
            && self
                .segs
                .get(n)
                .is_some_and(|s| s.size >= self.segment_bytes)
            && let Err(e) = self.begin_segment()
        {
            tracing::error!("spool log: {e}");
            self.active = None;
        }
    }

    fn append(&mut self, buf: &[u8], sync: bool) -> Result<(), String> {
        let Some((n, f)) = &self.active else {
            return Err("no segment to write to".into());
        };
        let n = *n;
        let seg = self.segs.entry(n).or_default();
        let at = seg.size;
        let r = f
            .write_all_at(buf, at)
            .and_then(|()| if sync { f.sync_data() } else { Ok(()) });
        match r {
            Ok(()) => {
                seg.size += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let path = self.dir.join(seg_name(n));
                // A partial write is cut off; if even that fails, the
                // segment is closed there and a new one begun on the next
                // append (a torn tail ends a segment when it is read).
                if f.set_len(at).is_err() {
                    self.active = None;
                }
                Err(io_err("writing", &path, e))
            }
        }
    }

    /// Deletes segments from the oldest on while none of their puts is
    /// waiting (never the one appended to). Returns how many went.
    pub fn reclaim(&mut self) -> usize {
        let mut gone = 0;
        while let Some((&n, s)) = self.segs.first_key_value() {
            if s.live > 0 || Some(n) == self.active_segment() {
                break;
            }
            let path = self.dir.join(seg_name(n));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!("spool log: {}", io_err("deleting", &path, e));
                    break;
                }
            }
            self.segs.remove(&n);
            gone += 1;
        }
        gone
    }

    /// Deletes segment `n` whatever it holds (a damaged one whose readable
    /// messages were written again).
    pub fn delete_segment(&mut self, n: u64) {
        if Some(n) == self.active_segment() {
            return;
        }
        let path = self.dir.join(seg_name(n));
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("spool log: {}", io_err("deleting", &path, e));
        }
        self.segs.remove(&n);
    }

    /// Begins a new segment (the current one then goes once empty).
    pub fn rotate(&mut self) -> Result<(), String> {
        self.begin_segment()
    }

    /// Whether the record at `loc` is in its file yet (a put of the batch
    /// under way is not, until it commits).
    pub fn written(&self, loc: Loc) -> bool {
        self.segs
            .get(&loc.seg)
            .is_some_and(|s| loc.off + u64::from(loc.len) <= s.size)
    }

    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// Bytes in the log's files.
    pub fn disk_bytes(&self) -> u64 {
        self.segs.values().map(|s| s.size).sum::<u64>()
    }

    /// Reads the put records at `locs` (sorted by place and read in runs,
    /// one read per run of adjacent records): one result per location, in
    /// the order given.
    pub fn read(&self, locs: &[Loc]) -> Vec<Result<Stored, String>> {
        let mut order: Vec<usize> = (0..locs.len()).collect();
        order.sort_by_key(|&i| (locs[i].seg, locs[i].off));
        let mut out: Vec<Option<Result<Stored, String>>> = vec![None; locs.len()];
        let mut i = 0;
        while i < order.len() {
            // A run: records back to back in one segment, up to 4 MiB.
            let first = locs[order[i]];
            let mut end = first.off + u64::from(first.len);
            let mut j = i + 1;
            while j < order.len() {
                let l = locs[order[j]];
                if l.seg != first.seg || l.off != end || end - first.off > 4 << 20 {
                    break;
                }
                end += u64::from(l.len);
                j += 1;
            }
            match self.read_range(first.seg, first.off, end - first.off) {
                Ok(bytes) => {
                    for &k in &order[i..j] {
                        let l = locs[k];
                        let at = (l.off - first.off) as usize;
                        let rec = bytes.slice(at..at + l.len as usize);
                        out[k] =
                            Some(parse_put_record(&rec).ok_or_else(|| {
                                format!("segment {}: bad record at {}", l.seg, l.off)
                            }));
                    }
                }
                Err(e) => {
                    for &k in &order[i..j] {
                        out[k] = Some(Err(e.clone()));
                    }
                }
            }
            i = j;
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err("not read".into())))
            .collect()
    }

    fn read_range(&self, seg: u64, off: u64, len: u64) -> Result<Bytes, String> {
        let path = self.dir.join(seg_name(seg));
        let mut buf = vec![0u8; len as usize];
        let r = match &self.active {
            Some((n, f)) if *n == seg => f.read_exact_at(&mut buf, off),
            _ => File::open(&path).and_then(|f| f.read_exact_at(&mut buf, off)),
        };
        r.map_err(|e| io_err("reading", &path, e))?;
        Ok(Bytes::from(buf))
    }
}

/// Fills in the head of the record begun at `start`; returns its length.
fn seal(b: &mut [u8], start: usize) -> u32 {
    let body = &b[start + HEAD..];
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(body);
    b[start..start + 4].copy_from_slice(&MAGIC.to_le_bytes());
    b[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    b[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    (HEAD as u32).saturating_add(len)
}

/// Reads fields off the front of a record body.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.u64().map(|v| v as i64)
    }
}

/// A record body, as far as scanning needs it.
enum Entry<'a> {
    /// Meta and id (the content type, header and content follow).
    Put(Meta, &'a str),
    Remove(u64),
    Update(u64, u32, i64),
}

/// Parses a put body up to its id; the header and content follow.
fn parse_body(body: &[u8]) -> Option<(Entry<'_>, Fields<'_>)> {
    let mut f = Fields(body);
    match f.u8()? {
        PUT => {
            let seq = f.u64()?;
            let precedence = f.u8()?;
            let flags = f.u8()?;
            let expiry = f.i64()?;
            let created = f.i64()?;
            let attempts = f.u32()?;
            let next_attempt = f.i64()?;
            let idn = f.u16()? as usize;
            let id = std::str::from_utf8(f.take(idn)?).ok()?;
            let ctn = f.u16()? as usize;
            f.take(ctn)?;
            let hn = f.u32()? as usize;
            if f.0.len() < hn {
                return None;
            }
            let bytes = f.0.len() as u64;
            // Back to the content type for whoever reads on.
            let mut rest = Fields(body);
            rest.take(1 + 8 + 1 + 1 + 8 + 8 + 4 + 8 + 2 + idn)?;
            Some((
                Entry::Put(
                    Meta {
                        seq,
                        precedence,
                        persistent: flags & 1 != 0,
                        infra: flags & 2 != 0,
                        expiry: (flags & 4 != 0).then_some(expiry),
                        created,
                        attempts,
                        next_attempt,
                        bytes,
                    },
                    id,
                ),
                rest,
            ))
        }
        REMOVE => Some((Entry::Remove(f.u64()?), f)),
        UPDATE => {
            let seq = f.u64()?;
            let a = f.u32()?;
            let n = f.i64()?;
            Some((Entry::Update(seq, a, n), f))
        }
        _ => None,
    }
}

/// Checks a whole record (head and checksum) and returns its body.
fn check(rec: &[u8]) -> Option<&[u8]> {
    if rec.len() < HEAD {
        return None;
    }
    let magic = u32::from_le_bytes(rec[0..4].try_into().ok()?);
    let len = u32::from_le_bytes(rec[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(rec[8..12].try_into().ok()?);
    if magic != MAGIC || len > MAX_RECORD || rec.len() < HEAD + len {
        return None;
    }
    let body = &rec[HEAD..HEAD + len];
    (crc32fast::hash(body) == crc).then_some(body)
}

fn parse_put_record(rec: &Bytes) -> Option<Stored> {
    let body = check(rec)?;
    let (Entry::Put(meta, id), mut rest) = parse_body(body)? else {
        return None;
    };
    let ctn = rest.u16()? as usize;
    let ct = std::str::from_utf8(rest.take(ctn)?).ok()?.to_owned();
    let hn = rest.u32()? as usize;
    // The header and content as slices of the buffer read (no copy).
    let body_at = HEAD + (body.len() - rest.0.len());
    let header = rec.slice(body_at..body_at + hn);
    let content = rec.slice(body_at + hn..HEAD + body.len());
    Some(Stored {
        meta,
        id: id.to_owned(),
        content_type: ct,
        header,
        content,
    })
}

/// One waiting message found by a scan.
#[derive(Debug, Clone)]
pub struct Found {
    pub meta: Meta,
    pub id: String,
    pub loc: Loc,
}

/// What a scan of the log found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Waiting messages, by seq.
    pub waiting: BTreeMap<u64, Found>,
    /// Segments and their sizes, oldest first.
    pub segments: Vec<(u64, u64)>,
    /// Damage found inside segments (not a torn end): what, where.
    pub damage: Vec<String>,
    /// The highest seq any record names.
    pub max_seq: u64,
}

/// Reads every segment in `dir` (a missing directory is an empty log).
pub fn scan(dir: &Path) -> Result<Scan, String> {
    let mut scan = Scan::default();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(io_err("reading", dir, e)),
    };
    let mut segs = Vec::new();
    for e in rd {
        let e = e.map_err(|e| io_err("reading", dir, e))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".seg")
            && hex.len() == 16
            && let Ok(n) = u64::from_str_radix(hex, 16)
        {
            segs.push(n);
        }
    }
    segs.sort_unstable();
    for n in segs {
        let path = dir.join(seg_name(n));
        let mut data = Vec::new();
        match File::open(&path).and_then(|mut f| f.read_to_end(&mut data)) {
            Ok(_) => {}
            // Deleted since listed (a running spool's, being checked).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("reading", &path, e)),
        }
        scan.segments.push((n, data.len() as u64));
        scan_segment(n, &data, &mut scan);
    }
    Ok(scan)
}

fn scan_segment(n: u64, data: &[u8], scan: &mut Scan) {
    let mut at = 0usize;
    while at < data.len() {
        let Some(body) = check(&data[at..]) else {
            // Damage, or the torn end of a write: look for the next good
            // record; none means the segment ends here.
            let Some(next) = (at + 1..data.len().saturating_sub(HEAD - 1))
                .find(|&i| data[i..i + 4] == MAGIC.to_le_bytes() && check(&data[i..]).is_some())
            else {
                return;
            };
            scan.damage.push(format!(
                "segment {}: {} unreadable byte(s) at offset {at}",
                seg_name(n),
                next - at
            ));
            at = next;
            continue;
        };
        let len = HEAD + body.len();
        match parse_body(body) {
            Some((Entry::Put(meta, id), _)) => {
                scan.max_seq = scan.max_seq.max(meta.seq);
                let loc = Loc {
                    seg: n,
                    off: at as u64,
                    len: len as u32,
                };
                scan.waiting.insert(
                    meta.seq,
                    Found {
                        meta,
                        id: id.to_owned(),
                        loc,
                    },
                );
            }
            Some((Entry::Remove(seq), _)) => {
                scan.max_seq = scan.max_seq.max(seq);
                scan.waiting.remove(&seq);
            }
            Some((Entry::Update(seq, attempts, next), _)) => {
                scan.max_seq = scan.max_seq.max(seq);
                if let Some(f) = scan.waiting.get_mut(&seq) {
                    f.meta.attempts = attempts;
                    f.meta.next_attempt = next;
                }
            }
            None => scan.damage.push(format!(
                "segment {}: a record of an unknown form at offset {at}",
                seg_name(n)
            )),
        }
        at += len;
    }
}

/// Copies segment `n` aside (`<name>.damaged-<suffix>`) for examination.
pub fn keep_copy(dir: &Path, n: u64, suffix: &str) -> Result<PathBuf, String> {
    let from = dir.join(seg_name(n));
    let to = dir.join(format!("{}.damaged-{suffix}", seg_name(n)));
    std::fs::copy(&from, &to).map_err(|e| io_err("copying", &from, e))?;
    let _ = File::open(&to).and_then(|f| f.sync_all());
    Ok(to)
}

/// The segment number a damage line names (see [`Scan::damage`]).
pub fn damaged_segment(line: &str) -> Option<u64> {
    let hex = line.strip_prefix("segment ")?.get(..16)?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(seq: u64) -> Meta {
        Meta {
            seq,
            precedence: 3,
            persistent: true,
            infra: false,
            expiry: Some(7),
            created: 11,
            attempts: 2,
            next_attempt: 5,
            bytes: 7,
        }
    }

    #[test]
    fn records_read_back_and_scan_rebuilds_what_waits() {
        let dir = std::env::temp_dir().join(format!("rs-log-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut log = Log::open(&dir, &[], SEGMENT_BYTES).unwrap();
        let a = log
            .put(&meta(1), "id-1", "text/xml", b"hdr", b"body")
            .unwrap();
        let b = log
            .put(&meta(2), "id-2", "text/xml", b"h", b"second")
            .unwrap();
        assert!(!log.written(a));
        log.write_puts().unwrap();
        log.remove(1);
        log.update(2, 9, 99);
        log.after_commit(true);
        assert!(log.written(a) && log.written(b));
        let got = log.read(&[b, a]);
        let b2 = got[0].as_ref().unwrap();
        assert_eq!(
            (b2.id.as_str(), &b2.header[..], &b2.content[..]),
            ("id-2", &b"h"[..], &b"second"[..])
        );
        assert_eq!(got[1].as_ref().unwrap().meta, meta(1));
        let s = scan(&dir).unwrap();
        assert_eq!(s.waiting.len(), 1);
        let f = &s.waiting[&2];
        assert_eq!((f.meta.attempts, f.meta.next_attempt, f.loc), (9, 99, b));
        assert_eq!(s.max_seq, 2);
        assert!(s.damage.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
