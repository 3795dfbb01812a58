//! ddome's tools: the in-process federation ([`simulate::run`]), the zero-shot bench
//! ([`bench::BenchReport`]), the bandwidth bench over real QUIC ([`bandwidth::measure`]) and
//! the shared experiment set-up ([`experiment::Experiment`]), and the inference bench
//! ([`inference_bench::run`]).
//! The `ddome` binary is a thin command line over these.

pub mod bandwidth;
pub mod bench;
pub mod experiment;
pub mod export;
pub mod inference_bench;
pub mod simulate;
