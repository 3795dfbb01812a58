//! A gate and some experts loaded once for zero-shot prediction over rows of embeddings:
//! the coordinator's infer service holds all M experts of the global model, a personalised
//! device the K of its bundle. Both predict through [`crate::predict`], in the batches the
//! simulator's zero-shot evaluation uses, so all three agree sample for sample.

use burn::tensor::{Device, Tensor, TensorData};

use crate::moe::{Predictions, predict};
use crate::nn::{Expert, ExpertInput, ExpertKind, Gate, ModelSpec};
use crate::params::{self, ParamLenError};

/// Rows per forward pass: the simulator's zero-shot evaluation predicts in chunks of 1024.
pub const PREDICT_BATCH: usize = 1024;

/// Why a mixture could not be loaded or could not predict.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MixtureError {
    /// A parameter vector does not fit the module it is loaded into.
    #[error(transparent)]
    Params(#[from] ParamLenError),
    /// `cnn` experts read pixels, which rows of embeddings do not carry.
    #[error("cnn experts read raw pixels; a mixture over embeddings needs head experts")]
    NeedsPixels,
    /// An expert index that is not loaded (or not in the model).
    #[error("expert {expert} is not available; the mixture holds experts {available:?}")]
    UnknownExpert {
        /// The index asked for.
        expert: usize,
        /// The indices loaded.
        available: Vec<usize>,
    },
    /// The same expert twice in one selection.
    #[error("expert {0} is selected twice")]
    DuplicateExpert(usize),
    /// A prediction with no experts.
    #[error("no experts selected")]
    NoExperts,
    /// The values are not whole rows of the model's embedding width.
    #[error("{values} values are not rows of {dim}-wide embeddings")]
    Width {
        /// The model's embedding width.
        dim: usize,
        /// Values supplied.
        values: usize,
    },
}

/// A gate and the experts it routes between, ready to predict.
#[derive(Debug)]
pub struct Mixture {
    spec: ModelSpec,
    gate: Gate,
    experts: Vec<(usize, Expert)>,
    device: Device,
}

impl Mixture {
    /// Loads the gate and `experts` (global index, flat parameters) of a `spec` model.
    pub fn load(
        spec: &ModelSpec,
        gate: &[f32],
        experts: &[(usize, &[f32])],
        device: &Device,
    ) -> Result<Self, MixtureError> {
        if !matches!(spec.expert, ExpertKind::Head { .. }) {
            return Err(MixtureError::NeedsPixels);
        }
        let gate = params::load(spec.gate(device), gate, "gate")?;
        let mut loaded = Vec::with_capacity(experts.len());
        for &(index, values) in experts {
            if index >= spec.experts {
                return Err(MixtureError::UnknownExpert {
                    expert: index,
                    available: (0..spec.experts).collect(),
                });
            }
            if loaded.iter().any(|(e, _)| *e == index) {
                return Err(MixtureError::DuplicateExpert(index));
            }
            let expert = params::load(spec.expert(device), values, &format!("expert {index}"))?;
            loaded.push((index, expert));
        }
        Ok(Self {
            spec: *spec,
            gate,
            experts: loaded,
            device: device.clone(),
        })
    }

    /// The model's shapes.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Global indices of the experts held, in load order.
    pub fn experts(&self) -> Vec<usize> {
        self.experts.iter().map(|(e, _)| *e).collect()
    }

    /// Zero-shot predictions (DDOME.md, "Zero-shot personalised inference", step 3) for
    /// `embeddings`, row-major, with the experts `selected` (global indices, best first).
    pub fn predict(
        &self,
        selected: &[usize],
        embeddings: &[f32],
    ) -> Result<Predictions, MixtureError> {
        let chosen = self.select(selected)?;
        let dim = self.spec.embedding_dim;
        if !embeddings.len().is_multiple_of(dim) {
            return Err(MixtureError::Width {
                dim,
                values: embeddings.len(),
            });
        }
        let mut predictions = Predictions::default();
        for rows in embeddings.chunks(PREDICT_BATCH * dim) {
            let input = ExpertInput {
                embeddings: Tensor::<2>::from_data(
                    TensorData::new(rows.to_vec(), [rows.len() / dim, dim]),
                    &self.device,
                ),
                pixels: None,
            };
            predictions.extend(predict(Some(&self.gate), selected, &chosen, &input));
        }
        Ok(predictions)
    }

    /// The loaded experts at `selected`, in that order.
    fn select(&self, selected: &[usize]) -> Result<Vec<&Expert>, MixtureError> {
        if selected.is_empty() {
            return Err(MixtureError::NoExperts);
        }
        let mut chosen = Vec::with_capacity(selected.len());
        for (i, &index) in selected.iter().enumerate() {
            if selected[..i].contains(&index) {
                return Err(MixtureError::DuplicateExpert(index));
            }
            let expert = self
                .experts
                .iter()
                .find(|(e, _)| *e == index)
                .map(|(_, expert)| expert)
                .ok_or_else(|| MixtureError::UnknownExpert {
                    expert: index,
                    available: self.experts(),
                })?;
            chosen.push(expert);
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu_device;
    use crate::features::Features;

    fn spec() -> ModelSpec {
        crate::nn::tiny_test_spec()
    }

    fn setup() -> (Vec<f32>, Vec<Vec<f32>>, Features) {
        let device = cpu_device();
        let spec = spec();
        let gate = params::init(&spec.gate(&device), 1);
        let experts = (0..3)
            .map(|e| params::init(&spec.expert(&device), 10 + e))
            .collect();
        let n = 2 * PREDICT_BATCH + 7;
        let features = Features {
            embeddings: (0..n * 4)
                .map(|i| ((i * 7919 % 23) as f32 - 11.0) / 5.0)
                .collect(),
            dim: 4,
            labels: vec![0; n],
            pixels: None,
        };
        (gate, experts, features)
    }

    #[test]
    fn predictions_equal_predict_over_the_simulators_chunks() {
        let (gate_w, experts_w, features) = setup();
        let device = cpu_device();
        let spec = spec();
        let selected = [2usize, 0];
        let mixture = Mixture::load(
            &spec,
            &gate_w,
            &[(0, &experts_w[0]), (2, &experts_w[2])],
            &device,
        )
        .unwrap();
        let got = mixture.predict(&selected, &features.embeddings).unwrap();

        let gate = params::load(spec.gate(&device), &gate_w, "gate").unwrap();
        let experts: Vec<Expert> = selected
            .iter()
            .map(|&e| params::load(spec.expert(&device), &experts_w[e], "e").unwrap())
            .collect();
        let chosen: Vec<&Expert> = experts.iter().collect();
        let mut expected = Predictions::default();
        let indices: Vec<usize> = (0..features.len()).collect();
        for chunk in indices.chunks(PREDICT_BATCH) {
            let (input, _) = features.batch(chunk, &device);
            expected.extend(predict(Some(&gate), &selected, &chosen, &input));
        }
        assert_eq!(got, expected);
        assert_eq!(got.len(), features.len());
        assert!(got.top_expert.iter().all(|e| selected.contains(e)));
    }

    #[test]
    fn bad_selections_and_widths_are_typed_errors() {
        let (gate_w, experts_w, _) = setup();
        let device = cpu_device();
        let spec = spec();
        let mixture = Mixture::load(&spec, &gate_w, &[(1, &experts_w[1])], &device).unwrap();
        assert_eq!(
            mixture.predict(&[0], &[0.0; 4]).unwrap_err(),
            MixtureError::UnknownExpert {
                expert: 0,
                available: vec![1]
            }
        );
        assert_eq!(
            mixture.predict(&[1, 1], &[0.0; 4]).unwrap_err(),
            MixtureError::DuplicateExpert(1)
        );
        assert_eq!(
            mixture.predict(&[], &[0.0; 4]).unwrap_err(),
            MixtureError::NoExperts
        );
        assert_eq!(
            mixture.predict(&[1], &[0.0; 5]).unwrap_err(),
            MixtureError::Width { dim: 4, values: 5 }
        );
        assert!(mixture.predict(&[1], &[]).unwrap().is_empty());
        assert!(matches!(
            Mixture::load(&spec, &gate_w[1..], &[], &device),
            Err(MixtureError::Params(_))
        ));
        assert!(matches!(
            Mixture::load(&spec, &gate_w, &[(3, &experts_w[0])], &device),
            Err(MixtureError::UnknownExpert { expert: 3, .. })
        ));
    }

    #[test]
    fn a_mixture_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Mixture>();
    }
}
