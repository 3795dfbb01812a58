//! Workspace integration tests, one binary split into modules by behaviour.

mod common_expert;
mod learning;
mod network;
mod personalize;

use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// The exported EfficientNet-Lite0; `scripts/setup.sh` creates it.
pub fn common_expert_onnx() -> PathBuf {
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
