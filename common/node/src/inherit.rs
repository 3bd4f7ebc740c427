//! Listening sockets kept open across a start in place (a reload on
//! SIGHUP, a `configChange`, a renewed certificate), so that no client is
//! refused while the daemon drains and starts again: connections that
//! arrive meanwhile wait in the kernel's accept queue and are served by
//! the new image.
//!
//! Every listener a daemon binds through [`crate::daemon`] is registered
//! here by a key naming what it is for and where it listens (`tcp main
//! 127.0.0.1:7000`, `tcp metrics 127.0.0.1:0`, `unix
//! /run/rs-proxy/rs-proxy.sock`), as a duplicate descriptor. Just before
//! the `exec`, [`pass_on`] clears close-on-exec on the duplicates and names
//! them in `RS_LISTEN_FDS` (descriptor, key and bound address,
//! tab-separated, one line each) with `RS_LISTEN_PID` (the PID the exec
//! keeps), as systemd's `LISTEN_FDS` does; the new image [`take`]s the one
//! its configuration names (by key or by bound address) and closes the
//! others once it is ready (a listener the new configuration moved).
//! Written here rather than with systemd's protocol (the `sd-notify`
//! crate's `listen_fds`) because that one needs the descriptors renumbered
//! from 3, which cannot be done safely while the runtime's own descriptors
//! are open.

use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, OnceLock};

const FDS: &str = "RS_LISTEN_FDS";
const PID: &str = "RS_LISTEN_PID";

/// One listener: the key its configuration named it by (`tcp main
/// 127.0.0.1:0`) and the one it is bound to (`tcp main 127.0.0.1:43567`).
struct Entry {
    key: String,
    bound: String,
    fd: OwnedFd,
}

#[derive(Default)]
struct State {
    /// Handed over by the previous image, not yet taken.
    inherited: Vec<Entry>,
    /// This image's listeners, to hand over at the next start in place.
    kept: Vec<Entry>,
}

fn state() -> MutexGuard<'static, State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            Mutex::new(State {
                inherited: from_environment(),
                kept: Vec::new(),
            })
        })
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The descriptors the previous image of this process named, made
/// close-on-exec again (a command this image runs must not hold them).
fn from_environment() -> Vec<Entry> {
    let mine =
        std::env::var(PID).ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let Ok(list) = std::env::var(FDS) else {
        return Vec::new();
    };
    if !mine {
        // Inherited from a parent that is not this process's earlier image
        // (a daemon started by one being reloaded): not ours.
        return Vec::new();
    }
    let mut out = Vec::new();
    for line in list.lines() {
        let mut fields = line.split('\t');
        let (Some(fd), Some(key), Some(bound)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(fd) = fd.parse::<RawFd>() else {
            continue;
        };
        let Some(owned) = adopt(fd) else {
            tracing::warn!("{FDS} names descriptor {fd}, which is not open");
            continue;
        };
        if let Err(e) = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC) {
            tracing::warn!("descriptor {fd}: {e}");
        }
        out.push(Entry {
            key: key.to_owned(),
            bound: bound.to_owned(),
            fd: owned,
        });
    }
    out
}

/// Owns descriptor `fd`, if it is open. Raw descriptor numbers are what
/// the exec hands over; std has no safe way to adopt one, hence this
/// `unsafe` (with `mem::trim`'s, the workspace's only ones).
#[allow(unsafe_code)]
fn adopt(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: the previous image of this process (same PID, checked by the
    // caller) left `fd` open for this image and named it once; it is
    // adopted once, here, and nothing else in this image knows of it. A
    // number that is not open fails the flag check and is not adopted.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).ok()?;
    // SAFETY: as above; from here the descriptor has one owner.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The listener the previous image kept under `key`, or bound to the
/// address `key` names (a configuration that now names the port it was
/// given), if it did.
pub fn take(key: &str) -> Option<OwnedFd> {
    let mut s = state();
    let i = s
        .inherited
        .iter()
        .position(|e| e.key == key || e.bound == key)?;
    Some(s.inherited.swap_remove(i).fd)
}

/// Closes inherited TCP listeners on `port` that were not taken: they would
/// stand in the way of binding it afresh (the address changed, say from
/// all interfaces to one).
pub fn release_port(port: u16) {
    if port == 0 {
        return;
    }
    let tail = format!(":{port}");
    state()
        .inherited
        .retain(|e| !(e.bound.starts_with("tcp ") && e.bound.ends_with(&tail)));
}

/// Keeps a duplicate of `fd` under `key` (bound to `bound`) for the next
/// start in place, replacing one kept under the same key.
pub fn keep(key: &str, bound: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let dup = fd.try_clone_to_owned()?;
    let mut s = state();
    s.kept.retain(|e| e.key != key);
    s.kept.push(Entry {
        key: key.to_owned(),
        bound: bound.to_owned(),
        fd: dup,
    });
    Ok(())
}

/// Closes what the previous image handed over that this one did not take
/// (its configuration listens elsewhere now), so no client waits on a
/// socket nobody will accept on.
pub fn close_unclaimed() {
    let gone = std::mem::take(&mut state().inherited);
    for e in &gone {
        tracing::info!(
            "closing the inherited listener {}: no longer configured",
            e.bound
        );
    }
}

/// Closes the kept duplicates: the daemon is stopping for good, and a
/// client should be refused at once (and fail over) rather than wait in
/// the accept queue of a process that is going away.
pub fn forget_kept() {
    state().kept.clear();
}

/// Prepares `cmd` (this program, about to replace this process) to inherit
/// the kept listeners (which stay open, owned here, until the exec).
/// Returns how many.
pub fn pass_on(cmd: &mut std::process::Command) -> usize {
    let s = state();
    let mut list = String::new();
    let mut n = 0;
    for e in &s.kept {
        if let Err(err) = rustix::io::fcntl_setfd(e.fd.as_fd(), rustix::io::FdFlags::empty()) {
            tracing::warn!("{}: cannot hand the listener over: {err}", e.bound);
            continue;
        }
        list.push_str(&format!("{}\t{}\t{}\n", e.fd.as_raw_fd(), e.key, e.bound));
        n += 1;
    }
    cmd.env(FDS, list).env(PID, std::process::id().to_string());
    n
}
