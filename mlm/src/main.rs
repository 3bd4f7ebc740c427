//! `rs-mlm --config mlm.toml`: parses flags and configuration, binds, and
//! hands over to `rs_mlm::run`.

use std::path::PathBuf;

use clap::Parser;
use rs_node::daemon;

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
    daemon::init_logging();
    let args = Args::parse();
    let cfg = rs_mlm::Config::load(&args.config).map_err(anyhow::Error::msg)?;
    let listener = daemon::bind(cfg.listen, args.addr_file.as_deref()).await?;
    let exit = rs_mlm::run(cfg, Some(args.config), listener, daemon::shutdown_token()).await?;
    daemon::finish(exit)
}
