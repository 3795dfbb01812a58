//! The common expert C: a frozen, pretrained ONNX image model run by tract, and the on-disk
//! cache of each dataset's embeddings (a device embeds its data once).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ddome_datasets::{ImageSet, ImageShape};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_linalg::multithread::{Executor, multithread_tract_scope};
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
    /// Images per tract run. The plan is optimised once for this batch size; a last,
    /// partial batch is padded to it.
    pub batch: usize,
    /// Threads an embedding call uses; see `threading` for how.
    pub threads: usize,
    /// How the threads share the work (default: [`Threading::Workers`]). It never changes
    /// an embedding: tract computes each image on its own whatever the batch, the worker or
    /// the thread, so embeddings are the same bit for bit across settings.
    #[serde(default)]
    pub threading: Threading,
}

/// How the common expert spends its threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Threading {
    /// `threads` workers, each running the plan on whole batches of its own; fewer when
    /// there are fewer batches. The default: `ddome bench embed` found it faster than tract's
    /// own pool in every case measured, a single image included.
    #[default]
    Workers,
    /// One batch at a time, tract splitting each operator's work across `threads` threads
    /// (tract-linalg's pool). Kept for devices with more cores, where it may lower the
    /// latency of a single image; benchmark before choosing it.
    IntraOp,
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
            // Per image, batches of 8 ran 10 to 25% faster than batches of 32 through tract's
            // channel-last plan (`ddome bench embed`), and hold a quarter of the activations.
            batch: 8,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threading: Threading::Workers,
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
    /// tract's thread pool for [`Threading::IntraOp`]; `None` for workers or one thread.
    pool: Option<Executor>,
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
        let mut model = model
            .with_outputs_by_name([config.output.as_str()])
            .and_then(|m| m.with_input_fact(0, f32::fact([config.batch, 3, height, width]).into()))
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .map_err(model_err)?;
        // ONNX convolutions are channel-first. Run channel-last, tract's fast layout for this
        // network: 1x1 convolutions become plain matrix products instead of being transposed
        // in and out of one per image of the batch, and depthwise convolutions take tract's
        // vectorised channel-last path. 1.3 to 3x faster on EfficientNet-Lite0 (`ddome bench
        // embed`), and the embeddings are the same bit for bit (checked against caches the
        // channel-first plan wrote).
        tract_onnx::tract_core::transform::get_transform("conv_nhwc")
            .and_then(|t| t.ok_or_else(|| TractError::msg("tract has no conv_nhwc transform")))
            .and_then(|t| t.transform(&mut model))
            .map_err(model_err)?;
        let model = model.into_optimized().map_err(model_err)?;
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
        let pool = (config.threads > 1 && config.threading == Threading::IntraOp)
            .then(|| Executor::multithread_with_name(config.threads, "common-expert"));
        Ok(Self {
            config,
            plan,
            pool,
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
        self.run_batches(images.len(), |i, out| {
            self.preprocess(images.image(i), shape, out)
        })
    }

    /// Embeds images that are already preprocessed: `input` is `[n, 3, H, W]` row-major,
    /// normalised as [`CommonExpert::preprocess`] writes it. The same batching and threads as
    /// [`CommonExpert::embed`]; what is left is the model alone.
    pub fn embed_preprocessed(&self, input: &[f32]) -> Result<Vec<f32>, CommonExpertError> {
        let [height, width] = self.config.input_size;
        let per_image = 3 * height * width;
        if !input.len().is_multiple_of(per_image) {
            return Err(CommonExpertError::Input {
                found: ImageShape {
                    height,
                    width,
                    channels: 3,
                },
                reason: format!(
                    "{} values are not a whole number of {per_image}-value images",
                    input.len()
                ),
            });
        }
        self.run_batches(input.len() / per_image, |i, out| {
            out.copy_from_slice(&input[i * per_image..(i + 1) * per_image])
        })
    }

    /// Embeds images `0..n`, `[n, d]`; `fill(i, out)` writes image `i`'s model input.
    fn run_batches(
        &self,
        n: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<Vec<f32>, CommonExpertError> {
        let d = self.dim();
        let batch = self.config.batch;
        let mut out = vec![0.0f32; n * d];
        let workers = self.config.threads.clamp(1, n.div_ceil(batch).max(1));
        // Workers take the next batch as they finish one, so a slow thread (a busy core)
        // delays the call by one batch at most.
        let queue = Mutex::new(out.chunks_mut(batch * d).enumerate());
        let work = || self.worker(&queue, &fill);
        match &self.pool {
            Some(pool) => multithread_tract_scope(pool.clone(), work)?,
            None if workers == 1 => work()?,
            None => std::thread::scope(|scope| {
                let handles: Vec<_> = (0..workers).map(|_| scope.spawn(work)).collect();
                handles
                    .into_iter()
                    .try_for_each(|h| h.join().expect("embedding worker panicked"))
            })?,
        }
        Ok(out)
    }

    /// Runs batches from `queue` until it is empty, one tract state reused throughout.
    fn worker<'a, I>(
        &self,
        queue: &Mutex<I>,
        fill: &(impl Fn(usize, &mut [f32]) + Sync),
    ) -> Result<(), CommonExpertError>
    where
        I: Iterator<Item = (usize, &'a mut [f32])>,
    {
        let d = self.dim();
        let batch = self.config.batch;
        let [height, width] = self.config.input_size;
        let per_image = 3 * height * width;
        let run_err = |e: TractError| CommonExpertError::Run {
            path: self.config.model.clone(),
            reason: format!("{e:#}"),
        };
        let mut state = self.plan.spawn().map_err(run_err)?;
        loop {
            let next = queue
                .lock()
                .expect("no worker panics holding the queue")
                .next();
            let Some((b, rows)) = next else {
                return Ok(());
            };
            let count = rows.len() / d;
            // Zeros pad a last, partial batch: tract computes each image on its own, so the
            // padding never reaches a real row.
            let mut tensor = Tensor::zero::<f32>(&[batch, 3, height, width]).map_err(run_err)?;
            {
                let mut view = tensor.to_plain_array_view_mut::<f32>().map_err(run_err)?;
                let input = view.as_slice_mut().expect("a fresh tensor is contiguous");
                for (i, image) in input.chunks_exact_mut(per_image).take(count).enumerate() {
                    fill(b * batch + i, image);
                }
            }
            let result = state.run(tvec!(tensor.into())).map_err(run_err)?;
            let view = result[0].to_plain_array_view::<f32>().map_err(run_err)?;
            for (dst, src) in rows.iter_mut().zip(view.iter()) {
                *dst = *src;
            }
        }
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

#[cfg(test)]
mod tests {
    use ddome_datasets::synthetic;

    use super::*;

    fn onnx() -> PathBuf {
        let path = std::env::var_os("DDOME_COMMON_EXPERT").map_or_else(
            || {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../.cache/models/efficientnet-lite0.onnx")
            },
            PathBuf::from,
        );
        assert!(
            path.exists(),
            "no common expert at {}: run scripts/setup.sh first",
            path.display()
        );
        path
    }

    fn expert(batch: usize, threads: usize, threading: Threading) -> CommonExpert {
        let mut config = CommonExpertConfig::efficientnet_lite0(onnx(), 32);
        config.batch = batch;
        config.threads = threads;
        config.threading = threading;
        CommonExpert::load(config).unwrap()
    }

    #[test]
    fn embeddings_do_not_depend_on_batch_threads_or_threading() {
        // 7 images: whole batches, a padded last batch, and more workers than batches.
        let images = synthetic(7, 1, 0, ImageShape::new(24, 24, 3), 5).train;
        let reference = expert(1, 1, Threading::Workers).embed(&images).unwrap();
        assert_eq!(reference.len(), 7 * 1280);
        assert_ne!(reference[..1280], reference[1280..2560]);
        for (batch, threads, threading) in [
            (4, 1, Threading::Workers),
            (2, 2, Threading::Workers),
            (4, 3, Threading::Workers),
            (8, 2, Threading::IntraOp),
        ] {
            let got = expert(batch, threads, threading).embed(&images).unwrap();
            let same = got
                .iter()
                .zip(&reference)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "batch {batch}, {threads} threads, {threading:?}");
        }
    }

    #[test]
    fn preprocessed_input_embeds_as_the_images_do() {
        let images = synthetic(3, 1, 0, ImageShape::new(20, 20, 1), 2).train;
        let expert = expert(2, 2, Threading::Workers);
        let per_image = 3 * 32 * 32;
        let mut input = vec![0.0; images.len() * per_image];
        for (i, out) in input.chunks_exact_mut(per_image).enumerate() {
            expert.preprocess(images.image(i), images.shape, out);
        }
        assert_eq!(
            expert.embed_preprocessed(&input).unwrap(),
            expert.embed(&images).unwrap()
        );
        let err = expert.embed_preprocessed(&input[1..]).unwrap_err();
        assert!(matches!(err, CommonExpertError::Input { .. }), "{err:?}");
    }
}
