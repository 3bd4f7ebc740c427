//! `rs-proxy`: the proxy's command line ([`rs_proxy::cli`]).

fn main() {
    std::process::exit(rs_proxy::cli::main_with(std::env::args_os()));
}
