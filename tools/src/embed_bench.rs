//! `ddome bench embed`: the common expert through tract (our library, as shipped) against
//! onnxruntime on the same ONNX graph, input tensor, batch size and thread count.
//!
//! For every (input side, batch B, threads T) one "iteration" embeds B × T images in
//! batches of B on T threads, in each of two ways where T > 1:
//! - data-parallel: T workers, one thread each, each running its own batches (tract:
//!   [`Threading::Workers`]; onnxruntime: T one-thread sessions driven from T threads);
//! - intra-op: one batch at a time, each operator split across T threads (tract:
//!   [`Threading::IntraOp`], tract-linalg's pool; onnxruntime: one session with
//!   `intra_op_num_threads = T`).
//!
//! The model alone is timed on a ready, preprocessed tensor; preprocessing (resize and
//! normalise from u8 pixels) is timed apart, and so is `embed` from pixels, which overlaps
//! the two. onnxruntime runs in `scripts/bench/ort_embed.py`, kept alive so the engines'
//! runs alternate (tract, onnxruntime, tract, ...) and share the machine's load; each
//! figure is the median of the repeats and each ratio compares medians of the same run.
//!
//! FLOPs per image are tract's own operator costs (`TypedOp::cost`) summed over the
//! typed graph at batch 1: 2 FLOPs per multiply-accumulate. Achieved GFLOP/s puts both
//! engines against the same count, which is where a floor shows.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use ddome_datasets::{ImageSet, ImageShape};
use ddome_models::{CommonExpert, CommonExpertConfig, Threading};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::Cost;

use crate::python_worker::PythonWorker;

/// The graph output both engines compute.
const OUTPUT: &str = "embedding";

/// `ddome bench embed`'s flags (here rather than in main.rs, which other benches share).
#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// The common expert (ONNX).
    #[arg(long, default_value = ".cache/models/efficientnet-lite0.onnx")]
    model: PathBuf,
    /// Python with onnxruntime (scripts/bench/setup-python.sh installs it).
    #[arg(long, default_value = crate::python_worker::DEFAULT_PYTHON)]
    python: PathBuf,
    /// The onnxruntime side.
    #[arg(long, default_value = "scripts/bench/ort_embed.py")]
    script: PathBuf,
    /// Input sides to sweep, comma-separated; each divides by 32.
    #[arg(long, value_delimiter = ',', default_value = "64,128,224")]
    sides: Vec<usize>,
    /// Batch sizes to sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Thread counts to sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Timed samples per engine and mode; medians are reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Shortest sample, seconds: an iteration is repeated until a sample lasts this long.
    #[arg(long, default_value_t = 0.2)]
    min_sample_secs: f64,
    /// Side of the synthetic RGB images preprocessing resizes (32 is CIFAR's).
    #[arg(long, default_value_t = 32)]
    source_side: usize,
    /// Seed of the synthetic pixels.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory for results.json and table.md.
    #[arg(long, default_value = "runs/bench-embed")]
    out: PathBuf,
}

/// Runs `ddome bench embed` and writes its results.
pub fn command(args: EmbedArgs, command_line: String) -> Result<()> {
    let config = EmbedBenchConfig {
        model: args.model,
        python: args.python,
        script: args.script,
        sides: args.sides,
        batches: args.batches,
        threads: args.threads,
        repeats: args.repeats,
        min_sample_secs: args.min_sample_secs,
        source_side: args.source_side,
        seed: args.seed,
    };
    let report = run(&config, command_line)?;
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::to_string_pretty(&report)?;
    fs::write(args.out.join("results.json"), json)
        .with_context(|| format!("writing {}/results.json", args.out.display()))?;
    let table = markdown(&report);
    fs::write(args.out.join("table.md"), &table)
        .with_context(|| format!("writing {}/table.md", args.out.display()))?;
    println!("{table}");
    println!("results written to {}", args.out.display());
    Ok(())
}

/// What to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedBenchConfig {
    /// The common expert (ONNX).
    pub model: PathBuf,
    /// The Python with onnxruntime.
    pub python: PathBuf,
    /// `scripts/bench/ort_embed.py`.
    pub script: PathBuf,
    /// Input sides (square) to sweep; each must divide by 32.
    pub sides: Vec<usize>,
    /// Batch sizes to sweep.
    pub batches: Vec<usize>,
    /// Thread counts to sweep.
    pub threads: Vec<usize>,
    /// Timed samples per engine and mode; the median is reported.
    pub repeats: usize,
    /// Each sample repeats the iteration until it lasts at least this long.
    pub min_sample_secs: f64,
    /// Side of the synthetic RGB source images that preprocessing resizes (32: CIFAR).
    pub source_side: usize,
    /// Seed of the synthetic pixels.
    pub seed: u64,
}

/// One engine in one mode on one case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineTiming {
    /// `tract` or `onnxruntime`.
    pub engine: String,
    /// `single` (T = 1), `data-parallel` or `intra-op`.
    pub mode: String,
    /// Iterations (B × T images each) per sample.
    pub iters: usize,
    /// Milliseconds per image, one value per repeat, in run order.
    pub ms_per_image: Vec<f64>,
    /// Their median.
    pub median_ms_per_image: f64,
    /// Images per second at the median.
    pub images_per_sec: f64,
    /// FLOPs per image × images per second, in GFLOP/s.
    pub gflops: f64,
}

/// Everything measured for one (side, batch, threads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedCase {
    /// Input side.
    pub side: usize,
    /// Images per model run.
    pub batch: usize,
    /// Threads.
    pub threads: usize,
    /// FLOPs per image at this side (tract's operator costs).
    pub flops_per_image: f64,
    /// Preprocessing one image from u8 pixels (resize + normalise), one thread, ms.
    pub preprocess_ms_per_image: f64,
    /// `CommonExpert::embed` from u8 pixels (data-parallel, as shipped), ms per image.
    pub tract_embed_ms_per_image: f64,
    /// Model-only timings, tract then onnxruntime, in the order they ran.
    pub engines: Vec<EngineTiming>,
    /// Fastest tract mode over fastest onnxruntime mode (median times; above 1: tract is slower).
    pub ratio_best: f64,
    /// tract as shipped (data-parallel workers) over onnxruntime as its users run it (one
    /// session, T intra-op threads).
    pub ratio_default: f64,
    /// Largest |tract − onnxruntime| over the batch's embeddings.
    pub max_abs_diff: f32,
}

/// What `ddome bench embed` writes to `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedBenchReport {
    /// The command line.
    pub command: String,
    /// The machine.
    pub machine: String,
    /// onnxruntime, numpy and Python versions as the script reports them.
    pub python: serde_json::Value,
    /// The configuration.
    pub config: EmbedBenchConfig,
    /// One entry per swept case.
    pub cases: Vec<EmbedCase>,
    /// Total wall time, seconds.
    pub wall_secs: f64,
}

/// Operator costs of a graph, summed.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct GraphCost {
    /// Multiply-accumulates (convolutions, matrix products, and the element-wise ops tract
    /// counts as one each).
    pub fma: u64,
    /// Divisions.
    pub div: u64,
}

impl GraphCost {
    /// FLOPs: two per multiply-accumulate, one per division.
    pub fn flops(&self) -> f64 {
        2.0 * self.fma as f64 + self.div as f64
    }
}

/// Sums tract's `TypedOp::cost` over every node of a typed model whose shapes are concrete.
pub fn graph_cost(model: &TypedModel) -> Result<GraphCost> {
    let mut total = GraphCost::default();
    for node in model.nodes() {
        let inputs = model.node_input_facts(node.id)?;
        for (cost, count) in node.op.cost(&inputs)? {
            let count = count
                .to_i64()
                .with_context(|| format!("node {} has a symbolic cost {count}", node.name))?;
            let count = u64::try_from(count).unwrap_or(0);
            match cost {
                Cost::FMA(_) => total.fma += count,
                Cost::Div(_) => total.div += count,
                _ => {}
            }
        }
    }
    Ok(total)
}

/// Cost of one image at `side` through the graph up to `output`.
pub fn model_cost(onnx: &[u8], output: &str, side: usize) -> Result<GraphCost> {
    let model = tract_onnx::onnx()
        .model_for_read(&mut &onnx[..])?
        .with_outputs_by_name([output])?
        .with_input_fact(0, f32::fact([1, 3, side, side]).into())?
        .into_typed()?
        .into_decluttered()?;
    graph_cost(&model)
}

/// The ONNX model with `output` as its only output and nothing that does not lead to it, so
/// that onnxruntime computes what tract computes after `with_outputs_by_name`.
pub fn keep_only_output(onnx: &[u8], output: &str) -> Result<Vec<u8>> {
    let mut model = ModelProto::decode(onnx).context("decoding the ONNX model")?;
    let graph = model
        .graph
        .as_mut()
        .context("the ONNX model has no graph")?;
    ensure!(
        graph.output.iter().any(|o| o.name == output),
        "the ONNX graph has no output {output:?}"
    );
    graph.output.retain(|o| o.name == output);
    let mut needed: std::collections::HashSet<String> = [output.to_string()].into();
    let mut keep = vec![false; graph.node.len()];
    // Nodes are topologically ordered: walking backwards reaches every producer of a
    // needed value after its consumers.
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(node.input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    let mut kept = keep.iter();
    graph
        .node
        .retain(|_| *kept.next().expect("one flag per node"));
    graph.initializer.retain(|t| needed.contains(&t.name));
    graph.value_info.retain(|v| needed.contains(&v.name));
    Ok(model.encode_to_vec())
}

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[derive(Deserialize)]
struct RunReply {
    secs: f64,
    images: usize,
}

/// A model-only engine of one case: how it runs one iteration.
enum Runner<'a> {
    Tract {
        expert: CommonExpert,
        input: &'a [f32],
    },
    /// The onnxruntime process (of [`OrtWorkers`]) loaded for this mode.
    Ort { worker: usize },
}

/// One onnxruntime process per mode, so that alternating modes needs no reload.
type OrtWorkers = [PythonWorker; 2];
const ORT_INTRA: usize = 0;
const ORT_DATA_PARALLEL: usize = 1;

struct Engine<'a> {
    engine: &'static str,
    mode: &'static str,
    runner: Runner<'a>,
    iters: usize,
    samples: Vec<f64>,
}

impl Engine<'_> {
    /// Runs `iters` iterations; returns (seconds, images).
    fn sample(&self, ort: &mut OrtWorkers, iters: usize) -> Result<(f64, usize)> {
        match &self.runner {
            Runner::Tract { expert, input } => {
                let started = Instant::now();
                let mut rows = 0;
                for _ in 0..iters {
                    rows += expert.embed_preprocessed(input)?.len() / expert.dim();
                }
                Ok((started.elapsed().as_secs_f64(), rows))
            }
            Runner::Ort { worker } => {
                let reply: RunReply =
                    ort[*worker].request(&json!({"op": "run", "iters": iters}))?;
                Ok((reply.secs, reply.images))
            }
        }
    }
}

/// Runs the sweep.
pub fn run(config: &EmbedBenchConfig, command: String) -> Result<EmbedBenchReport> {
    let started = Instant::now();
    ensure!(config.repeats > 0, "--repeats must be at least 1");
    for &side in &config.sides {
        ensure!(
            side > 0 && side % 32 == 0,
            "input side {side} does not divide by 32"
        );
    }
    ensure!(
        config.batches.iter().chain(&config.threads).all(|&v| v > 0),
        "batches and threads must be positive"
    );
    let onnx =
        fs::read(&config.model).with_context(|| format!("reading {}", config.model.display()))?;
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let ort_model = work.path().join("embedding-only.onnx");
    fs::write(&ort_model, keep_only_output(&onnx, OUTPUT)?)?;
    let mut ort: OrtWorkers = [
        PythonWorker::spawn(&config.python, &config.script, &[])?,
        PythonWorker::spawn(&config.python, &config.script, &[])?,
    ];
    let python: serde_json::Value = ort[ORT_INTRA].request(&json!({"op": "info"}))?;

    let mut cases = Vec::new();
    for &side in &config.sides {
        let cost = model_cost(&onnx, OUTPUT, side)?;
        for &batch in &config.batches {
            for &threads in &config.threads {
                eprintln!("ddome: embed bench, side {side}, batch {batch}, {threads} thread(s)");
                let case = measure_case(
                    config,
                    &mut ort,
                    &ort_model,
                    work.path(),
                    (side, batch, threads),
                    cost.flops(),
                )?;
                eprintln!("  {}", summary_line(&case));
                cases.push(case);
            }
        }
    }
    Ok(EmbedBenchReport {
        command,
        machine: crate::bench::machine_description(),
        python,
        config: config.clone(),
        cases,
        wall_secs: started.elapsed().as_secs_f64(),
    })
}

fn expert(
    config: &EmbedBenchConfig,
    side: usize,
    batch: usize,
    threads: usize,
    threading: Threading,
) -> Result<CommonExpert> {
    let mut c = CommonExpertConfig::efficientnet_lite0(config.model.clone(), side);
    c.batch = batch;
    c.threads = threads;
    c.threading = threading;
    Ok(CommonExpert::load(c)?)
}

fn synthetic_images(count: usize, side: usize, seed: u64) -> ImageSet {
    let shape = ImageShape::new(side, side, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ImageSet {
        images: (0..count * shape.size()).map(|_| rng.random()).collect(),
        labels: vec![0; count],
        shape,
        classes: vec!["synthetic".into()],
    }
}

fn measure_case(
    config: &EmbedBenchConfig,
    ort: &mut OrtWorkers,
    ort_model: &Path,
    work: &Path,
    (side, batch, threads): (usize, usize, usize),
    flops_per_image: f64,
) -> Result<EmbedCase> {
    let per_iter = batch * threads;
    let images = synthetic_images(per_iter, config.source_side, config.seed);
    let shipped = expert(config, side, batch, threads, Threading::default())?;
    let per_image = 3 * side * side;
    let mut input = vec![0.0f32; per_iter * per_image];
    for (i, out) in input.chunks_exact_mut(per_image).enumerate() {
        shipped.preprocess(images.image(i), images.shape, out);
    }

    // The same batch through both engines: the comparison is only fair if they agree.
    let input_path = work.join(format!("input-{side}-{batch}.f32"));
    let bytes: Vec<u8> = input[..batch * per_image]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    fs::write(&input_path, bytes)?;
    let load = |mode: &str| {
        json!({
            "op": "load", "model": ort_model, "input": input_path, "batch": batch,
            "side": side, "threads": threads, "mode": mode,
        })
    };
    let _: serde_json::Value = ort[ORT_INTRA].request(&load("intra"))?;
    if threads > 1 {
        let _: serde_json::Value = ort[ORT_DATA_PARALLEL].request(&load("data-parallel"))?;
    }
    let ort_out_path = work.join("ort-output.f32");
    let _: serde_json::Value =
        ort[ORT_INTRA].request(&json!({"op": "output", "path": ort_out_path}))?;
    let ort_out: Vec<f32> = fs::read(&ort_out_path)?
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("chunks of 4")))
        .collect();
    let tract_out = shipped.embed_preprocessed(&input[..batch * per_image])?;
    ensure!(
        ort_out.len() == tract_out.len(),
        "onnxruntime returned {} values, tract {}",
        ort_out.len(),
        tract_out.len()
    );
    let max_abs_diff = tract_out
        .iter()
        .zip(&ort_out)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    if !max_abs_diff.is_finite() || max_abs_diff > 1e-2 {
        bail!("tract and onnxruntime disagree on the same input: max |diff| {max_abs_diff}");
    }

    // Engines alternate between tract and onnxruntime within every repeat.
    let mut engines: Vec<Engine<'_>> = if threads == 1 {
        vec![
            Engine {
                engine: "tract",
                mode: "single",
                runner: Runner::Tract {
                    expert: expert(config, side, batch, 1, Threading::Workers)?,
                    input: &input,
                },
                iters: 1,
                samples: Vec::new(),
            },
            Engine {
                engine: "onnxruntime",
                mode: "single",
                runner: Runner::Ort { worker: ORT_INTRA },
                iters: 1,
                samples: Vec::new(),
            },
        ]
    } else {
        let mut list = Vec::new();
        for (threading, worker, label) in [
            (Threading::Workers, ORT_DATA_PARALLEL, "data-parallel"),
            (Threading::IntraOp, ORT_INTRA, "intra-op"),
        ] {
            list.push(Engine {
                engine: "tract",
                mode: label,
                runner: Runner::Tract {
                    expert: expert(config, side, batch, threads, threading)?,
                    input: &input,
                },
                iters: 1,
                samples: Vec::new(),
            });
            list.push(Engine {
                engine: "onnxruntime",
                mode: label,
                runner: Runner::Ort { worker },
                iters: 1,
                samples: Vec::new(),
            });
        }
        list
    };

    // Warm up and size the samples: one iteration each, after a first untimed one.
    for engine in &mut engines {
        engine.sample(ort, 1)?;
        let (secs, _) = engine.sample(ort, 1)?;
        engine.iters = ((config.min_sample_secs / secs.max(1e-6)).ceil() as usize).clamp(1, 10_000);
    }
    let mut preprocess = Vec::new();
    let mut embed = Vec::new();
    let mut scratch = vec![0.0f32; per_image];
    for _ in 0..config.repeats {
        for engine in &mut engines {
            let (secs, images) = engine.sample(ort, engine.iters)?;
            ensure!(
                images == engine.iters * per_iter,
                "{} {} embedded {images} images, expected {}",
                engine.engine,
                engine.mode,
                engine.iters * per_iter
            );
            engine.samples.push(1e3 * secs / images as f64);
        }
        let started = Instant::now();
        for i in 0..per_iter {
            shipped.preprocess(images.image(i), images.shape, &mut scratch);
        }
        preprocess.push(1e3 * started.elapsed().as_secs_f64() / per_iter as f64);
        let started = Instant::now();
        let rows = shipped.embed(&images)?;
        ensure!(
            rows.len() == per_iter * shipped.dim(),
            "embed returned {} values",
            rows.len()
        );
        embed.push(1e3 * started.elapsed().as_secs_f64() / per_iter as f64);
    }

    let engines: Vec<EngineTiming> = engines
        .into_iter()
        .map(|e| {
            let median_ms = median(&e.samples);
            EngineTiming {
                engine: e.engine.into(),
                mode: e.mode.into(),
                iters: e.iters,
                median_ms_per_image: median_ms,
                images_per_sec: 1e3 / median_ms,
                gflops: flops_per_image / (median_ms * 1e6),
                ms_per_image: e.samples,
            }
        })
        .collect();
    let best = |engine: &str| {
        engines
            .iter()
            .filter(|e| e.engine == engine)
            .map(|e| e.median_ms_per_image)
            .fold(f64::INFINITY, f64::min)
    };
    let find = |engine: &str, modes: &[&str]| {
        engines
            .iter()
            .find(|e| e.engine == engine && modes.contains(&e.mode.as_str()))
            .map_or(f64::NAN, |e| e.median_ms_per_image)
    };
    Ok(EmbedCase {
        side,
        batch,
        threads,
        flops_per_image,
        preprocess_ms_per_image: median(&preprocess),
        tract_embed_ms_per_image: median(&embed),
        ratio_best: best("tract") / best("onnxruntime"),
        ratio_default: find("tract", &["single", "data-parallel"])
            / find("onnxruntime", &["single", "intra-op"]),
        engines,
        max_abs_diff,
    })
}

fn summary_line(case: &EmbedCase) -> String {
    let mut line = String::new();
    for e in &case.engines {
        let _ = write!(
            line,
            "{} {}: {:.2} ms/img ({:.1} GFLOP/s); ",
            e.engine, e.mode, e.median_ms_per_image, e.gflops
        );
    }
    let _ = write!(
        line,
        "tract/ort {:.2} (best), {:.2} (defaults)",
        case.ratio_best, case.ratio_default
    );
    line
}

/// The markdown table: one row per case, milliseconds per image (median) and GFLOP/s.
pub fn markdown(report: &EmbedBenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Common expert: tract against onnxruntime\n");
    let _ = writeln!(out, "- command: `{}`", report.command);
    let _ = writeln!(out, "- machine: {}", report.machine);
    let _ = writeln!(out, "- Python side: {}", report.python);
    let _ = writeln!(
        out,
        "- model: {} (output `{OUTPUT}` only, for both engines); {} repeats, samples of at least {} s, engines alternating",
        report.config.model.display(),
        report.config.repeats,
        report.config.min_sample_secs
    );
    let _ = writeln!(
        out,
        "- model-only times in ms per image (median), an iteration being batch × threads images; GFLOP/s from tract's operator costs (2 per multiply-accumulate)\n"
    );
    let _ = writeln!(
        out,
        "| side | batch | threads | MFLOP/img | preprocess ms/img | tract embed ms/img | tract data-parallel | tract intra-op | ort data-parallel | ort intra-op | tract/ort best | tract/ort defaults | max abs diff |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for case in &report.cases {
        let cell = |engine: &str, modes: &[&str]| {
            case.engines
                .iter()
                .find(|e| e.engine == engine && modes.contains(&e.mode.as_str()))
                .map_or("–".to_string(), |e| {
                    format!("{:.2} ({:.1})", e.median_ms_per_image, e.gflops)
                })
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {:.3} | {:.2} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1e} |",
            case.side,
            case.batch,
            case.threads,
            case.flops_per_image / 1e6,
            case.preprocess_ms_per_image,
            case.tract_embed_ms_per_image,
            cell("tract", &["single", "data-parallel"]),
            cell("tract", &["intra-op"]),
            cell("onnxruntime", &["data-parallel"]),
            cell("onnxruntime", &["single", "intra-op"]),
            case.ratio_best,
            case.ratio_default,
            case.max_abs_diff
        );
    }
    let _ = writeln!(
        out,
        "\nCells: ms per image (GFLOP/s). With one thread both modes are the same run, shown under data-parallel (tract) and intra-op (ort). Ratios above 1: tract is slower. \"defaults\": tract as shipped (data-parallel workers) against one onnxruntime session with T intra-op threads."
    );
    out
}

#[cfg(test)]
mod tests {
    use tract_onnx::pb::attribute_proto::AttributeType;
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
    use tract_onnx::pb::type_proto::{self, Tensor as TensorType};
    use tract_onnx::pb::{
        AttributeProto, GraphProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
        TypeProto, ValueInfoProto,
    };

    use super::*;

    fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(TensorType {
                    elem_type: DataType::Float as i32,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                value: Some(dimension::Value::DimValue(d)),
                                ..Dimension::default()
                            })
                            .collect(),
                    }),
                })),
                ..TypeProto::default()
            }),
            ..ValueInfoProto::default()
        }
    }

    fn constant(name: &str, dims: &[i64]) -> TensorProto {
        let len: i64 = dims.iter().product();
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            float_data: vec![0.5; len as usize],
            ..TensorProto::default()
        }
    }

    fn ints(name: &str, values: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: values.to_vec(),
            ..AttributeProto::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            name: output.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..NodeProto::default()
        }
    }

    /// input [1, 3, S, S] -> 3x3 conv to 8 channels (padding 1) -> global average pool ->
    /// flatten = "embedding" [1, 8]; "logits" = embedding x [8, 4].
    fn tiny_model(side: i64) -> Vec<u8> {
        ModelProto {
            ir_version: 7,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                name: "tiny".into(),
                node: vec![
                    node(
                        "Conv",
                        &["input", "w", "b"],
                        "conv",
                        vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])],
                    ),
                    node("GlobalAveragePool", &["conv"], "pool", vec![]),
                    node("Flatten", &["pool"], "embedding", vec![]),
                    node("MatMul", &["embedding", "fc"], "logits", vec![]),
                ],
                initializer: vec![
                    constant("w", &[8, 3, 3, 3]),
                    constant("b", &[8]),
                    constant("fc", &[8, 4]),
                ],
                input: vec![value_info("input", &[1, 3, side, side])],
                output: vec![
                    value_info("embedding", &[1, 8]),
                    value_info("logits", &[1, 4]),
                ],
                ..GraphProto::default()
            }),
            ..ModelProto::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn the_cost_of_a_conv_is_its_multiply_accumulates() {
        let side = 8;
        let cost = model_cost(&tiny_model(side as i64), "embedding", side).unwrap();
        // Every output pixel of every output channel: 3 input channels x 3 x 3 taps.
        let conv = (side * side * 8 * 3 * 9) as u64;
        // The conv dominates; bias and pooling add at most one operation per element.
        let per_element_ops = (side * side * 8) as u64 * 2;
        assert!(
            cost.fma >= conv && cost.fma <= conv + per_element_ops,
            "{cost:?}, conv alone {conv}"
        );
        let logits = model_cost(&tiny_model(side as i64), "logits", side).unwrap();
        assert!(logits.fma >= cost.fma + 8 * 4, "{logits:?} vs {cost:?}");
    }

    #[test]
    fn keeping_one_output_drops_what_only_the_other_needs() {
        let pruned = keep_only_output(&tiny_model(8), "embedding").unwrap();
        let model = ModelProto::decode(&pruned[..]).unwrap();
        let graph = model.graph.unwrap();
        let outputs: Vec<_> = graph.output.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(outputs, ["embedding"]);
        let ops: Vec<_> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Conv", "GlobalAveragePool", "Flatten"]);
        let names: Vec<_> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w", "b"]);
        // tract still loads it and computes the same cost as for the full graph.
        assert_eq!(
            model_cost(&pruned, "embedding", 8).unwrap(),
            model_cost(&tiny_model(8), "embedding", 8).unwrap()
        );
        assert!(keep_only_output(&tiny_model(8), "features").is_err());
    }

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
