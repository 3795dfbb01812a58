//! The mixture of experts: its losses, top-K ranking and zero-shot prediction.
//!
//! Everything here works on tensors already on a device; [`crate::train`] builds the
//! batches and the simulator and the coordinator choose who trains what.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::features::Features;
use crate::nn::{Expert, ExpertInput, Gate, ModelSpec};
use crate::params::{self, ParamLenError};

/// Numerically stable log Σ exp along `dim`, keeping the dimension.
fn log_sum_exp<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    let max = x.clone().max_dim(dim).detach();
    (x - max.clone()).exp().sum_dim(dim).log() + max
}

/// The labels as a `[batch, 1]` index tensor, for gathering per-sample log-probabilities.
fn label_index(labels: &Tensor<1, Int>) -> Tensor<2, Int> {
    labels.clone().unsqueeze_dim(1)
}

/// Mean cross-entropy of `logits` against integer `labels`.
///
/// # Shapes
/// - logits: `[batch, classes]`, labels: `[batch]`, output: `[1]`
pub fn cross_entropy(logits: Tensor<2>, labels: &Tensor<1, Int>) -> Tensor<1> {
    log_softmax(logits, 1)
        .gather(1, label_index(labels))
        .mean()
        .neg()
}

/// The normal device's loss (choice, see DDOME.md): per sample, g = softmax of the gate logits
/// restricted to the `selected` experts, p(y|x) = Σ_k g_k softmax(f_k(x))_y, loss = −log p(y|x)
/// averaged over the batch. Gradients reach the gate and every selected expert.
///
/// # Shapes
/// - gate_logits: `[batch, M]`; each of expert_logits: `[batch, classes]`, in the order of
///   `selected`; labels: `[batch]`; output: `[1]`
pub fn mixture_nll(
    gate_logits: Tensor<2>,
    selected: &[usize],
    expert_logits: Vec<Tensor<2>>,
    labels: &Tensor<1, Int>,
) -> Tensor<1> {
    let device = gate_logits.device();
    let index = Tensor::<1, Int>::from_data(
        TensorData::new(
            selected.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            [selected.len()],
        ),
        &device,
    );
    let log_gate = log_softmax(gate_logits.select(1, index), 1); // [batch, K]
    let label_logp: Vec<Tensor<2>> = expert_logits
        .into_iter()
        .map(|logits| log_softmax(logits, 1).gather(1, label_index(labels))) // [batch, 1]
        .collect();
    let joint = log_gate + Tensor::cat(label_logp, 1); // [batch, K]
    log_sum_exp(joint, 1).mean().neg()
}

/// An anchor's loss: CE(f_q(x), y) + CE(r(e), q), equal weights (choice). The second term
/// pins the gate to route this anchor's data to its expert q.
pub fn anchor_loss(
    gate_logits: Tensor<2>,
    anchor_expert: usize,
    expert_logits: Tensor<2>,
    labels: &Tensor<1, Int>,
) -> Tensor<1> {
    let [batch, _] = gate_logits.dims();
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new(vec![anchor_expert as i64; batch], [batch]),
        &gate_logits.device(),
    );
    cross_entropy(expert_logits, labels) + cross_entropy(gate_logits, &targets)
}

/// Indices of the `k` largest scores, largest first; ties go to the lower index so every
/// device ranks identically.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// Softmax of the gate over one batch of embeddings, `[batch, M]` row-major.
pub fn gate_probabilities(gate: &Gate, embeddings: Tensor<2>) -> Vec<f32> {
    softmax(gate.forward(embeddings), 1)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .expect("converted tensor data is f32")
}

/// A device's expert scores p̄: the mean over its samples at `indices` of the gate's softmax
/// (DDOME.md, "One round", step 2). Normal devices rank with it, new devices pick their
/// experts with it; batches of 1024 keep memory flat whatever the device's data size.
pub fn mean_gate_scores(
    spec: &ModelSpec,
    gate: &[f32],
    data: &Features,
    indices: &[usize],
    device: &Device,
) -> Result<Vec<f32>, ParamLenError> {
    let gate = params::load(spec.gate(device), gate, "gate")?;
    let mut sum = vec![0.0f64; spec.experts];
    for chunk in indices.chunks(1024) {
        let (input, _) = data.batch(chunk, device);
        let probs = gate_probabilities(&gate, input.embeddings);
        for row in probs.chunks_exact(spec.experts) {
            for (s, p) in sum.iter_mut().zip(row) {
                *s += *p as f64;
            }
        }
    }
    Ok(sum
        .into_iter()
        .map(|s| (s / indices.len().max(1) as f64) as f32)
        .collect())
}

/// Zero-shot predictions of one batch with a device's K experts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Predictions {
    /// argmax f_{k*}(x) where k* = argmax over the K of the gate: the paper's rule.
    pub by_top_expert: Vec<u16>,
    /// Which expert (global index) made each `by_top_expert` prediction.
    pub top_expert: Vec<usize>,
    /// argmax of the gate-weighted mixture Σ_k g_k softmax(f_k(x)).
    pub by_mixture: Vec<u16>,
    /// softmax(f_{k*}(x)) of the `by_top_expert` class: how sure the predicting expert is.
    pub confidence: Vec<f32>,
    /// The mixture's probability of the `by_mixture` class.
    pub mixture_confidence: Vec<f32>,
}

impl Predictions {
    /// Appends another batch's predictions.
    pub fn extend(&mut self, other: Predictions) {
        self.by_top_expert.extend(other.by_top_expert);
        self.top_expert.extend(other.top_expert);
        self.by_mixture.extend(other.by_mixture);
        self.confidence.extend(other.confidence);
        self.mixture_confidence.extend(other.mixture_confidence);
    }

    /// Number of samples predicted.
    pub fn len(&self) -> usize {
        self.by_top_expert.len()
    }

    /// Whether no sample was predicted.
    pub fn is_empty(&self) -> bool {
        self.by_top_expert.is_empty()
    }
}

/// Predicts one batch with the gate and the device's experts (`experts[i]` is global expert
/// `selected[i]`). With no gate (FedAvg-style single model), `experts` must hold one model.
pub fn predict(
    gate: Option<&Gate>,
    selected: &[usize],
    experts: &[&Expert],
    input: &ExpertInput,
) -> Predictions {
    let device = input.embeddings.device();
    let [batch, _] = input.embeddings.dims();
    let probs: Vec<Tensor<2>> = experts
        .iter()
        .map(|expert| softmax(expert.forward(input), 1))
        .collect();
    let weights = match gate {
        Some(gate) => {
            let index = Tensor::<1, Int>::from_data(
                TensorData::new(
                    selected.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                    [selected.len()],
                ),
                &device,
            );
            softmax(gate.forward(input.embeddings.clone()).select(1, index), 1)
        }
        None => Tensor::ones([batch, experts.len()], &device),
    }; // [batch, K]
    let top: Vec<usize> = to_indices(weights.clone().argmax(1));
    let mut mixture: Option<Tensor<2>> = None;
    for (k, p) in probs.iter().enumerate() {
        let term = p.clone() * weights.clone().narrow(1, k, 1);
        mixture = Some(match mixture {
            Some(sum) => sum + term,
            None => term,
        });
    }
    let mixture = mixture.expect("a prediction needs at least one expert");
    let per_expert: Vec<Vec<usize>> = probs
        .iter()
        .map(|p| to_indices(p.clone().argmax(1)))
        .collect();
    let per_expert_max: Vec<Vec<f32>> =
        probs.into_iter().map(|p| to_floats(p.max_dim(1))).collect();
    Predictions {
        by_top_expert: top
            .iter()
            .enumerate()
            .map(|(i, &k)| per_expert[k][i] as u16)
            .collect(),
        top_expert: top.iter().map(|&k| selected[k]).collect(),
        by_mixture: to_indices(mixture.clone().argmax(1))
            .into_iter()
            .map(|c| c as u16)
            .collect(),
        confidence: top
            .iter()
            .enumerate()
            .map(|(i, &k)| per_expert_max[k][i])
            .collect(),
        mixture_confidence: to_floats(mixture.max_dim(1)),
    }
}

fn to_floats(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted tensor data is f32")
}

fn to_indices(t: Tensor<2, Int>) -> Vec<usize> {
    t.into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("converted tensor data is i64")
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::{Device, Gradients};

    use super::*;
    use crate::backend::cpu_device;
    use crate::features::Features;
    use crate::nn::ModelSpec;
    use crate::params;

    fn spec() -> ModelSpec {
        crate::nn::tiny_test_spec()
    }

    fn data() -> Features {
        let embeddings: Vec<f32> = (0..6 * 4)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0)
            .collect();
        Features {
            embeddings,
            dim: 4,
            labels: vec![0, 1, 2, 1, 0, 2],
            pixels: None,
        }
    }

    /// Gradient of every parameter of `module`, flat, in `params::flatten` order (0 if absent).
    fn grad_flat<M: Module>(module: &M, grads: &Gradients) -> (Vec<f32>, bool) {
        struct G<'a>(&'a Gradients, Vec<f32>, bool);
        impl ModuleVisitor for G<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let value = param.val();
                let len = value.dims().iter().product::<usize>();
                match value.grad(self.0) {
                    Some(g) => {
                        self.2 = true;
                        self.1.extend(
                            g.into_data()
                                .convert::<f32>()
                                .try_into_vec::<f32>()
                                .unwrap(),
                        );
                    }
                    None => self.1.extend(std::iter::repeat_n(0.0, len)),
                }
            }
        }
        let mut v = G(grads, Vec::new(), false);
        module.visit(&mut v);
        (v.1, v.2)
    }

    /// Loss of the mixture over experts `selected` with the given flat parameters.
    fn mixture_loss(
        spec: &ModelSpec,
        gate: &[f32],
        experts: &[Vec<f32>],
        selected: &[usize],
        device: &Device,
    ) -> f32 {
        let data = data();
        let (input, labels) = data.batch(&[0, 1, 2, 3, 4, 5], device);
        let gate = params::load(spec.gate(device), gate, "gate").unwrap();
        let logits = selected
            .iter()
            .map(|&e| {
                params::load(spec.expert(device), &experts[e], "expert")
                    .unwrap()
                    .forward(&input)
            })
            .collect();
        mixture_nll(
            gate.forward(input.embeddings.clone()),
            selected,
            logits,
            &labels,
        )
        .into_scalar::<f32>()
    }

    #[test]
    fn mixture_gradients_reach_gate_and_selected_experts_and_match_finite_differences() {
        let spec = spec();
        let plain = cpu_device();
        let device = cpu_device().autodiff();
        let gate_w = params::init(&spec.gate(&plain), 1);
        let experts_w: Vec<Vec<f32>> = (0..3)
            .map(|e| params::init(&spec.expert(&plain), 10 + e))
            .collect();
        let selected = [2usize, 0];

        let data = data();
        let (input, labels) = data.batch(&[0, 1, 2, 3, 4, 5], &device);
        let gate = params::load(spec.gate(&device), &gate_w, "gate").unwrap();
        let experts: Vec<Expert> = experts_w
            .iter()
            .map(|w| params::load(spec.expert(&device), w, "expert").unwrap())
            .collect();
        let logits = selected
            .iter()
            .map(|&e| experts[e].forward(&input))
            .collect();
        let loss = mixture_nll(
            gate.forward(input.embeddings.clone()),
            &selected,
            logits,
            &labels,
        );
        let grads = loss.backward();

        let (gate_grad, gate_has) = grad_flat(&gate, &grads);
        assert!(gate_has, "the gate must receive gradients");
        let (unselected_grad, unselected_has) = grad_flat(&experts[1], &grads);
        assert!(
            !unselected_has || unselected_grad.iter().all(|g| *g == 0.0),
            "an expert outside the top-K must not be trained"
        );

        let eps = 1e-2f32;
        let check = |analytic: f32, plus: f32, minus: f32, what: &str| {
            let numeric = (plus - minus) / (2.0 * eps);
            let tolerance = 2e-3 + 2e-2 * numeric.abs().max(analytic.abs());
            assert!(
                (numeric - analytic).abs() <= tolerance,
                "{what}: analytic {analytic} vs finite difference {numeric}"
            );
        };
        // Every gate parameter with a non-trivial gradient, and a spread of expert parameters.
        let mut checked_gate = 0;
        for i in 0..gate_w.len() {
            if gate_grad[i].abs() < 1e-4 {
                continue;
            }
            let mut p = gate_w.clone();
            p[i] += eps;
            let plus = mixture_loss(&spec, &p, &experts_w, &selected, &plain);
            p[i] -= 2.0 * eps;
            let minus = mixture_loss(&spec, &p, &experts_w, &selected, &plain);
            check(gate_grad[i], plus, minus, &format!("gate param {i}"));
            checked_gate += 1;
        }
        assert!(checked_gate > 10, "too few gate parameters had gradients");
        for &e in &selected {
            let (g, has) = grad_flat(&experts[e], &grads);
            assert!(has, "selected expert {e} must receive gradients");
            assert!(g.iter().any(|v| v.abs() > 1e-4));
            for i in (0..g.len()).step_by(3) {
                let mut ws = experts_w.clone();
                ws[e][i] += eps;
                let plus = mixture_loss(&spec, &gate_w, &ws, &selected, &plain);
                ws[e][i] -= 2.0 * eps;
                let minus = mixture_loss(&spec, &gate_w, &ws, &selected, &plain);
                check(g[i], plus, minus, &format!("expert {e} param {i}"));
            }
        }
    }

    #[test]
    fn anchor_loss_trains_gate_toward_its_expert() {
        let spec = spec();
        let device = cpu_device().autodiff();
        let plain = cpu_device();
        let data = data();
        let (input, labels) = data.batch(&[0, 1, 2, 3, 4, 5], &device);
        let gate = params::load(
            spec.gate(&device),
            &params::init(&spec.gate(&plain), 3),
            "g",
        )
        .unwrap();
        let expert = params::load(
            spec.expert(&device),
            &params::init(&spec.expert(&plain), 4),
            "e",
        )
        .unwrap();
        let gate_logits = gate.forward(input.embeddings.clone());
        let loss = anchor_loss(gate_logits.clone(), 1, expert.forward(&input), &labels);
        let grads = loss.backward();
        let (_, gate_has) = grad_flat(&gate, &grads);
        let (_, expert_has) = grad_flat(&expert, &grads);
        assert!(gate_has && expert_has);
        // The loss equals the two cross-entropies computed separately.
        let ce_expert = cross_entropy(expert.forward(&input), &labels).into_scalar::<f32>();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64; 6], [6]), &device);
        let ce_gate = cross_entropy(gate_logits, &targets).into_scalar::<f32>();
        assert!((loss.into_scalar::<f32>() - ce_expert - ce_gate).abs() < 1e-5);
    }

    #[test]
    fn top_k_orders_by_score_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.2, 0.5], 2), vec![1, 3]);
        assert_eq!(top_k(&[0.3, 0.1, 0.6], 1), vec![2]);
        assert_eq!(top_k(&[0.3, 0.1], 5), vec![0, 1]);
    }

    #[test]
    fn prediction_uses_the_gates_top_expert() {
        let spec = spec();
        let device = cpu_device();
        let data = data();
        let (input, _) = data.batch(&[0, 1, 2, 3, 4, 5], &device);
        let gate = params::load(
            spec.gate(&device),
            &params::init(&spec.gate(&device), 5),
            "g",
        )
        .unwrap();
        let experts: Vec<Expert> = (0..3)
            .map(|e| {
                params::load(
                    spec.expert(&device),
                    &params::init(&spec.expert(&device), e),
                    "e",
                )
                .unwrap()
            })
            .collect();
        let selected = [0usize, 2];
        let chosen = [&experts[0], &experts[2]];
        let p = predict(Some(&gate), &selected, &chosen, &input);
        let probs = gate_probabilities(&gate, input.embeddings.clone());
        for i in 0..6 {
            let row = &probs[i * 3..(i + 1) * 3];
            let expected = if row[0] >= row[2] { 0 } else { 2 };
            assert_eq!(p.top_expert[i], expected, "sample {i}");
            let own = to_indices(experts[expected].forward(&input).argmax(1));
            assert_eq!(p.by_top_expert[i] as usize, own[i]);
        }
        assert_eq!(p.by_mixture.len(), 6);
        for i in 0..6 {
            let own = softmax(experts[p.top_expert[i]].forward(&input), 1);
            let row = to_floats(own).chunks(3).nth(i).unwrap().to_vec();
            assert_eq!(p.confidence[i], row[p.by_top_expert[i] as usize]);
            assert!(p.mixture_confidence[i] > 1.0 / 3.0 - 1e-6 && p.mixture_confidence[i] <= 1.0);
        }
    }
}
