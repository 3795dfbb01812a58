//! A coordinator and six agents (three anchors, three normal devices) on loopback QUIC in
//! this process, on real CIFAR-10 images embedded by the real common expert.
//!
//! What must hold (issue 3): the lossless networked run equals `ddome simulate` bit for bit;
//! int8 deltas cost at most half a point of zero-shot accuracy; unenrolled and revoked
//! devices are refused; a vanished device does not hold a round past its deadline; a
//! coordinator stopped mid-run resumes from its store and completes the rounds, losing no
//! accepted update.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ddome_agent::{AgentConfig, AgentError, AgentSummary, LocalData};
use ddome_coordinator::StateDir;
use ddome_coordinator::config::{FederationConfig, ModelConfig, TrainSection};
use ddome_coordinator::server::{ServeReport, ServerHandle, start};
use ddome_datasets::{Partition, PartitionConfig, Skew, load_split, partition};
use ddome_models::{
    BackendChoice, CommonExpert, CommonExpertConfig, ExpertKind, Features, GlobalModel,
    TrainConfig, embed_cached,
};
use ddome_protocol::codec::CodecConfig;
use ddome_protocol::message::{AgentMessage, CoordinatorMessage, ErrorCode, Hello, Intent};
use ddome_protocol::round::RoundKind;
use ddome_protocol::{PROTOCOL_VERSION, Selection, SelectionConfig, select_participants};
use ddome_tools::simulate::{self, Method, SimConfig};

use crate::{common_expert_onnx, root};

/// Anchors (= experts) and normal devices of the test fleet.
pub(crate) const ANCHORS: usize = 3;
pub(crate) const NORMALS: usize = 3;
pub(crate) const SEED: u64 = 5;
/// Local epochs: with 200 samples a device makes one SGD step per epoch, and a few rounds of
/// single steps barely move the experts; five epochs let a short test learn.
const LOCAL_EPOCHS: usize = 5;
/// No await in these tests may hang: everything runs under this limit.
pub(crate) const LIMIT: Duration = Duration::from_secs(300);

/// A slice of real CIFAR-10 (every 25th training image, every 20th test image) seen through
/// the real common expert at 64×64, and its partition over the fleet.
pub(crate) struct RealData {
    pub(crate) train: Arc<Features>,
    pub(crate) test: Features,
    pub(crate) classes: Vec<String>,
    pub(crate) partition: Partition,
}

pub(crate) fn real_data() -> &'static RealData {
    static DATA: OnceLock<RealData> = OnceLock::new();
    DATA.get_or_init(|| {
        let split = load_split(&root().join("data/cifar10-jpeg"))
            .expect("CIFAR-10 ImageFolder in data/: run scripts/setup.sh");
        let train_rows: Vec<usize> = (0..split.train.len()).step_by(25).collect();
        let test_rows: Vec<usize> = (0..split.test.len()).step_by(20).collect();
        let (train, test) = (
            split.train.subset(&train_rows),
            split.test.subset(&test_rows),
        );
        let expert = CommonExpert::load(CommonExpertConfig::efficientnet_lite0(
            common_expert_onnx(),
            64,
        ))
        .unwrap();
        let cache = root().join(".cache/embeddings");
        let (train_emb, _) = embed_cached(&expert, &train, &cache).unwrap();
        let (test_emb, _) = embed_cached(&expert, &test, &cache).unwrap();
        let classes = train.classes.clone();
        let partition = partition(
            &train.labels,
            &test.labels,
            classes.len(),
            &PartitionConfig {
                devices: ANCHORS + NORMALS,
                anchors: ANCHORS,
                skew: Skew::LabelSkew {
                    labels_per_device: 4,
                },
                samples_per_device: 200,
                test_devices: 4,
                test_samples_per_device: 100,
                validation_devices: 0,
                seed: SEED,
            },
        )
        .unwrap();
        RealData {
            train: Arc::new(Features::from_image_set(
                train,
                train_emb,
                expert.dim(),
                false,
            )),
            test: Features::from_image_set(test, test_emb, expert.dim(), false),
            classes,
            partition,
        }
    })
}

pub(crate) fn federation(rounds: u64, codec: CodecConfig) -> FederationConfig {
    let paper = TrainConfig::default();
    FederationConfig {
        method: RoundKind::Ddome,
        seed: SEED,
        rounds,
        experts: ANCHORS,
        k: 2,
        anchors_per_round: 2,
        normals_per_round: 2,
        min_updates: 4,
        wait_for_devices: ANCHORS + NORMALS,
        round_deadline_secs: 120.0,
        codec,
        downlink: CodecConfig::LOSSLESS,
        max_frame: ddome_protocol::frame::DEFAULT_MAX_FRAME,
        model: ModelConfig {
            classes: real_data().classes.clone(),
            embedding_dim: 1280,
            gate_hidden: 256,
            expert_hidden: 256,
            common_expert_sha256: String::new(),
        },
        train: TrainSection {
            epochs: LOCAL_EPOCHS,
            batch_size: paper.batch_size,
            expert_lr: paper.expert_lr,
            gate_lr: paper.gate_lr,
            momentum: paper.momentum,
        },
    }
}

/// The simulator's config for the same federation.
pub(crate) fn simulation(rounds: u64) -> SimConfig {
    SimConfig {
        method: Method::Ddome,
        experts: ANCHORS,
        k: 2,
        anchors_per_round: 2,
        normals_per_round: 2,
        rounds: rounds as usize,
        eval_every: rounds as usize,
        expert: ExpertKind::Head { hidden: 256 },
        gate_hidden: 256,
        train: TrainConfig {
            epochs: LOCAL_EPOCHS,
            ..TrainConfig::default()
        },
        prox_mu: 0.0,
        seed: SEED,
        threads: 2,
        backend: BackendChoice::Ndarray,
    }
}

/// A state directory with the fleet enrolled (device i = partition device i, anchors first):
/// returns the device names and credentials.
pub(crate) fn enrolled(dir: &Path) -> Vec<(String, String)> {
    let mut state = StateDir::init(dir).unwrap();
    (0..ANCHORS + NORMALS)
        .map(|i| {
            let name = format!("dev-{i}");
            let anchor = (i < ANCHORS).then_some(i as u32);
            let (record, credential) = state.store_mut().enroll(&name, anchor).unwrap();
            assert_eq!(record.id, i as u64, "ids follow enrolment order");
            (name, credential.reveal())
        })
        .collect()
}

async fn serve(dir: &Path, config: FederationConfig, addr: SocketAddr) -> ServerHandle {
    let (store, identity) = StateDir::open(dir).unwrap().into_parts();
    start(store, &identity, config, addr).await.unwrap()
}

pub(crate) fn fingerprint(dir: &Path) -> String {
    StateDir::open(dir).unwrap().identity().fingerprint()
}

pub(crate) fn agent_config(
    addr: SocketAddr,
    fingerprint: &str,
    name: &str,
    credential: &str,
) -> AgentConfig {
    let mut config = AgentConfig::new(addr, fingerprint, name, credential);
    config.initial_backoff = Duration::from_millis(20);
    config.max_backoff = Duration::from_millis(500);
    config
}

fn local_data(device: usize) -> LocalData {
    let data = real_data();
    LocalData {
        features: Arc::clone(&data.train),
        indices: data.partition.train[device].indices.clone(),
        common_expert_sha256: None,
        class_names: None,
    }
}

/// Spawns an agent for each of `devices`.
pub(crate) fn spawn_agents(
    addr: SocketAddr,
    fingerprint: &str,
    credentials: &[(String, String)],
    devices: impl IntoIterator<Item = usize>,
) -> Vec<tokio::task::JoinHandle<Result<AgentSummary, AgentError>>> {
    devices
        .into_iter()
        .map(|i| {
            let (name, credential) = &credentials[i];
            let config = agent_config(addr, fingerprint, name, credential);
            let data = local_data(i);
            tokio::spawn(async move { ddome_agent::run(&config, &data).await })
        })
        .collect()
}

pub(crate) async fn join_agents(
    agents: Vec<tokio::task::JoinHandle<Result<AgentSummary, AgentError>>>,
) -> Vec<AgentSummary> {
    let mut summaries = Vec::new();
    for agent in agents {
        let summary = tokio::time::timeout(LIMIT, agent)
            .await
            .expect("agent finishes in time")
            .expect("agent task does not panic")
            .expect("agent ends cleanly");
        summaries.push(summary);
    }
    summaries
}

/// Runs a whole federation over QUIC; returns the report, the final model and the agents'
/// summaries.
async fn networked_run(
    rounds: u64,
    codec: CodecConfig,
) -> (ServeReport, GlobalModel, Vec<AgentSummary>) {
    networked_run_with(federation(rounds, codec)).await
}

async fn networked_run_with(
    config: FederationConfig,
) -> (ServeReport, GlobalModel, Vec<AgentSummary>) {
    let dir = tempfile::tempdir().unwrap();
    let credentials = enrolled(dir.path());
    let server = serve(dir.path(), config, loopback()).await;
    let agents = spawn_agents(
        server.local_addr,
        &fingerprint(dir.path()),
        &credentials,
        0..ANCHORS + NORMALS,
    );
    let report = tokio::time::timeout(LIMIT, server.finished())
        .await
        .expect("federation finishes in time")
        .unwrap();
    let summaries = join_agents(agents).await;
    (report, final_model(dir.path()), summaries)
}

pub(crate) fn loopback() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

pub(crate) fn final_model(dir: &Path) -> GlobalModel {
    let state = StateDir::open(dir).unwrap();
    let checkpoint = state.store().global_model().unwrap().unwrap();
    postcard::from_bytes(&checkpoint.blob).unwrap()
}

fn zero_shot(model: &GlobalModel, rounds: u64) -> f64 {
    let data = real_data();
    let config = simulation(rounds);
    let spec = simulate::model_spec(&config, &data.train, data.classes.len()).unwrap();
    simulate::zero_shot(
        &config,
        &spec,
        model,
        &data.test,
        data.classes.len(),
        &data.partition.test,
    )
    .unwrap()
    .mean
}

pub(crate) fn simulated(rounds: u64) -> simulate::RunResult {
    simulated_with(&simulation(rounds))
}

fn simulated_with(config: &SimConfig) -> simulate::RunResult {
    let data = real_data();
    simulate::run(
        config,
        &data.train,
        &data.test,
        data.classes.len(),
        &data.partition,
        |_, _| {},
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lossless_networked_run_equals_the_simulation_bit_for_bit() {
    let rounds = 4;
    let (report, model, summaries) = networked_run(rounds, CodecConfig::LOSSLESS).await;
    let simulated = simulated(rounds);
    assert_eq!(report.rounds_completed, rounds);
    assert_eq!(report.model_sha256, model.sha256());
    assert_eq!(
        report.model_sha256, simulated.model_sha256,
        "the networked model differs from `ddome simulate` with the same seed and config"
    );
    // Four participants per round uploaded, and every agent heard the end.
    let accepted: u64 = summaries.iter().map(|s| s.updates_accepted).sum();
    assert_eq!(accepted, 4 * rounds);
    assert!(summaries.iter().all(|s| s.rounds_completed == rounds));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fedmix_and_fedavg_over_the_network_equal_their_simulations() {
    let rounds = 3;
    for (kind, method) in [
        (RoundKind::Fedmix, Method::Fedmix),
        (RoundKind::Fedavg, Method::Fedavg),
    ] {
        let config = FederationConfig {
            method: kind,
            ..federation(rounds, CodecConfig::LOSSLESS)
        };
        let (report, _, summaries) = networked_run_with(config).await;
        let simulated = simulated_with(&SimConfig {
            method,
            ..simulation(rounds)
        });
        assert_eq!(report.model_sha256, simulated.model_sha256, "{method:?}");
        let accepted: u64 = summaries.iter().map(|s| s.updates_accepted).sum();
        assert_eq!(accepted, 4 * rounds, "{method:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn int8_deltas_cost_at_most_half_a_point() {
    let rounds = 20;
    let (_, int8_model, int8_agents) = networked_run(rounds, CodecConfig::int8()).await;
    let (_, lossless_model, lossless_agents) = networked_run(rounds, CodecConfig::LOSSLESS).await;
    let (int8, lossless) = (
        zero_shot(&int8_model, rounds),
        zero_shot(&lossless_model, rounds),
    );
    eprintln!(
        "zero-shot after {rounds} rounds: int8 {:.2}%, lossless {:.2}%",
        100.0 * int8,
        100.0 * lossless
    );
    assert!(
        lossless > 0.3,
        "the lossless run learns: {:.1}% on 10 classes",
        100.0 * lossless
    );
    assert!(
        (int8 - lossless).abs() <= 0.005,
        "int8 {:.2}% vs lossless {:.2}%",
        100.0 * int8,
        100.0 * lossless
    );
    assert_ne!(int8_model, lossless_model, "int8 really changed the deltas");
    let sent = |agents: &[AgentSummary]| agents.iter().map(|s| s.bytes_sent).sum::<u64>();
    assert!(
        sent(&int8_agents) * 2 < sent(&lossless_agents),
        "int8 uplink {} bytes vs lossless {}",
        sent(&int8_agents),
        sent(&lossless_agents)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unenrolled_and_revoked_devices_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = enrolled(dir.path());
    let revoked = {
        let mut state = StateDir::open(dir.path()).unwrap();
        let (_, credential) = state.store_mut().enroll("gone", None).unwrap();
        state.store_mut().revoke("gone").unwrap();
        credential.reveal()
    };
    let server = serve(dir.path(), federation(1, CodecConfig::LOSSLESS), loopback()).await;
    let fp = fingerprint(dir.path());
    let good_secret = &credentials[3].1;
    for (name, credential) in [
        ("stranger", good_secret.as_str()),
        ("gone", revoked.as_str()),
        ("dev-3", credentials[4].1.as_str()),
    ] {
        let config = agent_config(server.local_addr, &fp, name, credential);
        let outcome = tokio::time::timeout(LIMIT, ddome_agent::run(&config, &local_data(3)))
            .await
            .expect("refusal comes in time");
        match outcome {
            Err(AgentError::Refused(e)) => assert_eq!(e.code, ErrorCode::Unauthenticated),
            other => panic!("{name} was not refused: {other:?}"),
        }
    }
    // A wrong pinned certificate fails the handshake: the agent never talks to an impostor.
    let impostor = agent_config(server.local_addr, &"0".repeat(64), "dev-3", good_secret);
    let mut impostor = impostor;
    impostor.max_backoff = Duration::from_millis(50);
    let attempt = tokio::time::timeout(
        Duration::from_secs(3),
        ddome_agent::run(&impostor, &local_data(3)),
    )
    .await;
    assert!(attempt.is_err(), "a pinning failure is never a session");
    server.abort();
    let state = StateDir::open(dir.path()).unwrap();
    let counts = state.store().failure_counts().unwrap();
    assert_eq!(counts.get("unauthenticated"), Some(&3), "{counts:?}");
}

/// Who round 0 selects (the coordinator draws as the simulator does).
fn round_zero() -> Selection {
    let anchors: Vec<usize> = (0..ANCHORS).collect();
    let normals: Vec<usize> = (ANCHORS..ANCHORS + NORMALS).collect();
    let config = SelectionConfig {
        anchors: 2,
        normals: 2,
    };
    select_participants(&anchors, &normals, config, SEED, 0).unwrap()
}

/// A device that authenticates, takes its first task and then never answers.
async fn silent_device(addr: SocketAddr, fingerprint: &str, name: &str, credential: &str) {
    let endpoint = ddome_transport::client(fingerprint).unwrap();
    let conn = endpoint
        .connect(addr, ddome_transport::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = AgentMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        device: name.into(),
        credential: credential.into(),
        intent: Intent::Train,
    });
    ddome_transport::write_message(&mut send, &hello, usize::MAX)
        .await
        .unwrap();
    // Read until the end; answer nothing.
    while let Ok(Some(message)) =
        ddome_transport::read_message::<CoordinatorMessage>(&mut recv, usize::MAX).await
    {
        if matches!(message, CoordinatorMessage::Finished { .. }) {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vanished_device_does_not_hold_the_round_past_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = enrolled(dir.path());
    let mut config = federation(2, CodecConfig::LOSSLESS);
    config.min_updates = 3;
    config.round_deadline_secs = 3.0;
    // The silent device is one that round 0 selects.
    let selection = round_zero();
    let silent = selection.normals[0];
    let server = serve(dir.path(), config, loopback()).await;
    let fp = fingerprint(dir.path());
    let agents = spawn_agents(
        server.local_addr,
        &fp,
        &credentials,
        (0..ANCHORS + NORMALS).filter(|&d| d != silent),
    );
    let (name, credential) = credentials[silent].clone();
    let addr = server.local_addr;
    let fp2 = fp.clone();
    let silent_task =
        tokio::spawn(async move { silent_device(addr, &fp2, &name, &credential).await });
    let started = Instant::now();
    let report = tokio::time::timeout(LIMIT, server.finished())
        .await
        .expect("the deadline releases the round")
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(report.rounds_completed, 2);
    assert!(
        elapsed >= Duration::from_secs(3),
        "round 0 waited for its deadline ({elapsed:?})"
    );
    join_agents(agents).await;
    silent_task.await.unwrap();
    let state = StateDir::open(dir.path()).unwrap();
    let counts = state.store().failure_counts().unwrap();
    assert!(
        counts.get("deadline_missed").is_some_and(|&n| n >= 1),
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_coordinator_resumes_and_loses_no_accepted_update() {
    let rounds = 4;
    let dir = tempfile::tempdir().unwrap();
    let credentials = enrolled(dir.path());
    let server = serve(
        dir.path(),
        federation(rounds, CodecConfig::LOSSLESS),
        loopback(),
    )
    .await;
    let addr = server.local_addr;
    let agents = spawn_agents(
        addr,
        &fingerprint(dir.path()),
        &credentials,
        0..ANCHORS + NORMALS,
    );
    // Stop it in the middle of round 1, with some of that round's updates committed.
    let mut progress = server.progress();
    tokio::time::timeout(
        LIMIT,
        progress.wait_for(|p| p.rounds_completed == 1 && p.accepted_in_round >= 2),
    )
    .await
    .expect("round 1 gets updates in time")
    .unwrap();
    server.abort();
    // The same address, so the agents find it again.
    let restarted = tokio::time::timeout(LIMIT, async {
        loop {
            let (store, identity) = StateDir::open(dir.path()).unwrap().into_parts();
            match start(
                store,
                &identity,
                federation(rounds, CodecConfig::LOSSLESS),
                addr,
            )
            .await
            {
                Ok(server) => break server,
                // The aborted endpoint may hold the port a moment longer.
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("rebinding succeeds");
    // Usually the abort lands mid-round 1; on a fast machine the round's last uploads can
    // complete it first. Either way the restart must resume from at least what was observed.
    let resumed_with = *restarted.progress().borrow();
    assert!(
        (
            resumed_with.rounds_completed,
            resumed_with.accepted_in_round
        ) >= (1, 2),
        "the accepted updates of round 1 survived the restart: {resumed_with:?}"
    );
    let report = tokio::time::timeout(LIMIT, restarted.finished())
        .await
        .expect("the resumed federation finishes")
        .unwrap();
    assert_eq!(report.rounds_completed, rounds);
    join_agents(agents).await;
    // Nothing accepted was lost or counted twice: the result is the simulation's.
    assert_eq!(report.model_sha256, simulated(rounds).model_sha256);
}

/// A scripted participant speaking the protocol by hand: it sends every kind of bad update
/// once, then behaves (zero deltas), so the federation can finish.
async fn hostile_participant(
    addr: SocketAddr,
    fingerprint: String,
    name: String,
    credential: String,
) -> Vec<ErrorCode> {
    use ddome_protocol::codec::{EncodedDelta, encode};
    use ddome_protocol::message::{Ranking, Update};
    let endpoint = ddome_transport::client(&fingerprint).unwrap();
    let conn = endpoint
        .connect(addr, ddome_transport::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let max = usize::MAX;
    let hello = AgentMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        device: name,
        credential,
        intent: Intent::Train,
    });
    ddome_transport::write_message(&mut send, &hello, max)
        .await
        .unwrap();
    let mut refusals = Vec::new();
    let mut misbehaved = false;
    let zeros = |len: usize| encode(&vec![0.0; len], CodecConfig::LOSSLESS).unwrap();
    loop {
        let message = tokio::time::timeout(LIMIT, ddome_transport::read_message(&mut recv, max))
            .await
            .expect("the coordinator keeps talking")
            .unwrap();
        let reply = match message {
            Some(CoordinatorMessage::RankRequest(r)) => AgentMessage::Ranking(Ranking {
                round: r.round,
                attempt: r.attempt,
                experts: vec![0, 1],
                samples: 200,
            }),
            Some(CoordinatorMessage::TrainTask(task)) => {
                let gate_len = match &task.gate {
                    Some(g) => g.len as usize,
                    None => 1280 * 256 + 256 + 256 * ANCHORS + ANCHORS,
                };
                let expert_len = task.experts[0].1.len as usize;
                let good = Update {
                    round: task.round,
                    attempt: task.attempt,
                    samples: 200,
                    mean_loss: 1.0,
                    gate: Some(zeros(gate_len)),
                    experts: task
                        .experts
                        .iter()
                        .map(|(e, _)| (*e, zeros(expert_len)))
                        .collect(),
                };
                if !misbehaved {
                    misbehaved = true;
                    let mut wrong_shape = good.clone();
                    wrong_shape.gate = Some(zeros(gate_len - 1));
                    let mut not_finite = good.clone();
                    let mut values = vec![0.0f32; expert_len];
                    values[7] = f32::NAN;
                    not_finite.experts[0].1 = EncodedDelta {
                        len: expert_len as u32,
                        index_gaps: None,
                        values: ddome_protocol::codec::EncodedValues::F32(values),
                    };
                    let mut stale = good.clone();
                    stale.round += 7;
                    for bad in [wrong_shape, not_finite, stale, good.clone(), good.clone()] {
                        ddome_transport::write_message(&mut send, &AgentMessage::Update(bad), max)
                            .await
                            .unwrap();
                    }
                    continue;
                }
                AgentMessage::Update(good)
            }
            Some(CoordinatorMessage::Error(e)) => {
                refusals.push(e.code);
                continue;
            }
            Some(CoordinatorMessage::Finished { .. }) | None => return refusals,
            Some(_) => continue,
        };
        ddome_transport::write_message(&mut send, &reply, max)
            .await
            .unwrap();
    }
}

/// Opens a connection and writes `bytes` raw on its stream; returns the coordinator's error.
async fn raw_exchange(
    addr: SocketAddr,
    fingerprint: &str,
    bytes: Vec<u8>,
    finish: bool,
) -> ErrorCode {
    let endpoint = ddome_transport::client(fingerprint).unwrap();
    let conn = endpoint
        .connect(addr, ddome_transport::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let reply = tokio::time::timeout(LIMIT, ddome_transport::read_message(&mut recv, usize::MAX))
        .await
        .expect("the coordinator answers")
        .unwrap();
    match reply {
        Some(CoordinatorMessage::Error(e)) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_gets_typed_errors_and_everyone_else_is_served() {
    let rounds = 3;
    let dir = tempfile::tempdir().unwrap();
    let credentials = enrolled(dir.path());
    let server = serve(
        dir.path(),
        federation(rounds, CodecConfig::LOSSLESS),
        loopback(),
    )
    .await;
    let (addr, fp) = (server.local_addr, fingerprint(dir.path()));
    // Round 0's first anchor misbehaves; the other five are real agents.
    let selection = round_zero();
    let hostile = selection.anchors[0];
    let agents = spawn_agents(
        addr,
        &fp,
        &credentials,
        (0..ANCHORS + NORMALS).filter(|&d| d != hostile),
    );
    let (name, credential) = credentials[hostile].clone();
    let scripted = tokio::spawn(hostile_participant(addr, fp.clone(), name, credential));

    // Frames that are oversized, malformed, truncated, or speak another version.
    let frame =
        |message: &AgentMessage| ddome_protocol::frame::encode_frame(message, usize::MAX).unwrap();
    let old_hello = AgentMessage::Hello(Hello {
        version: PROTOCOL_VERSION + 1,
        device: "dev-0".into(),
        credential: credentials[0].1.clone(),
        intent: Intent::Train,
    });
    let mut truncated = frame(&old_hello);
    truncated.truncate(truncated.len() - 3);
    // Protocol 1's `Hello` had no `intent`: it does not decode as ours, yet is named.
    #[derive(serde::Serialize)]
    enum AgentMessageV1 {
        Hello {
            version: u32,
            device: String,
            credential: String,
        },
    }
    let v1_hello = ddome_protocol::frame::encode_frame(
        &AgentMessageV1::Hello {
            version: 1,
            device: "dev-0".into(),
            credential: credentials[0].1.clone(),
        },
        usize::MAX,
    )
    .unwrap();
    for (bytes, finish, expected) in [
        (
            u32::MAX.to_le_bytes().to_vec(),
            false,
            ErrorCode::OversizedFrame,
        ),
        (
            vec![3, 0, 0, 0, 0xff, 0xff, 0xff],
            false,
            ErrorCode::MalformedFrame,
        ),
        (truncated, true, ErrorCode::MalformedFrame),
        (frame(&old_hello), false, ErrorCode::VersionMismatch),
        (v1_hello, false, ErrorCode::VersionMismatch),
    ] {
        assert_eq!(raw_exchange(addr, &fp, bytes, finish).await, expected);
    }

    let report = tokio::time::timeout(LIMIT, server.finished())
        .await
        .expect("the federation finishes despite the hostile peer")
        .unwrap();
    assert_eq!(report.rounds_completed, rounds);
    join_agents(agents).await;
    let refusals = scripted.await.unwrap();
    assert_eq!(
        refusals,
        [
            ErrorCode::BadShape,
            ErrorCode::NotFinite,
            ErrorCode::StaleRound,
            ErrorCode::DuplicateUpdate
        ]
    );
    let model = final_model(dir.path());
    assert!(
        model
            .gate
            .iter()
            .chain(model.experts.iter().flatten())
            .all(|v| v.is_finite()),
        "no refused delta reached the model"
    );
    let counts = StateDir::open(dir.path())
        .unwrap()
        .store()
        .failure_counts()
        .unwrap();
    for kind in [
        "oversized_frame",
        "bad_shape",
        "not_finite",
        "stale_round",
        "duplicate_update",
    ] {
        assert_eq!(counts.get(kind), Some(&1), "{kind} in {counts:?}");
    }
    assert_eq!(counts.get("malformed_frame"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("version_mismatch"), Some(&2), "{counts:?}");
}
