//! Changing a daemon's configuration file from afar (`configChange`): lay a
//! TOML document over the file, validate the result, replace the file
//! atomically, and start the program over in place to take it up.

use rs_protocol::Outcome;
use rs_store::files::write_atomically;

/// `patch` (a TOML document) laid over the document `current`: tables
/// merge key by key; any other value given (arrays included) replaces
/// what was there.
pub fn merge(current: &str, patch: &str) -> Result<String, String> {
    let mut base: toml::Table = current
        .parse()
        .map_err(|e| format!("the current configuration: {e}"))?;
    let patch: toml::Table = patch.parse().map_err(|e| format!("{e}"))?;
    merge_tables(&mut base, patch);
    toml::to_string(&base).map_err(|e| e.to_string())
}

fn merge_tables(base: &mut toml::Table, patch: toml::Table) {
    for (k, v) in patch {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(p)) => merge_tables(b, p),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The whole `configChange`: reads the file at `path`, lays `patch` over
/// it, has `validate` check the result (returning the values of the keys
/// that must not change, compared with `identity`), and writes it. `Ok`
/// says what was done; `Err` is the outcome to answer, the old file kept.
pub fn change<F>(
    path: &std::path::Path,
    patch: &str,
    identity: &[String],
    validate: F,
) -> Result<String, Outcome>
where
    F: FnOnce(&str) -> Result<Vec<String>, String>,
{
    let refused = |why: String| {
        Outcome::rejected(
            "invalid",
            format!("configuration refused, the old one kept: {why}"),
        )
    };
    let current = std::fs::read_to_string(path)
        .map_err(|e| Outcome::rejected("failed", format!("cannot read {}: {e}", path.display())))?;
    let text = merge(&current, patch).map_err(refused)?;
    let keys = validate(&text).map_err(refused)?;
    if keys != identity {
        return Err(refused(
            "id and data_dir cannot change remotely (they are this component's identity \
             and where its state lives)"
                .into(),
        ));
    }
    write_atomically(path, text.as_bytes()).map_err(|e| {
        Outcome::rejected("failed", format!("cannot write {}: {e}", path.display()))
    })?;
    Ok(format!(
        "written to {}; restarting to apply it",
        path.display()
    ))
}

/// Starts this program over in this process, with the same arguments
/// (same PID, so a service manager sees no exit), to read its
/// configuration file again; its listeners stay open across the exec
/// ([`crate::inherit`]). Returns only on failure.
pub fn start_again() -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    match std::env::current_exe() {
        Ok(exe) => {
            let mut cmd = std::process::Command::new(exe);
            cmd.args(std::env::args_os().skip(1));
            crate::inherit::pass_on(&mut cmd);
            cmd.exec()
        }
        Err(e) => e,
    }
}
