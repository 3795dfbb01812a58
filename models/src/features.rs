//! What a holder of data trains and predicts on: cached embeddings, labels and, for `cnn`
//! experts, the raw pixels.

use burn::tensor::{Device, Int, Tensor, TensorData};
use ddome_datasets::ImageSet;

use crate::nn::{ExpertInput, PixelShape};

/// Raw pixels kept as bytes (HWC, as loaded) and normalised per batch, so a CIFAR-sized set
/// costs 1 byte per value rather than 4.
#[derive(Debug, Clone)]
pub struct Pixels {
    /// Image `i` is `values[i * shape.len()..][..shape.len()]`, HWC order.
    pub values: Vec<u8>,
    /// Shape the expert sees (CHW after conversion).
    pub shape: PixelShape,
    /// Per-channel mean, in 0..255 units.
    pub mean: [f32; 3],
    /// Per-channel standard deviation, in 0..255 units.
    pub std: [f32; 3],
}

/// Every sample of one data holder (a device, or a whole split in the simulator).
#[derive(Debug, Clone)]
pub struct Features {
    /// Row `i` is sample `i`'s common-expert embedding.
    pub embeddings: Vec<f32>,
    /// Embedding width d.
    pub dim: usize,
    /// Class of each sample (unused for unlabelled data).
    pub labels: Vec<u16>,
    /// Pixels, when `cnn` experts need them.
    pub pixels: Option<Pixels>,
}

impl Features {
    /// Wraps a set's embeddings (row-major, `dim` wide), labels and, if `keep_pixels`, its
    /// pixels.
    pub fn from_image_set(
        set: ImageSet,
        embeddings: Vec<f32>,
        dim: usize,
        keep_pixels: bool,
    ) -> Self {
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
        Self {
            embeddings,
            dim,
            labels: set.labels,
            pixels,
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Embedding row of sample `i`.
    pub fn embedding(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.dim..(i + 1) * self.dim]
    }

    /// The samples at `indices` as tensors on `device`: the expert input and the labels.
    pub fn batch(&self, indices: &[usize], device: &Device) -> (ExpertInput, Tensor<1, Int>) {
        let mut rows = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            rows.extend_from_slice(self.embedding(i));
        }
        let embeddings =
            Tensor::<2>::from_data(TensorData::new(rows, [indices.len(), self.dim]), device);
        let pixels = self.pixels.as_ref().map(|pixels| {
            let PixelShape {
                channels,
                height,
                width,
            } = pixels.shape;
            let per_image = pixels.shape.len();
            let mut values = vec![0.0f32; indices.len() * per_image];
            for (b, &i) in indices.iter().enumerate() {
                let image = &pixels.values[i * per_image..(i + 1) * per_image];
                let out = &mut values[b * per_image..(b + 1) * per_image];
                // HWC bytes -> normalised CHW floats.
                for (p, px) in image.chunks_exact(channels).enumerate() {
                    for (c, &v) in px.iter().enumerate() {
                        out[c * height * width + p] = (v as f32 - pixels.mean[c]) / pixels.std[c];
                    }
                }
            }
            Tensor::<4>::from_data(
                TensorData::new(values, [indices.len(), channels, height, width]),
                device,
            )
        });
        let labels = Tensor::<1, Int>::from_data(
            TensorData::new(
                indices
                    .iter()
                    .map(|&i| self.labels[i] as i64)
                    .collect::<Vec<_>>(),
                [indices.len()],
            ),
            device,
        );
        (ExpertInput { embeddings, pixels }, labels)
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
