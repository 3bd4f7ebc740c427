//! `rs-appserver --config appserver.toml`: parses flags and configuration,
//! and hands over to `rs_appserver::daemon`.

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
    /// Check the configuration (the same checks as at start) and exit:
    /// 0 when it is good, 1 with the problem as FILE:LINE: KEY: problem.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.check_config {
        std::process::exit(daemon::check_config(
            &args.config,
            rs_appserver::Config::parse,
        ));
    }
    daemon::init_logging();
    rs_appserver::daemon(args.config, args.addr_file).await
}
