//! The Q-network: an MLP `input -> hidden -> hidden -> n_actions` with ReLU, as a burn
//! module, with weights drawn from the learner's own seeded generator (so a seed fixes the
//! initial network whatever burn's global RNG is doing).

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use tuner::policy::XorShift64;

/// The Q-network.
#[derive(Module, Debug)]
pub struct QNet {
    /// Input layer.
    pub fc1: Linear,
    /// Hidden layer.
    pub fc2: Linear,
    /// Output layer: one Q-value per action.
    pub out: Linear,
}

/// A `[fan_in, fan_out]` layer with weights and biases uniform in `±1/sqrt(fan_in)` (the
/// usual default for linear layers).
fn layer(fan_in: usize, fan_out: usize, rng: &mut XorShift64, device: &Device) -> Linear {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut draw = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    let weight = TensorData::new(draw(fan_in * fan_out), [fan_in, fan_out]);
    let bias = TensorData::new(draw(fan_out), [fan_out]);
    Linear {
        weight: Param::from_tensor(Tensor::from_data(weight, device)),
        bias: Some(Param::from_tensor(Tensor::from_data(bias, device))),
    }
}

/// A layer holding `w`'s weights.
fn layer_from(w: &crate::warm::LayerWeights, device: &Device) -> Linear {
    let weight = TensorData::new(w.weight.clone(), [w.fan_in, w.fan_out]);
    let bias = TensorData::new(w.bias.clone(), [w.fan_out]);
    Linear {
        weight: Param::from_tensor(Tensor::from_data(weight, device)),
        bias: Some(Param::from_tensor(Tensor::from_data(bias, device))),
    }
}

impl QNet {
    /// A network holding the weights of a trained model ([`crate::warm`]), on `device`.
    pub fn from_weights(w: &crate::warm::StartWeights, device: &Device) -> QNet {
        QNet {
            fc1: layer_from(&w.fc1, device),
            fc2: layer_from(&w.fc2, device),
            out: layer_from(&w.out, device),
        }
    }

    /// A freshly initialised network on `device`.
    pub fn new(
        input: usize,
        hidden: usize,
        n_actions: usize,
        rng: &mut XorShift64,
        device: &Device,
    ) -> QNet {
        QNet {
            fc1: layer(input, hidden, rng, device),
            fc2: layer(hidden, hidden, rng, device),
            out: layer(hidden, n_actions, rng, device),
        }
    }

    /// Q-values for a batch of states: `[batch, input] -> [batch, n_actions]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = relu(self.fc1.forward(x));
        let x = relu(self.fc2.forward(x));
        self.out.forward(x)
    }
}
