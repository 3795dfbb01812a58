//! `ddome bench train`: local training of one expert with burn (ndarray backend, as
//! shipped) against PyTorch on the CPU, at the same batch size, thread count, architecture
//! and optimiser (SGD, momentum, no dampening).
//!
//! Two things are timed per (expert, threads), alternating burn and PyTorch runs:
//! - `step`: forward, backward and optimiser step on one ready batch: the engines alone;
//! - the training loop: burn's real [`train_local`] (parameters loaded, batches gathered and
//!   normalised from the device's samples, the loss read back each step) against the same
//!   loop in PyTorch (index a shuffled order, normalise, step, read the loss), so the cost
//!   of building batches shows next to the step's.
//!
//! Before timing, both engines start from the same parameters on the same batch and their
//! first losses are compared: a mismatch means the two are not training the same model.
//!
//! Each thread count runs in a process of its own (`ddome bench train-worker`): the
//! ndarray backend's thread pools (rayon's, matrixmultiply's) are sized once per process
//! from `RAYON_NUM_THREADS` and `MATMUL_NUM_THREADS`; PyTorch gets `set_num_threads`.
//! FLOPs per step are counted analytically: forward multiply-accumulates, again for the
//! weight gradients and again for the input gradients (except the first layer's), two
//! FLOPs each.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Int, Tensor};
use ddome_datasets::{ImageSet, ImageShape};
use ddome_models::{
    BackendChoice, Device, Expert, ExpertInput, ExpertKind, Features, ModelSpec, PixelShape,
    Received, Role, TrainConfig, cross_entropy, params, train_local,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::embed_bench::median;
use crate::python_worker::PythonWorker;

/// Width of the common-expert embedding a `head` expert reads.
const EMBEDDING_DIM: usize = 1280;
/// Steps whose losses are compared between the engines.
const CHECK_STEPS: usize = 3;

/// Which expert, on which input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TrainCase {
    /// The `head` MLP (1280 → hidden → classes) over embeddings.
    Head,
    /// The `cnn` expert over 28×28 grey pixels (Fashion-MNIST).
    CnnGrey28,
    /// The `cnn` expert over 32×32 RGB pixels (CIFAR-10).
    CnnRgb32,
}

impl TrainCase {
    fn name(self) -> &'static str {
        match self {
            TrainCase::Head => "head",
            TrainCase::CnnGrey28 => "cnn-grey28",
            TrainCase::CnnRgb32 => "cnn-rgb32",
        }
    }

    fn pixels(self) -> Option<PixelShape> {
        let (channels, side) = match self {
            TrainCase::Head => return None,
            TrainCase::CnnGrey28 => (1, 28),
            TrainCase::CnnRgb32 => (3, 32),
        };
        Some(PixelShape {
            channels,
            height: side,
            width: side,
        })
    }
}

/// `ddome bench train`'s flags (here rather than in main.rs, which other benches share).
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Experts to bench, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "head,cnn-grey28,cnn-rgb32"
    )]
    cases: Vec<TrainCase>,
    /// Thread counts, comma-separated; each runs in its own pair of processes.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Mini-batch size (the paper's: 256).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Samples the training loop draws its batches from (one epoch of `train_local`).
    #[arg(long, default_value_t = 2048)]
    samples: usize,
    /// Hidden width of the `head` expert.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Channels of the `cnn` expert's first stage.
    #[arg(long, default_value_t = 16)]
    cnn_width: usize,
    /// Classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Timed samples per engine; medians are reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Shortest sample, seconds: steps are repeated until a sample lasts this long.
    #[arg(long, default_value_t = 0.5)]
    min_sample_secs: f64,
    /// Seed of the synthetic data and the initial parameters.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// burn's CPU backend: ndarray (shipped) or flex (its successor; build with
    /// `--features flex`).
    #[arg(long, default_value_t = BackendChoice::Ndarray)]
    backend: BackendChoice,
    /// Python with torch (scripts/bench/setup-python.sh installs it).
    #[arg(long, default_value = crate::python_worker::DEFAULT_PYTHON)]
    python: PathBuf,
    /// The PyTorch side.
    #[arg(long, default_value = "scripts/bench/torch_train.py")]
    script: PathBuf,
    /// Output directory for results.json and table.md.
    #[arg(long, default_value = "runs/bench-train")]
    out: PathBuf,
}

/// The flags of the per-thread-count worker process `ddome bench train` starts.
#[derive(Debug, clap::Args)]
pub struct TrainWorkerArgs {
    /// The bench's configuration, JSON.
    #[arg(long)]
    config: PathBuf,
    /// The thread count this process measures.
    #[arg(long)]
    threads: usize,
    /// Where to write this thread count's results, JSON.
    #[arg(long)]
    out: PathBuf,
}

/// What to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainBenchConfig {
    /// Experts.
    pub cases: Vec<TrainCase>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Mini-batch size.
    pub batch: usize,
    /// Samples of the training loop.
    pub samples: usize,
    /// `head` hidden width.
    pub hidden: usize,
    /// `cnn` first-stage channels.
    pub cnn_width: usize,
    /// Classes.
    pub classes: usize,
    /// Learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Timed samples per engine.
    pub repeats: usize,
    /// Shortest sample, seconds.
    pub min_sample_secs: f64,
    /// Seed.
    pub seed: u64,
    /// burn's backend.
    #[serde(default)]
    pub backend: BackendChoice,
    /// Python with torch.
    pub python: PathBuf,
    /// `scripts/bench/torch_train.py`.
    pub script: PathBuf,
}

/// One engine on one path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepTiming {
    /// `burn` or `torch`.
    pub engine: String,
    /// `step` (ready batch) or `loop` (batches built from the samples).
    pub path: String,
    /// Steps per timed sample.
    pub steps: usize,
    /// Milliseconds per step, one value per repeat.
    pub ms_per_step: Vec<f64>,
    /// Their median.
    pub median_ms_per_step: f64,
    /// Steps per second at the median.
    pub steps_per_sec: f64,
    /// Analytic FLOPs per step × steps per second, GFLOP/s.
    pub gflops: f64,
}

/// Everything measured for one expert at one thread count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainCaseResult {
    /// The expert.
    pub case: TrainCase,
    /// Threads.
    pub threads: usize,
    /// Analytic FLOPs of one step (forward, backward, no optimiser).
    pub flops_per_step: f64,
    /// Parameters of the expert.
    pub parameters: usize,
    /// Timings, in the order they ran.
    pub engines: Vec<StepTiming>,
    /// burn's step over PyTorch's (median times; above 1: burn is slower).
    pub ratio_step: f64,
    /// burn's `train_local` over PyTorch's loop.
    pub ratio_loop: f64,
    /// burn's losses of the first steps from the shared parameters on the shared batch.
    pub burn_losses: Vec<f32>,
    /// PyTorch's.
    pub torch_losses: Vec<f32>,
}

/// One worker's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainThreadsResult {
    /// Threads.
    pub threads: usize,
    /// torch, numpy and Python versions as the script reports them.
    pub torch: serde_json::Value,
    /// The thread-pool variables the burn process ran with.
    pub env: Vec<(String, String)>,
    /// One per case.
    pub cases: Vec<TrainCaseResult>,
}

/// What `ddome bench train` writes to `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainBenchReport {
    /// The command line.
    pub command: String,
    /// The machine.
    pub machine: String,
    /// The configuration.
    pub config: TrainBenchConfig,
    /// One per thread count.
    pub runs: Vec<TrainThreadsResult>,
    /// Total wall time, seconds.
    pub wall_secs: f64,
}

/// The environment that sizes every CPU thread pool of both engines to `threads`.
fn thread_env(threads: usize) -> Vec<(&'static str, String)> {
    [
        "RAYON_NUM_THREADS",
        "MATMUL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
    ]
    .into_iter()
    .map(|k| (k, threads.to_string()))
    .collect()
}

/// Runs `ddome bench train` and writes its results.
pub fn command(args: TrainArgs, command_line: String) -> Result<()> {
    let config = TrainBenchConfig {
        cases: args.cases,
        threads: args.threads,
        batch: args.batch,
        samples: args.samples,
        hidden: args.hidden,
        cnn_width: args.cnn_width,
        classes: args.classes,
        lr: args.lr,
        momentum: args.momentum,
        repeats: args.repeats,
        min_sample_secs: args.min_sample_secs,
        seed: args.seed,
        backend: args.backend,
        python: args.python,
        script: args.script,
    };
    let exe = std::env::current_exe().context("locating the ddome binary")?;
    let report = run(&config, &exe, command_line)?;
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )
    .with_context(|| format!("writing {}/results.json", args.out.display()))?;
    let table = markdown(&report);
    fs::write(args.out.join("table.md"), &table)
        .with_context(|| format!("writing {}/table.md", args.out.display()))?;
    println!("{table}");
    println!("results written to {}", args.out.display());
    Ok(())
}

/// Runs the worker of one thread count (`ddome bench train-worker`).
pub fn worker_command(args: TrainWorkerArgs) -> Result<()> {
    let config: TrainBenchConfig = serde_json::from_slice(
        &fs::read(&args.config).with_context(|| format!("reading {}", args.config.display()))?,
    )?;
    let result = run_threads(&config, args.threads)?;
    fs::write(&args.out, serde_json::to_vec(&result)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

/// Runs every thread count in a worker process started from `exe` (the `ddome` binary).
pub fn run(config: &TrainBenchConfig, exe: &Path, command: String) -> Result<TrainBenchReport> {
    let started = Instant::now();
    ensure!(
        config.repeats > 0 && config.batch > 0 && config.samples >= config.batch,
        "need at least one repeat, a positive batch and at least one batch of samples"
    );
    ensure!(
        config.threads.iter().all(|&t| t > 0),
        "threads must be positive"
    );
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let config_path = work.path().join("config.json");
    fs::write(&config_path, serde_json::to_vec(config)?)?;
    let mut runs = Vec::new();
    for &threads in &config.threads {
        let out = work.path().join(format!("threads-{threads}.json"));
        let status = Command::new(exe)
            .args(["bench", "train-worker", "--threads", &threads.to_string()])
            .arg("--config")
            .arg(&config_path)
            .arg("--out")
            .arg(&out)
            .envs(thread_env(threads))
            .status()
            .with_context(|| format!("starting {} bench train-worker", exe.display()))?;
        if !status.success() {
            bail!("the {threads}-thread train worker failed ({status})");
        }
        runs.push(serde_json::from_slice(&fs::read(&out)?)?);
    }
    Ok(TrainBenchReport {
        command,
        machine: crate::bench::machine_description(),
        config: config.clone(),
        runs,
        wall_secs: started.elapsed().as_secs_f64(),
    })
}

/// Every case at one thread count, in this process (whose pools the environment sized).
pub fn run_threads(config: &TrainBenchConfig, threads: usize) -> Result<TrainThreadsResult> {
    let env: Vec<(String, String)> = thread_env(threads)
        .into_iter()
        .map(|(k, _)| (k.to_string(), std::env::var(k).unwrap_or_default()))
        .collect();
    if env.iter().take(2).any(|(_, v)| v != &threads.to_string()) {
        bail!("run through `ddome bench train`, which sizes the thread pools ({env:?})");
    }
    let mut torch = PythonWorker::spawn(&config.python, &config.script, &thread_env(threads))?;
    let info: serde_json::Value = torch.request(&json!({"op": "info"}))?;
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let mut cases = Vec::new();
    for &case in &config.cases {
        eprintln!(
            "ddome: train bench, {} expert, {threads} thread(s)",
            case.name()
        );
        let result = measure_case(config, case, threads, &mut torch, work.path())?;
        eprintln!("  {}", summary_line(&result));
        cases.push(result);
    }
    Ok(TrainThreadsResult {
        threads,
        torch: info,
        env,
        cases,
    })
}

fn spec(config: &TrainBenchConfig, case: TrainCase) -> ModelSpec {
    ModelSpec {
        embedding_dim: EMBEDDING_DIM,
        classes: config.classes,
        experts: 1,
        gate_hidden: config.hidden,
        expert: match case {
            TrainCase::Head => ExpertKind::Head {
                hidden: config.hidden,
            },
            _ => ExpertKind::Cnn {
                width: config.cnn_width,
                stem_stride: 1,
            },
        },
        pixels: case.pixels(),
    }
}

/// Multiply-accumulates of one sample's forward pass: (first layer, all layers).
fn forward_macs(config: &TrainBenchConfig, case: TrainCase) -> (f64, f64) {
    match case.pixels() {
        None => {
            let first = (EMBEDDING_DIM * config.hidden) as f64;
            (first, first + (config.hidden * config.classes) as f64)
        }
        Some(p) => {
            let w = config.cnn_width;
            let full = (p.height * p.width) as f64;
            let half = (p.height.div_ceil(2) * p.width.div_ceil(2)) as f64;
            let conv = |area: f64, cin: usize, cout: usize| area * (cin * cout * 9) as f64;
            let stem = conv(full, p.channels, w);
            let rest = 2.0 * conv(full, w, w)
                + conv(half, w, 2 * w)
                + 2.0 * conv(half, 2 * w, 2 * w)
                + (2 * w * config.classes) as f64;
            (stem, stem + rest)
        }
    }
}

/// Analytic FLOPs of one training step of `batch` samples.
pub fn step_flops(config: &TrainBenchConfig, case: TrainCase) -> f64 {
    let (first, all) = forward_macs(config, case);
    // Forward, weight gradients, input gradients (none into the data).
    2.0 * config.batch as f64 * (3.0 * all - first)
}

/// The device's samples: random embeddings, labels and (for `cnn`) pixels.
fn synthetic_features(config: &TrainBenchConfig, case: TrainCase) -> Features {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let n = config.samples;
    let pixels = case.pixels().unwrap_or(PixelShape {
        channels: 1,
        height: 1,
        width: 1,
    });
    let shape = ImageShape::new(pixels.height, pixels.width, pixels.channels);
    let set = ImageSet {
        images: (0..n * shape.size()).map(|_| rng.random()).collect(),
        labels: (0..n)
            .map(|_| rng.random_range(0..config.classes as u16))
            .collect(),
        shape,
        classes: (0..config.classes).map(|c| c.to_string()).collect(),
    };
    // Post-ReLU6 averages, as the common expert's embeddings are: non-negative, small.
    let embeddings = (0..n * EMBEDDING_DIM)
        .map(|_| rng.random_range(0.0..2.0f32))
        .collect();
    Features::from_image_set(set, embeddings, EMBEDDING_DIM, case.pixels().is_some())
}

fn sgd(config: &TrainBenchConfig) -> ModuleOptimizer {
    // What train_local builds (models/src/train.rs): the loss check below would catch a
    // difference in the step, the timing of train_local itself uses the real one.
    SgdConfig::new()
        .with_momentum(Some(
            MomentumConfig::new()
                .with_momentum(config.momentum)
                .with_dampening(0.0),
        ))
        .init()
}

/// burn on one ready batch.
struct BurnSteps {
    expert: Option<Expert>,
    optim: ModuleOptimizer,
    input: ExpertInput,
    labels: Tensor<1, Int>,
    lr: f64,
}

impl BurnSteps {
    fn new(
        config: &TrainBenchConfig,
        spec: &ModelSpec,
        initial: &[f32],
        input: ExpertInput,
        labels: Tensor<1, Int>,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            expert: Some(params::load(spec.expert(device), initial, "expert")?),
            optim: sgd(config),
            input,
            labels,
            lr: config.lr,
        })
    }

    /// One step; the loss before it when `read_loss`.
    fn step(&mut self, read_loss: bool) -> Option<f32> {
        let expert = self
            .expert
            .take()
            .expect("the expert is put back after every step");
        let loss = cross_entropy(expert.forward(&self.input), &self.labels);
        let value = read_loss.then(|| loss.clone().into_scalar::<f32>());
        let mut grads = loss.backward();
        let grads = GradientsParams::from_module(&mut grads, &expert);
        self.expert = Some(self.optim.step(self.lr, expert, grads));
        value
    }
}

fn write_f32(path: &Path, values: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn write_i64(path: &Path, values: &[i64]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

#[derive(Deserialize)]
struct Secs {
    secs: f64,
}

#[derive(Deserialize)]
struct Losses {
    losses: Vec<f32>,
}

/// A timed path: how it runs `n` units and how many steps a unit is.
struct Timed<'a> {
    engine: &'static str,
    path: &'static str,
    steps_per_unit: usize,
    units: usize,
    samples: Vec<f64>,
    run: Box<dyn FnMut(usize) -> Result<f64> + 'a>,
}

fn measure_case(
    config: &TrainBenchConfig,
    case: TrainCase,
    threads: usize,
    torch: &mut PythonWorker,
    work: &Path,
) -> Result<TrainCaseResult> {
    let device = ddome_models::device(config.backend)?.autodiff();
    let spec = spec(config, case);
    let initial = params::init(&spec.expert(&device), config.seed);
    let data = synthetic_features(config, case);
    let first: Vec<usize> = (0..config.batch).collect();
    let (input, labels) = data.batch(&first, &device);

    // The very batch burn trains on, for PyTorch.
    let batch_values = match &input.pixels {
        Some(pixels) => pixels.clone().into_data(),
        None => input.embeddings.clone().into_data(),
    }
    .convert::<f32>();
    let batch_labels = labels.clone().into_data().convert::<i64>();
    let path = |name: &str| work.join(format!("{}-{name}", case.name()));
    write_f32(&path("params.f32"), &initial)?;
    write_f32(
        &path("batch.f32"),
        batch_values.as_slice::<f32>().expect("converted to f32"),
    )?;
    write_i64(
        &path("batch-labels.i64"),
        batch_labels.as_slice::<i64>().expect("converted to i64"),
    )?;
    let labels_all: Vec<i64> = data.labels.iter().map(|&l| l as i64).collect();
    write_i64(&path("labels.i64"), &labels_all)?;
    let (mean, std) = match &data.pixels {
        Some(p) => {
            fs::write(path("data.u8"), &p.values)?;
            (p.mean.to_vec(), p.std.to_vec())
        }
        None => {
            write_f32(&path("data.f32"), &data.embeddings)?;
            (vec![], vec![])
        }
    };
    let pixels = case.pixels();
    let setup: serde_json::Value = torch.request(&json!({
        "op": "setup", "threads": threads, "expert": if pixels.is_some() { "cnn" } else { "head" },
        "classes": config.classes, "embedding_dim": EMBEDDING_DIM, "hidden": config.hidden,
        "channels": pixels.map(|p| p.channels), "height": pixels.map(|p| p.height),
        "width": pixels.map(|p| p.width), "cnn_width": config.cnn_width,
        "batch": config.batch, "lr": config.lr, "momentum": config.momentum,
        "params": path("params.f32"), "batch_input": path("batch.f32"),
        "batch_labels": path("batch-labels.i64"), "samples": config.samples,
        "data": if pixels.is_some() { path("data.u8") } else { path("data.f32") },
        "labels": path("labels.i64"), "mean": mean, "std": std, "seed": config.seed,
    }))?;
    ensure!(
        setup["threads"] == threads,
        "torch runs {} threads, asked for {threads}",
        setup["threads"]
    );

    // Same start, same batch: the first losses must agree (float rounding aside).
    let mut check = BurnSteps::new(
        config,
        &spec,
        &initial,
        input.clone(),
        labels.clone(),
        &device,
    )?;
    let burn_losses: Vec<f32> = (0..CHECK_STEPS)
        .map(|_| check.step(true).expect("asked for the loss"))
        .collect();
    let torch_losses = torch
        .request::<Losses>(&json!({"op": "check", "steps": CHECK_STEPS}))?
        .losses;
    for (b, t) in burn_losses.iter().zip(&torch_losses) {
        if !b.is_finite() || (b - t).abs() > 1e-3 * t.abs().max(1.0) {
            bail!(
                "burn and torch train differently: losses {burn_losses:?} against {torch_losses:?}"
            );
        }
    }

    let train_config = TrainConfig {
        epochs: 1,
        batch_size: config.batch,
        expert_lr: config.lr,
        gate_lr: config.lr,
        momentum: config.momentum,
        prox_mu: 0.0,
        normals_train_gate: true,
    };
    let indices: Vec<usize> = (0..config.samples).collect();
    let loop_steps = config.samples.div_ceil(config.batch);
    let mut burn_steps = BurnSteps::new(config, &spec, &initial, input, labels, &device)?;
    let torch = std::cell::RefCell::new(torch);
    let mut call = 0u64;
    let mut paths: Vec<Timed<'_>> = vec![
        Timed {
            engine: "burn",
            path: "step",
            steps_per_unit: 1,
            units: 1,
            samples: Vec::new(),
            run: Box::new(|n| {
                let started = Instant::now();
                for _ in 0..n {
                    burn_steps.step(false);
                }
                Ok(started.elapsed().as_secs_f64())
            }),
        },
        Timed {
            engine: "torch",
            path: "step",
            steps_per_unit: 1,
            units: 1,
            samples: Vec::new(),
            run: Box::new(|n| {
                Ok(torch
                    .borrow_mut()
                    .request::<Secs>(&json!({"op": "step", "steps": n}))?
                    .secs)
            }),
        },
        Timed {
            engine: "burn",
            path: "loop",
            steps_per_unit: loop_steps,
            units: 1,
            samples: Vec::new(),
            run: Box::new(|n| {
                let started = Instant::now();
                for _ in 0..n {
                    call += 1;
                    train_local(
                        &spec,
                        Received {
                            gate: None,
                            experts: &[&initial],
                        },
                        &Role::Single,
                        &data,
                        &indices,
                        &train_config,
                        config.seed + call,
                        &device,
                    )?;
                }
                Ok(started.elapsed().as_secs_f64())
            }),
        },
        Timed {
            engine: "torch",
            path: "loop",
            steps_per_unit: loop_steps,
            units: 1,
            samples: Vec::new(),
            run: Box::new(|n| {
                Ok(torch
                    .borrow_mut()
                    .request::<Secs>(&json!({"op": "epoch", "steps": n * loop_steps}))?
                    .secs)
            }),
        },
    ];
    // One untimed unit, then one timed to size the samples.
    for p in &mut paths {
        (p.run)(1)?;
        let secs = (p.run)(1)?;
        p.units = ((config.min_sample_secs / secs.max(1e-6)).ceil() as usize).clamp(1, 100_000);
    }
    for _ in 0..config.repeats {
        for p in &mut paths {
            let secs = (p.run)(p.units)?;
            p.samples
                .push(1e3 * secs / (p.units * p.steps_per_unit) as f64);
        }
    }

    let flops_per_step = step_flops(config, case);
    let engines: Vec<StepTiming> = paths
        .into_iter()
        .map(|p| {
            let ms = median(&p.samples);
            StepTiming {
                engine: p.engine.into(),
                path: p.path.into(),
                steps: p.units * p.steps_per_unit,
                median_ms_per_step: ms,
                steps_per_sec: 1e3 / ms,
                gflops: flops_per_step / (ms * 1e6),
                ms_per_step: p.samples,
            }
        })
        .collect();
    let find = |engine: &str, path: &str| {
        engines
            .iter()
            .find(|e| e.engine == engine && e.path == path)
            .map_or(f64::NAN, |e| e.median_ms_per_step)
    };
    Ok(TrainCaseResult {
        case,
        threads,
        flops_per_step,
        parameters: initial.len(),
        ratio_step: find("burn", "step") / find("torch", "step"),
        ratio_loop: find("burn", "loop") / find("torch", "loop"),
        engines,
        burn_losses,
        torch_losses,
    })
}

fn summary_line(case: &TrainCaseResult) -> String {
    let mut line = String::new();
    for e in &case.engines {
        let _ = write!(
            line,
            "{} {}: {:.2} ms/step ({:.1} GFLOP/s); ",
            e.engine, e.path, e.median_ms_per_step, e.gflops
        );
    }
    let _ = write!(
        line,
        "burn/torch {:.2} (step), {:.2} (loop)",
        case.ratio_step, case.ratio_loop
    );
    line
}

/// The markdown table: one row per (expert, threads).
pub fn markdown(report: &TrainBenchReport) -> String {
    let c = &report.config;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Local training: burn ({}) against PyTorch (CPU)\n",
        c.backend
    );
    let _ = writeln!(out, "- command: `{}`", report.command);
    let _ = writeln!(out, "- machine: {}", report.machine);
    if let Some(run) = report.runs.first() {
        let _ = writeln!(out, "- PyTorch side: {}", run.torch);
    }
    let _ = writeln!(
        out,
        "- batch {}, SGD lr {} momentum {}, `head` hidden {}, `cnn` width {}, {} classes; loop = one epoch of {} samples; {} repeats of at least {} s, engines alternating",
        c.batch,
        c.lr,
        c.momentum,
        c.hidden,
        c.cnn_width,
        c.classes,
        c.samples,
        c.repeats,
        c.min_sample_secs
    );
    let _ = writeln!(
        out,
        "- ms per step (median) and GFLOP/s from an analytic count (forward, weight and input gradients)\n"
    );
    let _ = writeln!(
        out,
        "| expert | threads | GFLOP/step | burn step | torch step | burn/torch step | burn train_local | torch loop | burn/torch loop | first loss burn / torch |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for run in &report.runs {
        for case in &run.cases {
            let cell = |engine: &str, path: &str| {
                case.engines
                    .iter()
                    .find(|e| e.engine == engine && e.path == path)
                    .map_or("–".to_string(), |e| {
                        format!("{:.2} ({:.1})", e.median_ms_per_step, e.gflops)
                    })
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {} | {} | {:.2} | {} | {} | {:.2} | {:.4} / {:.4} |",
                case.case.name(),
                case.threads,
                case.flops_per_step / 1e9,
                cell("burn", "step"),
                cell("torch", "step"),
                case.ratio_step,
                cell("burn", "loop"),
                cell("torch", "loop"),
                case.ratio_loop,
                case.burn_losses.first().copied().unwrap_or(f32::NAN),
                case.torch_losses.first().copied().unwrap_or(f32::NAN),
            );
        }
    }
    let _ = writeln!(
        out,
        "\nCells: ms per step (GFLOP/s). Ratios above 1: burn is slower."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddome_models::cpu_device;

    fn config() -> TrainBenchConfig {
        TrainBenchConfig {
            cases: vec![TrainCase::Head],
            threads: vec![1],
            batch: 2,
            samples: 4,
            hidden: 3,
            cnn_width: 2,
            classes: 5,
            lr: 0.01,
            momentum: 0.9,
            repeats: 1,
            min_sample_secs: 0.0,
            seed: 0,
            backend: BackendChoice::Ndarray,
            python: DEFAULT_PYTHON_PATH.into(),
            script: "scripts/bench/torch_train.py".into(),
        }
    }

    const DEFAULT_PYTHON_PATH: &str = crate::python_worker::DEFAULT_PYTHON;

    #[test]
    fn head_flops_count_both_layers_and_skip_the_input_gradient() {
        let c = config();
        // Forward: 1280 x 3 + 3 x 5 per sample; the first layer's input gradient is not
        // needed, so 3 x forward - first layer.
        let forward = 1280.0 * 3.0 + 15.0;
        let expected = 2.0 * 2.0 * (3.0 * forward - 1280.0 * 3.0);
        assert_eq!(step_flops(&c, TrainCase::Head), expected);
    }

    #[test]
    fn cnn_flops_count_every_conv_at_its_resolution() {
        let c = config();
        // 28x28 grey, width 2: stem 1->2, two 2->2 at 28x28, down 2->4 and two 4->4 at
        // 14x14, linear 4 -> 5.
        let full = 28.0 * 28.0;
        let half = 14.0 * 14.0;
        let stem = full * 2.0 * 9.0;
        let forward =
            stem + 2.0 * full * 4.0 * 9.0 + half * 8.0 * 9.0 + 2.0 * half * 16.0 * 9.0 + 20.0;
        let expected = 2.0 * 2.0 * (3.0 * forward - stem);
        assert_eq!(step_flops(&c, TrainCase::CnnGrey28), expected);
    }

    #[test]
    fn the_expert_benched_is_the_one_models_builds() {
        let c = config();
        let device = cpu_device();
        for case in [TrainCase::Head, TrainCase::CnnGrey28, TrainCase::CnnRgb32] {
            let spec = spec(&c, case);
            let n = params::flatten(&spec.expert(&device)).len();
            let expected = match case.pixels() {
                None => 1280 * 3 + 3 + 3 * 5 + 5,
                Some(p) => {
                    let conv = |cin: usize, cout: usize| cin * cout * 9 + cout;
                    conv(p.channels, 2) + 2 * conv(2, 2) + conv(2, 4) + 2 * conv(4, 4) + 4 * 5 + 5
                }
            };
            assert_eq!(n, expected, "{}", case.name());
        }
    }
}
