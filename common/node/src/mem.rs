//! Giving freed heap memory back to the kernel.

/// Returns the allocator's free pages to the kernel (glibc's
/// `malloc_trim`; elsewhere nothing).
///
/// glibc gives back only the top of a heap by itself: pages freed in its
/// middle stay resident. Start-up leaves such holes. OpenSSL parses the
/// system's whole root store for every TLS client built, even for the tier
/// clients that then trust only the provider's CA: about 0.9 MB of an idle
/// proxy's 16 MB. The daemons call this once they are up and after each
/// heartbeat, so an idle one keeps only what it uses; a call walks the free
/// lists, well under a millisecond for an idle daemon's heap.
///
/// No maintained crate wraps this one libc call, hence one of the
/// workspace's two `unsafe` places (with `inherit::adopt`).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes no pointers and does nothing but return
    // free pages under the allocator's own locks; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// This process's resident memory in bytes (`VmRSS` of
/// `/proc/self/status`), if it can be read.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A bound on resident memory, enforced where connections are admitted:
/// above it a tier accepts no new connection (they wait in the kernel's
/// accept queue, and proxies with a failover list move on) until what it
/// serves ends and it is back under. Read at most every 50 ms.
#[derive(Debug)]
pub struct MemoryBound {
    pub limit: u64,
    /// Whether it was over at the last look.
    over: std::sync::atomic::AtomicBool,
    /// Times it went over (each time the gate closed).
    pub closed: rs_net::metrics::IntCounter,
    last: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl MemoryBound {
    pub fn new(limit: u64) -> std::sync::Arc<Self> {
        std::sync::Arc::new(MemoryBound {
            limit,
            over: std::sync::atomic::AtomicBool::new(false),
            closed: rs_net::metrics::counter(
                "memory_bound_closed_total",
                "Times resident memory went over memory_limit_mb and new connections were held back.",
                &[],
            ),
            last: std::sync::Mutex::new(None),
        })
    }

    /// Resident memory now (at most 50 ms old).
    pub fn resident(&self) -> u64 {
        let now = std::time::Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *last {
            Some((at, v)) if now.duration_since(at) < std::time::Duration::from_millis(50) => v,
            _ => {
                let v = resident_bytes().unwrap_or(0);
                *last = Some((now, v));
                v
            }
        }
    }

    /// Whether a new connection may be accepted: resident memory under the
    /// bound. Going over, freed heap is first given back (`trim`).
    pub fn admits(&self) -> bool {
        use std::sync::atomic::Ordering;
        let mut r = self.resident();
        if r > self.limit && !self.over.load(Ordering::Relaxed) {
            trim();
            if let Ok(mut l) = self.last.lock() {
                *l = None;
            }
            r = self.resident();
        }
        let over = r > self.limit;
        if over != self.over.swap(over, Ordering::Relaxed) {
            if over {
                self.closed.inc();
                tracing::warn!(
                    "resident memory {} MB is over memory_limit_mb {}: accepting no new connection until it is back under",
                    r >> 20,
                    self.limit >> 20
                );
            } else {
                tracing::info!(
                    "resident memory {} MB is back under memory_limit_mb {}: accepting connections",
                    r >> 20,
                    self.limit >> 20
                );
            }
        }
        !over
    }

    /// Whether it was over at the last look.
    pub fn is_over(&self) -> bool {
        self.over.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The gate for `rs_net::server::ServeConfig::admit`.
    pub fn admission(self: &std::sync::Arc<Self>) -> rs_net::server::Admission {
        let me = self.clone();
        rs_net::server::Admission(std::sync::Arc::new(move || me.admits()))
    }

    /// Its metrics: the bound, resident memory, and the gate's closings.
    pub fn register(self: &std::sync::Arc<Self>, r: &rs_net::metrics::Registry) {
        r.add(&self.closed);
        let limit = self.limit as f64;
        r.add(&rs_net::metrics::pulling(
            "memory_bound_bytes",
            "memory_limit_mb in bytes: above it no new connection is accepted.",
            move || limit,
        ));
        crate::metrics::pulling(
            r,
            self,
            "memory_over_bound",
            "1 while resident memory is over memory_limit_mb (new connections wait), else 0.",
            |m| f64::from(u8::from(m.is_over())),
        );
    }
}

/// Resident memory as a metric (every daemon).
pub fn register_resident(r: &rs_net::metrics::Registry) {
    r.add(&rs_net::metrics::pulling(
        "memory_resident_bytes",
        "Resident memory of the daemon (VmRSS).",
        || resident_bytes().unwrap_or(0) as f64,
    ));
}
