//! rs-hostwatch: an example integrator. It turns what it sees on this host
//! (file-system usage, load, log lines, the OS inventory) into alarms,
//! events and data through a proxy's local API; see `rs_proxy::hostwatch`
//! and docs/integrators.md.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    rs_proxy::hostwatch::run(rs_proxy::hostwatch::Args::parse()).await;
}
