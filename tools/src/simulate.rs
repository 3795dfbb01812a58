//! The in-process federation: DDOME and its baselines on one machine, with the transport
//! replaced by function calls. Local training, aggregation and participant selection are the
//! library functions the agent and the coordinator use.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ddome_datasets::{DeviceData, Partition};
use ddome_models::{
    BackendChoice, Device, ExpertKind, Features, GlobalModel, LocalUpdate, ModelSpec, PixelShape,
    Predictions, Received, Role, TrainConfig, aggregate_round, gate_probabilities,
    mean_gate_scores, params, predict, top_k, train_local,
};
use ddome_protocol::round::local_seed;
use ddome_protocol::{SelectionConfig, select_participants};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, Resume, setup_sha256};

/// A federated (or central) training method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Joint gate–expert training with anchors; K experts per device.
    Ddome,
    /// One model averaged over randomly sampled devices.
    Fedavg,
    /// FedAvg with a proximal term μ/2‖w − w_global‖².
    Fedprox,
    /// A gate and M experts, every expert sent to every device (K = M), no anchors.
    Fedmix,
    /// The common-expert reference: one model trained centrally on all training data.
    Central,
}

impl Method {
    /// Every method, in the order tables list them.
    pub const ALL: [Method; 5] = [
        Method::Central,
        Method::Fedavg,
        Method::Fedprox,
        Method::Fedmix,
        Method::Ddome,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Ddome => "ddome",
            Method::Fedavg => "fedavg",
            Method::Fedprox => "fedprox",
            Method::Fedmix => "fedmix",
            Method::Central => "central",
        }
    }

    fn has_gate(self) -> bool {
        matches!(self, Method::Ddome | Method::Fedmix)
    }
}

/// Everything one simulated run depends on (with the data and the partition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// The method.
    pub method: Method,
    /// M, experts (DDOME, FedMix).
    pub experts: usize,
    /// K, experts per device (DDOME; FedMix uses all M).
    pub k: usize,
    /// N_a, anchors per round (DDOME).
    pub anchors_per_round: usize,
    /// N_c, normal devices per round (DDOME); baselines take N_a + N_c random devices.
    pub normals_per_round: usize,
    /// R, rounds (central: epochs over all the data).
    pub rounds: usize,
    /// Evaluate the zero-shot accuracy every this many rounds (and after the last).
    pub eval_every: usize,
    /// Expert architecture.
    pub expert: ExpertKind,
    /// Gate hidden width.
    pub gate_hidden: usize,
    /// Local optimiser settings.
    pub train: TrainConfig,
    /// FedProx μ.
    pub prox_mu: f64,
    /// Seed of initialisation, selection and shuffling.
    pub seed: u64,
    /// Devices trained concurrently within a round (results do not depend on it).
    pub threads: usize,
    /// The burn backend that trains and evaluates. Results are reproducible per backend;
    /// across backends they agree to float rounding only.
    #[serde(default)]
    pub backend: BackendChoice,
}

impl SimConfig {
    /// The device of `backend`; an error when this build lacks it.
    pub fn device(&self) -> Result<Device> {
        ddome_models::device(self.backend)
            .with_context(|| format!("starting the {} backend", self.backend))
    }

    /// The local optimiser settings, with FedProx's proximal term for FedProx only.
    pub fn local_train_config(&self) -> TrainConfig {
        TrainConfig {
            prox_mu: if self.method == Method::Fedprox {
                self.prox_mu
            } else {
                0.0
            },
            ..self.train
        }
    }
}

/// Zero-shot accuracy on the unseen test devices and where their samples were routed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroShot {
    /// Accuracy of each test device with the paper's rule (the gate's top expert predicts).
    pub per_device: Vec<f64>,
    /// Accuracy of each test device with the gate-weighted mixture of its K experts.
    pub per_device_mixture: Vec<f64>,
    /// Mean of `per_device`.
    pub mean: f64,
    /// Standard deviation of `per_device` across test devices.
    pub std: f64,
    /// Mean of `per_device_mixture`.
    pub mean_mixture: f64,
    /// `routing[e][y]`: test samples of label y whose top expert was e.
    pub routing: Vec<Vec<usize>>,
    /// The experts each test device selected.
    pub selected: Vec<Vec<usize>>,
}

/// Metrics at one evaluation point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// Rounds completed.
    pub round: usize,
    /// Mean local training loss of this round's participants.
    pub train_loss: f64,
    /// Zero-shot accuracy, top-expert rule.
    pub zero_shot: f64,
    /// Its standard deviation across test devices.
    pub zero_shot_std: f64,
    /// Zero-shot accuracy, mixture rule.
    pub zero_shot_mixture: f64,
    /// DDOME: for each anchor expert, the share of its labels the gate routes to it.
    pub anchor_routing: Vec<f64>,
    /// Zero-shot accuracy on the validation devices (top-expert rule), when there are any.
    #[serde(default)]
    pub validation: Option<f64>,
    /// The same with the mixture rule.
    #[serde(default)]
    pub validation_mixture: Option<f64>,
    /// Seconds since the run started.
    pub elapsed_secs: f64,
}

/// Payload bytes per round at f32 (what the wire would carry with the lossless codec, before
/// framing): model parameters both ways, plus the normal devices' rankings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundBytes {
    /// Coordinator to devices, summed over the round's participants.
    pub downlink: u64,
    /// Devices to coordinator, summed over the round's participants.
    pub uplink: u64,
}

/// Where a run's time went, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Normal devices ranking experts with the gate.
    pub ranking: f64,
    /// Local training.
    pub training: f64,
    /// Aggregation.
    pub aggregation: f64,
    /// Zero-shot evaluation.
    pub evaluation: f64,
}

/// The outcome of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// The configuration.
    pub config: SimConfig,
    /// Metrics at each evaluation point.
    pub history: Vec<RoundMetrics>,
    /// Final zero-shot evaluation.
    pub zero_shot: ZeroShot,
    /// Final zero-shot evaluation on the validation devices, when the partition has any:
    /// what settings are chosen by, never the test devices.
    #[serde(default)]
    pub validation: Option<ZeroShot>,
    /// For each anchor expert q: the share of the test split's samples with q's labels that
    /// the gate (argmax over all M) routes to q. Empty without anchors.
    pub anchor_routing: Vec<f64>,
    /// SHA-256 of the final global model's parameters (little-endian f32).
    pub model_sha256: String,
    /// Bytes per round.
    pub bytes_per_round: RoundBytes,
    /// Wall time of the run.
    pub wall_secs: f64,
    /// Where the time went.
    pub timings: Timings,
    /// Parameters of the gate and of one expert.
    pub params: (usize, usize),
    /// Upper bounds that explain the zero-shot result.
    #[serde(default)]
    pub ceilings: Ceilings,
}

/// Upper bounds that explain a zero-shot result. Each reads the test devices' labels, so
/// they are diagnostics, never methods, and nothing is tuned on them.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Ceilings {
    /// Single-model methods: mean accuracy when each test device's predictions are restricted
    /// to its true label set, the most that a label prior could add to this model.
    pub label_set_oracle: Option<f64>,
    /// DDOME: mean share of a test device's samples whose label belongs to the anchors of
    /// the experts it selected. Perfect specialists could be right on no other sample.
    pub anchor_coverage_selected: Option<f64>,
    /// DDOME: the same share for the best K anchors of each device.
    pub anchor_coverage_best: Option<f64>,
}

/// The model spec a run uses.
pub fn model_spec(config: &SimConfig, data: &Features, classes: usize) -> Result<ModelSpec> {
    let pixels: Option<PixelShape> = data.pixels.as_ref().map(|p| p.shape);
    if matches!(config.expert, ExpertKind::Cnn { .. }) && pixels.is_none() {
        bail!("cnn experts need pixels: prepare the experiment with pixels kept");
    }
    let experts = if config.method.has_gate() {
        config.experts
    } else {
        1
    };
    Ok(ModelSpec {
        embedding_dim: data.dim,
        classes,
        experts,
        gate_hidden: config.gate_hidden,
        expert: config.expert,
        pixels: match config.expert {
            ExpertKind::Cnn { .. } => pixels,
            ExpertKind::Head { .. } => None,
        },
    })
}

/// One training job of a round.
struct Job {
    device: usize,
    role: Role,
}

/// Runs `jobs` on up to `threads` workers; results come back in job order, so the outcome
/// does not depend on the thread count.
fn train_jobs(
    spec: &ModelSpec,
    global: &GlobalModel,
    jobs: &[Job],
    data: &Features,
    partition: &[DeviceData],
    config: &SimConfig,
    round: usize,
) -> Result<Vec<LocalUpdate>> {
    let train = &config.local_train_config();
    let device = &config.device()?.autodiff();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<LocalUpdate>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..config.threads.clamp(1, jobs.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let experts: Vec<&[f32]> = job
                        .role
                        .experts()
                        .iter()
                        .map(|&e| global.experts[e].as_slice())
                        .collect();
                    let received = Received {
                        gate: job.role.trains_gate().then_some(global.gate.as_slice()),
                        experts: &experts,
                    };
                    let outcome = train_local(
                        spec,
                        received,
                        &job.role,
                        data,
                        &partition[job.device].indices,
                        train,
                        local_seed(config.seed, round as u64, job.device as u64),
                        device,
                    )
                    .with_context(|| format!("device {} in round {round}", job.device));
                    results
                        .lock()
                        .expect("no worker panics while holding the lock")[i] = Some(outcome);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("workers are done")
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect()
}

/// Runs one method on a partition and evaluates it zero-shot on the test devices.
pub fn run(
    config: &SimConfig,
    train: &Features,
    test: &Features,
    classes: usize,
    partition: &Partition,
    on_round: impl FnMut(usize, Option<&RoundMetrics>),
) -> Result<RunResult> {
    run_resumable(
        config, train, test, classes, partition, None, on_round, None,
    )
}

/// Receives a checkpoint at each evaluation point.
pub type OnCheckpoint<'a> = &'a mut dyn FnMut(Checkpoint) -> Result<()>;

/// [`run`], continuing from `from` when given, and handing `on_checkpoint` the run's state
/// at each evaluation point.
#[allow(clippy::too_many_arguments)]
pub fn run_resumable(
    config: &SimConfig,
    train: &Features,
    test: &Features,
    classes: usize,
    partition: &Partition,
    from: Option<Resume>,
    mut on_round: impl FnMut(usize, Option<&RoundMetrics>),
    mut on_checkpoint: Option<OnCheckpoint>,
) -> Result<RunResult> {
    let started = Instant::now();
    let spec = model_spec(config, train, classes)?;
    // A resumed run's setup hash was checked against this run's when the resume was made.
    let setup = match &from {
        Some(resume) => Some(resume.checkpoint().setup_sha256.clone()),
        None => on_checkpoint
            .is_some()
            .then(|| setup_sha256(train, partition)),
    };
    let (first_round, mut global, mut timings, mut history, elapsed_before) = match from {
        Some(resume) => {
            let checkpoint = resume.into_checkpoint();
            (
                checkpoint.rounds_completed,
                checkpoint.global,
                checkpoint.timings,
                checkpoint.history,
                checkpoint.elapsed_secs,
            )
        }
        None => (
            0,
            GlobalModel::initial(&spec, config.seed, config.method.has_gate()),
            Timings::default(),
            Vec::new(),
            0.0,
        ),
    };
    let elapsed = || elapsed_before + started.elapsed().as_secs_f64();
    let eval_device = config.device()?;
    let anchors: Vec<usize> = partition
        .train
        .iter()
        .filter(|d| d.anchor_of.is_some())
        .map(|d| d.id)
        .collect();
    let normals: Vec<usize> = partition
        .train
        .iter()
        .filter(|d| d.anchor_of.is_none())
        .map(|d| d.id)
        .collect();
    let everyone: Vec<usize> = partition.train.iter().map(|d| d.id).collect();
    if config.method == Method::Ddome && anchors.len() != config.experts {
        bail!(
            "DDOME pins one anchor to each of the {} experts, but the partition has {} anchors",
            config.experts,
            anchors.len()
        );
    }
    let per_round = config.anchors_per_round + config.normals_per_round;
    let train_cfg = config.local_train_config();

    // The central reference makes one pass over the union of every device's data per round.
    let central_indices: Vec<usize> = if config.method == Method::Central {
        partition
            .train
            .iter()
            .flat_map(|d| d.indices.iter().copied())
            .collect()
    } else {
        Vec::new()
    };
    let rounds = config.rounds;
    let mut last_evaluation: Option<Evaluation> = None;
    for round in first_round..rounds {
        let loss;
        if config.method == Method::Central {
            let t = Instant::now();
            let device = eval_device.clone().autodiff();
            let experts = [global.experts[0].as_slice()];
            let update = train_local(
                &spec,
                Received {
                    gate: None,
                    experts: &experts,
                },
                &Role::Single,
                train,
                &central_indices,
                &train_cfg,
                local_seed(config.seed, round as u64, u64::MAX),
                &device,
            )?;
            timings.training += t.elapsed().as_secs_f64();
            loss = update.mean_loss as f64;
            aggregate_round(&mut global, &[update])?;
        } else {
            let jobs: Vec<Job> = match config.method {
                Method::Ddome => {
                    let selection = select_participants(
                        &anchors,
                        &normals,
                        SelectionConfig {
                            anchors: config.anchors_per_round,
                            normals: config.normals_per_round,
                        },
                        config.seed,
                        round as u64,
                    )?;
                    let t = Instant::now();
                    let mut jobs: Vec<Job> = Vec::with_capacity(per_round);
                    for &a in &selection.anchors {
                        let expert = partition.train[a]
                            .anchor_of
                            .expect("anchor pool holds anchors only");
                        jobs.push(Job {
                            device: a,
                            role: Role::Anchor { expert },
                        });
                    }
                    for &n in &selection.normals {
                        let scores = mean_gate_scores(
                            &spec,
                            &global.gate,
                            train,
                            &partition.train[n].indices,
                            &eval_device,
                        )?;
                        jobs.push(Job {
                            device: n,
                            role: Role::Normal {
                                experts: top_k(&scores, config.k),
                            },
                        });
                    }
                    timings.ranking += t.elapsed().as_secs_f64();
                    jobs
                }
                method => {
                    let selection = select_participants(
                        &[],
                        &everyone,
                        SelectionConfig {
                            anchors: 0,
                            normals: per_round,
                        },
                        config.seed,
                        round as u64,
                    )?;
                    let role = if method == Method::Fedmix {
                        Role::Normal {
                            experts: (0..config.experts).collect(),
                        }
                    } else {
                        Role::Single
                    };
                    selection
                        .normals
                        .into_iter()
                        .map(|device| Job {
                            device,
                            role: role.clone(),
                        })
                        .collect()
                }
            };
            // Device order, as the coordinator aggregates.
            let mut jobs = jobs;
            jobs.sort_by_key(|job| job.device);
            let t = Instant::now();
            let updates = train_jobs(
                &spec,
                &global,
                &jobs,
                train,
                &partition.train,
                config,
                round,
            )?;
            timings.training += t.elapsed().as_secs_f64();
            loss = updates.iter().map(|u| u.mean_loss as f64).sum::<f64>()
                / updates.len().max(1) as f64;
            let t = Instant::now();
            aggregate_round(&mut global, &updates)?;
            timings.aggregation += t.elapsed().as_secs_f64();
        }

        let done = round + 1;
        let metrics = if done % config.eval_every.max(1) == 0 || done == rounds {
            let t = Instant::now();
            let evaluation = evaluate(config, &spec, &global, train, test, classes, partition)?;
            timings.evaluation += t.elapsed().as_secs_f64();
            history.push(RoundMetrics {
                round: done,
                train_loss: loss,
                zero_shot: evaluation.test.mean,
                zero_shot_std: evaluation.test.std,
                zero_shot_mixture: evaluation.test.mean_mixture,
                anchor_routing: evaluation.anchor_routing.clone(),
                validation: evaluation.validation.as_ref().map(|v| v.mean),
                validation_mixture: evaluation.validation.as_ref().map(|v| v.mean_mixture),
                elapsed_secs: elapsed(),
            });
            last_evaluation = Some(evaluation);
            if let Some(on_checkpoint) = on_checkpoint.as_mut() {
                on_checkpoint(Checkpoint {
                    config: config.clone(),
                    setup_sha256: setup
                        .clone()
                        .expect("hashed when checkpoints are asked for"),
                    rounds_completed: done,
                    global: global.clone(),
                    history: history.clone(),
                    timings,
                    elapsed_secs: elapsed(),
                })?;
            }
            history.last()
        } else {
            None
        };
        on_round(done, metrics);
    }

    // The last round is always evaluated; only a run of zero rounds still needs it.
    let Evaluation {
        test: zs,
        anchor_routing,
        validation,
    } = match last_evaluation {
        Some(evaluation) => evaluation,
        None => evaluate(config, &spec, &global, train, test, classes, partition)?,
    };
    let ceilings = ceilings(config, &spec, &global, test, partition, &zs)?;
    let template = spec.expert(&eval_device);
    let expert_params = params::flatten(&template).len();
    Ok(RunResult {
        config: config.clone(),
        history,
        zero_shot: zs,
        validation,
        anchor_routing,
        model_sha256: global.sha256(),
        bytes_per_round: round_bytes(config, global.gate.len(), expert_params),
        wall_secs: elapsed(),
        timings,
        params: (global.gate.len(), expert_params),
        ceilings,
    })
}

/// The ceilings a method has: the label-set oracle for single models, anchor coverage for
/// DDOME.
fn ceilings(
    config: &SimConfig,
    spec: &ModelSpec,
    global: &GlobalModel,
    test: &Features,
    partition: &Partition,
    zs: &ZeroShot,
) -> Result<Ceilings> {
    let mut ceilings = Ceilings::default();
    match config.method {
        Method::Central | Method::Fedavg | Method::Fedprox => {
            let device = config.device()?;
            let expert = params::load(spec.expert(&device), &global.experts[0], "expert 0")?;
            let mut accuracies = Vec::with_capacity(partition.test.len());
            for d in &partition.test {
                let mut correct = 0usize;
                for chunk in d.indices.chunks(1024) {
                    let (input, _) = test.batch(chunk, &device);
                    let logits: Vec<f32> = expert
                        .forward(&input)
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .map_err(|e| anyhow::anyhow!("expert logits: {e:?}"))?;
                    let classes = logits.len() / chunk.len();
                    for (row, &i) in logits.chunks_exact(classes).zip(chunk) {
                        let best = d
                            .label_set
                            .iter()
                            .max_by(|a, b| row[**a as usize].total_cmp(&row[**b as usize]));
                        correct += usize::from(best == Some(&test.labels[i]));
                    }
                }
                accuracies.push(correct as f64 / d.indices.len().max(1) as f64);
            }
            ceilings.label_set_oracle = Some(mean_std(&accuracies).0);
        }
        Method::Ddome => {
            let anchor_labels: Vec<&[u16]> = partition
                .train
                .iter()
                .filter(|d| d.anchor_of.is_some())
                .map(|d| d.label_set.as_slice())
                .collect();
            let share = |d: &DeviceData, experts: &[usize]| {
                let covered = d
                    .indices
                    .iter()
                    .filter(|&&i| {
                        experts.iter().any(|&e| {
                            anchor_labels
                                .get(e)
                                .is_some_and(|labels| labels.contains(&test.labels[i]))
                        })
                    })
                    .count();
                covered as f64 / d.indices.len().max(1) as f64
            };
            let selected: Vec<f64> = partition
                .test
                .iter()
                .zip(&zs.selected)
                .map(|(d, experts)| share(d, experts))
                .collect();
            // The best K anchors hold the K largest per-anchor shares (their labels are disjoint).
            let best: Vec<f64> = partition
                .test
                .iter()
                .map(|d| {
                    let mut per_anchor: Vec<f64> =
                        (0..anchor_labels.len()).map(|e| share(d, &[e])).collect();
                    per_anchor.sort_by(|a, b| b.total_cmp(a));
                    per_anchor.iter().take(config.k).sum()
                })
                .collect();
            ceilings.anchor_coverage_selected = Some(mean_std(&selected).0);
            ceilings.anchor_coverage_best = Some(mean_std(&best).0);
        }
        Method::Fedmix => {}
    }
    Ok(ceilings)
}

/// What one evaluation point measures.
struct Evaluation {
    /// Zero-shot on the test devices.
    test: ZeroShot,
    /// DDOME: the anchors' routing shares on the test split.
    anchor_routing: Vec<f64>,
    /// Zero-shot on the validation devices (held-out train images), when there are any.
    validation: Option<ZeroShot>,
}

fn evaluate(
    config: &SimConfig,
    spec: &ModelSpec,
    global: &GlobalModel,
    train: &Features,
    test: &Features,
    classes: usize,
    partition: &Partition,
) -> Result<Evaluation> {
    let anchor_routing = if config.method == Method::Ddome {
        anchor_routing(spec, global, test, partition, &config.device()?)?
    } else {
        Vec::new()
    };
    let validation = (!partition.validation.is_empty())
        .then(|| zero_shot(config, spec, global, train, classes, &partition.validation))
        .transpose()?;
    Ok(Evaluation {
        test: zero_shot(config, spec, global, test, classes, &partition.test)?,
        anchor_routing,
        validation,
    })
}

/// Bytes a round moves at f32 (DDOME.md, App. K communication model, measured per method).
pub fn round_bytes(config: &SimConfig, gate_params: usize, expert_params: usize) -> RoundBytes {
    let f32_bytes = |params: usize| 4 * params as u64;
    let (p_r, p_e) = (gate_params, expert_params);
    let n = (config.anchors_per_round + config.normals_per_round) as u64;
    match config.method {
        Method::Ddome => {
            let anchors = config.anchors_per_round as u64;
            let normals = config.normals_per_round as u64;
            // A normal device gets W_r, answers K indices + its sample count (u32 each),
            // then gets its K experts; an anchor gets W_r and its one expert.
            let ranking = 4 * (config.k as u64 + 1);
            let normal_model = f32_bytes(p_r + config.k * p_e);
            let anchor_model = f32_bytes(p_r + p_e);
            RoundBytes {
                downlink: normals * normal_model + anchors * anchor_model,
                uplink: normals * (normal_model + ranking) + anchors * anchor_model,
            }
        }
        Method::Fedmix => RoundBytes {
            downlink: n * f32_bytes(p_r + config.experts * p_e),
            uplink: n * f32_bytes(p_r + config.experts * p_e),
        },
        Method::Fedavg | Method::Fedprox => RoundBytes {
            downlink: n * f32_bytes(p_e),
            uplink: n * f32_bytes(p_e),
        },
        Method::Central => RoundBytes {
            downlink: 0,
            uplink: 0,
        },
    }
}

/// Zero-shot evaluation: each test device picks its experts from its unlabelled data (top-K
/// of the mean gate scores), then predicts with no fine-tuning.
pub fn zero_shot(
    config: &SimConfig,
    spec: &ModelSpec,
    global: &GlobalModel,
    test: &Features,
    classes: usize,
    devices: &[DeviceData],
) -> Result<ZeroShot> {
    let device = config.device()?;
    let gate = if config.method.has_gate() {
        Some(params::load(spec.gate(&device), &global.gate, "gate")?)
    } else {
        None
    };
    let experts = global
        .experts
        .iter()
        .enumerate()
        .map(|(e, w)| params::load(spec.expert(&device), w, &format!("expert {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut routing = vec![vec![0usize; classes]; global.experts.len()];
    let mut per_device = Vec::with_capacity(devices.len());
    let mut per_device_mixture = Vec::with_capacity(devices.len());
    let mut selected_all = Vec::with_capacity(devices.len());
    for d in devices {
        let selected: Vec<usize> = match config.method {
            Method::Ddome => {
                let scores = mean_gate_scores(spec, &global.gate, test, &d.indices, &device)?;
                top_k(&scores, config.k)
            }
            Method::Fedmix => (0..config.experts).collect(),
            _ => vec![0],
        };
        let chosen: Vec<_> = selected.iter().map(|&e| &experts[e]).collect();
        let mut predictions = Predictions::default();
        for chunk in d.indices.chunks(1024) {
            let (input, _) = test.batch(chunk, &device);
            predictions.extend(predict(gate.as_ref(), &selected, &chosen, &input));
        }
        let labels: Vec<u16> = d.indices.iter().map(|&i| test.labels[i]).collect();
        let accuracy = |p: &[u16]| {
            p.iter().zip(&labels).filter(|(a, b)| a == b).count() as f64
                / labels.len().max(1) as f64
        };
        per_device.push(accuracy(&predictions.by_top_expert));
        per_device_mixture.push(accuracy(&predictions.by_mixture));
        for (e, y) in predictions.top_expert.iter().zip(&labels) {
            routing[*e][*y as usize] += 1;
        }
        selected_all.push(selected);
    }
    let (mean, std) = mean_std(&per_device);
    let (mean_mixture, _) = mean_std(&per_device_mixture);
    Ok(ZeroShot {
        per_device,
        per_device_mixture,
        mean,
        std,
        mean_mixture,
        routing,
        selected: selected_all,
    })
}

/// For each anchor expert q, the share of test samples carrying q's anchor labels that the
/// gate (argmax over all M experts) routes to q.
fn anchor_routing(
    spec: &ModelSpec,
    global: &GlobalModel,
    test: &Features,
    partition: &Partition,
    device: &Device,
) -> Result<Vec<f64>> {
    let gate = params::load(spec.gate(device), &global.gate, "gate")?;
    let all: Vec<usize> = (0..test.len()).collect();
    let mut top = Vec::with_capacity(test.len());
    for chunk in all.chunks(2048) {
        let (input, _) = test.batch(chunk, device);
        let probs = gate_probabilities(&gate, input.embeddings);
        top.extend(probs.chunks_exact(spec.experts).map(|row| top_k(row, 1)[0]));
    }
    let mut shares = Vec::new();
    for anchor in partition.train.iter().filter(|d| d.anchor_of.is_some()) {
        let q = anchor.anchor_of.expect("filtered to anchors");
        let (mut hits, mut total) = (0usize, 0usize);
        for (i, &e) in top.iter().enumerate() {
            if anchor.label_set.contains(&test.labels[i]) {
                total += 1;
                hits += usize::from(e == q);
            }
        }
        shares.push(hits as f64 / total.max(1) as f64);
    }
    Ok(shares)
}

/// `metrics.csv`, one row per evaluated round, flushed as each row is written.
pub struct MetricsCsv {
    path: PathBuf,
    file: fs::File,
    /// The first write error; the run goes on and the error is reported when it ends.
    error: Option<std::io::Error>,
}

impl MetricsCsv {
    pub fn create(path: &Path) -> Result<Self> {
        let mut file =
            fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        writeln!(
            file,
            "round,train_loss,zero_shot,zero_shot_std,zero_shot_mixture,validation,\
             validation_mixture,elapsed_secs"
        )
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            error: None,
        })
    }

    pub fn append(&mut self, m: &RoundMetrics) {
        if self.error.is_some() {
            return;
        }
        // No validation devices: empty fields, as CSV readers expect of missing values.
        let optional = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
        let row = writeln!(
            self.file,
            "{},{:.6},{:.6},{:.6},{:.6},{},{},{:.3}",
            m.round,
            m.train_loss,
            m.zero_shot,
            m.zero_shot_std,
            m.zero_shot_mixture,
            optional(m.validation),
            optional(m.validation_mixture),
            m.elapsed_secs
        )
        .and_then(|()| self.file.flush());
        self.error = row.err();
    }

    pub fn finish(self) -> Result<()> {
        match self.error {
            Some(e) => Err(e).with_context(|| format!("writing {}", self.path.display())),
            None => Ok(()),
        }
    }
}

/// Mean and population standard deviation.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use ddome_datasets::{ImageShape, PartitionConfig, Skew, partition, synthetic};

    use super::*;
    use crate::checkpoint::CheckpointError;

    /// Synthetic images whose "embedding" is their normalised pixels: no ONNX needed.
    fn setup(seed: u64) -> (Features, Features, Partition) {
        setup_with_validation(seed, 0)
    }

    fn setup_with_validation(
        seed: u64,
        validation_devices: usize,
    ) -> (Features, Features, Partition) {
        let split = synthetic(
            6,
            40,
            20,
            ImageShape {
                height: 4,
                width: 4,
                channels: 1,
            },
            7,
        );
        let embed = |set: &ddome_datasets::ImageSet| -> Vec<f32> {
            set.images.iter().map(|&v| v as f32 / 255.0).collect()
        };
        let (train_emb, test_emb) = (embed(&split.train), embed(&split.test));
        let part = partition(
            &split.train.labels,
            &split.test.labels,
            6,
            &PartitionConfig {
                devices: 12,
                anchors: 3,
                skew: Skew::LabelSkew {
                    labels_per_device: 3,
                },
                samples_per_device: 30,
                test_devices: 4,
                test_samples_per_device: 12,
                validation_devices,
                seed,
            },
        )
        .unwrap();
        (
            Features::from_image_set(split.train, train_emb, 16, false),
            Features::from_image_set(split.test, test_emb, 16, false),
            part,
        )
    }

    fn config(method: Method, seed: u64, threads: usize) -> SimConfig {
        SimConfig {
            method,
            experts: 3,
            k: 2,
            anchors_per_round: 2,
            normals_per_round: 3,
            rounds: 3,
            eval_every: 2,
            expert: ExpertKind::Head { hidden: 8 },
            gate_hidden: 8,
            train: TrainConfig {
                batch_size: 16,
                ..TrainConfig::default()
            },
            prox_mu: 0.01,
            seed,
            threads,
            backend: BackendChoice::Ndarray,
        }
    }

    #[test]
    fn same_seed_gives_identical_model_hash_whatever_the_thread_count() {
        let (train, test, part) = setup(1);
        for method in Method::ALL {
            let a = run(&config(method, 5, 1), &train, &test, 6, &part, |_, _| {}).unwrap();
            let b = run(&config(method, 5, 2), &train, &test, 6, &part, |_, _| {}).unwrap();
            assert_eq!(a.model_sha256, b.model_sha256, "{method:?}");
            assert_eq!(a.zero_shot, b.zero_shot, "{method:?}");
            let c = run(&config(method, 6, 2), &train, &test, 6, &part, |_, _| {}).unwrap();
            assert_ne!(
                a.model_sha256, c.model_sha256,
                "{method:?}: seed must matter"
            );
        }
    }

    #[cfg(not(feature = "flex"))]
    #[test]
    fn a_backend_missing_from_the_build_is_an_error_naming_the_feature() {
        let (train, test, part) = setup(1);
        let config = SimConfig {
            backend: BackendChoice::Flex,
            ..config(Method::Ddome, 1, 1)
        };
        let err = run(&config, &train, &test, 6, &part, |_, _| {}).unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("flex") && message.contains("--features flex"),
            "{message}"
        );
    }

    #[cfg(feature = "flex")]
    #[test]
    fn flex_runs_are_reproducible_and_agree_with_ndarray_to_rounding() {
        let (train, test, part) = setup(1);
        let run_on = |backend, threads| {
            let config = SimConfig {
                backend,
                ..config(Method::Ddome, 5, threads)
            };
            run(&config, &train, &test, 6, &part, |_, _| {}).unwrap()
        };
        let flex_1 = run_on(BackendChoice::Flex, 1);
        let flex_2 = run_on(BackendChoice::Flex, 2);
        assert_eq!(flex_1.model_sha256, flex_2.model_sha256);
        let ndarray = run_on(BackendChoice::Ndarray, 2);
        assert_eq!(flex_1.config.backend, BackendChoice::Flex);
        // Three rounds of SGD amplify rounding differences little: the same experts are
        // selected and accuracy moves by at most a few test samples.
        assert_eq!(flex_1.zero_shot.selected, ndarray.zero_shot.selected);
        assert!(
            (flex_1.zero_shot.mean - ndarray.zero_shot.mean).abs() < 0.05,
            "flex {} against ndarray {}",
            flex_1.zero_shot.mean,
            ndarray.zero_shot.mean
        );
    }

    /// A three-round DDOME run (seed 1) on `setup`'s data.
    fn run_ddome((train, test, part): &(Features, Features, Partition)) -> RunResult {
        run(
            &config(Method::Ddome, 1, 2),
            train,
            test,
            6,
            part,
            |_, _| {},
        )
        .unwrap()
    }

    /// `config` run from its start on `setup`'s data, each checkpoint handed to `on_checkpoint`.
    fn run_checkpointed(
        config: &SimConfig,
        (train, test, part): &(Features, Features, Partition),
        on_checkpoint: OnCheckpoint,
    ) -> RunResult {
        run_resumable(
            config,
            train,
            test,
            6,
            part,
            None,
            |_, _| {},
            Some(on_checkpoint),
        )
        .unwrap()
    }

    #[test]
    fn a_resumed_run_ends_on_the_model_of_one_that_never_stopped() {
        let data = setup(3);
        let (train, test, part) = &data;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        for method in Method::ALL {
            let cfg = |rounds, threads| SimConfig {
                rounds,
                eval_every: 1,
                ..config(method, 4, threads)
            };
            let whole = run(&cfg(3, 2), train, test, 6, part, |_, _| {}).unwrap();
            // Stopped after two rounds, as when a session ends; resumed on another thread count.
            let mut save = |c: Checkpoint| Ok(c.save(&path)?);
            let (first, resumed) = (&cfg(2, 1), &cfg(3, 2));
            let stopped = run_checkpointed(first, &data, &mut save);
            let checkpoint = Checkpoint::load(&path).unwrap();
            assert_eq!(checkpoint.rounds_completed, 2, "{method:?}");
            assert_eq!(
                checkpoint.global.sha256(),
                stopped.model_sha256,
                "{method:?}"
            );
            let mut rounds_run = Vec::new();
            let resume = checkpoint.resume(resumed, train, part, &path).unwrap();
            let resumed = run_resumable(
                resumed,
                train,
                test,
                6,
                part,
                Some(resume),
                |round, _| rounds_run.push(round),
                None,
            )
            .unwrap();
            assert_eq!(rounds_run, [3], "{method:?}: only the missing round runs");
            assert_ne!(stopped.model_sha256, whole.model_sha256, "{method:?}");
            assert_eq!(resumed.model_sha256, whole.model_sha256, "{method:?}");
            assert_eq!(resumed.zero_shot, whole.zero_shot, "{method:?}");
            let points = |r: &RunResult| -> Vec<(usize, f64, f64)> {
                r.history
                    .iter()
                    .map(|m| (m.round, m.train_loss, m.zero_shot))
                    .collect()
            };
            assert_eq!(points(&resumed), points(&whole), "{method:?}");
        }
    }

    #[test]
    fn a_checkpoint_of_another_run_is_refused_naming_what_differs() {
        let data = setup(3);
        let mut kept = None;
        let mut keep = |c: Checkpoint| {
            kept = Some(c);
            Ok(())
        };
        let cfg = config(Method::Ddome, 4, 1);
        run_checkpointed(&cfg, &data, &mut keep);
        let checkpoint = kept.expect("the last round is a checkpoint");
        let setup = setup_sha256(&data.0, &data.2);
        let path = Path::new("runs/x/checkpoint.bin");
        let refusal = |config: &SimConfig, setup: &str| {
            let err = checkpoint.check_continues(config, setup, path).unwrap_err();
            let message = err.to_string();
            assert!(message.contains("runs/x/checkpoint.bin"), "{message}");
            message
        };
        assert!(refusal(&config(Method::Ddome, 5, 1), &setup).contains("its seed differs"));
        assert!(refusal(&config(Method::Fedmix, 4, 1), &setup).contains("its method differs"));
        let wider = SimConfig {
            gate_hidden: 16,
            ..cfg.clone()
        };
        assert!(refusal(&wider, &setup).contains("model or federation setting"));
        let (other_train, _, other_part) = setup_with_validation(3, 2);
        let other = setup_sha256(&other_train, &other_part);
        assert_ne!(other, setup);
        assert!(refusal(&cfg, &other).contains("data or partition"));
        let shorter = SimConfig {
            rounds: 2,
            ..cfg.clone()
        };
        assert!(refusal(&shorter, &setup).contains("completed 3 rounds, more than the 2"));
        // What does not change a round may change.
        let longer = SimConfig {
            rounds: 9,
            threads: 2,
            eval_every: 4,
            ..cfg
        };
        checkpoint.check_continues(&longer, &setup, path).unwrap();
    }

    #[test]
    fn a_damaged_checkpoint_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        let mut save = |c: Checkpoint| Ok(c.save(&path)?);
        run_checkpointed(&config(Method::Ddome, 4, 1), &setup(3), &mut save);
        let good = fs::read(&path).unwrap();
        let mut checkpoint = Checkpoint::load(&path).unwrap();
        let load_error = |bytes: &[u8]| {
            fs::write(&path, bytes).unwrap();
            let err = Checkpoint::load(&path).unwrap_err();
            assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err:?}");
            let message = err.to_string();
            assert!(message.contains("checkpoint.bin"), "{message}");
            message
        };
        assert!(load_error(&good[..good.len() / 2]).contains("decoding"));
        assert!(load_error(b"not a checkpoint at all").contains("header"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(load_error(&longer).contains("1 bytes follow"));
        checkpoint.global.experts[1][0] = f32::NAN;
        checkpoint.save(&path).unwrap();
        let nan = fs::read(&path).unwrap();
        assert!(load_error(&nan).contains("NaN"));
        let missing = Checkpoint::load(&dir.path().join("absent.bin")).unwrap_err();
        assert!(missing.to_string().contains("absent.bin"), "{missing}");
    }

    #[test]
    fn history_has_eval_points_and_final_round() {
        let r = run_ddome(&setup(2));
        let rounds: Vec<usize> = r.history.iter().map(|m| m.round).collect();
        assert_eq!(rounds, vec![2, 3]);
        assert_eq!(r.zero_shot.per_device.len(), 4);
        assert_eq!(r.anchor_routing.len(), 3);
        assert!(r.zero_shot.selected.iter().all(|s| s.len() == 2));
        assert_eq!(r.validation, None);
        assert!(r.history.iter().all(|m| m.validation.is_none()));
    }

    #[test]
    fn validation_devices_are_evaluated_beside_the_test_devices() {
        let data = setup_with_validation(2, 3);
        assert_eq!(data.2.validation.len(), 3);
        let r = run_ddome(&data);
        let validation = r.validation.expect("the partition has validation devices");
        assert_eq!(validation.per_device.len(), 3);
        assert!(validation.selected.iter().all(|s| s.len() == 2));
        // Every validation sample is routed once: they are the held-out train images.
        let routed: usize = validation.routing.iter().flatten().sum();
        assert_eq!(routed, 3 * 12);
        // The final row reports the final evaluation; every row has a validation score.
        let last = r.history.last().expect("round 3 is evaluated");
        assert_eq!(last.validation, Some(validation.mean));
        assert_eq!(last.validation_mixture, Some(validation.mean_mixture));
        assert!(r.history.iter().all(|m| m.validation.is_some()));
        // The test devices are evaluated as before.
        assert_eq!(r.zero_shot.per_device.len(), 4);
    }

    #[test]
    fn metrics_csv_holds_each_row_as_soon_as_it_is_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let mut csv = MetricsCsv::create(&path).unwrap();
        let row = |round| RoundMetrics {
            round,
            train_loss: 2.0,
            zero_shot: 0.25,
            zero_shot_std: 0.05,
            zero_shot_mixture: 0.5,
            anchor_routing: vec![],
            validation: (round > 10).then_some(0.375),
            validation_mixture: (round > 10).then_some(0.4),
            elapsed_secs: 1.5,
        };
        csv.append(&row(10));
        // Readable before the run ends: a run stopped here keeps its first evaluation.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "round,train_loss,zero_shot,zero_shot_std,zero_shot_mixture,validation,\
                 validation_mixture,elapsed_secs",
                "10,2.000000,0.250000,0.050000,0.500000,,,1.500",
            ]
        );
        csv.append(&row(20));
        csv.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().nth(2),
            Some("20,2.000000,0.250000,0.050000,0.500000,0.375000,0.400000,1.500")
        );
    }

    #[test]
    fn metrics_csv_in_a_missing_directory_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").join("metrics.csv");
        let err = MetricsCsv::create(&path).err().unwrap();
        assert!(format!("{err:#}").contains("absent/metrics.csv"), "{err:#}");
    }

    #[test]
    fn bytes_follow_the_communication_model() {
        let c = config(Method::Ddome, 0, 1);
        let b = round_bytes(&c, 100, 10);
        // 3 normals: W_r + 2 experts; 2 anchors: W_r + 1 expert; f32.
        assert_eq!(b.downlink, 4 * (3 * (100 + 20) + 2 * (100 + 10)));
        assert_eq!(b.uplink, b.downlink + 3 * 4 * 3);
        let fedmix = round_bytes(&config(Method::Fedmix, 0, 1), 100, 10);
        assert_eq!(fedmix.downlink, 5 * 4 * (100 + 30));
    }
}
