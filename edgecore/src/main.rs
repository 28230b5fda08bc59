//! `edgecore`: the Causeway edge daemon.

fn main() {
    println!("edgecore {}", env!("CARGO_PKG_VERSION"));
}
