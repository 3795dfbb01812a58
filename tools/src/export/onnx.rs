//! A minimal ONNX graph builder over tract-onnx's prost-generated protobuf types.

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::type_proto::{self, Tensor};
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// Default-domain operator set the graph is written against.
pub(super) const OPSET: i64 = 13;
/// ONNX IR version that introduced opset 13 (ONNX 1.8).
pub(super) const IR_VERSION: i64 = 7;

/// A dimension of a graph input or output.
#[derive(Clone, Copy, Debug)]
pub(super) enum Dim {
    Fixed(usize),
    Named(&'static str),
}

/// Nodes and initializers, appended in topological order.
#[derive(Debug, Default)]
pub(super) struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Elements over all initializers.
    parameters: usize,
}

impl Graph {
    /// Adds a float32 initializer called `name` and returns its name.
    pub(super) fn constant(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), values.len(), "{name}");
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(TensorProto {
            name: name.to_owned(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data,
            ..TensorProto::default()
        });
        self.parameters += values.len();
        name.to_owned()
    }

    /// Adds an `op` node whose single output is named `name`; returns that name.
    pub(super) fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> String {
        self.nodes.push(NodeProto {
            name: name.to_owned(),
            op_type: op.to_owned(),
            input: inputs.iter().map(|&i| i.to_owned()).collect(),
            output: vec![name.to_owned()],
            attribute,
            ..NodeProto::default()
        });
        name.to_owned()
    }

    pub(super) fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub(super) fn initializer_count(&self) -> usize {
        self.initializers.len()
    }

    pub(super) fn parameters(&self) -> usize {
        self.parameters
    }

    /// Wraps the graph in a model with the given inputs, outputs and metadata.
    pub(super) fn into_model(
        self,
        name: &str,
        doc: &str,
        inputs: Vec<ValueInfoProto>,
        outputs: Vec<ValueInfoProto>,
        metadata: &[(&str, String)],
    ) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "ddome".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.into(),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: (*k).into(),
                    value: v.clone(),
                })
                .collect(),
            graph: Some(GraphProto {
                name: name.into(),
                node: self.nodes,
                initializer: self.initializers,
                input: inputs,
                output: outputs,
                ..GraphProto::default()
            }),
            ..ModelProto::default()
        }
    }
}

/// A float32 tensor value description for graph inputs and outputs.
pub(super) fn float_tensor(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match *d {
                Dim::Fixed(n) => dimension::Value::DimValue(n as i64),
                Dim::Named(s) => dimension::Value::DimParam(s.into()),
            }),
            ..Dimension::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

pub(super) fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..AttributeProto::default()
    }
}

pub(super) fn ints_attr(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..AttributeProto::default()
    }
}
