//! ddome's tools: the in-process federation ([`simulate::run`], resumable from a
//! [`checkpoint::Checkpoint`]), the zero-shot bench
//! ([`bench::BenchReport`]), the bandwidth bench over real QUIC ([`bandwidth::measure`]) and
//! the shared experiment set-up ([`experiment::Experiment`]), and the inference bench
//! ([`inference_bench::run`]), and the speed benches against Python's tools: tract against
//! onnxruntime ([`embed_bench::run`]) and burn against PyTorch ([`train_bench::run`]).
//! The `ddome` binary is a thin command line over these.

pub mod bandwidth;
pub mod bench;
pub mod checkpoint;
pub mod embed_bench;
pub mod experiment;
pub mod export;
pub mod inference_bench;
pub mod python_worker;
pub mod simulate;
pub mod train_bench;
