//! Relaying in step with the upstream: the messages of envelopes that
//! arrive while the MLM's upstream POSTs are all in flight go up together
//! in the next one (like a database's group commit). Under light load each
//! envelope goes up at once, alone; under heavy load many proxies' envelopes
//! share one POST, one store transaction at the server and one reply, and
//! each is answered with its own messages' outcomes. Nothing changes for a
//! message: it is answered only once the upstream answered for it.

use std::sync::Arc;

use rs_protocol::Outcome;
use rs_protocol::codec::RawMessage;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::Mlm;

/// Upstream POSTs in flight at once.
const IN_FLIGHT: usize = 2;

/// One envelope's messages waiting to go up, and where their outcomes go.
#[derive(Debug)]
pub struct Job {
    msgs: Vec<RawMessage>,
    /// How many messages (`msgs` is taken when they go up).
    count: usize,
    bytes: usize,
    reply: oneshot::Sender<Vec<Outcome>>,
}

/// The relaying side of the MLM's handlers.
#[derive(Debug)]
pub struct Coalescer {
    tx: mpsc::Sender<Job>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<Job>>>,
}

impl Default for Coalescer {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(4096);
        Coalescer {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
        }
    }
}

impl Coalescer {
    /// Relays `msgs` (with others waiting, if any); their outcomes, in order.
    pub async fn relay(&self, msgs: Vec<RawMessage>) -> Vec<Outcome> {
        let n = msgs.len();
        let bytes = msgs.iter().map(|m| m.content.len() + 1024).sum();
        let (reply, rx) = oneshot::channel();
        let job = Job {
            msgs,
            count: n,
            bytes,
            reply,
        };
        if self.tx.send(job).await.is_ok()
            && let Ok(o) = rx.await
        {
            return o;
        }
        vec![crate::forward::unavailable("the MLM is stopping"); n]
    }
}

/// Takes envelopes' messages up, several at once when the upstream is
/// busy. Runs until the MLM stops.
pub async fn run(mlm: Arc<Mlm>) {
    let Some(mut rx) = mlm.coalescer.rx.lock().ok().and_then(|mut r| r.take()) else {
        return;
    };
    let limits = mlm.cfg.limits();
    let (max_messages, max_bytes) = (limits.max_messages / 2, limits.max_envelope_bytes / 2);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        // Wait for a free POST; what arrives meanwhile goes with this one.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut n, mut bytes) = (first.msgs.len(), first.bytes);
        let mut jobs = vec![first];
        while let Ok(j) = rx.try_recv() {
            if n + j.msgs.len() > max_messages || bytes + j.bytes > max_bytes {
                carried = Some(j);
                break;
            }
            n += j.msgs.len();
            bytes += j.bytes;
            jobs.push(j);
        }
        let mlm = mlm.clone();
        tokio::spawn(async move {
            let all: Vec<(usize, RawMessage)> = jobs
                .iter_mut()
                .flat_map(|j| std::mem::take(&mut j.msgs))
                .enumerate()
                .collect();
            let mut outcomes = crate::forward::relay(&mlm, &all).await.into_iter();
            for j in jobs {
                let mine: Vec<Outcome> = outcomes.by_ref().take(j.count).collect();
                let _ = j.reply.send(mine);
            }
            drop(slot);
        });
    }
}
