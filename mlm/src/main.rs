//! `rs-mlm --config mlm.toml`: parses flags and configuration, binds, and
//! hands over to `rs_mlm::run`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// The Remote Services mid-level manager.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); see docs/configuration.md.
    #[arg(long, short)]
    config: PathBuf,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let cfg = rs_mlm::Config::load(&args.config).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    if let Some(f) = &args.addr_file {
        std::fs::write(f, listener.local_addr()?.to_string())?;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(rs_common::shutdown_on_signal(shutdown.clone()));
    match rs_mlm::run(cfg, Some(args.config), listener, shutdown).await? {
        rs_mlm::Exit::Stopped => Ok(()),
        rs_mlm::Exit::Restart => Err(anyhow::anyhow!(
            "cannot start again: {}",
            rs_common::config_file::start_again()
        )),
    }
}
