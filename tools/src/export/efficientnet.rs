//! EfficientNet-Lite0 state dict (lukemelas-style key names) to an ONNX graph.
//!
//! The network: a 3x3 stride-2 stem conv, 16 MBConv blocks in 7 stages, a 1x1 head conv,
//! global average pooling (the 1280-d `embedding`) and a fully connected classifier
//! (`logits`). Every conv is followed by batch norm; stem, expansion, depthwise and head
//! convs are followed by ReLU6 (Lite has no swish and no squeeze-excite), projections are
//! linear, and a block adds its input back when it has stride 1 and keeps its width.
//!
//! Channels, kernel sizes and the presence of expansion convs are read from the tensor
//! shapes; stage boundaries are where the block width changes. Strides are not in a state
//! dict, so they come from the EfficientNet stage table [`STAGE_STRIDES`].
//!
//! Batch norm is folded into the preceding conv (computed in f64, stored as f32): with
//! `s = gamma / sqrt(var + eps)`, the conv weight becomes `w * s` per output channel and
//! its bias `beta - mean * s`. The graph therefore holds only Conv, Clip, Add,
//! GlobalAveragePool, Flatten and Gemm nodes.
//!
//! Padding follows TensorFlow's "same" rule the weights were trained with: for a side
//! divisible by the stride the total padding is `kernel - stride`, split with the smaller
//! half before, i.e. (0, 1) for 3x3 and (1, 2) for 5x5 stride-2 convs and symmetric for
//! stride 1. Every stride-2 conv sees an even side when the input sides divide by 32.

use std::collections::HashSet;

use tract_onnx::pb::ModelProto;

use super::onnx::{Dim, Graph, float_tensor, int_attr, ints_attr};
use super::pth::Checkpoint;
use super::{EMBEDDING_DIM, ExportError, INPUT, NUM_CLASSES, OUTPUT_EMBEDDING, OUTPUT_LOGITS};

/// Batch-norm epsilon of the TensorFlow-trained Lite models.
const BN_EPS: f64 = 1e-3;
/// Stride of the first block of each EfficientNet stage (all other blocks: 1).
const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];
/// Stride of the stem conv.
const STEM_STRIDE: usize = 2;
const RELU6_MIN: &str = "relu6.min";
const RELU6_MAX: &str = "relu6.max";

/// One MBConv block as found in the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    index: usize,
    input: usize,
    /// Width after expansion (equals `input` when there is no expansion conv).
    hidden: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    expand: bool,
}

impl Block {
    fn skip(&self) -> bool {
        self.stride == 1 && self.input == self.output
    }
}

/// The built model and counts for the export summary.
pub(super) struct Built {
    pub(super) model: ModelProto,
    pub(super) nodes: usize,
    pub(super) initializers: usize,
    pub(super) onnx_parameters: usize,
    pub(super) blocks: usize,
}

/// A conv followed by batch norm (folded) and optionally ReLU6.
struct ConvBn<'a> {
    weight: &'a str,
    bn: &'a str,
    out: usize,
    /// Input channels per group (1 for depthwise).
    in_per_group: usize,
    kernel: usize,
    stride: usize,
    group: usize,
    relu6: bool,
}

struct Builder<'a> {
    ck: &'a Checkpoint,
    used: HashSet<String>,
    graph: Graph,
}

fn same_pads(kernel: usize, stride: usize) -> [i64; 4] {
    let total = kernel.saturating_sub(stride) as i64;
    let (begin, end) = (total / 2, total - total / 2);
    [begin, begin, end, end]
}

impl Builder<'_> {
    fn load(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f64>, ExportError> {
        let values = self.ck.tensor_f64(key, shape)?;
        self.used.insert(key.to_owned());
        Ok(values)
    }

    fn shape_error(&self, key: &str, expected: &str) -> ExportError {
        ExportError::UnexpectedShape {
            path: self.ck.path().to_owned(),
            key: key.to_owned(),
            expected: expected.to_owned(),
            found: self
                .ck
                .shape(key)
                .map(<[usize]>::to_vec)
                .unwrap_or_default(),
        }
    }

    fn conv_bn(&mut self, name: &str, input: &str, c: &ConvBn<'_>) -> Result<String, ExportError> {
        let w = self.load(c.weight, &[c.out, c.in_per_group, c.kernel, c.kernel])?;
        let [gamma, beta, mean, var] = ["weight", "bias", "running_mean", "running_var"]
            .map(|p| format!("{}.{p}", c.bn))
            .map(|key| self.load(&key, &[c.out]));
        let (gamma, beta, mean, var) = (gamma?, beta?, mean?, var?);
        let per_out = w.len() / c.out;
        let mut weight = Vec::with_capacity(w.len());
        let mut bias = Vec::with_capacity(c.out);
        for o in 0..c.out {
            let scale = gamma[o] / (var[o] + BN_EPS).sqrt();
            weight.extend(
                w[o * per_out..(o + 1) * per_out]
                    .iter()
                    .map(|&v| (v * scale) as f32),
            );
            bias.push((beta[o] - mean[o] * scale) as f32);
        }
        let shape = [c.out, c.in_per_group, c.kernel, c.kernel];
        let w = self
            .graph
            .constant(&format!("{name}.weight"), &shape, &weight);
        let b = self
            .graph
            .constant(&format!("{name}.bias"), &[c.out], &bias);
        let k = c.kernel as i64;
        let s = c.stride as i64;
        let attrs = vec![
            ints_attr("kernel_shape", &[k, k]),
            ints_attr("strides", &[s, s]),
            ints_attr("dilations", &[1, 1]),
            ints_attr("pads", &same_pads(c.kernel, c.stride)),
            int_attr("group", c.group as i64),
        ];
        let conv = self.graph.node("Conv", name, &[input, &w, &b], attrs);
        if c.relu6 {
            Ok(self.graph.node(
                "Clip",
                &format!("{name}.relu6"),
                &[&conv, RELU6_MIN, RELU6_MAX],
                vec![],
            ))
        } else {
            Ok(conv)
        }
    }

    /// Reads the block structure from the `_blocks.N.*` tensor shapes.
    fn discover_blocks(&self, stem: usize) -> Result<Vec<Block>, ExportError> {
        let mut blocks: Vec<Block> = Vec::new();
        let mut width = stem;
        loop {
            let index = blocks.len();
            let p = format!("_blocks.{index}");
            let dw = format!("{p}._depthwise_conv.weight");
            if !self.ck.contains(&dw) {
                break;
            }
            let expected_dw = "[channels, 1, k, k] with k in {3, 5}";
            let &[hidden, 1, kernel, k2] = self.ck.shape(&dw)? else {
                return Err(self.shape_error(&dw, expected_dw));
            };
            if kernel != k2 || !matches!(kernel, 3 | 5) {
                return Err(self.shape_error(&dw, expected_dw));
            }
            let expand = self.ck.contains(&format!("{p}._expand_conv.weight"));
            if !expand && hidden != width {
                return Err(self.shape_error(
                    &dw,
                    &format!("[{width}, 1, {kernel}, {kernel}] (no expansion conv)"),
                ));
            }
            let project = format!("{p}._project_conv.weight");
            let &[output, ..] = self.ck.shape(&project)? else {
                return Err(self.shape_error(&project, &format!("[out, {hidden}, 1, 1]")));
            };
            blocks.push(Block {
                index,
                input: width,
                hidden,
                output,
                kernel,
                stride: 1,
                expand,
            });
            width = output;
        }
        // A stage starts where the width changes; its first block carries the stride.
        let mut stage = 0;
        for i in 0..blocks.len() {
            if i > 0 && blocks[i].output != blocks[i - 1].output {
                stage += 1;
                blocks[i].stride = STAGE_STRIDES.get(stage).copied().unwrap_or(1);
            } else if i == 0 {
                blocks[i].stride = STAGE_STRIDES[0];
            }
        }
        if blocks.is_empty() || stage + 1 != STAGE_STRIDES.len() {
            return Err(ExportError::Format {
                path: self.ck.path().to_owned(),
                detail: format!(
                    "found {} MBConv blocks in {} stages; EfficientNet-Lite has {} stages",
                    blocks.len(),
                    if blocks.is_empty() { 0 } else { stage + 1 },
                    STAGE_STRIDES.len()
                ),
            });
        }
        Ok(blocks)
    }

    fn block(&mut self, b: &Block, input: &str) -> Result<String, ExportError> {
        let p = format!("_blocks.{}", b.index);
        let name = format!("block{}", b.index);
        let mut x = input.to_owned();
        if b.expand {
            let spec = ConvBn {
                weight: &format!("{p}._expand_conv.weight"),
                bn: &format!("{p}._bn0"),
                out: b.hidden,
                in_per_group: b.input,
                kernel: 1,
                stride: 1,
                group: 1,
                relu6: true,
            };
            x = self.conv_bn(&format!("{name}.expand"), &x, &spec)?;
        }
        let spec = ConvBn {
            weight: &format!("{p}._depthwise_conv.weight"),
            bn: &format!("{p}._bn1"),
            out: b.hidden,
            in_per_group: 1,
            kernel: b.kernel,
            stride: b.stride,
            group: b.hidden,
            relu6: true,
        };
        x = self.conv_bn(&format!("{name}.depthwise"), &x, &spec)?;
        let spec = ConvBn {
            weight: &format!("{p}._project_conv.weight"),
            bn: &format!("{p}._bn2"),
            out: b.output,
            in_per_group: b.hidden,
            kernel: 1,
            stride: 1,
            group: 1,
            relu6: false,
        };
        x = self.conv_bn(&format!("{name}.project"), &x, &spec)?;
        if b.skip() {
            x = self
                .graph
                .node("Add", &format!("{name}.add"), &[&x, input], vec![]);
        }
        Ok(x)
    }
}

/// Builds the ONNX model from a decoded EfficientNet-Lite0 checkpoint.
pub(super) fn build(ck: &Checkpoint) -> Result<Built, ExportError> {
    let mut b = Builder {
        ck,
        used: HashSet::new(),
        graph: Graph::default(),
    };
    b.graph.constant(RELU6_MIN, &[], &[0.0]);
    b.graph.constant(RELU6_MAX, &[], &[6.0]);

    let stem_key = "_conv_stem.weight";
    let stem_expected = "[channels, 3, 3, 3]";
    let &[stem, 3, 3, 3] = ck.shape(stem_key)? else {
        return Err(b.shape_error(stem_key, stem_expected));
    };
    let spec = ConvBn {
        weight: stem_key,
        bn: "_bn0",
        out: stem,
        in_per_group: 3,
        kernel: 3,
        stride: STEM_STRIDE,
        group: 1,
        relu6: true,
    };
    let mut x = b.conv_bn("stem", INPUT, &spec)?;

    let blocks = b.discover_blocks(stem)?;
    for block in &blocks {
        x = b.block(block, &x)?;
    }
    let last = blocks.last().map_or(stem, |bl| bl.output);

    let spec = ConvBn {
        weight: "_conv_head.weight",
        bn: "_bn1",
        out: EMBEDDING_DIM,
        in_per_group: last,
        kernel: 1,
        stride: 1,
        group: 1,
        relu6: true,
    };
    x = b.conv_bn("head", &x, &spec)?;
    let pooled = b.graph.node("GlobalAveragePool", "pool", &[&x], vec![]);
    let embedding = b.graph.node(
        "Flatten",
        OUTPUT_EMBEDDING,
        &[&pooled],
        vec![int_attr("axis", 1)],
    );

    let fc_w = b.load("_fc.weight", &[NUM_CLASSES, EMBEDDING_DIM])?;
    let fc_b = b.load("_fc.bias", &[NUM_CLASSES])?;
    let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
    let w = b
        .graph
        .constant("fc.weight", &[NUM_CLASSES, EMBEDDING_DIM], &to_f32(fc_w));
    let bias = b.graph.constant("fc.bias", &[NUM_CLASSES], &to_f32(fc_b));
    b.graph.node(
        "Gemm",
        OUTPUT_LOGITS,
        &[&embedding, &w, &bias],
        vec![int_attr("transB", 1)],
    );

    // Anything left over (e.g. squeeze-excite weights of a non-Lite EfficientNet) would be
    // silently ignored by this graph, so refuse it.
    if let Some(extra) = ck
        .keys()
        .find(|k| !b.used.contains(*k) && !k.ends_with(".num_batches_tracked"))
    {
        return Err(ExportError::Format {
            path: ck.path().to_owned(),
            detail: format!(
                "tensor {extra:?} has no place in EfficientNet-Lite (is this a Lite checkpoint?)"
            ),
        });
    }

    let source = ck
        .path()
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (nodes, initializers, onnx_parameters) = (
        b.graph.node_count(),
        b.graph.initializer_count(),
        b.graph.parameters(),
    );
    let batch = Dim::Named("batch");
    let model = b.graph.into_model(
        "efficientnet_lite0",
        "EfficientNet-Lite0 (ImageNet). Input: RGB, NCHW, float32, normalised as (x - 127) / 128 \
         for pixel values x in 0..=255; sides divisible by 32. Outputs: the 1280-d globally \
         pooled features (`embedding`) and 1000 ImageNet class logits (`logits`).",
        vec![float_tensor(
            INPUT,
            &[
                batch,
                Dim::Fixed(3),
                Dim::Named("height"),
                Dim::Named("width"),
            ],
        )],
        vec![
            float_tensor(OUTPUT_EMBEDDING, &[batch, Dim::Fixed(EMBEDDING_DIM)]),
            float_tensor(OUTPUT_LOGITS, &[batch, Dim::Fixed(NUM_CLASSES)]),
        ],
        &[
            ("source", source),
            ("preprocessing", "RGB NCHW, (x - 127) / 128".into()),
            (
                "batch_norm",
                format!("folded into Conv weights and biases (eps {BN_EPS})"),
            ),
        ],
    );
    Ok(Built {
        model,
        nodes,
        initializers,
        onnx_parameters,
        blocks: blocks.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorflow_same_padding() {
        assert_eq!(same_pads(3, 2), [0, 0, 1, 1]);
        assert_eq!(same_pads(5, 2), [1, 1, 2, 2]);
        assert_eq!(same_pads(3, 1), [1, 1, 1, 1]);
        assert_eq!(same_pads(5, 1), [2, 2, 2, 2]);
        assert_eq!(same_pads(1, 1), [0, 0, 0, 0]);
    }
}
