//! `rsctl`: the admin command line; see the `rs_ctl` library.

fn main() {
    std::process::exit(rs_ctl::main_with(std::env::args_os()));
}
