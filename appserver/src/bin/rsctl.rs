//! `rsctl`: the admin command line; see `rs_appserver::rsctl`.

fn main() {
    std::process::exit(rs_appserver::rsctl::main_with(std::env::args_os()));
}
