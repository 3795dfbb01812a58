//! The common expert C: a frozen, pretrained ONNX image model run by tract, and the on-disk
//! cache of each dataset's embeddings (a device embeds its data once).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ddome_datasets::{ImageSet, ImageShape};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::DimLike;

/// How to run the common expert: which model, what input it wants, which output to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommonExpertConfig {
    /// The ONNX file.
    pub model: PathBuf,
    /// Input height and width the images are resized to (bilinear). Sides of EfficientNet
    /// inputs must divide by 32.
    pub input_size: [usize; 2],
    /// Per-channel mean subtracted from RGB values in 0..255 (EfficientNet-Lite: 127).
    pub mean: [f32; 3],
    /// Per-channel divisor after the mean (EfficientNet-Lite: 128).
    pub std: [f32; 3],
    /// Name of the embedding output in the graph.
    pub output: String,
    /// Width d of that output; checked when the model loads.
    pub embedding_dim: usize,
    /// Images per tract run. The plan is optimised once for this batch size.
    pub batch: usize,
    /// Worker threads, each running the shared plan on its share of the images.
    pub threads: usize,
}

impl CommonExpertConfig {
    /// EfficientNet-Lite0 as exported by `ddome export-common-expert` (1280-d features).
    pub fn efficientnet_lite0(model: PathBuf, side: usize) -> Self {
        Self {
            model,
            input_size: [side, side],
            mean: [127.0; 3],
            std: [128.0; 3],
            output: "embedding".into(),
            embedding_dim: 1280,
            batch: 32,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Why the common expert could not load or run.
#[derive(Debug, thiserror::Error)]
pub enum CommonExpertError {
    /// The model file could not be read.
    #[error("cannot read common expert {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// tract could not parse or plan the model (a corrupt or unsupported ONNX file).
    #[error("common expert {path} is not a usable ONNX model: {reason}")]
    Model {
        /// The file.
        path: PathBuf,
        /// tract's explanation.
        reason: String,
    },
    /// The configured embedding output is not in the graph.
    #[error("common expert {path} has no output named {output:?}")]
    NoSuchOutput {
        /// The file.
        path: PathBuf,
        /// The configured name.
        output: String,
    },
    /// The embedding output's shape differs from the configuration.
    #[error(
        "common expert {path}: output {output:?} has shape {found}, config expects [batch, {expected}]"
    )]
    OutputShape {
        /// The file.
        path: PathBuf,
        /// The output.
        output: String,
        /// The configured width.
        expected: usize,
        /// The shape tract inferred.
        found: String,
    },
    /// The images cannot be fed to this model.
    #[error("images of shape {found:?} cannot be embedded: {reason}")]
    Input {
        /// Shape of the images.
        found: ImageShape,
        /// Why not.
        reason: String,
    },
    /// tract failed while running the plan.
    #[error("common expert {path} failed at run time: {reason}")]
    Run {
        /// The file.
        path: PathBuf,
        /// tract's explanation.
        reason: String,
    },
    /// An embedding cache file could not be written.
    #[error("cannot write embedding cache {path}: {source}")]
    Cache {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A loaded, optimised common expert. Cheap to share across threads.
pub struct CommonExpert {
    config: CommonExpertConfig,
    plan: Arc<TypedRunnableModel>,
    model_sha256: String,
}

impl std::fmt::Debug for CommonExpert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommonExpert")
            .field("config", &self.config)
            .field("model_sha256", &self.model_sha256)
            .finish()
    }
}

impl CommonExpert {
    /// Loads the ONNX file, keeps only the embedding output, optimises the plan once for
    /// `[batch, 3, H, W]` input and checks the output width against the config.
    pub fn load(config: CommonExpertConfig) -> Result<Self, CommonExpertError> {
        let path = config.model.clone();
        let bytes = fs::read(&path).map_err(|source| CommonExpertError::Io {
            path: path.clone(),
            source,
        })?;
        let model_sha256 = hex::encode(Sha256::digest(&bytes));
        let model_err = |e: TractError| CommonExpertError::Model {
            path: path.clone(),
            reason: format!("{e:#}"),
        };
        let [height, width] = config.input_size;
        let model = tract_onnx::onnx()
            .model_for_read(&mut bytes.as_slice())
            .map_err(model_err)?;
        let has_output = model
            .output_outlets()
            .map_err(model_err)?
            .iter()
            .any(|o| model.outlet_label(*o) == Some(config.output.as_str()))
            || model.nodes().iter().any(|n| n.name == config.output);
        if !has_output {
            return Err(CommonExpertError::NoSuchOutput {
                path,
                output: config.output.clone(),
            });
        }
        let model = model
            .with_outputs_by_name([config.output.as_str()])
            .and_then(|m| m.with_input_fact(0, f32::fact([config.batch, 3, height, width]).into()))
            .and_then(|m| m.into_optimized())
            .map_err(model_err)?;
        let shape = model.output_fact(0).map_err(model_err)?.shape.clone();
        let dims: Vec<Option<usize>> = shape.iter().map(|d| d.to_usize().ok()).collect();
        if dims != [Some(config.batch), Some(config.embedding_dim)] {
            return Err(CommonExpertError::OutputShape {
                path,
                output: config.output.clone(),
                expected: config.embedding_dim,
                found: format!("{shape:?}"),
            });
        }
        let plan = model.into_runnable().map_err(model_err)?;
        Ok(Self {
            config,
            plan,
            model_sha256,
        })
    }

    /// The configuration it was loaded with.
    pub fn config(&self) -> &CommonExpertConfig {
        &self.config
    }

    /// Embedding width d.
    pub fn dim(&self) -> usize {
        self.config.embedding_dim
    }

    /// SHA-256 of the ONNX file, hex.
    pub fn model_sha256(&self) -> &str {
        &self.model_sha256
    }

    /// Identifies everything that decides an embedding except the image: the model and the
    /// preprocessing. Part of every cache key.
    pub fn fingerprint(&self) -> String {
        let c = &self.config;
        format!(
            "{}|{:?}|{:?}|{:?}|{}",
            self.model_sha256, c.input_size, c.mean, c.std, c.output
        )
    }

    /// Embeds every image of `images` (u8 HWC), `[n, d]` row-major.
    pub fn embed(&self, images: &ImageSet) -> Result<Vec<f32>, CommonExpertError> {
        let shape = images.shape;
        if shape.channels != 1 && shape.channels != 3 {
            return Err(CommonExpertError::Input {
                found: shape,
                reason: "the common expert takes grey (1) or RGB (3) channels".into(),
            });
        }
        let n = images.len();
        let d = self.dim();
        let mut out = vec![0.0f32; n * d];
        let threads = self.config.threads.max(1);
        let per_thread = n.div_ceil(threads).max(1);
        let results: Vec<Result<(), CommonExpertError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = out
                .chunks_mut(per_thread * d)
                .enumerate()
                .map(|(t, chunk)| {
                    let start = t * per_thread;
                    scope.spawn(move || self.embed_range(images, start, chunk))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("embedding worker panicked"))
                .collect()
        });
        results.into_iter().collect::<Result<(), _>>()?;
        Ok(out)
    }

    /// Embeds images `start..start + out.len() / d` into `out`, one padded batch at a time.
    fn embed_range(
        &self,
        images: &ImageSet,
        start: usize,
        out: &mut [f32],
    ) -> Result<(), CommonExpertError> {
        let d = self.dim();
        let batch = self.config.batch;
        let [height, width] = self.config.input_size;
        let plane = height * width;
        let mut input = vec![0.0f32; batch * 3 * plane];
        for (b, rows) in out.chunks_mut(batch * d).enumerate() {
            let first = start + b * batch;
            let count = rows.len() / d;
            input.fill(0.0);
            for i in 0..count {
                self.preprocess(
                    images.image(first + i),
                    images.shape,
                    &mut input[i * 3 * plane..(i + 1) * 3 * plane],
                );
            }
            let tensor = Tensor::from_shape(&[batch, 3, height, width], &input)
                .expect("the input buffer matches the planned shape");
            let result =
                self.plan
                    .run(tvec!(tensor.into()))
                    .map_err(|e| CommonExpertError::Run {
                        path: self.config.model.clone(),
                        reason: format!("{e:#}"),
                    })?;
            let view =
                result[0]
                    .to_plain_array_view::<f32>()
                    .map_err(|e| CommonExpertError::Run {
                        path: self.config.model.clone(),
                        reason: format!("{e:#}"),
                    })?;
            for (dst, src) in rows.iter_mut().zip(view.iter()) {
                *dst = *src;
            }
        }
        Ok(())
    }

    /// Resizes one HWC u8 image (bilinear) and writes it normalised, CHW, RGB into `out`.
    pub fn preprocess(&self, image: &[u8], shape: ImageShape, out: &mut [f32]) {
        let [height, width] = self.config.input_size;
        let plane = height * width;
        let c = &self.config;
        let sample = |y: usize, x: usize, ch: usize| -> f32 {
            let src_ch = if shape.channels == 1 { 0 } else { ch };
            image[(y * shape.width + x) * shape.channels + src_ch] as f32
        };
        // Align pixel centres (half-pixel convention), clamping at the borders.
        let scale_y = shape.height as f32 / height as f32;
        let scale_x = shape.width as f32 / width as f32;
        for oy in 0..height {
            let fy = ((oy as f32 + 0.5) * scale_y - 0.5).max(0.0);
            let y0 = (fy as usize).min(shape.height - 1);
            let y1 = (y0 + 1).min(shape.height - 1);
            let wy = fy - y0 as f32;
            for ox in 0..width {
                let fx = ((ox as f32 + 0.5) * scale_x - 0.5).max(0.0);
                let x0 = (fx as usize).min(shape.width - 1);
                let x1 = (x0 + 1).min(shape.width - 1);
                let wx = fx - x0 as f32;
                for ch in 0..3 {
                    let top = sample(y0, x0, ch) * (1.0 - wx) + sample(y0, x1, ch) * wx;
                    let bottom = sample(y1, x0, ch) * (1.0 - wx) + sample(y1, x1, ch) * wx;
                    let v = top * (1.0 - wy) + bottom * wy;
                    out[ch * plane + oy * width + ox] = (v - c.mean[ch]) / c.std[ch];
                }
            }
        }
    }
}

const CACHE_MAGIC: &[u8; 8] = b"DDOMEEMB";

/// Embeds `images`, or reads the embeddings from `cache_dir` if this model and preprocessing
/// already embedded these exact pixels. Returns the embeddings and whether the cache served them.
///
/// The key hashes the model, the preprocessing and every pixel, so a changed image, model or
/// input size can never return stale embeddings. A cache file that is truncated or corrupt is
/// recomputed and rewritten (it is derived data), with a warning.
pub fn embed_cached(
    expert: &CommonExpert,
    images: &ImageSet,
    cache_dir: &Path,
) -> Result<(Vec<f32>, bool), CommonExpertError> {
    let mut hasher = Sha256::new();
    hasher.update(expert.fingerprint().as_bytes());
    hasher.update(format!("{:?}", images.shape).as_bytes());
    hasher.update(&images.images);
    let key = hex::encode(hasher.finalize());
    let path = cache_dir.join(format!("{}.emb", &key[..32]));
    let n = images.len();
    let d = expert.dim();
    if let Ok(bytes) = fs::read(&path) {
        match parse_cache(&bytes, n, d) {
            Some(embeddings) => return Ok((embeddings, true)),
            None => tracing::warn!(path = %path.display(), "corrupt embedding cache; recomputing"),
        }
    }
    let embeddings = expert.embed(images)?;
    let cache_err = |source| CommonExpertError::Cache {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(cache_dir).map_err(cache_err)?;
    let tmp = path.with_extension("emb.tmp");
    let mut file = fs::File::create(&tmp).map_err(cache_err)?;
    let mut bytes = Vec::with_capacity(24 + embeddings.len() * 4);
    bytes.extend_from_slice(CACHE_MAGIC);
    bytes.extend_from_slice(&(n as u64).to_le_bytes());
    bytes.extend_from_slice(&(d as u64).to_le_bytes());
    for v in &embeddings {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    file.write_all(&bytes).map_err(cache_err)?;
    file.sync_all().map_err(cache_err)?;
    fs::rename(&tmp, &path).map_err(cache_err)?;
    Ok((embeddings, false))
}

fn parse_cache(bytes: &[u8], n: usize, d: usize) -> Option<Vec<f32>> {
    let body = bytes.strip_prefix(CACHE_MAGIC)?;
    let (header, data) = body.split_at_checked(16)?;
    let rows = u64::from_le_bytes(header[..8].try_into().ok()?);
    let cols = u64::from_le_bytes(header[8..].try_into().ok()?);
    if rows != n as u64 || cols != d as u64 || data.len() != n * d * 4 {
        return None;
    }
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("chunks of 4")))
        .collect();
    values.iter().all(|v| v.is_finite()).then_some(values)
}
