//! Converts the pretrained EfficientNet-Lite0 PyTorch checkpoint (legacy, pre-1.6 `torch.save`
//! format) into an ONNX model that tract runs, without Python or torch.
//!
//! The ONNX contract other code relies on:
//! - one input `input`: float32 `[batch, 3, height, width]`, RGB, already normalised as
//!   `(x - 127) / 128` for pixel values `x` in `0..=255` (normalisation is *not* in the
//!   graph); `height` and `width` must divide by 32;
//! - output `embedding`: float32 `[batch, 1280]`, the globally average-pooled features after
//!   the head conv, batch norm and ReLU6;
//! - output `logits`: float32 `[batch, 1000]`, ImageNet class scores.
//!
//! `pth` reads the checkpoint, `efficientnet` builds the graph (batch norm folded into the
//! convs), `onnx` holds the protobuf helpers.

mod efficientnet;
mod onnx;
mod pickle;
mod pth;

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;

/// Name of the graph input.
pub const INPUT: &str = "input";
/// Name of the pooled-feature output.
pub const OUTPUT_EMBEDDING: &str = "embedding";
/// Name of the classifier output.
pub const OUTPUT_LOGITS: &str = "logits";
/// Width of `embedding`.
pub const EMBEDDING_DIM: usize = 1280;
/// Width of `logits` (ImageNet-1k).
pub const NUM_CLASSES: usize = 1000;
/// Preprocessing the graph expects: `(x - PIXEL_MEAN) / PIXEL_SCALE` for RGB values in 0..=255.
pub const PIXEL_MEAN: f32 = 127.0;
/// See [`PIXEL_MEAN`].
pub const PIXEL_SCALE: f32 = 128.0;
/// File name of the checkpoint that `scripts/setup.sh` installs under `.cache/assets/`.
pub const CHECKPOINT_FILE: &str = "efficientnet-lite0-57934424.pth";

/// What an export produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Floating-point parameters in the checkpoint (batch-norm statistics included,
    /// `num_batches_tracked` counters excluded): 4,694,024 for EfficientNet-Lite0.
    pub parameters: usize,
    /// Float32 values stored in the ONNX initializers (fewer: batch norm is folded).
    pub onnx_parameters: usize,
    /// Nodes in the ONNX graph.
    pub nodes: usize,
    /// Initializers in the ONNX graph.
    pub initializers: usize,
    /// MBConv blocks found in the checkpoint (16 for Lite0).
    pub blocks: usize,
    /// Size of the written ONNX file in bytes.
    pub bytes: usize,
    /// Default-domain ONNX operator set of the graph.
    pub opset: i64,
    /// ONNX IR version of the file.
    pub ir_version: i64,
}

/// Why an export failed. Every variant names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the checkpoint or writing the ONNX file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a legacy (pre-1.6, non-zip) PyTorch checkpoint: it does not start
    /// with a pickle holding the legacy magic number.
    #[error("{}: not a legacy PyTorch checkpoint: {detail}", path.display())]
    NotLegacyTorch {
        /// The checkpoint.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// One of the checkpoint's pickles is malformed or truncated.
    #[error("{}: malformed pickle at byte {offset}: {detail}", path.display())]
    Pickle {
        /// The checkpoint.
        path: PathBuf,
        /// Byte offset in the file of the opcode that failed.
        offset: usize,
        /// What was wrong.
        detail: String,
    },
    /// The pickles decode but do not form the legacy layout this converter expects (protocol
    /// version, state dict, storage list, tensor views, extra or unknown tensors).
    #[error("{}: unexpected checkpoint contents: {detail}", path.display())]
    Format {
        /// The checkpoint.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A tensor the EfficientNet-Lite0 graph needs is not in the state dict.
    #[error("{}: tensor {key:?} is missing from the state dict", path.display())]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// State-dict key of the missing tensor.
        key: String,
    },
    /// A tensor's shape does not fit the architecture.
    #[error("{}: tensor {key:?} has shape {found:?}, expected {expected}", path.display())]
    UnexpectedShape {
        /// The checkpoint.
        path: PathBuf,
        /// State-dict key of the tensor.
        key: String,
        /// The shape (or pattern) the architecture needs.
        expected: String,
        /// The shape in the checkpoint.
        found: Vec<usize>,
    },
    /// A tensor's element type is not supported (weights must be float32 or float64).
    #[error("{}: tensor {key:?} has unsupported element type {dtype}", path.display())]
    UnsupportedDtype {
        /// The checkpoint.
        path: PathBuf,
        /// State-dict key of the tensor.
        key: String,
        /// The element type or storage class found.
        dtype: String,
    },
    /// The raw storage section ends before a storage's data does.
    #[error(
        "{}: storage {key:?} at byte {offset} is truncated: needs {needed} bytes, {available} remain",
        path.display()
    )]
    StorageTruncated {
        /// The checkpoint.
        path: PathBuf,
        /// Storage key (as listed in the checkpoint).
        key: String,
        /// Byte offset of the storage's element-count header.
        offset: usize,
        /// Bytes the storage needs, header included.
        needed: usize,
        /// Bytes left in the file from `offset`.
        available: usize,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads the legacy PyTorch EfficientNet-Lite0 checkpoint `pth` and writes the equivalent
/// ONNX model (see the module docs for its inputs and outputs) to `onnx_out`.
///
/// The file is written to a sibling temporary file and renamed into place, so `onnx_out`
/// either keeps its old contents or holds the complete new model.
pub fn export_efficientnet_lite0(
    pth: &Path,
    onnx_out: &Path,
) -> Result<ExportSummary, ExportError> {
    let data = fs::read(pth).map_err(io_error(pth))?;
    let checkpoint = pth::Checkpoint::parse(pth, data)?;
    let built = efficientnet::build(&checkpoint)?;
    let bytes = built.model.encode_to_vec();

    let mut partial = onnx_out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    fs::write(&partial, &bytes)
        .and_then(|()| fs::rename(&partial, onnx_out))
        .map_err(|e| {
            let _ = fs::remove_file(&partial);
            io_error(onnx_out)(e)
        })?;

    Ok(ExportSummary {
        parameters: checkpoint.parameter_count(),
        onnx_parameters: built.onnx_parameters,
        nodes: built.nodes,
        initializers: built.initializers,
        blocks: built.blocks,
        bytes: bytes.len(),
        opset: onnx::OPSET,
        ir_version: onnx::IR_VERSION,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::imageops::FilterType;
    use std::time::Instant;
    use tract_onnx::pb::ModelProto;
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
    use tract_onnx::prelude::*;

    /// The assets directory: `$DDOME_ASSETS`, else `<workspace>/.cache/assets`.
    fn assets() -> PathBuf {
        let dir = std::env::var_os("DDOME_ASSETS").map_or_else(
            || {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("..")
                    .join(".cache")
                    .join("assets")
            },
            PathBuf::from,
        );
        let ok = dir.join(CHECKPOINT_FILE).is_file() && dir.join("foolbox-data").is_dir();
        assert!(
            ok,
            "test assets missing: expected {} and {}/ (run scripts/setup.sh from the workspace \
             root, or point DDOME_ASSETS at a directory holding them)",
            dir.join(CHECKPOINT_FILE).display(),
            dir.join("foolbox-data").display()
        );
        dir
    }

    fn export_to_temp() -> (tempfile::TempDir, PathBuf, ExportSummary) {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("efficientnet-lite0.onnx");
        let start = Instant::now();
        let summary = export_efficientnet_lite0(&assets().join(CHECKPOINT_FILE), &out).unwrap();
        eprintln!("export took {:.2?}: {summary:?}", start.elapsed());
        (tmp, out, summary)
    }

    fn plan(onnx: &Path, shape: [usize; 4]) -> Arc<TypedRunnableModel> {
        tract_onnx::onnx()
            .model_for_path(onnx)
            .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .unwrap()
    }

    /// Runs the plan; returns (embedding, logits) as flat row-major vectors with their shapes.
    fn run(
        plan: &Arc<TypedRunnableModel>,
        shape: [usize; 4],
        input: &[f32],
    ) -> [(Vec<usize>, Vec<f32>); 2] {
        let tensor = Tensor::from_shape(&shape, input).unwrap();
        let out = plan.run(tvec!(tensor.into())).unwrap();
        assert_eq!(out.len(), 2);
        let take = |v: &TValue| {
            let view = v.to_plain_array_view::<f32>().unwrap();
            (
                view.shape().to_vec(),
                view.iter().copied().collect::<Vec<_>>(),
            )
        };
        [take(&out[0]), take(&out[1])]
    }

    #[test]
    fn exported_model_classifies_foolbox_imagenet_samples() {
        let (_tmp, onnx, summary) = export_to_temp();
        assert_eq!(summary.parameters, 4_694_024);
        assert_eq!(summary.blocks, 16);
        assert_eq!(summary.bytes as u64, fs::metadata(&onnx).unwrap().len());

        let dir = assets().join("foolbox-data");
        let mut samples: Vec<(PathBuf, usize)> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter_map(|p| {
                let name = p.file_stem()?.to_str()?.to_owned();
                let rest = name.strip_prefix("imagenet_")?;
                let label = rest.split('_').nth(1)?.parse().ok()?;
                Some((p, label))
            })
            .collect();
        samples.sort();
        assert_eq!(
            samples.len(),
            20,
            "expected 20 imagenet_XX_LABEL.jpg files in {}",
            dir.display()
        );

        let (n, side) = (samples.len(), 224);
        let plane = side * side;
        let mut input = vec![0f32; n * 3 * plane];
        for (i, (path, _)) in samples.iter().enumerate() {
            // Like foolbox's `samples()`: squash to 224x224 with bicubic resampling (Pillow's
            // default for `Image.resize`); the files are 512x512 and one 1024x683.
            let img = image::open(path).unwrap().to_rgb8();
            let img =
                image::imageops::resize(&img, side as u32, side as u32, FilterType::CatmullRom);
            for (p, px) in img.pixels().enumerate() {
                for c in 0..3 {
                    input[(i * 3 + c) * plane + p] = (f32::from(px[c]) - PIXEL_MEAN) / PIXEL_SCALE;
                }
            }
        }

        let shape = [n, 3, side, side];
        let start = Instant::now();
        let plan = plan(&onnx, shape);
        let planned = start.elapsed();
        let [(e_shape, embedding), (l_shape, logits)] = run(&plan, shape, &input);
        eprintln!(
            "tract: plan {planned:.2?}, run of {n} images {:.2?}",
            start.elapsed() - planned
        );
        assert_eq!(e_shape, [n, EMBEDDING_DIM]);
        assert_eq!(l_shape, [n, NUM_CLASSES]);
        assert!(
            embedding.iter().all(|v| v.is_finite()),
            "non-finite embedding"
        );
        // After ReLU6 and average pooling every feature lies in [0, 6].
        assert!(embedding.iter().all(|v| (0.0..=6.0).contains(v)));

        let mut correct = 0;
        for (i, (path, label)) in samples.iter().enumerate() {
            let row = &logits[i * NUM_CLASSES..(i + 1) * NUM_CLASSES];
            let top = (0..NUM_CLASSES)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            correct += usize::from(top == *label);
            eprintln!(
                "{}: label {label}, top-1 {top}",
                path.file_name().unwrap().to_string_lossy()
            );
        }
        eprintln!("top-1 matches: {correct}/{n}");
        assert!(
            correct >= 15,
            "only {correct}/{n} top-1 matches (a faithful conversion gets 17)"
        );
    }

    #[test]
    fn other_input_sizes_divisible_by_32_run() {
        let (_tmp, onnx, _) = export_to_temp();
        for (h, w) in [(32, 32), (64, 64), (96, 64)] {
            let shape = [2, 3, h, w];
            let input: Vec<f32> = (0..2 * 3 * h * w)
                .map(|i| ((i * 37 % 255) as f32 - 127.0) / 128.0)
                .collect();
            let [(e_shape, embedding), (l_shape, logits)] = run(&plan(&onnx, shape), shape, &input);
            assert_eq!(e_shape, [2, EMBEDDING_DIM], "{h}x{w}");
            assert_eq!(l_shape, [2, NUM_CLASSES], "{h}x{w}");
            assert!(
                embedding.iter().chain(&logits).all(|v| v.is_finite()),
                "{h}x{w}"
            );
        }
    }

    #[test]
    fn onnx_file_follows_the_contract() {
        let (_tmp, onnx, summary) = export_to_temp();
        let model = ModelProto::decode(fs::read(&onnx).unwrap().as_slice()).unwrap();
        assert_eq!(model.ir_version, 7);
        assert_eq!(model.opset_import.len(), 1);
        assert_eq!(
            (
                model.opset_import[0].domain.as_str(),
                model.opset_import[0].version
            ),
            ("", 13)
        );
        let graph = model.graph.unwrap();
        assert_eq!(graph.node.len(), summary.nodes);
        assert_eq!(graph.initializer.len(), summary.initializers);
        let dims = |v: &tract_onnx::pb::ValueInfoProto| -> (String, Vec<String>) {
            let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
                v.r#type.as_ref().unwrap().value.as_ref()
            else {
                panic!("{} is not a tensor", v.name);
            };
            assert_eq!(
                t.elem_type,
                tract_onnx::pb::tensor_proto::DataType::Float as i32
            );
            let dims =
                t.shape
                    .as_ref()
                    .unwrap()
                    .dim
                    .iter()
                    .map(|d| match d.value.as_ref().unwrap() {
                        DimValue::DimValue(n) => n.to_string(),
                        DimValue::DimParam(s) => s.clone(),
                    });
            (v.name.clone(), dims.collect())
        };
        let inputs: Vec<_> = graph.input.iter().map(dims).collect();
        let outputs: Vec<_> = graph.output.iter().map(dims).collect();
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            inputs,
            [("input".to_owned(), s(&["batch", "3", "height", "width"]))]
        );
        assert_eq!(
            outputs,
            [
                ("embedding".to_owned(), s(&["batch", "1280"])),
                ("logits".to_owned(), s(&["batch", "1000"]))
            ]
        );
        // The symbolic model also loads and types in tract without a concrete input fact.
        let typed = tract_onnx::onnx()
            .model_for_path(&onnx)
            .unwrap()
            .into_typed()
            .unwrap();
        assert_eq!(
            format!("{:?}", typed.output_fact(0).unwrap().shape),
            "batch,1280"
        );
    }

    #[test]
    fn export_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope.pth");
        let err = export_efficientnet_lite0(&missing, &tmp.path().join("o.onnx")).unwrap_err();
        assert!(
            matches!(err, ExportError::Io { ref path, .. } if *path == missing),
            "{err}"
        );

        // A well-formed legacy checkpoint that is not EfficientNet-Lite0.
        let fake = tmp.path().join("fake.pth");
        let bytes = pth::tests::fake_checkpoint(
            &[pth::tests::FakeTensor {
                key: "w",
                storage: "0",
                shape: &[1],
                stride: &[1],
                offset: 0,
            }],
            &[("0", vec![1.0])],
        );
        fs::write(&fake, bytes).unwrap();
        let out = tmp.path().join("o.onnx");
        let err = export_efficientnet_lite0(&fake, &out).unwrap_err();
        assert!(
            matches!(err, ExportError::MissingTensor { ref key, .. } if key == "_conv_stem.weight"),
            "{err}"
        );
        assert!(err.to_string().contains("fake.pth"), "{err}");
        assert!(!out.exists());

        let garbage = tmp.path().join("garbage.pth");
        fs::write(&garbage, b"not a checkpoint").unwrap();
        let err = export_efficientnet_lite0(&garbage, &out).unwrap_err();
        assert!(matches!(err, ExportError::NotLegacyTorch { .. }), "{err}");
    }
}
