//! The federation learns: on a synthetic task with label-skewed devices, DDOME's experts
//! specialise (anchors get their labels routed to them) and unseen devices are classified
//! well above chance, zero-shot.

use ddome_datasets::{ImageShape, PartitionConfig, Skew, partition, synthetic};
use ddome_models::{BackendChoice, ExpertKind, Features, TrainConfig};
use ddome_tools::simulate::{Method, SimConfig, run};

#[test]
fn ddome_specialises_and_predicts_unseen_devices() {
    let split = synthetic(
        6,
        200,
        60,
        ImageShape {
            height: 6,
            width: 6,
            channels: 1,
        },
        11,
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
            devices: 20,
            anchors: 3,
            skew: Skew::LabelSkew {
                labels_per_device: 2,
            },
            samples_per_device: 60,
            test_devices: 4,
            test_samples_per_device: 30,
            validation_devices: 0,
            seed: 3,
        },
    )
    .unwrap();
    let train = Features::from_image_set(split.train, train_emb, 36, false);
    let test = Features::from_image_set(split.test, test_emb, 36, false);
    let config = SimConfig {
        method: Method::Ddome,
        experts: 3,
        k: 2,
        anchors_per_round: 3,
        normals_per_round: 3,
        rounds: 60,
        eval_every: 20,
        expert: ExpertKind::Head { hidden: 16 },
        gate_hidden: 16,
        train: TrainConfig {
            batch_size: 32,
            gate_lr: 0.05,
            expert_lr: 0.05,
            ..TrainConfig::default()
        },
        prox_mu: 0.0,
        seed: 1,
        threads: 2,
        backend: BackendChoice::Ndarray,
    };
    let result = run(&config, &train, &test, 6, &part, |_, _| {}).unwrap();
    assert!(
        result.zero_shot.mean > 0.6,
        "zero-shot accuracy {:.3} (chance is 1/6)",
        result.zero_shot.mean
    );
    let specialised = result.anchor_routing.iter().filter(|s| **s > 0.5).count();
    assert!(
        specialised >= 2,
        "anchors' labels should be routed to their experts: {:?}",
        result.anchor_routing
    );
}
