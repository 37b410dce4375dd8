//! Building an ONNX graph node by node: each node's output gets a fresh name, weights and constants become
//! initializers.

use super::onnx_proto::{
    attribute_type, data_type, AttributeProto, Dimension, DimensionValue, GraphProto, NodeProto, TensorProto,
    TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto,
};

/// Names of the anonymous constants start with this.
pub const CONSTANT_PREFIX: &str = "const_";

/// Nodes in the order they were added (each uses only earlier outputs, so the order is topological) and the
/// initializers they read.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    constants: usize,
}

impl Graph {
    /// Appends `op(inputs)` with one output, named after the op and its position; returns that name. An empty
    /// input name leaves an optional input out (Resize's `roi` and `scales`).
    pub fn op(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        let output = format!("{}_{}", op.to_lowercase(), self.nodes.len());
        self.op_into(op, inputs, attributes, &output)
    }

    /// As [`Graph::op`], writing to `output` (a graph output's name).
    pub fn op_into(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>, output: &str) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: output.to_string(),
            op_type: op.to_string(),
            attribute: attributes,
        });
        output.to_string()
    }

    /// A float initializer `name` of shape `dims`, row-major.
    pub fn floats_named(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), values.len());
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type::FLOAT,
            name: name.to_string(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name.to_string()
    }

    /// An anonymous float constant (`dims` empty: a scalar).
    pub fn floats(&mut self, dims: &[usize], values: &[f32]) -> String {
        let name = self.constant_name();
        self.floats_named(&name, dims, values)
    }

    /// An anonymous int64 constant (`dims` empty: a scalar).
    pub fn int64s(&mut self, dims: &[usize], values: &[i64]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), values.len());
        let name = self.constant_name();
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type::INT64,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    fn constant_name(&mut self) -> String {
        self.constants += 1;
        format!("{CONSTANT_PREFIX}{}", self.constants)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn finish(self, name: &str, input: Vec<ValueInfoProto>, output: Vec<ValueInfoProto>) -> GraphProto {
        GraphProto {
            node: self.nodes,
            name: name.to_string(),
            initializer: self.initializers,
            doc_string: String::new(),
            input,
            output,
        }
    }
}

pub fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        i: Some(value),
        r#type: attribute_type::INT,
        ..AttributeProto::default()
    }
}

pub fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        ints: values.to_vec(),
        r#type: attribute_type::INTS,
        ..AttributeProto::default()
    }
}

pub fn string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        s: Some(value.as_bytes().to_vec()),
        r#type: attribute_type::STRING,
        ..AttributeProto::default()
    }
}

/// One dimension of a graph input's or output's shape.
#[derive(Clone, Copy, Debug)]
pub enum Dim<'a> {
    Fixed(usize),
    /// A free size, named so that equal names mean equal sizes (`height` in and out).
    Named(&'a str),
}

pub fn tensor_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => DimensionValue::DimValue(*n as i64),
                Dim::Named(s) => DimensionValue::DimParam(s.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}
