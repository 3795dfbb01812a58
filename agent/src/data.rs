//! A device's local data, embedded once by the common expert (cached on disk).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ddome_datasets::{
    DatasetError, PartitionConfig, PartitionError, load_image_folder, load_split,
};
use ddome_models::{CommonExpert, CommonExpertConfig, CommonExpertError, Features, embed_cached};

/// What a device trains on: embeddings of its samples and their labels.
///
/// `features` may be shared between simulated devices in one process (a fleet simulated on
/// one machine embeds its dataset once); `indices` are this device's rows.
#[derive(Debug, Clone)]
pub struct LocalData {
    /// Embedded samples (possibly more than this device's).
    pub features: Arc<Features>,
    /// This device's rows of `features`, in training order.
    pub indices: Vec<usize>,
    /// SHA-256 of the common expert that made the embeddings, when known; checked against
    /// the coordinator's.
    pub common_expert_sha256: Option<String>,
    /// Local class names by label, when the labels come from folder names and must be
    /// mapped onto the coordinator's classes.
    pub class_names: Option<Vec<String>>,
}

/// Where the common expert is and how it sees images.
#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// The ONNX file.
    pub model: PathBuf,
    /// Side of the square input.
    pub input_side: usize,
    /// Embedding cache directory.
    pub cache_dir: PathBuf,
}

/// Local data that could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The dataset could not be read.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// The partition could not be made.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// The common expert failed.
    #[error(transparent)]
    CommonExpert(#[from] CommonExpertError),
    /// The device index is outside the partition.
    #[error("device index {index} but the partition has {devices} devices of that kind")]
    NoSuchDevice {
        /// Index asked for.
        index: usize,
        /// Training devices.
        devices: usize,
    },
    /// A local class the coordinator's model does not know.
    #[error("local class {0:?} is not one of the coordinator's classes")]
    UnknownClass(String),
    /// Unlabelled images could not be read.
    #[error(transparent)]
    Images(#[from] crate::images::ImageError),
    /// Labels beyond the model's classes.
    #[error("local label {label} but the model has {classes} classes")]
    LabelOutOfRange {
        /// The label.
        label: u16,
        /// Classes of the model.
        classes: usize,
    },
}

fn load_expert(config: &EmbedConfig) -> Result<CommonExpert, DataError> {
    Ok(CommonExpert::load(CommonExpertConfig::efficientnet_lite0(
        config.model.clone(),
        config.input_side,
    ))?)
}

fn embed(
    set: ddome_datasets::ImageSet,
    config: &EmbedConfig,
) -> Result<(Features, String), DataError> {
    let expert = load_expert(config)?;
    let (embeddings, _) = embed_cached(&expert, &set, &config.cache_dir)?;
    let dim = expert.dim();
    Ok((
        Features::from_image_set(set, embeddings, dim, false),
        expert.model_sha256().to_string(),
    ))
}

impl LocalData {
    /// An ImageFolder directory (one subdirectory of images per class): what a real device
    /// holds. Labels are mapped onto the coordinator's classes by name when it welcomes us.
    pub fn from_folder(dir: &Path, embed_config: &EmbedConfig) -> Result<Self, DataError> {
        let set = load_image_folder(dir)?;
        let class_names = set.classes.clone();
        let n = set.len();
        let (features, sha) = embed(set, embed_config)?;
        Ok(Self {
            features: Arc::new(features),
            indices: (0..n).collect(),
            common_expert_sha256: Some(sha),
            class_names: Some(class_names),
        })
    }

    /// Device `index` of a partitioned dataset, for fleets simulated on real data: the same
    /// partition `ddome simulate` makes from the same config.
    pub fn from_partition(
        dataset: &Path,
        partition: &PartitionConfig,
        index: usize,
        embed_config: &EmbedConfig,
    ) -> Result<Self, DataError> {
        let split = load_split(dataset)?;
        let part = ddome_datasets::partition(
            &split.train.labels,
            &split.test.labels,
            split.train.num_classes(),
            partition,
        )?;
        let indices = part
            .train
            .get(index)
            .ok_or(DataError::NoSuchDevice {
                index,
                devices: part.train.len(),
            })?
            .indices
            .clone();
        let (features, sha) = embed(split.train, embed_config)?;
        Ok(Self {
            features: Arc::new(features),
            indices,
            common_expert_sha256: Some(sha),
            class_names: None,
        })
    }

    /// Unlabelled images (files, or directories searched recursively): what a new device
    /// holds when it personalises. Embedded once through the cache; every label is 0 and
    /// unused.
    pub fn unlabelled(inputs: &[PathBuf], embed_config: &EmbedConfig) -> Result<Self, DataError> {
        let files = crate::images::image_files(inputs)?;
        let expert = load_expert(embed_config)?;
        let embeddings =
            crate::images::embed_files(&expert, &files, Some(&embed_config.cache_dir))?;
        Ok(Self {
            features: Arc::new(Features {
                embeddings,
                dim: expert.dim(),
                labels: vec![0; files.len()],
                pixels: None,
            }),
            indices: (0..files.len()).collect(),
            common_expert_sha256: Some(expert.model_sha256().to_string()),
            class_names: None,
        })
    }

    /// Zero-shot test device `index` of a partitioned dataset: the unseen devices of the
    /// simulator's evaluation, drawn from the test split with label combinations no training
    /// device has.
    pub fn from_partition_test(
        dataset: &Path,
        partition: &PartitionConfig,
        index: usize,
        embed_config: &EmbedConfig,
    ) -> Result<Self, DataError> {
        let split = load_split(dataset)?;
        let part = ddome_datasets::partition(
            &split.train.labels,
            &split.test.labels,
            split.train.num_classes(),
            partition,
        )?;
        let indices = part
            .test
            .get(index)
            .ok_or(DataError::NoSuchDevice {
                index,
                devices: part.test.len(),
            })?
            .indices
            .clone();
        let (features, sha) = embed(split.test, embed_config)?;
        Ok(Self {
            features: Arc::new(features),
            indices,
            common_expert_sha256: Some(sha),
            class_names: None,
        })
    }

    /// This data with labels renumbered to the coordinator's `classes`.
    pub fn aligned_to(&self, classes: &[String]) -> Result<Self, DataError> {
        let Some(names) = &self.class_names else {
            if let Some(&label) = self
                .indices
                .iter()
                .map(|&i| &self.features.labels[i])
                .find(|&&l| l as usize >= classes.len())
            {
                return Err(DataError::LabelOutOfRange {
                    label,
                    classes: classes.len(),
                });
            }
            return Ok(self.clone());
        };
        let mapping = names
            .iter()
            .map(|name| {
                classes
                    .iter()
                    .position(|c| c == name)
                    .map(|p| p as u16)
                    .ok_or_else(|| DataError::UnknownClass(name.clone()))
            })
            .collect::<Result<Vec<u16>, DataError>>()?;
        let mut features = (*self.features).clone();
        for label in &mut features.labels {
            *label = mapping[*label as usize];
        }
        Ok(Self {
            features: Arc::new(features),
            indices: self.indices.clone(),
            common_expert_sha256: self.common_expert_sha256.clone(),
            class_names: Some(classes.to_vec()),
        })
    }
}
