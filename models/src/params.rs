//! Parameters as one flat `f32` vector: what the coordinator stores, aggregates and ships.
//!
//! The order is the module's field order (burn's visitor order), so the same `ModelSpec`
//! always gives the same layout on every device.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A flat vector whose length does not match the module it was loaded into.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("parameter vector holds {found} values but the {module} takes {expected}")]
pub struct ParamLenError {
    /// What was being loaded (gate, expert 3, ...).
    pub module: String,
    /// Values the module takes.
    pub expected: usize,
    /// Values supplied.
    pub found: usize,
}

/// All float parameters of `module`, concatenated.
pub fn flatten<M: Module>(module: &M) -> Vec<f32> {
    struct Flatten(Vec<f32>);
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.extend_from_slice(
                data.as_slice::<f32>()
                    .expect("converted tensor data is f32"),
            );
        }
    }
    let mut visitor = Flatten(Vec::with_capacity(module.num_params()));
    module.visit(&mut visitor);
    visitor.0
}

/// Replaces every float parameter of `module` with the next values of `flat`.
pub fn load<M: Module>(module: M, flat: &[f32], name: &str) -> Result<M, ParamLenError> {
    let expected = module.num_params();
    if flat.len() != expected {
        return Err(ParamLenError {
            module: name.to_string(),
            expected,
            found: flat.len(),
        });
    }
    struct Load<'a> {
        rest: &'a [f32],
    }
    impl ModuleMapper for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|tensor| {
                let dims = tensor.dims();
                let len: usize = dims.iter().product();
                let (head, tail) = self.rest.split_at(len);
                self.rest = tail;
                let grad = tensor.is_require_grad();
                Tensor::from_data(TensorData::new(head.to_vec(), dims), &tensor.device())
                    .set_require_grad(grad)
            })
        }
    }
    Ok(module.map(&mut Load { rest: flat }))
}

/// Deterministic initial values for `module`'s parameters from `seed`: uniform in
/// ±1/sqrt(fan_in) for weights and their biases (PyTorch's default for linear and conv
/// layers), drawn from ChaCha8 so every machine gets the same model.
pub fn init<M: Module>(module: &M, seed: u64) -> Vec<f32> {
    struct Init {
        rng: ChaCha8Rng,
        fan_in: usize,
        out: Vec<f32>,
    }
    impl ModuleVisitor for Init {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let dims = param.val().dims();
            // burn's Linear weight is [in, out]; Conv2d's is [out, in, k, k]. A bias follows
            // its weight and shares its fan-in.
            match D {
                2 => self.fan_in = dims[0],
                4 => self.fan_in = dims[1] * dims[2] * dims[3],
                _ => {}
            }
            let bound = 1.0 / (self.fan_in.max(1) as f32).sqrt();
            let len: usize = dims.iter().product();
            self.out
                .extend((0..len).map(|_| self.rng.random_range(-bound..bound)));
        }
    }
    let mut visitor = Init {
        rng: ChaCha8Rng::seed_from_u64(seed),
        fan_in: 1,
        out: Vec::with_capacity(module.num_params()),
    };
    module.visit(&mut visitor);
    visitor.out
}
