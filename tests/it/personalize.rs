//! Zero-shot personalised inference on loopback QUIC, on the real CIFAR-10 fixture of the
//! network tests.
//!
//! What must hold (issue 5): new devices personalise from unlabelled data alone, and their
//! zero-shot accuracy measured through the coordinator's infer service and through the
//! agent's on-device prediction equals the simulator's zero-shot evaluation of the same
//! model on the same data, exactly; serve-only devices are never scheduled into a round;
//! requests for experts that do not exist, embeddings of the wrong width, oversized
//! batches and unauthenticated callers get typed errors, are counted in `status`, and the
//! service keeps answering everyone else.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ddome_agent::{AgentConfig, DeviceModel, LocalData, ServiceClient, ServiceError};
use ddome_coordinator::StateDir;
use ddome_coordinator::config::InferenceConfig;
use ddome_coordinator::server::{ServerHandle, start_with};
use ddome_models::{CommonExpert, CommonExpertConfig, Features, Predictions};
use ddome_protocol::codec::CodecConfig;
use ddome_protocol::message::{
    AgentMessage, CommonExpertRef, CoordinatorMessage, ErrorCode, InferInput, InferRequest,
    PersonalizeRequest, Prediction,
};
use ddome_tools::simulate;

use crate::network::{
    ANCHORS, LIMIT, NORMALS, agent_config, enrolled, federation, final_model, fingerprint,
    join_agents, loopback, real_data, simulated, simulation, spawn_agents,
};
use crate::{common_expert_onnx, root};

/// Enrols the partition's unseen test devices as normal devices that will never train.
fn enroll_newcomers(dir: &Path, count: usize) -> Vec<(String, String)> {
    let mut state = StateDir::open(dir).unwrap();
    (0..count)
        .map(|i| {
            let name = format!("new-{i}");
            let (_, credential) = state.store_mut().enroll(&name, None).unwrap();
            (name, credential.reveal())
        })
        .collect()
}

async fn serve(dir: &Path, rounds: u64, inference: InferenceConfig) -> ServerHandle {
    let (store, identity) = StateDir::open(dir).unwrap().into_parts();
    start_with(
        store,
        &identity,
        federation(rounds, CodecConfig::LOSSLESS),
        inference,
        loopback(),
    )
    .await
    .unwrap()
}

async fn connect(config: &AgentConfig) -> ServiceClient {
    tokio::time::timeout(LIMIT, ServiceClient::connect(config))
        .await
        .expect("the service answers hello in time")
        .expect("an enrolled device is welcome")
}

/// The common expert the fixture's embeddings come from.
fn common_expert_ref() -> CommonExpertRef {
    let model = CommonExpert::load(CommonExpertConfig::efficientnet_lite0(
        common_expert_onnx(),
        64,
    ))
    .unwrap();
    CommonExpertRef {
        sha256: model.model_sha256().to_string(),
        input_size: [64, 64],
    }
}

/// The rows of `features` at `indices`, flat.
fn rows(features: &Features, indices: &[usize]) -> Vec<f32> {
    indices
        .iter()
        .flat_map(|&i| features.embedding(i).iter().copied())
        .collect()
}

fn accuracy(predicted: impl Iterator<Item = u16>, labels: &[u16]) -> f64 {
    predicted.zip(labels).filter(|(p, y)| p == *y).count() as f64 / labels.len().max(1) as f64
}

/// The service's answer in the model crate's columns, to compare with on-device predictions.
fn columns(predictions: &[Prediction]) -> Predictions {
    Predictions {
        by_top_expert: predictions.iter().map(|p| p.class).collect(),
        top_expert: predictions.iter().map(|p| p.expert as usize).collect(),
        by_mixture: predictions.iter().map(|p| p.mixture_class).collect(),
        confidence: predictions.iter().map(|p| p.confidence).collect(),
        mixture_confidence: predictions.iter().map(|p| p.mixture_confidence).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_shot_through_the_service_and_on_the_device_equals_the_simulator() {
    let rounds = 10;
    let data = real_data();
    let dir = tempfile::tempdir().unwrap();
    let credentials = enrolled(dir.path());
    let newcomers = enroll_newcomers(dir.path(), data.partition.test.len());
    let server = serve(
        dir.path(),
        rounds,
        InferenceConfig {
            keep_serving: true,
            ..InferenceConfig::default()
        },
    )
    .await;
    let (addr, fp) = (server.local_addr, fingerprint(dir.path()));

    // The newcomers connect before the fleet: if a round could select them, it would, and
    // the model would differ from the simulation's.
    let mut clients = Vec::new();
    for (name, credential) in &newcomers {
        clients.push(connect(&agent_config(addr, &fp, name, credential)).await);
    }
    let offer = clients[0].gate().await.unwrap();
    assert_eq!(offer.round, 0, "the service answers before the first round");
    let agents = spawn_agents(addr, &fp, &credentials, 0..ANCHORS + NORMALS);
    let mut progress = server.progress();
    tokio::time::timeout(LIMIT, progress.wait_for(|p| p.rounds_completed == rounds))
        .await
        .expect("the federation trains in time")
        .unwrap();
    let summaries = join_agents(agents).await;
    assert!(summaries.iter().all(|s| s.rounds_completed == rounds));
    let model = final_model(dir.path());
    assert_eq!(
        model.sha256(),
        simulated(rounds).model_sha256,
        "serve-only devices changed the federation"
    );

    // The simulator's zero-shot evaluation of the very same model.
    let config = simulation(rounds);
    let spec = simulate::model_spec(&config, &data.train, data.classes.len()).unwrap();
    let expected = simulate::zero_shot(
        &config,
        &spec,
        &model,
        &data.test,
        data.classes.len(),
        &data.partition.test,
    )
    .unwrap();

    let test = Arc::new(data.test.clone());
    let common_expert = common_expert_ref();
    let bundles = tempfile::tempdir().unwrap();
    let (mut served, mut on_device) = (Vec::new(), Vec::new());
    let (mut served_mixture, mut on_device_mixture) = (Vec::new(), Vec::new());
    for (i, device) in data.partition.test.iter().enumerate() {
        // Unlabelled: the device holds only its embeddings.
        let local = LocalData {
            features: Arc::clone(&test),
            indices: device.indices.clone(),
            common_expert_sha256: None,
            class_names: None,
        };
        let personalized = tokio::time::timeout(
            LIMIT,
            ddome_agent::personalize_with(&clients[i], &local, &common_expert),
        )
        .await
        .expect("personalisation answers in time")
        .unwrap();
        assert_eq!(personalized.bundle.round, rounds);
        assert_eq!(personalized.bundle.global_model_sha256, model.sha256());
        assert_eq!(
            personalized.bundle.expert_indices(),
            expected.selected[i],
            "test device {i} chose other experts than the simulator's"
        );
        let path = bundles.path().join(format!("new-{i}.ddome"));
        ddome_agent::save_bundle(&path, &personalized.bytes).unwrap();
        let device_model = DeviceModel::open(&path).unwrap();

        let embeddings = rows(&test, &device.indices);
        let labels: Vec<u16> = device.indices.iter().map(|&j| test.labels[j]).collect();
        let local_predictions = device_model.predict_embeddings(&embeddings).unwrap();
        let reply = clients[i]
            .infer(InferRequest {
                experts: personalized
                    .bundle
                    .experts
                    .iter()
                    .map(|(e, _)| *e)
                    .collect(),
                input: InferInput::Embeddings {
                    dim: test.dim as u32,
                    values: embeddings,
                },
            })
            .await
            .unwrap();
        assert_eq!(reply.round, rounds);
        let remote_predictions = columns(&reply.predictions);
        assert_eq!(
            remote_predictions, local_predictions,
            "the service and the device predict differently"
        );
        served.push(accuracy(
            remote_predictions.by_top_expert.iter().copied(),
            &labels,
        ));
        served_mixture.push(accuracy(
            remote_predictions.by_mixture.iter().copied(),
            &labels,
        ));
        on_device.push(accuracy(
            local_predictions.by_top_expert.iter().copied(),
            &labels,
        ));
        on_device_mixture.push(accuracy(
            local_predictions.by_mixture.iter().copied(),
            &labels,
        ));
    }
    assert_eq!(served, expected.per_device);
    assert_eq!(on_device, expected.per_device);
    assert_eq!(served_mixture, expected.per_device_mixture);
    assert_eq!(on_device_mixture, expected.per_device_mixture);
    let (mean, _) = simulate::mean_std(&served);
    assert_eq!(mean, expected.mean);
    eprintln!(
        "zero-shot after {rounds} rounds: {:.2}% through the service, on the device and in the \
         simulator; experts chosen {:?}",
        100.0 * mean,
        expected.selected
    );

    // A gate fetched before the last round still personalises, from the checkpoint it came
    // from; one pruned since is stale, and the device is told to fetch the gate again.
    let request = |round| PersonalizeRequest {
        round,
        experts: vec![1],
        scores: vec![0.2, 0.5, 0.3],
        samples: 10,
        common_expert: common_expert.clone(),
    };
    let older = clients[0].personalize(request(rounds - 1)).await.unwrap();
    let (older, _) = ddome_protocol::bundle::Bundle::decode(&older.bytes).unwrap();
    assert_eq!(older.round, rounds - 1);
    assert_ne!(older.global_model_sha256, model.sha256());
    assert_eq!(
        refusal(clients[0].personalize(request(0)).await),
        ErrorCode::StaleRound
    );

    for client in clients {
        client.close().await;
    }
    server.shutdown();
    let report = tokio::time::timeout(LIMIT, server.finished())
        .await
        .expect("shutdown completes")
        .unwrap();
    assert_eq!(report.rounds_completed, rounds);
}

/// A few real test images of CIFAR-10, as a device would hold them.
fn some_images(count: usize) -> Vec<PathBuf> {
    let dir = root().join("data/cifar10-jpeg/test");
    ["airplane", "cat", "ship", "truck", "frog"]
        .iter()
        .cycle()
        .take(count)
        .enumerate()
        .map(|(i, class)| dir.join(class).join(format!("{:04}.jpg", i)))
        .collect()
}

fn refusal<T: std::fmt::Debug>(outcome: Result<T, ServiceError>) -> ErrorCode {
    match outcome {
        Err(ServiceError::Refused(e)) => e.code,
        other => panic!("expected a typed refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_errors_are_typed_counted_and_everyone_else_is_still_served() {
    let data = real_data();
    let dir = tempfile::tempdir().unwrap();
    let credentials = enrolled(dir.path());
    let max_batch = 8;
    let server = serve(
        dir.path(),
        0,
        InferenceConfig {
            keep_serving: true,
            max_batch,
            common_expert: Some(common_expert_onnx()),
            input_side: 64,
            ..InferenceConfig::default()
        },
    )
    .await;
    let (addr, fp) = (server.local_addr, fingerprint(dir.path()));
    let good = Arc::new(
        connect(&agent_config(
            addr,
            &fp,
            &credentials[3].0,
            &credentials[3].1,
        ))
        .await,
    );
    let bad = connect(&agent_config(
        addr,
        &fp,
        &credentials[4].0,
        &credentials[4].1,
    ))
    .await;
    let dim = data.test.dim;
    let embeddings = |n: usize| rows(&data.test, &(0..n).collect::<Vec<_>>());
    let infer = |experts: Vec<u32>, dim: usize, values: Vec<f32>| InferRequest {
        experts,
        input: InferInput::Embeddings {
            dim: dim as u32,
            values,
        },
    };
    let still_served = || {
        let good = Arc::clone(&good);
        let request = infer(vec![0, 1], dim, embeddings(2));
        async move {
            let reply = good
                .infer(request)
                .await
                .expect("a well-behaved client is served");
            assert_eq!(reply.predictions.len(), 2);
        }
    };
    still_served().await;

    let m = ANCHORS;
    let scores = vec![0.2, 0.5, 0.3];
    let common_expert = common_expert_ref();
    let personalize = |experts: Vec<u32>| PersonalizeRequest {
        round: 0,
        experts,
        scores: scores.clone(),
        samples: 10,
        common_expert: common_expert.clone(),
    };
    let cases: Vec<(AgentMessage, ErrorCode)> = vec![
        (
            AgentMessage::Infer(infer(vec![0, m as u32 + 6], dim, embeddings(1))),
            ErrorCode::UnknownExpert,
        ),
        (
            AgentMessage::Personalize(personalize(vec![7])),
            ErrorCode::UnknownExpert,
        ),
        (
            AgentMessage::Infer(infer(vec![0], dim - 1, vec![0.5; dim - 1])),
            ErrorCode::BadShape,
        ),
        (
            AgentMessage::Infer(infer(vec![0], dim, embeddings(max_batch + 1))),
            ErrorCode::OversizedBatch,
        ),
        (
            AgentMessage::Infer(infer(vec![0], dim, vec![f32::NAN; dim])),
            ErrorCode::NotFinite,
        ),
        (
            // Expert 0 is not the top-1 of the scores sent with it.
            AgentMessage::Personalize(personalize(vec![0])),
            ErrorCode::InvalidRequest,
        ),
    ];
    for (message, expected) in cases {
        let kind = message.kind();
        assert_eq!(
            refusal(bad.request(&message).await),
            expected,
            "{kind} request"
        );
        still_served().await;
    }
    // The misbehaving client's connection survives its refusals.
    let bundle = bad.personalize(personalize(vec![1])).await.unwrap();
    assert!(ddome_protocol::bundle::Bundle::decode(&bundle.bytes).is_ok());

    // Unauthenticated callers: a wrong credential, and a request without any hello.
    let impostor = agent_config(addr, &fp, &credentials[5].0, &credentials[4].1);
    assert_eq!(
        refusal(ServiceClient::connect(&impostor).await),
        ErrorCode::Unauthenticated
    );
    assert_eq!(
        request_without_hello(
            addr,
            &fp,
            &AgentMessage::Infer(infer(vec![0], dim, embeddings(1)))
        )
        .await,
        ErrorCode::Unauthenticated
    );
    still_served().await;

    // Many requests at once on one connection: queued by the slots, all answered.
    let mut concurrent = tokio::task::JoinSet::new();
    for _ in 0..24 {
        concurrent.spawn(still_served());
    }
    while let Some(done) = concurrent.join_next().await {
        done.unwrap();
    }

    // A device that cannot run the common expert sends pixels; the coordinator embeds them
    // with the same model and preprocessing a device would use.
    let files = some_images(5);
    let images = ddome_agent::load_runs(&files).unwrap();
    assert_eq!(images.len(), 1, "CIFAR images share one shape");
    let set = &images[0];
    let reply = good
        .infer(InferRequest {
            experts: vec![2, 0],
            input: InferInput::Images {
                height: set.shape.height as u32,
                width: set.shape.width as u32,
                channels: set.shape.channels as u32,
                pixels: set.images.clone(),
            },
        })
        .await
        .unwrap();
    let expert = CommonExpert::load(CommonExpertConfig::efficientnet_lite0(
        common_expert_onnx(),
        64,
    ))
    .unwrap();
    let from_embeddings = good
        .infer(infer(vec![2, 0], dim, expert.embed(set).unwrap()))
        .await
        .unwrap();
    assert_eq!(reply.predictions.len(), 5);
    assert_eq!(reply, from_embeddings);

    good.request(&AgentMessage::GetGate).await.unwrap();
    bad.close().await;
    server.shutdown();
    tokio::time::timeout(LIMIT, server.finished())
        .await
        .expect("shutdown completes")
        .unwrap();
    let status = StateDir::open(dir.path())
        .unwrap()
        .store()
        .status()
        .unwrap();
    let counts = &status.failure_counts;
    for (kind, count) in [
        ("unknown_expert", 2),
        ("bad_shape", 1),
        ("oversized_batch", 1),
        ("not_finite", 1),
        ("invalid_request", 1),
        ("unauthenticated", 2),
    ] {
        assert_eq!(counts.get(kind), Some(&count), "{kind} in {counts:?}");
    }
    let bad_device = status
        .devices
        .iter()
        .find(|d| d.name == credentials[4].0)
        .unwrap();
    assert_eq!(
        bad_device.failures, 6,
        "refusals are counted against the device"
    );
}

/// Opens a connection whose first stream carries `message` instead of a hello; returns the
/// coordinator's error.
async fn request_without_hello(
    addr: std::net::SocketAddr,
    fingerprint: &str,
    message: &AgentMessage,
) -> ErrorCode {
    let endpoint = ddome_transport::client(fingerprint).unwrap();
    let conn = endpoint
        .connect(addr, ddome_transport::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    ddome_transport::write_message(&mut send, message, usize::MAX)
        .await
        .unwrap();
    let reply = ddome_transport::within(
        LIMIT,
        ddome_transport::read_message::<CoordinatorMessage>(&mut recv, usize::MAX),
    )
    .await
    .unwrap();
    match reply {
        Some(CoordinatorMessage::Error(e)) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}
