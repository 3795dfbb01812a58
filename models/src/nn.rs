//! The gate and the two expert kinds as burn modules.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::ops::PadMode;
use burn::tensor::{Device, Slice, Tensor};
use serde::{Deserialize, Serialize};

/// Which architecture every expert of a federation has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ExpertKind {
    /// A two-layer MLP over the common-expert embedding; cheap enough for a Raspberry Pi.
    Head {
        /// Hidden width.
        hidden: usize,
    },
    /// A small residual CNN over raw pixels, as in the paper (which used ResNet-34).
    Cnn {
        /// Channels of the first stage; the second stage has twice as many.
        width: usize,
        /// Stride of the first convolution: 2 runs both stages at half the side, a quarter of
        /// the work, for the quick bench and small devices.
        #[serde(default = "one")]
        stem_stride: usize,
    },
}

fn one() -> usize {
    1
}

/// The pixel input a `cnn` expert takes: NCHW, normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PixelShape {
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
}

impl PixelShape {
    /// Values per image.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Whether an image has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Shapes of every module in one federation; the coordinator and every device share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Width d of the common-expert embedding the gate (and `head` experts) read.
    pub embedding_dim: usize,
    /// Output classes.
    pub classes: usize,
    /// M, the number of experts.
    pub experts: usize,
    /// Hidden width of the gate (choice: 256).
    pub gate_hidden: usize,
    /// Expert architecture.
    pub expert: ExpertKind,
    /// Pixel input of `cnn` experts; `None` for `head` experts.
    pub pixels: Option<PixelShape>,
}

impl ModelSpec {
    /// Builds a freshly initialised gate on `device` (weights are then replaced by
    /// [`crate::params::load`]; burn's own initialiser is never relied on for determinism).
    pub fn gate(&self, device: &Device) -> Gate {
        Gate {
            hidden: LinearConfig::new(self.embedding_dim, self.gate_hidden).init(device),
            out: LinearConfig::new(self.gate_hidden, self.experts).init(device),
        }
    }

    /// Builds one expert on `device`.
    pub fn expert(&self, device: &Device) -> Expert {
        match self.expert {
            ExpertKind::Head { hidden } => Expert::Head(HeadExpert {
                hidden: LinearConfig::new(self.embedding_dim, hidden).init(device),
                out: LinearConfig::new(hidden, self.classes).init(device),
            }),
            ExpertKind::Cnn { width, stem_stride } => {
                let channels = self.pixels.map_or(3, |p| p.channels);
                let conv = |from: usize, to: usize, stride: usize| {
                    Conv2dConfig::new([from, to], [3, 3])
                        .with_stride([stride, stride])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(device)
                };
                Expert::Cnn(CnnExpert {
                    stem: conv(channels, width, stem_stride),
                    block1_a: conv(width, width, 1),
                    block1_b: conv(width, width, 1),
                    down: conv(width, 2 * width, 2),
                    block2_a: conv(2 * width, 2 * width, 1),
                    block2_b: conv(2 * width, 2 * width, 1),
                    out: LinearConfig::new(2 * width, self.classes).init(device),
                })
            }
        }
    }
}

/// The gate ("expert ranker") r(e; W_r): a two-layer MLP from the embedding to M logits.
#[derive(Module, Debug)]
pub struct Gate {
    hidden: Linear,
    out: Linear,
}

impl Gate {
    /// Gate logits; the softmax over them ranks the experts.
    ///
    /// # Shapes
    /// - embeddings: `[batch, d]`
    /// - output: `[batch, M]`
    pub fn forward(&self, embeddings: Tensor<2>) -> Tensor<2> {
        self.out.forward(relu(self.hidden.forward(embeddings)))
    }
}

/// A `head` expert: an MLP over the common-expert embedding.
#[derive(Module, Debug)]
pub struct HeadExpert {
    hidden: Linear,
    out: Linear,
}

/// A `cnn` expert: two residual stages over raw pixels, global average pooling, a linear
/// classifier. No normalisation layers: batch statistics do not average well across devices.
#[derive(Module, Debug)]
pub struct CnnExpert {
    stem: Conv2d,
    block1_a: Conv2d,
    block1_b: Conv2d,
    down: Conv2d,
    block2_a: Conv2d,
    block2_b: Conv2d,
    out: Linear,
}

impl CnnExpert {
    /// # Shapes
    /// - pixels: `[batch, channels, height, width]`
    /// - output: `[batch, classes]`
    fn forward(&self, pixels: Tensor<4>) -> Tensor<2> {
        let x = relu(conv3x3(&self.stem, pixels)); // [b, w, h / s, w / s]
        let x = relu(x.clone() + conv3x3(&self.block1_b, relu(conv3x3(&self.block1_a, x))));
        let x = relu(conv3x3(&self.down, x)); // [b, 2w, h / 2s, w / 2s]
        let x = relu(x.clone() + conv3x3(&self.block2_b, relu(conv3x3(&self.block2_a, x))));
        let [batch, channels, height, width] = x.dims();
        let pooled = x.reshape([batch, channels, height * width]).mean_dim(2); // [b, 2w, 1]
        self.out.forward(pooled.reshape([batch, channels]))
    }
}

/// One of the `cnn` expert's 3×3 convolutions (padding 1, its stride, its bias).
///
/// burn's ndarray backend convolves directly: fine forward, but its weight gradient is a
/// convolution whose kernel is the whole feature map, and a training step ran about 100×
/// slower than PyTorch's (`ddome bench train`). On ndarray the convolution is therefore
/// written as matrix products ([`conv3x3_im2col`]). burn's flex backend has its own tiled
/// im2col and GEMM and trains the expert in half the time of our im2col on it (BENCHMARKS.md),
/// so it convolves natively. wgpu keeps the matrix products until the two are measured there.
///
/// # Shapes
/// - x: `[batch, in, height, width]`
/// - output: `[batch, out, ceil(height / stride), ceil(width / stride)]`
fn conv3x3(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    if crate::backend::convolves_natively(&x.device()) {
        conv.forward(x)
    } else {
        conv3x3_im2col(conv, x)
    }
}

/// [`conv3x3`] as a matrix product per image over the nine shifted copies of the input
/// (im2col), so that forward and backward go through the GEMM. The sum runs in another
/// order than a direct convolution's, so results differ from it by float rounding; they
/// are as deterministic.
fn conv3x3_im2col(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [batch, channels, height, width] = x.dims();
    let weight = conv.weight.val(); // [out, in, 3, 3]
    let [out, _, kernel, _] = weight.dims();
    let stride = conv.stride[0];
    let out_h = (height - 1) / stride + 1;
    let out_w = (width - 1) / stride + 1;
    let padded = x.pad((1, 1, 1, 1), PadMode::Constant(0.0)); // [b, in, h + 2, w + 2]
    let tap = |start: usize, len: usize| {
        Slice::new(
            start as isize,
            Some((start + stride * (len - 1) + 1) as isize),
            stride as isize,
        )
    };
    let all = Slice::new(0, None, 1);
    let taps: Vec<Tensor<4>> = (0..kernel * kernel)
        .map(|t| {
            let (ky, kx) = (t / kernel, t % kernel);
            padded
                .clone()
                .slice([all, all, tap(ky, out_h), tap(kx, out_w)]) // [b, in, oh, ow]
        })
        .collect();
    // [b, in, 9, oh, ow]: row `c * 9 + ky * 3 + kx` lines up with the weight's layout.
    let columns: Tensor<5> = Tensor::stack(taps, 2);
    let columns = columns.reshape([batch, channels * kernel * kernel, out_h * out_w]);
    let weight = weight.reshape([1, out, channels * kernel * kernel]);
    let y = weight.matmul(columns); // [b, out, oh * ow]
    let y = match &conv.bias {
        Some(bias) => y + bias.val().reshape([1, out, 1]),
        None => y,
    };
    y.reshape([batch, out, out_h, out_w])
}

/// What an expert reads: the embedding always, the pixels for `cnn` experts.
#[derive(Debug, Clone)]
pub struct ExpertInput {
    /// Common-expert embeddings, `[batch, d]`.
    pub embeddings: Tensor<2>,
    /// Normalised pixels, `[batch, channels, height, width]`; present for `cnn` experts.
    pub pixels: Option<Tensor<4>>,
}

/// One expert f_i(x; W_i).
// A handful of experts exist at a time, so the CNN variant's size costs nothing; boxing it
// would take it outside what burn's Module derive handles.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Expert {
    /// MLP over the embedding.
    Head(HeadExpert),
    /// Residual CNN over pixels.
    Cnn(CnnExpert),
}

impl Expert {
    /// Class logits.
    ///
    /// # Shapes
    /// - output: `[batch, classes]`
    pub fn forward(&self, input: &ExpertInput) -> Tensor<2> {
        match self {
            Expert::Head(head) => head
                .out
                .forward(relu(head.hidden.forward(input.embeddings.clone()))),
            Expert::Cnn(cnn) => cnn.forward(
                input
                    .pixels
                    .clone()
                    .expect("a cnn expert is only built when the spec carries pixels"),
            ),
        }
    }
}

/// A head-expert spec small enough for exact and finite-difference checks in unit tests.
#[cfg(test)]
pub(crate) fn tiny_test_spec() -> ModelSpec {
    ModelSpec {
        embedding_dim: 4,
        classes: 3,
        experts: 3,
        gate_hidden: 5,
        expert: ExpertKind::Head { hidden: 6 },
        pixels: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu_device;
    use burn::tensor::Distribution;

    /// A stride-2 stem runs the same parameters at half the side and still ends in one
    /// logit per class; specs written before the stride existed read as stride 1.
    #[test]
    fn cnn_stem_stride_halves_the_side_and_keeps_the_parameters() {
        let device = cpu_device();
        let spec = |stem_stride| ModelSpec {
            embedding_dim: 4,
            classes: 3,
            experts: 1,
            gate_hidden: 5,
            expert: ExpertKind::Cnn {
                width: 4,
                stem_stride,
            },
            pixels: Some(PixelShape {
                channels: 3,
                height: 9,
                width: 8,
            }),
        };
        let (full, quarter) = (spec(1).expert(&device), spec(2).expert(&device));
        assert_eq!(
            crate::params::flatten(&full).len(),
            crate::params::flatten(&quarter).len()
        );
        let Expert::Cnn(cnn) = &quarter else {
            panic!("a cnn spec builds a cnn expert")
        };
        let pixels = Tensor::<4>::random([2, 3, 9, 8], Distribution::Normal(0.0, 1.0), &device);
        let stem = conv3x3(&cnn.stem, pixels.clone());
        assert_eq!(stem.dims(), [2, 4, 5, 4]);
        let input = ExpertInput {
            embeddings: Tensor::zeros([2, 4], &device),
            pixels: Some(pixels),
        };
        assert_eq!(quarter.forward(&input).dims(), [2, 3]);

        let old: ExpertKind = serde_json::from_str(r#"{"kind":"cnn","width":16}"#).unwrap();
        assert_eq!(
            old,
            ExpertKind::Cnn {
                width: 16,
                stem_stride: 1
            }
        );
    }

    /// The im2col convolution and burn's own agree (to float rounding) for both strides the
    /// expert uses, odd sides included, on every CPU backend this build has.
    #[test]
    fn im2col_convolution_matches_burns_own() {
        let devices = [
            cpu_device(),
            #[cfg(feature = "flex")]
            Device::flex(),
        ];
        for device in devices {
            for stride in [1, 2] {
                let conv = Conv2dConfig::new([3, 4], [3, 3])
                    .with_stride([stride, stride])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(&device);
                let x = Tensor::<4>::random([2, 3, 7, 6], Distribution::Normal(0.0, 1.0), &device);
                let ours = conv3x3_im2col(&conv, x.clone());
                let burns = conv.forward(x);
                assert_eq!(ours.dims(), burns.dims(), "stride {stride}");
                let largest_gap = (ours - burns).abs().max().into_scalar::<f32>();
                assert!(
                    largest_gap < 1e-5,
                    "{device:?}, stride {stride}: {largest_gap}"
                );
            }
        }
    }
}
