//! Warm start: the weights of a trained policy (`NAME.onnx` with its card), read back
//! into the learner's network so that online learning continues from that policy
//! instead of from random weights.
//!
//! The ONNX file is the one the learner exports ([`crate::dqn::Dqn::export_onnx`]): an
//! MLP whose initializers are named after the burn layers, `fc1.weight` (`[input,
//! hidden]`), `fc1.bias` (`[hidden]`), `fc2.weight` (`[hidden, hidden]`), `fc2.bias`,
//! `out.weight` (`[hidden, actions]`) and `out.bias` (`[actions]`), f32. They are read
//! through tract-onnx's protobuf model (no second ONNX parser here); every shape is
//! checked against the card's `input_size` and `output_size`, and a model of another
//! shape or layout is refused naming what differs.
//!
//! Loading the weights is then checked end to end by the caller: the learner's
//! Q-values on the card's reference input must equal the card's reference Q-values
//! ([`crate::online::OnlineLearner::warm_started`]).

use std::path::Path;

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::TensorProto;
use tract_onnx::prelude::Framework;
use tuner::policy::ModelCard;

use crate::error::LearnError;

/// Largest hidden width accepted from a model file (as `DqnConfig::hidden`'s bound).
const MAX_HIDDEN: usize = 4096;

/// One linear layer: weight `[fan_in, fan_out]` row-major, bias `[fan_out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// Inputs of the layer.
    pub fan_in: usize,
    /// Outputs of the layer.
    pub fan_out: usize,
    /// `fan_in * fan_out` values, row-major (`weight[i * fan_out + j]`).
    pub weight: Vec<f32>,
    /// `fan_out` values.
    pub bias: Vec<f32>,
}

/// The three layers of a Q-network read from a model file.
#[derive(Debug, Clone, PartialEq)]
pub struct StartWeights {
    /// Input layer (`input -> hidden`).
    pub fc1: LayerWeights,
    /// Hidden layer (`hidden -> hidden`).
    pub fc2: LayerWeights,
    /// Output layer (`hidden -> actions`).
    pub out: LayerWeights,
}

impl StartWeights {
    /// Width of the hidden layers.
    pub fn hidden(&self) -> usize {
        self.fc1.fan_out
    }
}

fn bad(path: &Path, message: impl Into<String>) -> LearnError {
    LearnError::StartModel {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The f32 values and dims of one initializer.
fn values(path: &Path, t: &TensorProto) -> Result<(Vec<usize>, Vec<f32>), LearnError> {
    if t.data_type != DataType::Float as i32 {
        return Err(bad(
            path,
            format!(
                "initializer {:?} has ONNX data type {}, not float",
                t.name, t.data_type
            ),
        ));
    }
    let dims = t
        .dims
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .ok()
                .filter(|d| (1..=1 << 20).contains(d))
        })
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| {
            bad(
                path,
                format!("initializer {:?} has dims {:?}", t.name, t.dims),
            )
        })?;
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(path, format!("initializer {:?} is too large", t.name)))?;
    let data: Vec<f32> = if !t.raw_data.is_empty() {
        if t.raw_data.len() != n * 4 {
            return Err(bad(
                path,
                format!(
                    "initializer {:?}: {} bytes of data for dims {dims:?}",
                    t.name,
                    t.raw_data.len()
                ),
            ));
        }
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    if data.len() != n {
        return Err(bad(
            path,
            format!(
                "initializer {:?}: {} values for dims {dims:?}",
                t.name,
                data.len()
            ),
        ));
    }
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(bad(
            path,
            format!("initializer {:?}[{i}] is {}", t.name, data[i]),
        ));
    }
    Ok((dims, data))
}

/// Reads the layers of the model `bytes` (from `path`, for messages) and checks them
/// against `card` (input and output sizes).
pub fn read(path: &Path, bytes: &[u8], card: &ModelCard) -> Result<StartWeights, LearnError> {
    let model =
        std::panic::catch_unwind(|| tract_onnx::onnx().proto_model_for_read(&mut &bytes[..]))
            .map_err(|p| {
                bad(
                    path,
                    format!(
                        "the ONNX parser panicked: {}",
                        tuner::sandbox::panic_message(&*p)
                    ),
                )
            })?
            .map_err(|e| bad(path, format!("not an ONNX model: {e:#}")))?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| bad(path, "the ONNX model has no graph"))?;
    let find = |name: &str| -> Result<(Vec<usize>, Vec<f32>), LearnError> {
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "no initializer {name:?}: not a Q-network exported by the learner \
                         (an MLP with layers fc1, fc2, out)"
                    ),
                )
            })?;
        values(path, t)
    };
    let layer = |name: &str, fan_in: Option<usize>, fan_out: Option<usize>| {
        let (wd, weight) = find(&format!("{name}.weight"))?;
        let (bd, bias) = find(&format!("{name}.bias"))?;
        let [rows, cols] = wd[..] else {
            return Err(bad(path, format!("{name}.weight has dims {wd:?}, not 2")));
        };
        let want = |what: &str, got: usize, want: Option<usize>| match want {
            Some(w) if w != got => Err(bad(
                path,
                format!("{name}.weight has {got} {what}, the card and the other layers need {w}"),
            )),
            _ => Ok(()),
        };
        want("rows (inputs)", rows, fan_in)?;
        want("columns (outputs)", cols, fan_out)?;
        if bd != [cols] {
            return Err(bad(
                path,
                format!("{name}.bias has dims {bd:?}, the layer has {cols} outputs"),
            ));
        }
        Ok(LayerWeights {
            fan_in: rows,
            fan_out: cols,
            weight,
            bias,
        })
    };
    let fc1 = layer("fc1", Some(card.input_size), None)?;
    let hidden = fc1.fan_out;
    if hidden > MAX_HIDDEN {
        return Err(bad(
            path,
            format!("hidden width {hidden} is above {MAX_HIDDEN}"),
        ));
    }
    let fc2 = layer("fc2", Some(hidden), Some(hidden))?;
    let out = layer("out", Some(hidden), Some(card.output_size))?;
    Ok(StartWeights { fc1, fc2, out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn repo_models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    fn card_of(name: &str) -> ModelCard {
        let text = std::fs::read(repo_models().join(format!("{name}.card.json"))).unwrap();
        serde_json::from_slice(&text).unwrap()
    }

    #[test]
    fn reads_the_shipped_policy_and_refuses_a_card_of_another_shape() {
        let path = repo_models().join("general.onnx");
        let bytes = std::fs::read(&path).unwrap();
        let card = card_of("general");
        let w = read(&path, &bytes, &card).unwrap();
        assert_eq!((w.fc1.fan_in, w.hidden()), (card.input_size, 64));
        assert_eq!(w.out.fan_out, card.output_size);
        assert_eq!(w.fc2.weight.len(), 64 * 64);
        let mut other = card.clone();
        other.output_size += 1;
        let e = read(&path, &bytes, &other).unwrap_err();
        let want = format!("out.weight has {} columns", card.output_size);
        assert!(e.to_string().contains(&want), "{e}");
        let e = read(&path, b"not onnx at all", &card).unwrap_err();
        assert!(matches!(e, LearnError::StartModel { .. }), "{e}");
    }
}
