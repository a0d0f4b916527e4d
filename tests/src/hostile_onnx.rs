//! Hostile ONNX policies for the tests, assembled with tract-onnx's own protobuf types:
//! graphs of the right input and output shape (so that they pass the shape checks and
//! reach tract's optimiser and runner) whose operators make tract panic (issue 14).

use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
use tract_onnx::pb::{
    attribute_proto::AttributeType, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// Input and output sizes of the shipped test policy (its card is reused): the schema's
/// vector and the action layout.
const INPUT: i64 = tuner::schema::FEATURES.len() as i64;
const OUTPUT: i64 = tuner::actions::LAYOUT_LEN as i64;

fn value(name: &str, cols: i64) -> ValueInfoProto {
    let dim = |d: i64| Dimension {
        value: Some(dimension::Value::DimValue(d)),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto {
                    dim: vec![dim(1), dim(cols)],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![values.len() as i64],
        data_type: DataType::Int64 as i32,
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

fn floats(name: &str, values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![values.len() as i64],
        data_type: DataType::Float as i32,
        float_data: values.to_vec(),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn model(node: NodeProto, initializer: Vec<TensorProto>) -> Vec<u8> {
    graph(vec![node], initializer)
}

fn graph(node: Vec<NodeProto>, initializer: Vec<TensorProto>) -> Vec<u8> {
    ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "vmm hostile test".into(),
        graph: Some(GraphProto {
            name: "hostile".into(),
            node,
            initializer,
            input: vec![value("input", INPUT)],
            output: vec![value("q", OUTPUT)],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// `q = Gather(input, [1000; OUTPUT], axis=1)`: constant indices far outside the input's
/// columns.
pub fn gather_out_of_range() -> Vec<u8> {
    model(
        NodeProto {
            op_type: "Gather".into(),
            input: vec!["input".into(), "idx".into()],
            output: vec!["q".into()],
            attribute: vec![AttributeProto {
                name: "axis".into(),
                r#type: AttributeType::Int as i32,
                i: 1,
                ..Default::default()
            }],
            ..Default::default()
        },
        vec![ints("idx", &[1000; OUTPUT as usize])],
    )
}

/// A network that answers an all-zero input (the probe at load) and panics on any
/// other: `q = Gather([0.0], Cast<int64>(Slice(input, 0..OUTPUT) * 1e6), axis=0)`: every
/// index but 0 is outside the one-element table. It makes tract panic on the tuner's
/// thread, under its seccomp filter, at the first real decision.
pub fn gather_out_of_range_later() -> Vec<u8> {
    graph(
        vec![
            node(
                "Slice",
                &["input", "starts", "ends", "axes"],
                "head",
                vec![],
            ),
            node("Mul", &["head", "scale"], "scaled", vec![]),
            node(
                "Cast",
                &["scaled"],
                "idx",
                vec![int_attr("to", DataType::Int64 as i64)],
            ),
            node("Gather", &["table", "idx"], "q", vec![int_attr("axis", 0)]),
        ],
        vec![
            ints("starts", &[0]),
            ints("ends", &[OUTPUT]),
            ints("axes", &[1]),
            floats("scale", &[1e6]),
            floats("table", &[0.0]),
        ],
    )
}

/// `q = Slice(input, starts=[0], ends=[OUTPUT], axes=[1], steps=[0])`: a step of zero.
pub fn slice_step_zero() -> Vec<u8> {
    model(
        NodeProto {
            op_type: "Slice".into(),
            input: ["input", "starts", "ends", "axes", "steps"]
                .map(String::from)
                .to_vec(),
            output: vec!["q".into()],
            ..Default::default()
        },
        vec![
            ints("starts", &[0]),
            ints("ends", &[OUTPUT]),
            ints("axes", &[1]),
            ints("steps", &[0]),
        ],
    )
}

/// Writes `bytes` as `dir/name.onnx` with the shipped test policy's card (valid for a VM
/// with one drive) renamed to `name`; returns the model's path.
pub fn write_with_card(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let card = std::fs::read_to_string(repo.join("models/test-policy.card.json"))
        .expect("the shipped test card");
    let mut card: serde_json::Value = serde_json::from_str(&card).expect("card JSON");
    card["name"] = serde_json::Value::String(name.to_string());
    // No reference evaluation: a network that panics on the reference input only would
    // be refused at load (this file's models are probed with zeros, then run).
    card["evaluation"] = serde_json::json!({});
    let path = dir.join(format!("{name}.onnx"));
    std::fs::write(&path, bytes).expect("write model");
    std::fs::write(
        dir.join(format!("{name}.card.json")),
        serde_json::to_string_pretty(&card).expect("card"),
    )
    .expect("write card");
    path
}
