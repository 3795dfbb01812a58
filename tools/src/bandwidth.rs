//! `ddome bench bandwidth`: a real coordinator and a fleet of agents on loopback QUIC, one
//! run per (method, codec), with the bytes every agent's QUIC connections sent and received
//! (UDP payloads: QUIC and TLS overhead included) and the zero-shot accuracy reached.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ddome_agent::{AgentConfig, LocalData};
use ddome_coordinator::StateDir;
use ddome_coordinator::config::{FederationConfig, ModelConfig, TrainSection};
use ddome_datasets::Partition;
use ddome_models::{ExpertKind, Features, GlobalModel};
use ddome_protocol::codec::CodecConfig;
use ddome_protocol::round::RoundKind;
use serde::Serialize;

use crate::simulate::{Method, SimConfig, model_spec, zero_shot};

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BandwidthRun {
    /// ddome, fedmix or fedavg.
    pub method: String,
    /// Uplink (delta) codec.
    pub codec: String,
    /// Downlink (parameter) codec.
    pub downlink: String,
    /// Rounds run.
    pub rounds: u64,
    /// Participations (devices × rounds they trained in).
    pub participations: u64,
    /// Mean bytes a participant received per round (downlink), QUIC layer.
    pub down_per_participant: f64,
    /// Mean bytes a participant sent per round (uplink), QUIC layer.
    pub up_per_participant: f64,
    /// Of `up_per_participant`, bytes declared lost and resent.
    pub up_resent_per_participant: f64,
    /// Zero-shot accuracy on the unseen test devices after the run.
    pub zero_shot: f64,
    /// Wall seconds of the run.
    pub wall_secs: f64,
}

/// What stays fixed across the runs.
pub struct BandwidthSetup<'a> {
    /// Training features (shared by every agent).
    pub train: Arc<Features>,
    /// Test features.
    pub test: &'a Features,
    /// Class names.
    pub classes: Vec<String>,
    /// The partition (its training devices become the fleet).
    pub partition: &'a Partition,
    /// The simulator config the federation mirrors (M, K, N_a, N_c, training, seed).
    pub sim: SimConfig,
}

fn kind(method: Method) -> Result<RoundKind> {
    Ok(match method {
        Method::Ddome => RoundKind::Ddome,
        Method::Fedmix => RoundKind::Fedmix,
        Method::Fedavg => RoundKind::Fedavg,
        other => bail!("{} does not run over the network", other.name()),
    })
}

/// Runs one federation over loopback QUIC and measures it.
pub async fn measure(
    setup: &BandwidthSetup<'_>,
    method: Method,
    codec: CodecConfig,
    downlink: CodecConfig,
) -> Result<BandwidthRun> {
    let started = Instant::now();
    let sim = &setup.sim;
    let dir = tempfile::tempdir().context("creating a state directory")?;
    let mut state = StateDir::init(dir.path())?;
    let mut credentials = Vec::new();
    for device in &setup.partition.train {
        let name = format!("device-{}", device.id);
        let anchor = device.anchor_of.map(|e| e as u32);
        let (_, credential) = state.store_mut().enroll(&name, anchor)?;
        credentials.push((name, credential.reveal()));
    }
    let fingerprint = state.identity().fingerprint();
    let (store, identity) = state.into_parts();
    let config = FederationConfig {
        method: kind(method)?,
        seed: sim.seed,
        rounds: sim.rounds as u64,
        experts: sim.experts,
        k: sim.k,
        anchors_per_round: sim.anchors_per_round,
        normals_per_round: sim.normals_per_round,
        min_updates: sim.anchors_per_round + sim.normals_per_round,
        wait_for_devices: setup.partition.train.len(),
        round_deadline_secs: 600.0,
        codec,
        downlink,
        max_frame: ddome_protocol::frame::DEFAULT_MAX_FRAME,
        model: ModelConfig {
            classes: setup.classes.clone(),
            embedding_dim: setup.train.dim,
            gate_hidden: sim.gate_hidden,
            expert_hidden: match sim.expert {
                ExpertKind::Head { hidden } => hidden,
                ExpertKind::Cnn { .. } => bail!("the agent trains head experts"),
            },
            common_expert_sha256: String::new(),
        },
        train: TrainSection {
            epochs: sim.train.epochs,
            batch_size: sim.train.batch_size,
            expert_lr: sim.train.expert_lr,
            gate_lr: sim.train.gate_lr,
            momentum: sim.train.momentum,
        },
    };
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let server = ddome_coordinator::server::start(store, &identity, config, listen).await?;
    let addr = server.local_addr;
    let agents: Vec<_> = setup
        .partition
        .train
        .iter()
        .zip(&credentials)
        .map(|(device, (name, credential))| {
            let config = AgentConfig::new(addr, &fingerprint, name, credential);
            let data = LocalData {
                features: Arc::clone(&setup.train),
                indices: device.indices.clone(),
                common_expert_sha256: None,
                class_names: None,
            };
            tokio::spawn(async move { ddome_agent::run(&config, &data).await })
        })
        .collect();
    let report = server.finished().await?;
    let (mut down, mut up, mut lost, mut participations) = (0u64, 0u64, 0u64, 0u64);
    for agent in agents {
        let summary = agent.await.context("agent task")??;
        down += summary.bytes_received;
        up += summary.bytes_sent;
        lost += summary.bytes_lost;
        participations += summary.updates_accepted;
    }
    let checkpoint = StateDir::open(dir.path())?
        .store()
        .global_model()?
        .context("no model committed")?;
    let model: GlobalModel = postcard::from_bytes(&checkpoint.blob)?;
    let sim_config = SimConfig {
        method,
        ..sim.clone()
    };
    let spec = model_spec(&sim_config, &setup.train, setup.classes.len())?;
    let zs = zero_shot(
        &sim_config,
        &spec,
        &model,
        setup.test,
        setup.classes.len(),
        &setup.partition.test,
    )?;
    Ok(BandwidthRun {
        method: method.name().to_string(),
        codec: codec.to_string(),
        downlink: downlink.to_string(),
        rounds: report.rounds_completed,
        participations,
        down_per_participant: down as f64 / participations.max(1) as f64,
        up_per_participant: up as f64 / participations.max(1) as f64,
        up_resent_per_participant: lost as f64 / participations.max(1) as f64,
        zero_shot: zs.mean,
        wall_secs: started.elapsed().as_secs_f64(),
    })
}

/// The markdown table of a set of runs, with each run's bytes relative to the last FedMix
/// f32 run among them.
pub fn markdown(runs: &[BandwidthRun]) -> String {
    let fedmix = runs
        .iter()
        .find(|r| r.method == "fedmix" && r.codec == "f32" && r.downlink == "f32")
        .map(|r| r.down_per_participant + r.up_per_participant);
    let mut out = String::from(
        "| method | uplink codec | downlink codec | down KiB / participant / round | up KiB / participant / round (resent) | total vs FedMix f32 | zero-shot % | rounds | wall s |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let total = r.down_per_participant + r.up_per_participant;
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} ({:.1}) | {} | {:.1} | {} | {:.0} |\n",
            r.method,
            r.codec,
            r.downlink,
            r.down_per_participant / 1024.0,
            r.up_per_participant / 1024.0,
            r.up_resent_per_participant / 1024.0,
            fedmix.map_or("–".into(), |f| format!("{:.3}", total / f)),
            100.0 * r.zero_shot,
            r.rounds,
            r.wall_secs
        ));
    }
    out
}
