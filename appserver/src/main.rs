//! `rs-appserver --config appserver.toml`: parses flags and configuration,
//! binds, and hands over to `rs_appserver::run`.

use std::path::PathBuf;

use clap::Parser;
use rs_node::daemon;

/// The Remote Services application server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); see docs/configuration.md.
    #[arg(long, short)]
    config: PathBuf,
    /// Write the bound address to this file once listening (for scripts
    /// that start the server on port 0).
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    daemon::init_logging();
    let args = Args::parse();
    let cfg = rs_appserver::Config::load(&args.config).map_err(anyhow::Error::msg)?;
    let listener = daemon::bind(cfg.listen, args.addr_file.as_deref()).await?;
    rs_appserver::run(cfg, listener, daemon::shutdown_token()).await
}
