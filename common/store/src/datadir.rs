//! One daemon per data directory: an exclusive `flock` on `<data_dir>/lock`,
//! taken at start and held until the daemon stops. Two copies on one
//! directory would share its SQLite files (each thinking it owns the
//! spool's in-flight rows, the back-channel's routes, the socket), so the
//! second refuses to start and says who holds the directory.
//!
//! `flock` rather than a PID file: the kernel drops the lock when the
//! holder dies, even by SIGKILL, so a crash never leaves a stale lock.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Creates `dir` if need be and locks it for `daemon` (its name, for
    /// the message a second copy prints).
    pub fn acquire(dir: &Path, daemon: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
        let path = dir.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if let Err(e) =
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            if e != rustix::io::Errno::WOULDBLOCK {
                return Err(format!("cannot lock {}: {e}", path.display()));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                String::from("another process")
            } else {
                holder.to_owned()
            };
            return Err(format!(
                "data directory {} is in use by {who}; stop it first, or give this {daemon} a \
                 data_dir of its own",
                dir.display()
            ));
        }
        // Who holds it, for the message above (the lock is what counts).
        let me = format!("{daemon} (pid {})\n", std::process::id());
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()));
        Ok(DataDirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = std::env::temp_dir().join(format!("rs-datadir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = DataDirLock::acquire(&dir, "rs-test").unwrap();
        let e = DataDirLock::acquire(&dir, "rs-test").unwrap_err();
        assert!(e.contains("in use by rs-test (pid"), "{e}");
        assert!(e.contains(&dir.display().to_string()), "{e}");
        drop(first);
        let again = DataDirLock::acquire(&dir, "rs-test").unwrap();
        assert!(again.path().ends_with("lock"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
