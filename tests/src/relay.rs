//! A TCP relay to put between two tiers in tests: it counts the bytes that
//! cross the link in each direction, counts occurrences of chosen markers
//! in what flows down (server to client), and can cut a connection at the
//! moment a marker passes, after the server has written it and before the
//! client reads it: a reply lost on the way.
//!
//! It can also be told to misbehave ([`Fault`]): delay every chunk, stall
//! everything (a blackhole: connections stay open, nothing passes), or
//! reset every connection open now.
//!
//! Plain TCP on loopback; the tiers speak HTTP through it unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A standing misbehaviour of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Every chunk waits this long before it goes on.
    Delay(std::time::Duration),
    /// Nothing passes either way (connections stay open, half-open as far
    /// as either end can tell) until the fault is cleared.
    Blackhole,
}

/// What the relay saw and what it is told to do.
#[derive(Debug, Default)]
pub struct Link {
    fault: Mutex<Fault>,
    /// Bumped by [`Link::reset`]: connections of an older generation end.
    generation: AtomicU64,
    /// Bytes from the client to the server (requests).
    pub up_bytes: AtomicU64,
    /// Bytes from the server to the client (replies).
    pub down_bytes: AtomicU64,
    /// Connections cut.
    pub cuts: AtomicU64,
    /// (marker, times seen going down).
    counted: Mutex<Vec<(Vec<u8>, u64)>>,
    /// (marker, times seen going up).
    counted_up: Mutex<Vec<(Vec<u8>, u64)>>,
    /// Cut the next reply (down) that contains this marker.
    cut_down: Mutex<Option<Vec<u8>>>,
    /// Cut the next request (up) that contains this marker.
    cut_up: Mutex<Option<Vec<u8>>>,
}

impl Link {
    /// Counts occurrences of `marker` in replies from now on.
    pub fn count(&self, marker: &str) {
        if let Ok(mut c) = self.counted.lock() {
            c.push((marker.as_bytes().to_vec(), 0));
        }
    }

    /// How often `marker` crossed down since [`Link::count`].
    pub fn seen(&self, marker: &str) -> u64 {
        self.counted
            .lock()
            .ok()
            .and_then(|c| {
                c.iter()
                    .find(|(m, _)| m == marker.as_bytes())
                    .map(|(_, n)| *n)
            })
            .unwrap_or(0)
    }

    /// Counts occurrences of `marker` in requests from now on.
    pub fn count_up(&self, marker: &str) {
        if let Ok(mut c) = self.counted_up.lock() {
            c.push((marker.as_bytes().to_vec(), 0));
        }
    }

    /// How often `marker` crossed up since [`Link::count_up`].
    pub fn seen_up(&self, marker: &str) -> u64 {
        self.counted_up
            .lock()
            .ok()
            .and_then(|c| {
                c.iter()
                    .find(|(m, _)| m == marker.as_bytes())
                    .map(|(_, n)| *n)
            })
            .unwrap_or(0)
    }

    /// Drops the next reply that carries `marker`, closing the connection.
    pub fn cut_reply_with(&self, marker: &str) {
        if let Ok(mut c) = self.cut_down.lock() {
            *c = Some(marker.as_bytes().to_vec());
        }
    }

    /// Drops the next request that carries `marker`, closing the connection.
    pub fn cut_request_with(&self, marker: &str) {
        if let Ok(mut c) = self.cut_up.lock() {
            *c = Some(marker.as_bytes().to_vec());
        }
    }

    /// Sets (or with `Fault::None` clears) a standing fault.
    pub fn set_fault(&self, f: Fault) {
        if let Ok(mut x) = self.fault.lock() {
            *x = f;
        }
    }

    fn fault(&self) -> Fault {
        self.fault.lock().map(|f| *f).unwrap_or_default()
    }

    /// Resets every connection open now (new ones are taken as usual).
    pub fn reset(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn armed(&self) -> bool {
        self.cut_down.lock().map(|c| c.is_some()).unwrap_or(false)
            || self.cut_up.lock().map(|c| c.is_some()).unwrap_or(false)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Starts a relay on 127.0.0.1 to `target`; returns its address and link.
pub async fn start(target: String) -> std::io::Result<(String, Arc<Link>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    let link = Arc::new(Link::default());
    let lk = link.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let (target, link) = (target.clone(), lk.clone());
            tokio::spawn(async move {
                if let Ok(server) = TcpStream::connect(&target).await {
                    pipe(client, server, link).await;
                }
            });
        }
    });
    Ok((addr, link))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Client to server: requests.
    Up,
    /// Server to client: replies.
    Down,
}

impl Link {
    fn cut(&self, way: Way) -> &Mutex<Option<Vec<u8>>> {
        match way {
            Way::Up => &self.cut_up,
            Way::Down => &self.cut_down,
        }
    }

    fn counters(&self, way: Way) -> &Mutex<Vec<(Vec<u8>, u64)>> {
        match way {
            Way::Up => &self.counted_up,
            Way::Down => &self.counted,
        }
    }

    fn bytes(&self, way: Way) -> &AtomicU64 {
        match way {
            Way::Up => &self.up_bytes,
            Way::Down => &self.down_bytes,
        }
    }
}

/// Copies one direction: counts, and cuts when an armed marker passes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    way: Way,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // The end of the previous chunk, so a marker split across two reads is
    // still found.
    let mut tail: Vec<u8> = Vec::new();
    let born = link.generation.load(Ordering::Relaxed);
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            () = reset_of(&link, born) => return,
        };
        // A standing fault holds the chunk (or ends the connection).
        loop {
            if link.generation.load(Ordering::Relaxed) != born {
                return;
            }
            match link.fault() {
                Fault::None => break,
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Fault::Blackhole => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
        let chunk = &buf[..n];
        let mut window = tail.clone();
        window.extend_from_slice(chunk);
        let cut = {
            let mut c = link.cut(way).lock().unwrap_or_else(|e| e.into_inner());
            match c.as_ref() {
                Some(m) if contains(&window, m) => {
                    *c = None;
                    true
                }
                _ => false,
            }
        };
        if cut {
            link.cuts.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Ok(mut counted) = link.counters(way).lock() {
            for (m, k) in counted.iter_mut() {
                // Occurrences that end in this chunk.
                *k += count_in(&window, m) - count_in(&tail, m);
            }
        }
        link.bytes(way).fetch_add(n as u64, Ordering::Relaxed);
        if to.write_all(chunk).await.is_err() {
            return;
        }
        tail = window[window.len().saturating_sub(256)..].to_vec();
    }
}

async fn pipe(client: TcpStream, server: TcpStream, link: Arc<Link>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Either side ending (or a cut) ends the connection both ways.
    tokio::select! {
        () = pump(cr, sw, link.clone(), Way::Up) => {}
        () = pump(sr, cw, link, Way::Down) => {}
    }
}

/// Resolves when the link is reset past generation `born`.
async fn reset_of(link: &Link, born: u64) {
    while link.generation.load(Ordering::Relaxed) == born {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn count_in(hay: &[u8], needle: &[u8]) -> u64 {
    if needle.is_empty() || hay.len() < needle.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count() as u64
}
