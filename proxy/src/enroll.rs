//! `rs-proxy enroll`: a site in one step. Obtains the certificate and the
//! ID with a one-time token, writes the configuration, hands what it wrote
//! to the service's user, and (in the command) starts the service.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rs_net::tls::TlsConfig;

use crate::Config;

/// What `rs-proxy enroll` is given.
#[derive(Debug, Clone)]
pub struct Site {
    /// The upstream URLs (the provider's MLMs or server), in failover order.
    pub upstreams: Vec<String>,
    /// The one-time enrollment token (`rsctl enroll`).
    pub token: String,
    /// The provider's CA certificate (public; it comes with the token).
    pub ca: PathBuf,
    /// The configuration file to write (the package's default is laid
    /// over, keeping what the operator set there).
    pub config: PathBuf,
    /// The proxy's state directory (spool, registry, certificate).
    pub data_dir: PathBuf,
    /// The integrator socket.
    pub socket: PathBuf,
    /// The system user the service runs as, who must own the state
    /// directory, the key and the configuration (which `configChange`
    /// rewrites); `None` leaves ownership as it is.
    pub user: Option<String>,
}

/// Enrolls the site: returns the ID the certificate names. Nothing is
/// written to the configuration unless the certificate was obtained; a
/// proxy enrolled already is refused (its certificate is not replaced).
pub async fn site(s: &Site) -> anyhow::Result<String> {
    let current = match std::fs::read_to_string(&s.config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("{}: {e}", s.config.display()),
    };
    if let Ok(c) = Config::parse(&current)
        && let Some(t) = &c.tls
        && t.cert.exists()
    {
        anyhow::bail!(
            "{} is enrolled already (certificate {}); to enroll this site again, have the \
             certificate revoked (rsctl ca revoke) and remove it",
            s.config.display(),
            t.cert.display()
        );
    }
    rs_node::upstream::check_urls(&s.upstreams).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        s.ca.is_file(),
        "{}: the provider's CA certificate is needed (it comes with the token)",
        s.ca.display()
    );
    let mut tls = TlsConfig::in_dir(&s.data_dir.join("tls"));
    tls.ca = std::path::absolute(&s.ca)?;
    let me = rs_net::enroll::ensure(&tls, Some(&s.token), &s.upstreams, None)
        .await
        .map_err(|e| anyhow::anyhow!("enrollment: {e}"))?;
    let id = crate::proxy_id(me)?;

    // The file as it is, with what enrollment decided laid over it.
    let mut patch = toml::Table::new();
    patch.insert("id".into(), id.clone().into());
    patch.insert("data_dir".into(), path_value(&s.data_dir)?);
    patch.insert("socket".into(), path_value(&s.socket)?);
    let mut upstream = toml::Table::new();
    upstream.insert(
        "urls".into(),
        toml::Value::Array(s.upstreams.iter().map(|u| u.clone().into()).collect()),
    );
    patch.insert("upstream".into(), upstream.into());
    patch.insert("tls".into(), toml::Value::try_from(&tls)?);
    let merged = rs_node::config_file::merge(&current, &toml::to_string(&patch)?)
        .map_err(anyhow::Error::msg)?;
    // The token is spent: it is not kept where it could be read.
    let mut table: toml::Table = merged.parse()?;
    table.remove("enroll_token");
    let text = toml::to_string(&table)?;
    // The same checks as at start: the service will start with it.
    Config::parse(&text).map_err(|e| anyhow::anyhow!("the configuration made: {e}"))?;
    if let Some(dir) = s.config.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    rs_store::files::write_atomically(&s.config, text.as_bytes())
        .with_context(|| format!("cannot write {}", s.config.display()))?;
    if let Some(user) = &s.user {
        hand_over(user, &s.data_dir, &tls, &s.config)?;
    }
    Ok(id)
}

fn path_value(p: &Path) -> anyhow::Result<toml::Value> {
    Ok(std::path::absolute(p)?.display().to_string().into())
}

/// Makes `user` the owner of the state directory, what enrollment wrote in
/// it, and the configuration file.
fn hand_over(user: &str, data_dir: &Path, tls: &TlsConfig, config: &Path) -> anyhow::Result<()> {
    let u = nix::unistd::User::from_name(user)
        .with_context(|| format!("user {user:?}"))?
        .ok_or_else(|| anyhow::anyhow!("no user {user:?} (the package creates rs-proxy)"))?;
    let mut paths = vec![data_dir.to_owned()];
    if let Some(d) = tls.cert.parent() {
        paths.push(d.to_owned());
    }
    paths.extend([tls.cert.clone(), tls.key.clone(), config.to_owned()]);
    paths.extend(tls.crl.clone().filter(|c| c.exists()));
    for p in paths {
        nix::unistd::chown(p.as_path(), Some(u.uid), Some(u.gid))
            .with_context(|| format!("cannot hand {} to {user}", p.display()))?;
    }
    Ok(())
}
