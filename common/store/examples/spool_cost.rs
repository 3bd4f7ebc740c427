//! The embedded spool's cost per message, alone, for profilers: rounds of
//! enqueue (one group commit), dequeue and settle of 100 messages of about
//! 2 KB, in a scratch directory.
//! `cargo build --release -p rs-store --example spool_cost` then
//! `perf record -g target/release/examples/spool_cost [ROUNDS]`.

use std::time::Instant;

use rs_protocol::codec::Limits;
use rs_protocol::ids::MessageId;
use rs_protocol::time::Timestamp;
use rs_protocol::{decode_headers, encode_envelope, samples};
use rs_store::spool::sqlite::SqliteSpool;
use rs_store::spool::{Settle, Spool, SpoolConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 500,
    };
    let dir = std::env::temp_dir().join(format!("rs-spool-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let spool = SqliteSpool::open(SpoolConfig::new(dir.join("spool.db")))?;
    let enc = encode_envelope(&samples::bench_envelope());
    let base = decode_headers(&enc.content_type, enc.body, &Limits::default())?.messages;
    let now = Timestamp::now();
    let t = Instant::now();
    for r in 0..rounds {
        let mut batch = Vec::with_capacity(base.len());
        for (i, m) in base.iter().enumerate() {
            let mut m = m.clone();
            m.header.id = MessageId::new(format!("m{r}-{i}"))?;
            if let rs_protocol::Route::Source(s) = &mut m.header.route {
                s.qos.expiry = None;
            }
            batch.push(m);
        }
        spool.enqueue(batch, now).await?;
        let got = spool.dequeue(base.len(), 1 << 20, now, false).await?;
        let settle = got
            .into_iter()
            .map(|s| (s.msg.header.id, Settle::Delivered))
            .collect();
        spool.settle(settle, now).await?;
    }
    let el = t.elapsed();
    let st = spool.stats().await?;
    println!(
        "{:.2} µs per message, {} delivered, {} left",
        el.as_secs_f64() * 1e6 / (rounds * base.len()) as f64,
        st.delivered_total,
        st.messages
    );
    drop(spool);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
