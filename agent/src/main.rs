//! `ddome-agent`: the edge binary.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ddome_agent::{
    AgentConfig, DeviceModel, EmbedConfig, LocalData, embed_batch, image_files, personalize, run,
    save_bundle,
};
use ddome_datasets::{PartitionConfig, Skew};
use ddome_models::BackendChoice;
use ddome_protocol::message::CommonExpertRef;

/// mimalloc keeps freed training buffers for the next step; glibc's malloc unmaps and
/// faults them back in, which made `cnn` steps 1.3× slower (`ddome bench train`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ddome-agent", version, about = "ddome edge agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the federation: train when selected, until the coordinator's rounds are done.
    Run(RunArgs),
    /// Personalise this device without labels: fetch the coordinator's gate, rank the experts
    /// on the local unlabelled data, and store the bundle of the top K (its hash verified).
    Personalize(PersonalizeArgs),
    /// Predict images on the device, offline, with a stored bundle: the common expert, the
    /// gate and the bundle's experts.
    Predict(PredictArgs),
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Where local training runs: ndarray (the CPU), flex (the CPU, burn's newer backend;
    /// builds with `--features flex`) or wgpu (a GPU through Vulkan, Metal or GL; builds
    /// with `--features wgpu`).
    #[arg(long, default_value_t = BackendChoice::Ndarray)]
    backend: BackendChoice,
    /// With `--backend wgpu`, fail when no adapter starts instead of training on the CPU.
    #[arg(long)]
    no_fallback: bool,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    embed: EmbedArgs,
}

/// Who this device is and where its coordinator listens.
#[derive(Args)]
struct ConnectArgs {
    /// The coordinator's QUIC address, host:port.
    #[arg(long)]
    coordinator: SocketAddr,
    /// SHA-256 fingerprint of the coordinator's certificate (printed by `ddome-coordinator init`).
    #[arg(long)]
    fingerprint: String,
    /// The name this device was enrolled under.
    #[arg(long)]
    device: String,
    /// File holding the credential from `ddome-coordinator enroll` (or set DDOME_CREDENTIAL;
    /// never pass secrets as arguments, other users can read them).
    #[arg(long)]
    credential_file: Option<PathBuf>,
}

/// The common expert and its cache.
#[derive(Args)]
struct EmbedArgs {
    /// The common expert (ONNX).
    #[arg(long, default_value = ".cache/models/efficientnet-lite0.onnx")]
    model: PathBuf,
    /// Side of the common expert's square input.
    #[arg(long, default_value_t = 64)]
    input_side: usize,
    /// Where embeddings are cached.
    #[arg(long, default_value = ".cache/embeddings")]
    cache_dir: PathBuf,
}

/// Local data: a directory of class folders, or one device of a partitioned dataset.
#[derive(Args)]
struct DataArgs {
    /// An ImageFolder directory: one subdirectory of images per class.
    #[arg(long, conflicts_with = "dataset")]
    data: Option<PathBuf>,
    /// A dataset (CIFAR-10 binary, ImageFolder split, Fashion-MNIST IDX) partitioned as
    /// `ddome simulate` does; this device takes `--device-index`.
    #[arg(long, requires = "device_index")]
    dataset: Option<PathBuf>,
    /// This device's index in the partition.
    #[arg(long)]
    device_index: Option<usize>,
    #[command(flatten)]
    partition: PartitionArgs,
}

/// How a dataset is partitioned over the fleet (the simulator's flags and defaults).
#[derive(Args)]
struct PartitionArgs {
    /// Training devices in the partition.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Anchor devices (= experts).
    #[arg(long, default_value_t = 5)]
    anchors: usize,
    /// Skew: label:L or dirichlet:ALPHA.
    #[arg(long, default_value = "label:4")]
    skew: Skew,
    /// Samples per device.
    #[arg(long, default_value_t = 500)]
    samples_per_device: usize,
    /// Zero-shot test devices of the partition (they shape the draw, so keep the simulator's).
    #[arg(long, default_value_t = 20)]
    test_devices: usize,
    /// Samples per test device.
    #[arg(long, default_value_t = 250)]
    test_samples: usize,
    /// Partition seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl PartitionArgs {
    fn config(&self) -> PartitionConfig {
        PartitionConfig {
            devices: self.devices,
            anchors: self.anchors,
            skew: self.skew.clone(),
            samples_per_device: self.samples_per_device,
            test_devices: self.test_devices,
            test_samples_per_device: self.test_samples,
            validation_devices: 0,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
struct PersonalizeArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Unlabelled local images: files, or directories searched recursively.
    #[arg(long, num_args = 1.., conflicts_with = "dataset")]
    data: Vec<PathBuf>,
    /// A partitioned dataset; this device is `--device-index` (a training device) or
    /// `--test-device-index` (one of the simulator's unseen zero-shot devices).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// A training device of the partition.
    #[arg(long, requires = "dataset", conflicts_with = "test_device_index")]
    device_index: Option<usize>,
    /// A zero-shot test device of the partition.
    #[arg(long, requires = "dataset")]
    test_device_index: Option<usize>,
    #[command(flatten)]
    partition: PartitionArgs,
    #[command(flatten)]
    embed: EmbedArgs,
    /// Where to store the bundle.
    #[arg(long, default_value = "bundle.ddome")]
    out: PathBuf,
}

#[derive(Args)]
struct PredictArgs {
    /// The bundle stored by `ddome-agent personalize`.
    #[arg(long)]
    bundle: PathBuf,
    /// The common expert (ONNX); it must be the one the bundle was personalised with.
    #[arg(long, default_value = ".cache/models/efficientnet-lite0.onnx")]
    model: PathBuf,
    /// Print one JSON array instead of a line per image.
    #[arg(long)]
    json: bool,
    /// Images, or directories of images (searched recursively).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => run_command(args),
        Command::Personalize(args) => personalize_command(args),
        Command::Predict(args) => predict_command(args),
    };
    if let Err(err) = outcome {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn credential(file: Option<&PathBuf>) -> Result<String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading credential {}", path.display()))?;
        return Ok(text.trim().to_string());
    }
    match std::env::var("DDOME_CREDENTIAL") {
        Ok(c) if !c.trim().is_empty() => Ok(c.trim().to_string()),
        _ => bail!("no credential: pass --credential-file or set DDOME_CREDENTIAL"),
    }
}

impl EmbedArgs {
    fn config(&self) -> EmbedConfig {
        EmbedConfig {
            model: self.model.clone(),
            input_side: self.input_side,
            cache_dir: self.cache_dir.clone(),
        }
    }
}

impl ConnectArgs {
    fn config(&self) -> Result<AgentConfig> {
        let credential = credential(self.credential_file.as_ref())?;
        Ok(AgentConfig::new(
            self.coordinator,
            &self.fingerprint,
            &self.device,
            &credential,
        ))
    }
}

fn run_command(args: RunArgs) -> Result<()> {
    let mut config = args.connect.config()?;
    let (train_device, backend) = ddome_models::device_or_cpu(args.backend, !args.no_fallback)
        .with_context(|| format!("starting the {} backend", args.backend))?;
    eprintln!("ddome-agent: training on {backend}");
    config.train_device = train_device;
    let embed = args.embed.config();
    let d = &args.data;
    let data = match (&d.data, &d.dataset, d.device_index) {
        (Some(dir), None, _) => LocalData::from_folder(dir, &embed)?,
        (None, Some(dataset), Some(index)) => {
            LocalData::from_partition(dataset, &d.partition.config(), index, &embed)?
        }
        _ => bail!("pass --data DIR, or --dataset PATH with --device-index"),
    };
    eprintln!(
        "ddome-agent: {} local samples embedded; connecting to {}",
        data.indices.len(),
        config.coordinator
    );
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let summary = runtime.block_on(run(&config, &data))?;
    println!(
        "done: {} rounds in the federation; this device: {} updates accepted, {} rankings, \
         {} reconnects, {} bytes sent, {} bytes received",
        summary.rounds_completed,
        summary.updates_accepted,
        summary.rankings,
        summary.reconnects,
        summary.bytes_sent,
        summary.bytes_received
    );
    Ok(())
}

fn personalize_command(args: PersonalizeArgs) -> Result<()> {
    let config = args.connect.config()?;
    let embed = args.embed.config();
    let partition = args.partition.config();
    let data = match (&args.dataset, args.device_index, args.test_device_index) {
        (None, _, _) if !args.data.is_empty() => LocalData::unlabelled(&args.data, &embed)?,
        (Some(dataset), Some(index), None) => {
            LocalData::from_partition(dataset, &partition, index, &embed)?
        }
        (Some(dataset), None, Some(index)) => {
            LocalData::from_partition_test(dataset, &partition, index, &embed)?
        }
        _ => bail!(
            "pass --data with images or directories, or --dataset PATH with --device-index \
             or --test-device-index"
        ),
    };
    let common_expert = CommonExpertRef {
        sha256: data
            .common_expert_sha256
            .clone()
            .context("the local data names no common expert")?,
        input_size: [args.embed.input_side as u32; 2],
    };
    eprintln!(
        "ddome-agent: {} unlabelled samples embedded; asking {} for the gate",
        data.indices.len(),
        config.coordinator
    );
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let personalized = runtime.block_on(personalize(&config, &data, &common_expert))?;
    save_bundle(&args.out, &personalized.bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let bundle = &personalized.bundle;
    let scores: Vec<String> = bundle.scores.iter().map(|s| format!("{s:.3}")).collect();
    eprintln!(
        "personalised from round {}: experts {:?} (mean gate scores [{}]); bundle of {} bytes \
         stored in {}",
        bundle.round,
        bundle.expert_indices(),
        scores.join(", "),
        personalized.bytes.len(),
        args.out.display()
    );
    // The one value this command produces, for scripts: the bundle's hash.
    println!("{}", personalized.sha256);
    Ok(())
}

fn predict_command(args: PredictArgs) -> Result<()> {
    let model = DeviceModel::open(&args.bundle)?;
    let files = image_files(&args.inputs)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let expert =
        model.load_common_expert(&args.model, embed_batch(files.len(), threads), threads)?;
    let result = model.predict_files(&expert, &files)?;
    let p = &result.predictions;
    let classes = model.classes();
    let name = |label: u16| {
        classes
            .get(label as usize)
            .cloned()
            .unwrap_or_else(|| label.to_string())
    };
    if args.json {
        let rows: Vec<serde_json::Value> = files
            .iter()
            .enumerate()
            .map(|(i, path)| {
                serde_json::json!({
                    "path": path.display().to_string(),
                    "class": name(p.by_top_expert[i]),
                    "label": p.by_top_expert[i],
                    "expert": p.top_expert[i],
                    "confidence": p.confidence[i],
                    "mixture_class": name(p.by_mixture[i]),
                    "mixture_label": p.by_mixture[i],
                    "mixture_confidence": p.mixture_confidence[i],
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for (i, path) in files.iter().enumerate() {
            println!(
                "{}\t{}\texpert {}\tconfidence {:.3}\tmixture {} {:.3}",
                path.display(),
                name(p.by_top_expert[i]),
                p.top_expert[i],
                p.confidence[i],
                name(p.by_mixture[i]),
                p.mixture_confidence[i]
            );
        }
    }
    eprintln!(
        "ddome-agent: {} images with bundle {} (round {}, experts {:?}): common expert {:.1} ms, \
         gate and experts {:.1} ms",
        files.len(),
        &model.sha256()[..12],
        model.bundle().round,
        model.bundle().expert_indices(),
        1e3 * result.common_expert_secs,
        1e3 * result.mixture_secs
    );
    Ok(())
}
