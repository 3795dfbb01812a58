//! `ddome-agent`: the edge binary. Its networked run (enrol, rank, train, upload over QUIC)
//! is being built in issue 3; this binary only reports that so far.

fn main() {
    eprintln!("ddome-agent: the networked agent is not built yet (issue 3)");
    std::process::exit(2);
}
