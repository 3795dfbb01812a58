//! `ddome bench inference`: zero-shot personalised inference, on the device and through the
//! coordinator.
//!
//! - On the device, the path of `ddome-agent predict`: image files decoded and embedded by
//!   the common expert (tract), then the gate and the bundle's K experts. Latency per image
//!   at batch 1 (the median of many single-image calls, with a plan made for one image) and
//!   throughput batched, each split into decode + common expert and gate + experts.
//! - The coordinator's infer service on loopback QUIC: many serve-only clients, each on its
//!   own connection, send infer requests back to back; requests per second and the p50 and
//!   p99 latency of a request as a client sees it.
//!
//! The model is the paper's shape (M experts, K per device, `head` experts of the given
//! width over the 1280-d embedding) drawn from a seed: timing does not depend on training.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use ddome_agent::{AgentConfig, DeviceModel, ServiceClient, embed_batch, image_files};
use ddome_coordinator::StateDir;
use ddome_coordinator::config::{FederationConfig, InferenceConfig, ModelConfig, TrainSection};
use ddome_models::{ExpertKind, GlobalModel, ModelSpec, top_k};
use ddome_protocol::bundle::Bundle;
use ddome_protocol::codec::CodecConfig;
use ddome_protocol::message::{CommonExpertRef, InferInput, InferRequest, ModelDescription};
use ddome_protocol::round::RoundKind;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What to measure.
#[derive(Debug, Clone, Serialize)]
pub struct InferenceBenchConfig {
    /// Images (a directory searched recursively); the first ones in name order are used.
    pub images: PathBuf,
    /// The common expert (ONNX).
    pub model: PathBuf,
    /// Side of its square input.
    pub input_side: usize,
    /// Images predicted one at a time.
    pub latency_images: usize,
    /// Images per batched call.
    pub batch: usize,
    /// Batched calls.
    pub batches: usize,
    /// Concurrent clients of the infer service.
    pub clients: usize,
    /// Requests per client, back to back.
    pub requests: usize,
    /// Embeddings per infer request; one service run per value.
    pub rows_per_request: Vec<usize>,
    /// M.
    pub experts: usize,
    /// K.
    pub k: usize,
    /// Classes.
    pub classes: usize,
    /// Hidden width of the gate and the experts.
    pub hidden: usize,
}

/// Medians of one on-device path, milliseconds per call.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceTiming {
    /// Images per call.
    pub images: usize,
    /// Calls timed.
    pub calls: usize,
    /// Decoding and the common expert.
    pub common_expert_ms: f64,
    /// The gate and the K experts.
    pub mixture_ms: f64,
    /// The whole call.
    pub total_ms: f64,
    /// Images per second at the median call.
    pub images_per_sec: f64,
}

/// One run of the infer service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceTiming {
    /// Concurrent clients (one QUIC connection each).
    pub clients: usize,
    /// Requests timed.
    pub requests: usize,
    /// Embeddings per request.
    pub rows_per_request: usize,
    /// Wall seconds from the first request to the last answer.
    pub wall_secs: f64,
    /// Requests answered per second.
    pub requests_per_sec: f64,
    /// Embeddings predicted per second.
    pub rows_per_sec: f64,
    /// Median request latency, milliseconds.
    pub p50_ms: f64,
    /// 99th-percentile request latency, milliseconds.
    pub p99_ms: f64,
    /// Slowest request, milliseconds.
    pub max_ms: f64,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct InferenceBenchReport {
    /// What was measured.
    pub config: InferenceBenchConfig,
    /// The command line.
    pub command: String,
    /// Cores and CPU.
    pub machine: String,
    /// Batch 1, then batched.
    pub device: Vec<DeviceTiming>,
    /// One per `rows_per_request`.
    pub service: Vec<ServiceTiming>,
}

/// Runs both measurements.
pub fn run(config: &InferenceBenchConfig, command: String) -> Result<InferenceBenchReport> {
    ensure!(
        config.latency_images > 0 && config.batch > 0 && config.batches > 0,
        "latency images, batch and batches must be positive"
    );
    ensure!(
        config.k >= 1 && config.k <= config.experts,
        "need 1 <= k <= experts"
    );
    let dir = tempfile::tempdir().context("creating a scratch directory")?;
    let bundle_path = dir.path().join("bench.ddome");
    let global = write_bundle(config, &bundle_path)?;
    let device_model = DeviceModel::open(&bundle_path)?;
    let mut files = image_files(std::slice::from_ref(&config.images))?;
    let needed = config.latency_images.max(config.batch);
    ensure!(
        files.len() >= needed,
        "{} holds {} images, the bench needs {needed}",
        config.images.display(),
        files.len()
    );
    files.truncate(needed);

    eprintln!(
        "ddome: on-device predict, {} images one at a time",
        config.latency_images
    );
    let single = device_batch1(config, &device_model, &files[..config.latency_images])?;
    eprintln!(
        "ddome: on-device predict, {} calls of {} images",
        config.batches, config.batch
    );
    let (batched, embeddings) = device_batched(config, &device_model, &files[..config.batch])?;

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let mut service = Vec::new();
    for &rows in &config.rows_per_request {
        eprintln!(
            "ddome: coordinator infer, {} clients x {} requests of {rows} embeddings",
            config.clients, config.requests
        );
        service.push(runtime.block_on(measure_service(config, &global, &embeddings, rows))?);
    }
    Ok(InferenceBenchReport {
        config: config.clone(),
        command,
        machine: crate::bench::machine_description(),
        device: vec![single, batched],
        service,
    })
}

fn spec(config: &InferenceBenchConfig) -> ModelSpec {
    ModelSpec {
        embedding_dim: 1280,
        classes: config.classes,
        experts: config.experts,
        gate_hidden: config.hidden,
        expert: ExpertKind::Head {
            hidden: config.hidden,
        },
        pixels: None,
    }
}

fn description(config: &InferenceBenchConfig, common_expert_sha256: &str) -> ModelDescription {
    ModelDescription {
        embedding_dim: 1280,
        classes: (0..config.classes).map(|c| format!("class-{c}")).collect(),
        experts: config.experts as u32,
        k: config.k as u32,
        gate_hidden: config.hidden as u32,
        expert_hidden: config.hidden as u32,
        common_expert_sha256: common_expert_sha256.to_string(),
    }
}

/// Writes the bundle of a device whose scores favour the last K experts; returns the model.
fn write_bundle(config: &InferenceBenchConfig, path: &Path) -> Result<GlobalModel> {
    let global = GlobalModel::initial(&spec(config), 0, true);
    let onnx = std::fs::read(&config.model)
        .with_context(|| format!("reading {}", config.model.display()))?;
    let sha = hex::encode(Sha256::digest(&onnx));
    let scores: Vec<f32> = (0..config.experts)
        .map(|e| (e + 1) as f32 / (config.experts * (config.experts + 1) / 2) as f32)
        .collect();
    let experts = top_k(&scores, config.k)
        .into_iter()
        .map(|e| (e as u32, global.experts[e].clone()))
        .collect();
    let bundle = Bundle {
        device: "bench".into(),
        model: description(config, ""),
        round: 0,
        global_model_sha256: global.sha256(),
        common_expert: CommonExpertRef {
            sha256: sha,
            input_size: [config.input_side as u32; 2],
        },
        gate: global.gate.clone(),
        experts,
        scores,
        samples: 1,
    };
    let (bytes, _) = bundle.encode()?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(global)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The nearest-rank percentile `q` of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Single images through a plan made for one image on one thread, as a small device runs.
fn device_batch1(
    config: &InferenceBenchConfig,
    model: &DeviceModel,
    files: &[PathBuf],
) -> Result<DeviceTiming> {
    let expert = model.load_common_expert(&config.model, 1, 1)?;
    // Warm the caches and the allocator before timing.
    model.predict_files(&expert, &files[..1])?;
    let (mut common, mut mixture, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for file in files {
        let started = Instant::now();
        let timed = model.predict_files(&expert, std::slice::from_ref(file))?;
        total.push(1e3 * started.elapsed().as_secs_f64());
        common.push(1e3 * timed.common_expert_secs);
        mixture.push(1e3 * timed.mixture_secs);
    }
    let total_ms = median(&mut total);
    Ok(DeviceTiming {
        images: 1,
        calls: files.len(),
        common_expert_ms: median(&mut common),
        mixture_ms: median(&mut mixture),
        total_ms,
        images_per_sec: 1e3 / total_ms,
    })
}

/// Batches through `ddome-agent predict`'s plan (every core); also returns the embeddings,
/// which the service runs send.
fn device_batched(
    config: &InferenceBenchConfig,
    model: &DeviceModel,
    files: &[PathBuf],
) -> Result<(DeviceTiming, Vec<f32>)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let expert =
        model.load_common_expert(&config.model, embed_batch(files.len(), threads), threads)?;
    model.predict_files(&expert, files)?;
    let (mut common, mut mixture, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..config.batches {
        let started = Instant::now();
        let timed = model.predict_files(&expert, files)?;
        total.push(1e3 * started.elapsed().as_secs_f64());
        common.push(1e3 * timed.common_expert_secs);
        mixture.push(1e3 * timed.mixture_secs);
    }
    let embeddings = ddome_agent::embed_files(&expert, files, None)?;
    let total_ms = median(&mut total);
    Ok((
        DeviceTiming {
            images: files.len(),
            calls: config.batches,
            common_expert_ms: median(&mut common),
            mixture_ms: median(&mut mixture),
            total_ms,
            images_per_sec: 1e3 * files.len() as f64 / total_ms,
        },
        embeddings,
    ))
}

/// A coordinator serving `global` (no rounds to run) and `config.clients` serve-only
/// clients sending requests of `rows` embeddings back to back.
async fn measure_service(
    config: &InferenceBenchConfig,
    global: &GlobalModel,
    embeddings: &[f32],
    rows: usize,
) -> Result<ServiceTiming> {
    let dir = tempfile::tempdir().context("creating a state directory")?;
    let mut state = StateDir::init(dir.path())?;
    let blob = postcard::to_allocvec(global)?;
    state.store_mut().commit_model(0, &blob)?;
    let mut credentials = Vec::new();
    for i in 0..config.clients {
        let name = format!("bench-{i}");
        let (_, credential) = state.store_mut().enroll(&name, None)?;
        credentials.push((name, credential.reveal()));
    }
    let fingerprint = state.identity().fingerprint();
    let (store, identity) = state.into_parts();
    let federation = FederationConfig {
        method: RoundKind::Ddome,
        seed: 0,
        rounds: 0,
        experts: config.experts,
        k: config.k,
        anchors_per_round: 1,
        normals_per_round: 1,
        min_updates: 1,
        wait_for_devices: 0,
        round_deadline_secs: 600.0,
        codec: CodecConfig::LOSSLESS,
        downlink: CodecConfig::LOSSLESS,
        max_frame: ddome_protocol::frame::DEFAULT_MAX_FRAME,
        model: ModelConfig {
            classes: description(config, "").classes,
            embedding_dim: 1280,
            gate_hidden: config.hidden,
            expert_hidden: config.hidden,
            common_expert_sha256: String::new(),
        },
        train: TrainSection::default(),
    };
    let inference = InferenceConfig {
        keep_serving: true,
        max_batch: rows.max(InferenceConfig::default().max_batch),
        ..InferenceConfig::default()
    };
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let server =
        ddome_coordinator::server::start_with(store, &identity, federation, inference, listen)
            .await?;
    let addr = server.local_addr;
    let experts: Vec<u32> = ((config.experts - config.k)..config.experts)
        .rev()
        .map(|e| e as u32)
        .collect();
    let available = embeddings.len() / 1280;
    let request = |offset: usize| InferRequest {
        experts: experts.clone(),
        input: InferInput::Embeddings {
            dim: 1280,
            values: (0..rows)
                .flat_map(|r| {
                    let row = (offset + r) % available;
                    embeddings[row * 1280..(row + 1) * 1280].iter().copied()
                })
                .collect(),
        },
    };
    let mut clients = Vec::new();
    for (name, credential) in &credentials {
        let client =
            ServiceClient::connect(&AgentConfig::new(addr, &fingerprint, name, credential)).await?;
        // The first request loads the model's modules: not part of the timing.
        client.infer(request(0)).await?;
        clients.push(Arc::new(client));
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, client) in clients.iter().enumerate() {
        let client = Arc::clone(client);
        let requests: Vec<InferRequest> = (0..config.requests)
            .map(|i| request(c * config.requests + i))
            .collect();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(requests.len());
            for request in requests {
                let sent = Instant::now();
                client.infer(request).await?;
                latencies.push(1e3 * sent.elapsed().as_secs_f64());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.context("client task")??);
    }
    let wall_secs = started.elapsed().as_secs_f64();
    for client in clients {
        if let Some(client) = Arc::into_inner(client) {
            client.close().await;
        }
    }
    server.shutdown();
    server.finished().await?;
    latencies.sort_by(f64::total_cmp);
    let requests = latencies.len();
    Ok(ServiceTiming {
        clients: config.clients,
        requests,
        rows_per_request: rows,
        wall_secs,
        requests_per_sec: requests as f64 / wall_secs,
        rows_per_sec: (requests * rows) as f64 / wall_secs,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(0.0),
    })
}

/// The report as markdown tables.
pub fn markdown(report: &InferenceBenchReport) -> String {
    let c = &report.config;
    let mut out = format!(
        "On-device `ddome-agent predict` (bundle of K = {} of M = {} head experts, hidden {}, \
         {} classes; EfficientNet-Lite0 at {}x{} by tract; {}):\n\n\
         | call | images | decode + common expert ms | gate + experts ms | total ms | images/s |\n\
         |---|---|---|---|---|---|\n",
        c.k, c.experts, c.hidden, c.classes, c.input_side, c.input_side, report.machine
    );
    for d in &report.device {
        let what = if d.images == 1 {
            format!("batch 1, one thread (median of {})", d.calls)
        } else {
            format!("batched, all cores (median of {})", d.calls)
        };
        out.push_str(&format!(
            "| {what} | {} | {:.2} | {:.2} | {:.2} | {:.1} |\n",
            d.images, d.common_expert_ms, d.mixture_ms, d.total_ms, d.images_per_sec
        ));
    }
    out.push_str(
        "\nCoordinator `infer` on loopback QUIC (each client its own connection, requests back \
         to back; latency as the client sees it):\n\n\
         | clients | embeddings / request | requests | requests/s | embeddings/s | p50 ms | p99 ms | max ms |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for s in &report.service {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |\n",
            s.clients,
            s.rows_per_request,
            s.requests,
            s.requests_per_sec,
            s.rows_per_sec,
            s.p50_ms,
            s.p99_ms,
            s.max_ms
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.5), 50.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }
}
