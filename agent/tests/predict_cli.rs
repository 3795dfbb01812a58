//! `ddome-agent predict` as a device runs it: a stored bundle, the real common expert and
//! real CIFAR-10 test images. The command's predictions are the library's, and it refuses a
//! tampered bundle and a common expert other than the bundle's, saying why.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ddome_agent::{DeviceModel, embed_batch, image_files};
use ddome_models::{ExpertKind, GlobalModel, ModelSpec};
use ddome_protocol::bundle::Bundle;
use ddome_protocol::message::{CommonExpertRef, ModelDescription};
use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ sits in the workspace root")
        .to_path_buf()
}

/// The exported EfficientNet-Lite0; `scripts/setup.sh` creates it.
fn common_expert_onnx() -> PathBuf {
    let path = std::env::var_os("DDOME_COMMON_EXPERT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/models/efficientnet-lite0.onnx"));
    assert!(
        path.exists(),
        "no common expert at {}: run scripts/setup.sh first",
        path.display()
    );
    path
}

const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// A bundle of experts 2 and 0 of a seeded three-expert model over the real common expert.
fn write_bundle(path: &Path) {
    let spec = ModelSpec {
        embedding_dim: 1280,
        classes: CLASSES.len(),
        experts: 3,
        gate_hidden: 64,
        expert: ExpertKind::Head { hidden: 64 },
        pixels: None,
    };
    let global = GlobalModel::initial(&spec, 11, true);
    let onnx = std::fs::read(common_expert_onnx()).unwrap();
    let bundle = Bundle {
        device: "camera-7".into(),
        model: ModelDescription {
            embedding_dim: 1280,
            classes: CLASSES.iter().map(|c| c.to_string()).collect(),
            experts: 3,
            k: 2,
            gate_hidden: 64,
            expert_hidden: 64,
            common_expert_sha256: String::new(),
        },
        round: 0,
        global_model_sha256: global.sha256(),
        common_expert: CommonExpertRef {
            sha256: hex::encode(Sha256::digest(&onnx)),
            input_size: [64, 64],
        },
        gate: global.gate.clone(),
        experts: vec![
            (2, global.experts[2].clone()),
            (0, global.experts[0].clone()),
        ],
        scores: vec![0.4, 0.1, 0.5],
        samples: 100,
    };
    let (bytes, _) = bundle.encode().unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn predict(bundle: &Path, model: &Path, inputs: &[PathBuf], json: bool) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ddome-agent"));
    command.arg("predict").arg("--bundle").arg(bundle);
    command.arg("--model").arg(model);
    if json {
        command.arg("--json");
    }
    command.args(inputs).output().unwrap()
}

#[test]
fn predict_prints_what_the_library_predicts_and_refuses_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.ddome");
    write_bundle(&bundle);
    let test = root().join("data/cifar10-jpeg/test");
    // Two files named directly and a directory of three, as a device would pass them.
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for (i, class) in ["cat", "ship", "frog"].iter().enumerate() {
        std::fs::copy(
            test.join(class).join("0007.jpg"),
            photos.join(format!("{i}.jpg")),
        )
        .unwrap();
    }
    let inputs = vec![
        test.join("airplane/0000.jpg"),
        test.join("truck/0003.jpg"),
        photos.clone(),
    ];

    let output = predict(&bundle, &common_expert_onnx(), &inputs, true);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();

    let files = image_files(&inputs).unwrap();
    assert_eq!(files.len(), 5);
    let model = DeviceModel::open(&bundle).unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let expert = model
        .load_common_expert(
            &common_expert_onnx(),
            embed_batch(files.len(), threads),
            threads,
        )
        .unwrap();
    let expected = model.predict_files(&expert, &files).unwrap().predictions;
    assert_eq!(printed.len(), files.len());
    for (i, row) in printed.iter().enumerate() {
        assert_eq!(row["path"], files[i].display().to_string());
        assert_eq!(row["label"], expected.by_top_expert[i]);
        assert_eq!(row["class"], CLASSES[expected.by_top_expert[i] as usize]);
        assert_eq!(row["expert"], expected.top_expert[i]);
        assert!([0, 2].contains(&expected.top_expert[i]));
        assert_eq!(
            row["confidence"].as_f64().unwrap() as f32,
            expected.confidence[i]
        );
        assert_eq!(row["mixture_label"], expected.by_mixture[i]);
    }

    // Text: one line per image, naming the class and the expert.
    let text = predict(&bundle, &common_expert_onnx(), &inputs, false);
    assert!(text.status.success());
    let lines: Vec<String> = String::from_utf8(text.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), files.len());
    for (i, line) in lines.iter().enumerate() {
        assert!(
            line.contains(CLASSES[expected.by_top_expert[i] as usize]),
            "{line}"
        );
        assert!(
            line.contains(&format!("expert {}", expected.top_expert[i])),
            "{line}"
        );
    }

    // Another "common expert" (any other file) is refused before it is loaded.
    let other_model = dir.path().join("other.onnx");
    std::fs::write(&other_model, b"not the bundle's model").unwrap();
    let refused = predict(&bundle, &other_model, &inputs, false);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("SHA-256") && why.contains("personalised with"),
        "{why}"
    );

    // A bundle altered on disk is refused by its hash.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let tampered = dir.path().join("tampered.ddome");
    std::fs::write(&tampered, bytes).unwrap();
    let refused = predict(&tampered, &common_expert_onnx(), &inputs, false);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("hash mismatch"), "{why}");
}
