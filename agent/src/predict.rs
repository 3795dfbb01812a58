//! On-device prediction from a stored bundle: the common expert (tract), the gate and the
//! bundle's experts, all local. Nothing here touches the network, so a personalised device
//! predicts offline.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ddome_models::{
    CommonExpert, CommonExpertConfig, CommonExpertError, Mixture, MixtureError, Predictions,
    cpu_device,
};
use ddome_protocol::bundle::{Bundle, BundleError};
use sha2::{Digest, Sha256};

use crate::images::{ImageError, embed_files};
use crate::session::spec_of;

/// Why a bundle cannot predict.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bundle is invalid (truncated, another version, hash mismatch, shapes).
    #[error("bundle {path}: {source}")]
    Bundle {
        /// The bundle file.
        path: PathBuf,
        /// What is wrong with it.
        source: BundleError,
    },
    /// The bundle's parameters do not fit the model it describes, or a batch does not fit
    /// the model.
    #[error(transparent)]
    Model(#[from] MixtureError),
    /// The common expert offered is not the one the bundle's experts were chosen with.
    #[error(
        "common expert {path} has SHA-256 {found}, but this bundle was personalised with \
         {expected}: its experts were chosen on other embeddings"
    )]
    CommonExpertMismatch {
        /// The model file.
        path: PathBuf,
        /// Its hash.
        found: String,
        /// The hash the bundle records.
        expected: String,
    },
    /// The common expert could not load or run.
    #[error(transparent)]
    CommonExpert(#[from] CommonExpertError),
    /// The images could not be read.
    #[error(transparent)]
    Images(#[from] ImageError),
}

/// A bundle loaded for prediction: the gate and its experts as modules.
#[derive(Debug)]
pub struct DeviceModel {
    bundle: Bundle,
    sha256: String,
    mixture: Mixture,
}

/// Predictions of a set of images and where the time went.
#[derive(Debug, Clone)]
pub struct ImagePredictions {
    /// One per image, in the order given.
    pub predictions: Predictions,
    /// Seconds decoding and embedding the images (the common expert).
    pub common_expert_secs: f64,
    /// Seconds in the gate and the experts.
    pub mixture_secs: f64,
}

impl DeviceModel {
    /// Reads, verifies and loads a bundle file.
    pub fn open(path: &Path) -> Result<Self, PredictError> {
        let bytes = std::fs::read(path).map_err(|source| PredictError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let (bundle, sha256) = Bundle::decode(&bytes).map_err(|source| PredictError::Bundle {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bundle(bundle, sha256)
    }

    /// Loads a verified bundle (with its payload hash) into modules.
    pub fn from_bundle(bundle: Bundle, sha256: String) -> Result<Self, PredictError> {
        let spec = spec_of(&bundle.model);
        let experts: Vec<(usize, &[f32])> = bundle
            .experts
            .iter()
            .map(|(e, w)| (*e as usize, w.as_slice()))
            .collect();
        let mixture = Mixture::load(&spec, &bundle.gate, &experts, &cpu_device())?;
        Ok(Self {
            bundle,
            sha256,
            mixture,
        })
    }

    /// The bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The bundle's payload hash, hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The bundle's class names, by label.
    pub fn classes(&self) -> &[String] {
        &self.bundle.model.classes
    }

    /// Predictions for rows of common-expert embeddings (`[n, d]`, row-major), with the
    /// bundle's experts.
    pub fn predict_embeddings(&self, embeddings: &[f32]) -> Result<Predictions, PredictError> {
        Ok(self
            .mixture
            .predict(&self.bundle.expert_indices(), embeddings)?)
    }

    /// Loads the common expert at `model` for this bundle: refused unless it is the file
    /// the bundle records (checked before tract reads it), at the bundle's input size.
    /// `batch` images per tract run; `threads` runs at once.
    pub fn load_common_expert(
        &self,
        model: &Path,
        batch: usize,
        threads: usize,
    ) -> Result<CommonExpert, PredictError> {
        let bytes = std::fs::read(model).map_err(|source| PredictError::Read {
            path: model.to_path_buf(),
            source,
        })?;
        let found = hex::encode(Sha256::digest(&bytes));
        let expected = &self.bundle.common_expert.sha256;
        if !found.eq_ignore_ascii_case(expected) {
            return Err(PredictError::CommonExpertMismatch {
                path: model.to_path_buf(),
                found,
                expected: expected.clone(),
            });
        }
        let [height, width] = self.bundle.common_expert.input_size;
        let mut config =
            CommonExpertConfig::efficientnet_lite0(model.to_path_buf(), height as usize);
        config.input_size = [height as usize, width as usize];
        config.batch = batch.max(1);
        config.threads = threads.max(1);
        Ok(CommonExpert::load(config)?)
    }

    /// Predictions for image files: decoded, embedded by `expert`, then the gate and the
    /// experts. `expert` must come from [`DeviceModel::load_common_expert`].
    pub fn predict_files(
        &self,
        expert: &CommonExpert,
        files: &[PathBuf],
    ) -> Result<ImagePredictions, PredictError> {
        let started = Instant::now();
        let embeddings = embed_files(expert, files, None)?;
        let embedded = Instant::now();
        let predictions = self.predict_embeddings(&embeddings)?;
        Ok(ImagePredictions {
            predictions,
            common_expert_secs: (embedded - started).as_secs_f64(),
            mixture_secs: embedded.elapsed().as_secs_f64(),
        })
    }
}

/// Images per tract run for `images` images over `threads` threads: enough for each thread
/// to take its share in one run, at most 32 (the plan's size bounds memory).
pub fn embed_batch(images: usize, threads: usize) -> usize {
    images.div_ceil(threads.max(1)).clamp(1, 32)
}
