//! `ddome-coordinator`: the federation server. Its QUIC service is being built in issue 3;
//! this binary only reports that so far.

fn main() {
    eprintln!("ddome-coordinator: the coordinator service is not built yet (issue 3)");
    std::process::exit(2);
}
