//! The real common expert through tract: bad files and configs give typed errors naming the
//! file and the mismatch; embeddings are cached and a corrupt cache is recomputed.

use ddome_datasets::{ImageShape, synthetic};
use ddome_models::{CommonExpert, CommonExpertConfig, CommonExpertError, embed_cached};

use crate::common_expert_onnx;

fn config() -> CommonExpertConfig {
    let mut c = CommonExpertConfig::efficientnet_lite0(common_expert_onnx(), 32);
    c.batch = 4;
    c
}

#[test]
fn corrupt_onnx_is_a_model_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.onnx");
    let mut bytes = std::fs::read(common_expert_onnx()).unwrap();
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&path, &bytes).unwrap();
    let err = CommonExpert::load(CommonExpertConfig {
        model: path.clone(),
        ..config()
    })
    .unwrap_err();
    assert!(matches!(err, CommonExpertError::Model { .. }), "{err:?}");
    assert!(err.to_string().contains("broken.onnx"), "{err}");
}

#[test]
fn missing_onnx_is_an_io_error_naming_the_file() {
    let err = CommonExpert::load(CommonExpertConfig {
        model: "/nonexistent/model.onnx".into(),
        ..config()
    })
    .unwrap_err();
    assert!(matches!(err, CommonExpertError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/model.onnx"));
}

#[test]
fn output_width_differing_from_config_is_rejected() {
    let err = CommonExpert::load(CommonExpertConfig {
        embedding_dim: 1000,
        ..config()
    })
    .unwrap_err();
    match &err {
        CommonExpertError::OutputShape {
            expected, found, ..
        } => {
            assert_eq!(*expected, 1000);
            assert!(found.contains("1280"), "{found}");
        }
        other => panic!("expected OutputShape, got {other:?}"),
    }
}

#[test]
fn unknown_output_name_is_rejected() {
    let err = CommonExpert::load(CommonExpertConfig {
        output: "features".into(),
        ..config()
    })
    .unwrap_err();
    assert!(
        matches!(&err, CommonExpertError::NoSuchOutput { output, .. } if output == "features"),
        "{err:?}"
    );
}

#[test]
fn embeddings_are_cached_and_a_corrupt_cache_is_recomputed() {
    let expert = CommonExpert::load(config()).unwrap();
    let images = synthetic(
        2,
        3,
        1,
        ImageShape {
            height: 32,
            width: 32,
            channels: 3,
        },
        1,
    )
    .train;
    let dir = tempfile::tempdir().unwrap();
    let (first, cached) = embed_cached(&expert, &images, dir.path()).unwrap();
    assert!(!cached);
    assert_eq!(first.len(), images.len() * 1280);
    assert!(first.iter().all(|v| v.is_finite()));
    // Two different images give different embeddings.
    assert_ne!(first[..1280], first[1280..2560]);
    let (second, cached) = embed_cached(&expert, &images, dir.path()).unwrap();
    assert!(cached);
    assert_eq!(first, second);

    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "emb"))
        .expect("a cache file was written");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::write(&file, vec![0u8; (len / 2) as usize]).unwrap();
    let (third, cached) = embed_cached(&expert, &images, dir.path()).unwrap();
    assert!(!cached, "a corrupt cache must not be served");
    assert_eq!(first, third);
}

#[test]
fn grey_images_are_embedded_as_rgb() {
    let expert = CommonExpert::load(config()).unwrap();
    let grey = synthetic(
        2,
        2,
        1,
        ImageShape {
            height: 28,
            width: 28,
            channels: 1,
        },
        3,
    )
    .train;
    let embeddings = expert.embed(&grey).unwrap();
    assert_eq!(embeddings.len(), grey.len() * 1280);
    assert!(embeddings.iter().all(|v| v.is_finite()));
}
