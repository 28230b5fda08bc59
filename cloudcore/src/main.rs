//! `cloudcore`: the Causeway cloud daemon.

fn main() {
    println!("cloudcore {}", env!("CARGO_PKG_VERSION"));
}
