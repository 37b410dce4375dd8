//! SageMaker's recordio-protobuf messages (`aialgs.data`, proto2), written by hand with prost so no `protoc` is
//! needed, and the probabilities response built from them.
//!
//! ```proto
//! message Float32Tensor { repeated float  values = 1 [packed = true]; repeated uint64 keys = 2 [packed = true];
//!                         repeated uint64 shape = 3 [packed = true]; }
//! message Float64Tensor { repeated double values = 1 [packed = true]; ... same keys, shape }
//! message Int32Tensor   { repeated int32  values = 1 [packed = true]; ... same keys, shape }
//! message Bytes  { repeated bytes value = 1; optional string content_type = 2; }
//! message Value  { oneof value { Float32Tensor float32_tensor = 2; Float64Tensor float64_tensor = 3;
//!                                Int32Tensor int32_tensor = 7; Bytes bytes = 9; } }
//! message Record { map<string, Value> features = 1; map<string, Value> label = 2; optional string uid = 3;
//!                  optional string metadata = 4; optional string configuration = 5; }
//! ```
//!
//! The response is one RecordIO record (cflag 0) holding a `Record` with feature `target` (float32_tensor, the softmax
//! probabilities `[1, C, H, W]` row-major, `shape` set) and feature `shape` (int32_tensor whose values are
//! `[1, C, H, W]`): what the SageMaker example notebook decodes.

use std::collections::HashMap;

use prost::Message;

use crate::data::recordio;
use crate::infer::Probabilities;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Float32Tensor {
    #[prost(float, repeated, packed = "true", tag = "1")]
    pub values: Vec<f32>,
    #[prost(uint64, repeated, packed = "true", tag = "2")]
    pub keys: Vec<u64>,
    #[prost(uint64, repeated, packed = "true", tag = "3")]
    pub shape: Vec<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Float64Tensor {
    #[prost(double, repeated, packed = "true", tag = "1")]
    pub values: Vec<f64>,
    #[prost(uint64, repeated, packed = "true", tag = "2")]
    pub keys: Vec<u64>,
    #[prost(uint64, repeated, packed = "true", tag = "3")]
    pub shape: Vec<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Int32Tensor {
    #[prost(int32, repeated, packed = "true", tag = "1")]
    pub values: Vec<i32>,
    #[prost(uint64, repeated, packed = "true", tag = "2")]
    pub keys: Vec<u64>,
    #[prost(uint64, repeated, packed = "true", tag = "3")]
    pub shape: Vec<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Bytes {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub value: Vec<Vec<u8>>,
    #[prost(string, optional, tag = "2")]
    pub content_type: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(oneof = "value::Kind", tags = "2, 3, 7, 9")]
    pub kind: Option<value::Kind>,
}

pub mod value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "2")]
        Float32Tensor(super::Float32Tensor),
        #[prost(message, tag = "3")]
        Float64Tensor(super::Float64Tensor),
        #[prost(message, tag = "7")]
        Int32Tensor(super::Int32Tensor),
        #[prost(message, tag = "9")]
        Bytes(super::Bytes),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    #[prost(map = "string, message", tag = "1")]
    pub features: HashMap<String, Value>,
    #[prost(map = "string, message", tag = "2")]
    pub label: HashMap<String, Value>,
    #[prost(string, optional, tag = "3")]
    pub uid: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub metadata: Option<String>,
    #[prost(string, optional, tag = "5")]
    pub configuration: Option<String>,
}

/// The `Record` for one image's probabilities (consumes them: the values move, they are not copied).
pub fn probabilities_message(probabilities: Probabilities) -> Record {
    let [c, h, w] = probabilities.shape();
    let shape = [1, c, h, w];
    let target = Float32Tensor {
        values: probabilities.into_vec(),
        keys: Vec::new(),
        shape: shape.iter().map(|&d| d as u64).collect(),
    };
    let shape = Int32Tensor {
        values: shape.iter().map(|&d| i32::try_from(d).unwrap_or(i32::MAX)).collect(),
        keys: Vec::new(),
        shape: vec![4],
    };
    let mut features = HashMap::new();
    features.insert(
        "target".to_string(),
        Value {
            kind: Some(value::Kind::Float32Tensor(target)),
        },
    );
    features.insert(
        "shape".to_string(),
        Value {
            kind: Some(value::Kind::Int32Tensor(shape)),
        },
    );
    Record {
        features,
        ..Record::default()
    }
}

/// Encode `record` as one RecordIO record (cflag 0) in a single buffer.
pub fn encode_framed(record: &Record) -> Result<Vec<u8>, ProtobufError> {
    let len = record.encoded_len();
    if len > recordio::MAX_PART_LEN {
        return Err(ProtobufError::TooLarge(len));
    }
    let mut out = Vec::with_capacity(recordio::framed_len(len));
    out.extend_from_slice(&recordio::header(0, len));
    record
        .encode(&mut out)
        .map_err(|e| ProtobufError::Encode(e.to_string()))?;
    out.extend_from_slice(recordio::padding_bytes(len));
    Ok(out)
}

/// The probabilities response body: a RecordIO-framed `Record`.
pub fn encode_probabilities(probabilities: Probabilities) -> Result<Vec<u8>, ProtobufError> {
    encode_framed(&probabilities_message(probabilities))
}

/// Decode a recordio-protobuf probabilities response back to `(shape [1, C, H, W], values)`.
pub fn decode_probabilities(body: &[u8]) -> Result<(Vec<usize>, Vec<f32>), ProtobufError> {
    let records = recordio::read_all(body).map_err(|e| ProtobufError::Decode(e.to_string()))?;
    let [record] = records.as_slice() else {
        return Err(ProtobufError::Decode(format!(
            "expected one record, found {}",
            records.len()
        )));
    };
    let record = Record::decode(record.as_slice()).map_err(|e| ProtobufError::Decode(e.to_string()))?;
    let shape = match record.features.get("shape").and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::Int32Tensor(t)) => t.values.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>(),
        _ => return Err(ProtobufError::Decode("feature `shape` is not an int32 tensor".into())),
    };
    let values = match record.features.get("target").and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::Float32Tensor(t)) => t.values.clone(),
        _ => return Err(ProtobufError::Decode("feature `target` is not a float32 tensor".into())),
    };
    if shape.iter().product::<usize>() != values.len() {
        return Err(ProtobufError::Decode(format!(
            "shape {shape:?} does not match {} values",
            values.len()
        )));
    }
    Ok((shape, values))
}

#[derive(Debug, thiserror::Error)]
pub enum ProtobufError {
    #[error("the encoded record would be {0} bytes, over RecordIO's limit of 2^29 - 1")]
    TooLarge(usize),
    #[error("cannot encode the record: {0}")]
    Encode(String),
    #[error("cannot decode the recordio-protobuf body: {0}")]
    Decode(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_round_trip_through_recordio_protobuf() -> anyhow::Result<()> {
        let values: Vec<f32> = (0..24).map(|v| v as f32 / 24.0).collect();
        let p = Probabilities::new(2, 3, 4, values.clone())?;
        let body = encode_probabilities(p)?;
        assert_eq!(body.len() % 4, 0);
        assert_eq!(&body[..4], &recordio::MAGIC.to_le_bytes());
        let (shape, decoded) = decode_probabilities(&body)?;
        assert_eq!(shape, vec![1, 2, 3, 4]);
        assert_eq!(decoded, values);
        Ok(())
    }

    #[test]
    fn float_values_are_packed() -> anyhow::Result<()> {
        let p = Probabilities::new(1, 1, 2, vec![0.5, 0.5])?;
        let Some(value::Kind::Float32Tensor(t)) = probabilities_message(p).features["target"].kind.clone() else {
            anyhow::bail!("target is not a float32 tensor");
        };
        // field 1, wire type 2 (length-delimited), 8 bytes: the packed encoding.
        assert_eq!(&t.encode_to_vec()[..2], &[0x0a, 8]);
        Ok(())
    }
}
