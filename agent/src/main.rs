//! `ddome-agent`: the edge binary.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ddome_agent::{AgentConfig, EmbedConfig, LocalData, run};
use ddome_datasets::{PartitionConfig, Skew};

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
}

#[derive(Args)]
struct RunArgs {
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
    #[command(flatten)]
    data: DataArgs,
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

fn run_command(args: RunArgs) -> Result<()> {
    let credential = credential(args.credential_file.as_ref())?;
    let embed = EmbedConfig {
        model: args.model.clone(),
        input_side: args.input_side,
        cache_dir: args.cache_dir.clone(),
    };
    let d = &args.data;
    let data = match (&d.data, &d.dataset, d.device_index) {
        (Some(dir), None, _) => LocalData::from_folder(dir, &embed)?,
        (None, Some(dataset), Some(index)) => LocalData::from_partition(
            dataset,
            &PartitionConfig {
                devices: d.devices,
                anchors: d.anchors,
                skew: d.skew.clone(),
                samples_per_device: d.samples_per_device,
                test_devices: d.test_devices,
                test_samples_per_device: d.test_samples,
                seed: d.seed,
            },
            index,
            &embed,
        )?,
        _ => bail!("pass --data DIR, or --dataset PATH with --device-index"),
    };
    eprintln!(
        "ddome-agent: {} local samples embedded; connecting to {}",
        data.indices.len(),
        args.coordinator
    );
    let config = AgentConfig::new(
        args.coordinator,
        &args.fingerprint,
        &args.device,
        &credential,
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
