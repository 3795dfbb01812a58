//! The wgpu backend trains what the CPU trains. Runs with `--features wgpu` on any Vulkan,
//! Metal or GL adapter; on Mesa's lavapipe, a CPU Vulkan device, it needs no GPU.
#![cfg(feature = "wgpu")]

use ddome_models::{
    BackendChoice, ExpertKind, Features, ModelSpec, Received, Role, TrainConfig, cpu_device,
    device, params, train_local,
};

const DIM: usize = 32;
const CLASSES: usize = 4;

/// Each class clusters around a direction of its own, so training moves the weights.
fn features() -> Features {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 1000) as f32 / 1000.0 - 0.5
    };
    let mut embeddings = Vec::new();
    let mut labels = Vec::new();
    for i in 0..200 {
        let label = i % CLASSES;
        embeddings.extend((0..DIM).map(|d| if d % CLASSES == label { 1.5 } else { 0.0 } + noise()));
        labels.push(label as u16);
    }
    Features {
        embeddings,
        dim: DIM,
        labels,
        pixels: None,
    }
}

#[test]
fn a_round_trained_on_wgpu_matches_the_cpu_to_float_rounding() {
    let gpu = device(BackendChoice::Wgpu).expect(
        "a wgpu adapter: on a machine without a GPU, install Mesa's lavapipe \
         (Debian: mesa-vulkan-drivers)",
    );
    let spec = ModelSpec {
        embedding_dim: DIM,
        classes: CLASSES,
        experts: 3,
        gate_hidden: 16,
        expert: ExpertKind::Head { hidden: 16 },
        pixels: None,
    };
    let cpu = cpu_device();
    let gate = params::init(&spec.gate(&cpu), 1);
    let experts: Vec<Vec<f32>> = (0..2)
        .map(|e| params::init(&spec.expert(&cpu), 10 + e))
        .collect();
    let expert_refs: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
    let data = features();
    let indices: Vec<usize> = (0..200).collect();
    let config = TrainConfig {
        batch_size: 32,
        ..TrainConfig::default()
    };
    let train = |device: &ddome_models::Device| {
        train_local(
            &spec,
            Received {
                gate: Some(&gate),
                experts: &expert_refs,
            },
            &Role::Normal {
                experts: vec![0, 2],
            },
            &data,
            &indices,
            &config,
            7,
            &device.clone().autodiff(),
        )
        .unwrap()
    };
    let on_cpu = train(&cpu);
    let on_gpu = train(&gpu);

    assert_eq!(on_gpu.samples, on_cpu.samples);
    assert!(on_gpu.mean_loss.is_finite());
    assert!(
        (on_gpu.mean_loss - on_cpu.mean_loss).abs() <= 1e-3 * on_cpu.mean_loss.abs(),
        "mean loss: wgpu {} cpu {}",
        on_gpu.mean_loss,
        on_cpu.mean_loss
    );
    let pairs = std::iter::once((
        on_gpu.gate_delta.as_deref().unwrap(),
        on_cpu.gate_delta.as_deref().unwrap(),
    ))
    .chain(
        on_gpu
            .expert_deltas
            .iter()
            .zip(&on_cpu.expert_deltas)
            .map(|((_, g), (_, c))| (g.as_slice(), c.as_slice())),
    );
    for (gpu_delta, cpu_delta) in pairs {
        let scale = cpu_delta.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "training moved the weights");
        let worst = gpu_delta
            .iter()
            .zip(cpu_delta)
            .map(|(g, c)| (g - c).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-3 * scale,
            "largest difference {worst} against a largest delta of {scale}"
        );
    }
}
