use std::collections::HashSet;

use rand::seq::{SliceRandom, index};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

/// How normal (non-anchor) devices' data is skewed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Skew {
    /// Each device holds exactly `labels_per_device` distinct labels (L in the paper).
    LabelSkew {
        /// Labels per device, `1..=classes`.
        labels_per_device: usize,
    },
    /// Each device's class proportions are drawn from a symmetric Dirichlet(α).
    Dirichlet {
        /// Concentration: small values give few labels per device. Finite and positive.
        alpha: f64,
    },
}

impl std::str::FromStr for Skew {
    type Err = String;

    /// `label:L` (L labels per device) or `dirichlet:ALPHA`, as command lines write it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| format!("expected label:L or dirichlet:ALPHA, got {s:?}"))?;
        match kind {
            "label" => value
                .parse()
                .map(|labels_per_device| Skew::LabelSkew { labels_per_device })
                .map_err(|e| format!("label count {value:?}: {e}")),
            "dirichlet" => value
                .parse()
                .map(|alpha| Skew::Dirichlet { alpha })
                .map_err(|e| format!("alpha {value:?}: {e}")),
            _ => Err(format!(
                "unknown skew {kind:?}: use label:L or dirichlet:ALPHA"
            )),
        }
    }
}

/// Parameters of a federated partition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartitionConfig {
    /// Training devices S, anchors included.
    pub devices: usize,
    /// Anchor devices M (one per expert), 0 for none; at most `devices` and `classes`.
    pub anchors: usize,
    /// Skew of the normal devices.
    pub skew: Skew,
    /// Samples per training device (drawn with replacement).
    pub samples_per_device: usize,
    /// Zero-shot test devices.
    pub test_devices: usize,
    /// Samples per test device.
    pub test_samples_per_device: usize,
    /// Validation devices, built like the test devices but from training images held out of
    /// every training device, so that settings can be chosen without reading the test
    /// devices. 0 (the default) holds nothing out and leaves the partition as it was.
    #[serde(default)]
    pub validation_devices: usize,
    /// Seed of every random choice.
    pub seed: u64,
}

/// One device's share of a dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceData {
    /// Position of this device in [`Partition::train`], [`Partition::test`] or
    /// [`Partition::validation`].
    pub id: usize,
    /// Indices into the train `ImageSet` (for test devices, the test `ImageSet`); repeats
    /// possible where sampling is with replacement.
    pub indices: Vec<usize>,
    /// Sorted labels this device holds: the assigned labels under label skew and for
    /// anchors, the labels with at least one sample under Dirichlet skew.
    pub label_set: Vec<u16>,
    /// The expert this device anchors, for anchor devices.
    pub anchor_of: Option<usize>,
}

/// Devices of one experiment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Training devices, anchors first: device `i < anchors` anchors expert `i`.
    pub train: Vec<DeviceData>,
    /// Zero-shot test devices.
    pub test: Vec<DeviceData>,
    /// Zero-shot validation devices: images of the train split that no training device holds,
    /// in label combinations (under label skew) that no training device has.
    #[serde(default)]
    pub validation: Vec<DeviceData>,
}

/// Why a partition cannot be built.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PartitionError {
    /// The dataset declares no class.
    #[error("cannot partition a dataset with no classes")]
    NoClasses,
    /// `labels_per_device` is 0 or exceeds the number of classes.
    #[error("labels_per_device must be in 1..={classes}, got {labels_per_device}")]
    InvalidLabelsPerDevice {
        /// The configured L.
        labels_per_device: usize,
        /// Number of classes.
        classes: usize,
    },
    /// More anchors than classes: some anchor would get no label.
    #[error("{anchors} anchors need at least as many classes, but there are {classes}")]
    AnchorsExceedClasses {
        /// The configured M.
        anchors: usize,
        /// Number of classes.
        classes: usize,
    },
    /// More anchors than devices (anchors are counted among the devices).
    #[error("{anchors} anchors exceed the {devices} training devices they are part of")]
    AnchorsExceedDevices {
        /// The configured M.
        anchors: usize,
        /// The configured S.
        devices: usize,
    },
    /// The Dirichlet concentration is not a finite positive number.
    #[error("Dirichlet alpha must be finite and positive, got {alpha}")]
    InvalidAlpha {
        /// The configured α.
        alpha: f64,
    },
    /// Devices were asked for but would hold no sample.
    #[error("{field} must be positive when devices are requested")]
    ZeroSamples {
        /// `"samples_per_device"` or `"test_samples_per_device"`.
        field: &'static str,
    },
    /// A label is not below the number of classes.
    #[error("{split} label {label} at index {index} is out of range for {classes} classes")]
    LabelOutOfRange {
        /// `"train"` or `"test"`.
        split: &'static str,
        /// Position of the label.
        index: usize,
        /// The label.
        label: u16,
        /// Number of classes.
        classes: usize,
    },
    /// A class has no sample to draw from.
    #[error("class {class} has no {split} samples")]
    EmptyClass {
        /// `"train"` or `"test"`.
        split: &'static str,
        /// The empty class.
        class: usize,
    },
    /// Not enough label combinations are absent from training for the zero-shot test (or
    /// validation) devices.
    #[error(
        "only {available} of the {total} combinations of {labels_per_device} labels never occur \
         on a training device, but {requested} zero-shot {kind} devices were requested"
    )]
    TooFewUnseenCombinations {
        /// `"test"` or `"validation"`.
        kind: &'static str,
        /// Unseen combinations.
        available: u128,
        /// All combinations of `labels_per_device` out of the classes.
        total: u128,
        /// The configured L.
        labels_per_device: usize,
        /// The configured number of test or validation devices.
        requested: usize,
    },
    /// A class has too few training samples to hold some out for validation and keep some.
    #[error(
        "class {class} has {samples} train samples: too few to hold some out for validation \
         devices and keep some for training"
    )]
    TooFewToHoldOut {
        /// The class.
        class: usize,
        /// Its train samples.
        samples: usize,
    },
}

// Independent ChaCha streams per phase, so that e.g. adding test devices leaves the
// training partition unchanged.
const STREAM_ANCHORS: u64 = 0;
const STREAM_DEVICES: u64 = 1;
const STREAM_TEST: u64 = 2;
const STREAM_VALIDATION: u64 = 3;

/// Share of each class's train samples held out for validation devices, when any are
/// requested.
pub const VALIDATION_HOLDOUT: f64 = 0.1;

/// Combination spaces up to this size are enumerated; larger ones are rejection-sampled.
const ENUMERATE_LIMIT: u128 = 1 << 20;
/// Dirichlet draws retried when every Gamma sample underflows to zero.
const DIRICHLET_RETRIES: usize = 64;

/// Splits a dataset over `cfg.devices` training devices (the first `cfg.anchors` of them
/// anchors), `cfg.test_devices` zero-shot test devices and `cfg.validation_devices`
/// zero-shot validation devices. Deterministic in `cfg.seed`.
///
/// - Validation: when validation devices are requested, [`VALIDATION_HOLDOUT`] of each
///   class's train samples is set aside first; training devices never draw from it, and the
///   validation devices are built from it as the test devices are built from the test split.
///
/// - Anchors: the classes, shuffled, are cut into `anchors` disjoint groups whose sizes
///   differ by at most one; anchor `i` draws its samples with replacement from the pooled
///   indices of group `i`.
/// - Label skew: each normal device picks L distinct labels uniformly and draws with
///   replacement from their pooled indices. Test devices get distinct L-label combinations
///   that no training device holds, with samples spread evenly over their labels and drawn
///   from the test split without replacement where the class has enough samples.
/// - Dirichlet: per-device class proportions ~ Dir(α), turned into counts summing exactly to
///   the device's sample count (largest remainders); training draws are with replacement,
///   test draws without replacement where the class allows.
pub fn partition(
    train_labels: &[u16],
    test_labels: &[u16],
    num_classes: usize,
    cfg: &PartitionConfig,
) -> Result<Partition, PartitionError> {
    validate(num_classes, cfg)?;
    let mut train_pools = class_pools(
        train_labels,
        num_classes,
        "train",
        cfg.devices + cfg.validation_devices > 0,
    )?;
    let test_pools = class_pools(test_labels, num_classes, "test", cfg.test_devices > 0)?;
    let rng_for = |stream| {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(stream);
        rng
    };
    let mut validation_rng = rng_for(STREAM_VALIDATION);
    let validation_pools = if cfg.validation_devices > 0 {
        hold_out(&mut train_pools, VALIDATION_HOLDOUT, &mut validation_rng)?
    } else {
        Vec::new()
    };

    let mut train = Vec::with_capacity(cfg.devices);
    let mut rng = rng_for(STREAM_ANCHORS);
    for (expert, labels) in anchor_groups(num_classes, cfg.anchors, &mut rng)
        .into_iter()
        .enumerate()
    {
        let indices = draw_pooled(&labels, &train_pools, cfg.samples_per_device, &mut rng);
        train.push(DeviceData {
            id: expert,
            indices,
            label_set: labels,
            anchor_of: Some(expert),
        });
    }

    let mut rng = rng_for(STREAM_DEVICES);
    for id in cfg.anchors..cfg.devices {
        let (indices, label_set) = match cfg.skew {
            Skew::LabelSkew { labels_per_device } => {
                let labels = random_labels(num_classes, labels_per_device, &mut rng);
                (
                    draw_pooled(&labels, &train_pools, cfg.samples_per_device, &mut rng),
                    labels,
                )
            }
            Skew::Dirichlet { alpha } => {
                let counts = dirichlet_counts(alpha, num_classes, cfg.samples_per_device, &mut rng);
                draw_counts(&counts, &train_pools, true, &mut rng)
            }
        };
        train.push(DeviceData {
            id,
            indices,
            label_set,
            anchor_of: None,
        });
    }

    let held_out = HeldOut {
        skew: &cfg.skew,
        trained_label_sets: train.iter().map(|d| d.label_set.as_slice()).collect(),
        classes: num_classes,
        samples: cfg.test_samples_per_device,
    };
    let test = held_out.devices(
        "test",
        cfg.test_devices,
        &test_pools,
        &mut rng_for(STREAM_TEST),
    )?;
    let validation = held_out.devices(
        "validation",
        cfg.validation_devices,
        &validation_pools,
        &mut validation_rng,
    )?;
    Ok(Partition {
        train,
        test,
        validation,
    })
}

/// How devices outside training (test and validation) are built.
struct HeldOut<'a> {
    skew: &'a Skew,
    /// Label sets of the training devices, which held-out devices under label skew avoid.
    trained_label_sets: HashSet<&'a [u16]>,
    classes: usize,
    samples: usize,
}

impl HeldOut<'_> {
    /// `count` devices drawing from `pools` (without replacement where a class has enough):
    /// under label skew, distinct label combinations that no training device holds with the
    /// samples spread evenly over them; under Dirichlet, fresh Dir(α) proportions.
    fn devices(
        &self,
        kind: &'static str,
        count: usize,
        pools: &[Vec<usize>],
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<DeviceData>, PartitionError> {
        let device = |id, (indices, label_set)| DeviceData {
            id,
            indices,
            label_set,
            anchor_of: None,
        };
        match *self.skew {
            Skew::LabelSkew { labels_per_device } => {
                let combos = unseen_combinations(
                    kind,
                    self.classes,
                    labels_per_device,
                    &self.trained_label_sets,
                    count,
                    rng,
                )?;
                Ok(combos
                    .into_iter()
                    .enumerate()
                    .map(|(id, labels)| {
                        let counts = even_counts(&labels, self.classes, self.samples, rng);
                        let (indices, _) = draw_counts(&counts, pools, false, rng);
                        device(id, (indices, labels))
                    })
                    .collect())
            }
            Skew::Dirichlet { alpha } => Ok((0..count)
                .map(|id| {
                    let counts = dirichlet_counts(alpha, self.classes, self.samples, rng);
                    device(id, draw_counts(&counts, pools, false, rng))
                })
                .collect()),
        }
    }
}

/// Removes `share` of each class pool (at least one sample, and never all of them) and
/// returns the removed indices per class, in index order.
fn hold_out(
    pools: &mut [Vec<usize>],
    share: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    pools
        .iter_mut()
        .enumerate()
        .map(|(class, pool)| {
            let samples = pool.len();
            if samples < 2 {
                return Err(PartitionError::TooFewToHoldOut { class, samples });
            }
            let count = ((samples as f64 * share).round() as usize).clamp(1, samples - 1);
            let mut chosen = vec![false; samples];
            for i in index::sample(rng, samples, count) {
                chosen[i] = true;
            }
            let (mut held, mut kept) = (Vec::with_capacity(count), Vec::with_capacity(samples));
            for (&index, held_out) in pool.iter().zip(chosen) {
                if held_out { &mut held } else { &mut kept }.push(index);
            }
            *pool = kept;
            Ok(held)
        })
        .collect()
}

/// How many of `indices` carry each label. Panics if a label is `>= num_classes`.
pub fn label_histogram(labels: &[u16], indices: &[usize], num_classes: usize) -> Vec<usize> {
    let mut counts = vec![0; num_classes];
    for &i in indices {
        let label = usize::from(labels[i]);
        assert!(
            label < num_classes,
            "label {label} at index {i} is out of range for {num_classes} classes"
        );
        counts[label] += 1;
    }
    counts
}

fn validate(classes: usize, cfg: &PartitionConfig) -> Result<(), PartitionError> {
    if classes == 0 {
        return Err(PartitionError::NoClasses);
    }
    match cfg.skew {
        Skew::LabelSkew { labels_per_device }
            if labels_per_device == 0 || labels_per_device > classes =>
        {
            return Err(PartitionError::InvalidLabelsPerDevice {
                labels_per_device,
                classes,
            });
        }
        Skew::Dirichlet { alpha } if !(alpha.is_finite() && alpha > 0.0) => {
            return Err(PartitionError::InvalidAlpha { alpha });
        }
        _ => {}
    }
    if cfg.anchors > classes {
        return Err(PartitionError::AnchorsExceedClasses {
            anchors: cfg.anchors,
            classes,
        });
    }
    if cfg.anchors > cfg.devices {
        return Err(PartitionError::AnchorsExceedDevices {
            anchors: cfg.anchors,
            devices: cfg.devices,
        });
    }
    if cfg.devices > 0 && cfg.samples_per_device == 0 {
        return Err(PartitionError::ZeroSamples {
            field: "samples_per_device",
        });
    }
    if cfg.test_devices + cfg.validation_devices > 0 && cfg.test_samples_per_device == 0 {
        return Err(PartitionError::ZeroSamples {
            field: "test_samples_per_device",
        });
    }
    Ok(())
}

/// Indices of each class, in index order. When `need_all`, every class must be non-empty.
fn class_pools(
    labels: &[u16],
    classes: usize,
    split: &'static str,
    need_all: bool,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let mut pools = vec![Vec::new(); classes];
    for (index, &label) in labels.iter().enumerate() {
        let pool = pools
            .get_mut(usize::from(label))
            .ok_or(PartitionError::LabelOutOfRange {
                split,
                index,
                label,
                classes,
            })?;
        pool.push(index);
    }
    if need_all && let Some(class) = pools.iter().position(Vec::is_empty) {
        return Err(PartitionError::EmptyClass { split, class });
    }
    Ok(pools)
}

/// Shuffled classes cut into `anchors` groups, the first `classes % anchors` one larger.
fn anchor_groups(classes: usize, anchors: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<u16>> {
    let mut order: Vec<u16> = (0..classes).map(label_u16).collect();
    order.shuffle(rng);
    let mut rest = order.as_slice();
    (0..anchors)
        .map(|i| {
            let size = classes / anchors + usize::from(i < classes % anchors);
            let (group, tail) = rest.split_at(size);
            rest = tail;
            let mut group = group.to_vec();
            group.sort_unstable();
            group
        })
        .collect()
}

fn label_u16(class: usize) -> u16 {
    u16::try_from(class).expect("class pools were built from u16 labels, so classes fit u16")
}

/// `count` distinct labels drawn uniformly, sorted.
fn random_labels(classes: usize, count: usize, rng: &mut ChaCha8Rng) -> Vec<u16> {
    let mut labels: Vec<u16> = index::sample(rng, classes, count)
        .into_iter()
        .map(label_u16)
        .collect();
    labels.sort_unstable();
    labels
}

/// `n` indices drawn uniformly with replacement from the union of `labels`' pools, so each
/// label is drawn in proportion to its number of samples.
fn draw_pooled(labels: &[u16], pools: &[Vec<usize>], n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let ends: Vec<usize> = labels
        .iter()
        .scan(0, |end, &l| {
            *end += pools[usize::from(l)].len();
            Some(*end)
        })
        .collect();
    let total = *ends.last().expect("a device holds at least one label");
    (0..n)
        .map(|_| {
            let r = rng.random_range(0..total);
            let k = ends.partition_point(|&end| end <= r);
            let start = if k == 0 { 0 } else { ends[k - 1] };
            pools[usize::from(labels[k])][r - start]
        })
        .collect()
}

/// Draws `counts[c]` indices of each class `c`, shuffled together; returns them with the
/// sorted labels drawn. With `replace` false, a class contributes distinct indices until its
/// pool is exhausted, and only then repeats.
fn draw_counts(
    counts: &[usize],
    pools: &[Vec<usize>],
    replace: bool,
    rng: &mut ChaCha8Rng,
) -> (Vec<usize>, Vec<u16>) {
    let mut indices = Vec::with_capacity(counts.iter().sum());
    let mut labels = Vec::new();
    for (class, (&count, pool)) in counts.iter().zip(pools).enumerate() {
        if count == 0 {
            continue;
        }
        labels.push(label_u16(class));
        let mut remaining = count;
        if !replace {
            let distinct = count.min(pool.len());
            indices.extend(
                index::sample(rng, pool.len(), distinct)
                    .into_iter()
                    .map(|i| pool[i]),
            );
            remaining -= distinct;
        }
        indices.extend((0..remaining).map(|_| pool[rng.random_range(0..pool.len())]));
    }
    indices.shuffle(rng);
    (indices, labels)
}

/// Per-class counts spreading `n` samples evenly over `labels`; the remainder goes to
/// randomly chosen labels so that no label is favoured across devices.
fn even_counts(labels: &[u16], classes: usize, n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for &l in labels {
        counts[usize::from(l)] = n / labels.len();
    }
    for k in index::sample(rng, labels.len(), n % labels.len()) {
        counts[usize::from(labels[k])] += 1;
    }
    counts
}

/// Class counts summing to `n` from proportions ~ Dir(α).
fn dirichlet_counts(alpha: f64, classes: usize, n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    apportion(&dirichlet(alpha, classes, rng), n)
}

/// One draw from a symmetric Dirichlet(α) via normalised Gamma(α, 1) samples.
fn dirichlet(alpha: f64, classes: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let gamma = Gamma::new(alpha, 1.0).expect("alpha was validated as finite and positive");
    for _ in 0..DIRICHLET_RETRIES {
        let draws: Vec<f64> = (0..classes).map(|_| gamma.sample(rng)).collect();
        // Scaling by the maximum first keeps the sum finite even for huge α.
        let max = draws.iter().copied().fold(0.0, f64::max);
        if max > 0.0 && max.is_finite() {
            let sum: f64 = draws.iter().map(|d| d / max).sum();
            return draws.iter().map(|d| d / max / sum).collect();
        }
    }
    // For α so small that every Gamma draw underflows to zero, Dir(α) is indistinguishable
    // from its α → 0 limit: all mass on one uniformly chosen class.
    let mut one_hot = vec![0.0; classes];
    one_hot[rng.random_range(0..classes)] = 1.0;
    one_hot
}

/// Integer counts summing exactly to `n`, proportional to `proportions` (which sum to 1):
/// floors first, then one more for the largest remainders (lowest class on ties).
fn apportion(proportions: &[f64], n: usize) -> Vec<usize> {
    let exact: Vec<f64> = proportions.iter().map(|p| p * n as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    // Rounding in the proportions could overshoot by a hair; take the excess back.
    while counts.iter().sum::<usize>() > n {
        let largest = (0..counts.len())
            .max_by_key(|&c| counts[c])
            .expect("there is a class");
        counts[largest] -= 1;
    }
    let short = n - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| {
        let frac = |c: usize| exact[c] - exact[c].floor();
        frac(b).total_cmp(&frac(a)).then(a.cmp(&b))
    });
    for &c in order.iter().cycle().take(short) {
        counts[c] += 1;
    }
    counts
}

/// Binomial coefficient, saturating at `u128::MAX`.
fn binomial(n: usize, k: usize) -> u128 {
    let k = k.min(n - k);
    let mut result: u128 = 1;
    for i in 0..k {
        // result * (n - i) / (i + 1) stays an integer at every step.
        match result.checked_mul((n - i) as u128) {
            Some(v) => result = v / (i as u128 + 1),
            None => return u128::MAX,
        }
    }
    result
}

/// `want` distinct sorted `size`-label combinations, none in `seen`, uniformly at random, for
/// `kind` (test or validation) devices.
fn unseen_combinations(
    kind: &'static str,
    classes: usize,
    size: usize,
    seen: &HashSet<&[u16]>,
    want: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<u16>>, PartitionError> {
    if want == 0 {
        return Ok(Vec::new());
    }
    let total = binomial(classes, size);
    let seen_of_size = seen.iter().filter(|s| s.len() == size).count() as u128;
    let available = total.saturating_sub(seen_of_size);
    if available < want as u128 {
        return Err(PartitionError::TooFewUnseenCombinations {
            kind,
            available,
            total,
            labels_per_device: size,
            requested: want,
        });
    }
    // Rejection sampling is fast only if unseen, unchosen combinations dominate; otherwise
    // the space is at most a few times the device count and can be listed.
    let crowded = 4 * (seen_of_size + want as u128);
    if total <= ENUMERATE_LIMIT.max(crowded) {
        let unseen: Vec<Vec<u16>> = Combinations::new(classes, size)
            .filter(|c| !seen.contains(c.as_slice()))
            .collect();
        return Ok(index::sample(rng, unseen.len(), want)
            .into_iter()
            .map(|i| unseen[i].clone())
            .collect());
    }
    let mut chosen = Vec::with_capacity(want);
    let mut taken = HashSet::new();
    while chosen.len() < want {
        let combo = random_labels(classes, size, rng);
        if !seen.contains(combo.as_slice()) && taken.insert(combo.clone()) {
            chosen.push(combo);
        }
    }
    Ok(chosen)
}

/// All `size`-subsets of `0..classes` as sorted label vectors, in lexicographic order.
struct Combinations {
    classes: usize,
    next: Option<Vec<u16>>,
}

impl Combinations {
    fn new(classes: usize, size: usize) -> Self {
        Self {
            classes,
            next: (size <= classes).then(|| (0..size).map(label_u16).collect()),
        }
    }
}

impl Iterator for Combinations {
    type Item = Vec<u16>;

    fn next(&mut self) -> Option<Vec<u16>> {
        let current = self.next.take()?;
        let size = current.len();
        // Advance the rightmost position that still has room, then reset those after it.
        let mut following = current.clone();
        if let Some(i) = (0..size)
            .rev()
            .find(|&i| usize::from(following[i]) < self.classes - size + i)
        {
            following[i] += 1;
            for j in i + 1..size {
                following[j] = following[j - 1] + 1;
            }
            self.next = Some(following);
        }
        Some(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 classes, unbalanced a little: class c has 100 + 10c train and 20 + c test samples.
    fn labels() -> (Vec<u16>, Vec<u16>) {
        let make = |base: usize, step: usize| -> Vec<u16> {
            let mut v: Vec<u16> = (0..10u16)
                .flat_map(|c| std::iter::repeat_n(c, base + step * usize::from(c)))
                .collect();
            // Interleave so that indices do not follow labels.
            v.shuffle(&mut ChaCha8Rng::seed_from_u64(99));
            v
        };
        (make(100, 10), make(20, 1))
    }

    fn label_skew(
        devices: usize,
        anchors: usize,
        l: usize,
        test_devices: usize,
        seed: u64,
    ) -> PartitionConfig {
        PartitionConfig {
            devices,
            anchors,
            skew: Skew::LabelSkew {
                labels_per_device: l,
            },
            samples_per_device: 64,
            test_devices,
            test_samples_per_device: 30,
            validation_devices: 0,
            seed,
        }
    }

    fn dirichlet_cfg(alpha: f64) -> PartitionConfig {
        PartitionConfig {
            devices: 40,
            anchors: 0,
            skew: Skew::Dirichlet { alpha },
            samples_per_device: 101,
            test_devices: 10,
            test_samples_per_device: 33,
            validation_devices: 0,
            seed: 5,
        }
    }

    fn labels_of(labels: &[u16], device: &DeviceData) -> Vec<u16> {
        let mut held: Vec<u16> = device.indices.iter().map(|&i| labels[i]).collect();
        held.sort_unstable();
        held.dedup();
        held
    }

    #[test]
    fn label_skew_devices_hold_l_labels_and_only_those() {
        let (train, test) = labels();
        let p = partition(&train, &test, 10, &label_skew(30, 5, 3, 8, 1)).expect("valid config");
        assert_eq!((p.train.len(), p.test.len()), (30, 8));
        for (i, d) in p.train.iter().enumerate().skip(5) {
            assert_eq!(d.id, i);
            assert_eq!(d.anchor_of, None);
            assert_eq!(d.label_set.len(), 3);
            assert!(
                d.label_set.windows(2).all(|w| w[0] < w[1]),
                "sorted and distinct"
            );
            assert_eq!(d.indices.len(), 64);
            assert!(d.indices.iter().all(|&i| d.label_set.contains(&train[i])));
        }
        for (i, d) in p.test.iter().enumerate() {
            assert_eq!(d.id, i);
            assert_eq!(d.label_set.len(), 3);
            assert_eq!(d.indices.len(), 30);
            assert!(d.indices.iter().all(|&i| d.label_set.contains(&test[i])));
            // 30 samples over 3 labels, each class pool ≥ 20: exactly 10 distinct per label.
            let hist = label_histogram(&test, &d.indices, 10);
            assert!(
                d.label_set.iter().all(|&l| hist[usize::from(l)] == 10),
                "{hist:?}"
            );
            let mut distinct = d.indices.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 30, "drawn without replacement");
        }
    }

    #[test]
    fn anchors_have_disjoint_groups_covering_all_classes() {
        let (train, test) = labels();
        for (anchors, sizes) in [
            (5, vec![2; 5]),
            (3, vec![4, 3, 3]),
            (10, vec![1; 10]),
            (1, vec![10]),
        ] {
            let p = partition(&train, &test, 10, &label_skew(12, anchors, 2, 0, 7))
                .expect("valid config");
            let mut all: Vec<u16> = Vec::new();
            for (i, d) in p.train.iter().take(anchors).enumerate() {
                assert_eq!(d.anchor_of, Some(i));
                assert_eq!(d.id, i);
                assert_eq!(d.label_set.len(), sizes[i]);
                assert_eq!(d.indices.len(), 64);
                assert!(d.indices.iter().all(|&j| d.label_set.contains(&train[j])));
                all.extend(&d.label_set);
            }
            all.sort_unstable();
            assert_eq!(
                all,
                (0..10).collect::<Vec<u16>>(),
                "pairwise disjoint and covering"
            );
            assert!(p.train[anchors..].iter().all(|d| d.anchor_of.is_none()));
        }
    }

    #[test]
    fn test_combinations_never_occur_in_training() {
        let (train, test) = labels();
        for (devices, l, test_devices) in [(30, 2, 15), (25, 3, 40), (10, 1, 5)] {
            let p = partition(
                &train,
                &test,
                10,
                &label_skew(devices, 5, l, test_devices, 3),
            )
            .expect("valid config");
            let seen: HashSet<&Vec<u16>> = p.train.iter().map(|d| &d.label_set).collect();
            let mut combos = HashSet::new();
            for d in &p.test {
                assert!(
                    !seen.contains(&d.label_set),
                    "{:?} occurs in training",
                    d.label_set
                );
                assert!(
                    combos.insert(d.label_set.clone()),
                    "{:?} repeated",
                    d.label_set
                );
            }
            assert_eq!(combos.len(), test_devices);
        }
    }

    #[test]
    fn validation_devices_hold_train_images_no_training_device_holds() {
        let (train, test) = labels();
        for cfg in [label_skew(30, 5, 3, 8, 1), dirichlet_cfg(0.5)] {
            let cfg = PartitionConfig {
                validation_devices: 6,
                ..cfg
            };
            let p = partition(&train, &test, 10, &cfg).expect("valid config");
            assert_eq!(p.validation.len(), 6);
            let trained: HashSet<usize> = p
                .train
                .iter()
                .flat_map(|d| d.indices.iter().copied())
                .collect();
            let seen: HashSet<&Vec<u16>> = p.train.iter().map(|d| &d.label_set).collect();
            for (i, d) in p.validation.iter().enumerate() {
                assert_eq!(d.id, i);
                assert_eq!(d.anchor_of, None);
                assert_eq!(d.indices.len(), cfg.test_samples_per_device);
                assert_eq!(
                    d.label_set,
                    labels_of(&train, d),
                    "indices into the train split"
                );
                assert!(
                    d.indices.iter().all(|i| !trained.contains(i)),
                    "validation device {i} shares an image with a training device"
                );
                if let Skew::LabelSkew { .. } = cfg.skew {
                    assert!(!seen.contains(&d.label_set), "{:?} is trained", d.label_set);
                    // 10 per label from held-out pools of 10 to 19: no repeats.
                    let mut distinct = d.indices.clone();
                    distinct.sort_unstable();
                    distinct.dedup();
                    assert_eq!(distinct.len(), d.indices.len());
                }
            }
            // A tenth of each class is held out, whether or not a device drew it.
            let mut pools = class_pools(&train, 10, "train", true).expect("valid labels");
            let held = hold_out(
                &mut pools,
                VALIDATION_HOLDOUT,
                &mut ChaCha8Rng::seed_from_u64(0),
            )
            .expect("every class has samples");
            for (c, (held, kept)) in held.iter().zip(&pools).enumerate() {
                let samples = 100 + 10 * c;
                assert_eq!(held.len(), (samples as f64 / 10.0).round() as usize);
                assert_eq!(held.len() + kept.len(), samples);
                assert!(
                    held.iter()
                        .all(|i| !kept.contains(i) && train[*i] == c as u16)
                );
            }
        }
    }

    #[test]
    fn large_combination_space_is_sampled() {
        // C(100, 5) ≈ 75M combinations: too many to list, so rejection sampling is used.
        let train: Vec<u16> = (0..2000).map(|i| (i % 100) as u16).collect();
        let cfg = PartitionConfig {
            samples_per_device: 10,
            test_samples_per_device: 5,
            ..label_skew(50, 0, 5, 20, 0)
        };
        let p = partition(&train, &train, 100, &cfg).expect("valid config");
        let seen: HashSet<&Vec<u16>> = p.train.iter().map(|d| &d.label_set).collect();
        assert_eq!(p.test.len(), 20);
        assert!(
            p.test
                .iter()
                .all(|d| d.label_set.len() == 5 && !seen.contains(&d.label_set))
        );
    }

    #[test]
    fn seeds_determine_the_partition() {
        let (train, test) = labels();
        for cfg in [label_skew(20, 5, 2, 6, 42), dirichlet_cfg(0.5)] {
            let a = partition(&train, &test, 10, &cfg).expect("valid config");
            assert_eq!(a, partition(&train, &test, 10, &cfg).expect("valid config"));
            let other = PartitionConfig {
                seed: cfg.seed + 1,
                ..cfg.clone()
            };
            let b = partition(&train, &test, 10, &other).expect("valid config");
            assert_ne!(a.train, b.train);
            assert_ne!(a.test, b.test);
            // Separate streams: more test devices leave the training devices unchanged.
            let more = PartitionConfig {
                test_devices: cfg.test_devices + 2,
                ..cfg.clone()
            };
            assert_eq!(
                partition(&train, &test, 10, &more)
                    .expect("valid config")
                    .train,
                a.train
            );
        }
    }

    #[test]
    fn dirichlet_counts_sum_and_alpha_controls_spread() {
        let (train, test) = labels();
        let mean_labels = |alpha: f64| {
            let p = partition(&train, &test, 10, &dirichlet_cfg(alpha)).expect("valid config");
            for d in &p.train {
                assert_eq!(d.indices.len(), 101);
                assert_eq!(d.label_set, labels_of(&train, d));
            }
            for d in &p.test {
                assert_eq!(d.indices.len(), 33);
                assert_eq!(d.label_set, labels_of(&test, d));
            }
            p.train.iter().map(|d| d.label_set.len()).sum::<usize>() as f64 / p.train.len() as f64
        };
        let (few, many) = (mean_labels(0.01), mean_labels(100.0));
        assert!(few <= 2.0, "alpha 0.01 gave {few} labels per device");
        assert!(many >= 9.5, "alpha 100 gave {many} labels per device");
        // Underflowing Gamma draws fall back to a single class rather than looping.
        assert!(mean_labels(1e-300) == 1.0);
        assert!(mean_labels(1e300) >= 9.5);
    }

    #[test]
    fn apportion_sums_exactly() {
        assert_eq!(apportion(&[0.5, 0.25, 0.25], 4), vec![2, 1, 1]);
        assert_eq!(apportion(&[1.0 / 3.0; 3], 10), vec![4, 3, 3]);
        assert_eq!(apportion(&[0.0, 1.0], 7), vec![0, 7]);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for n in [0, 1, 17, 1000] {
            let counts = apportion(&dirichlet(0.3, 10, &mut rng), n);
            assert_eq!(counts.iter().sum::<usize>(), n);
        }
        assert_eq!(binomial(10, 2), 45);
        assert_eq!(binomial(100, 5), 75_287_520);
        assert_eq!(binomial(300, 150), u128::MAX);
        assert_eq!(Combinations::new(4, 2).count(), 6);
        assert_eq!(
            Combinations::new(3, 3).collect::<Vec<_>>(),
            vec![vec![0, 1, 2]]
        );
    }

    #[test]
    fn histogram_counts_indexed_labels() {
        assert_eq!(
            label_histogram(&[0, 2, 2, 1], &[1, 2, 2, 0], 4),
            vec![1, 0, 3, 0]
        );
    }

    #[test]
    fn config_errors() {
        let (train, test) = labels();
        let run =
            |cfg: PartitionConfig| partition(&train, &test, 10, &cfg).expect_err("invalid config");
        assert_eq!(
            run(label_skew(10, 0, 0, 0, 0)),
            PartitionError::InvalidLabelsPerDevice {
                labels_per_device: 0,
                classes: 10
            }
        );
        assert_eq!(
            run(label_skew(10, 0, 11, 0, 0)),
            PartitionError::InvalidLabelsPerDevice {
                labels_per_device: 11,
                classes: 10
            }
        );
        assert_eq!(
            run(label_skew(20, 11, 2, 0, 0)),
            PartitionError::AnchorsExceedClasses {
                anchors: 11,
                classes: 10
            }
        );
        assert_eq!(
            run(label_skew(4, 5, 2, 0, 0)),
            PartitionError::AnchorsExceedDevices {
                anchors: 5,
                devices: 4
            }
        );
        for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                run(PartitionConfig {
                    skew: Skew::Dirichlet { alpha },
                    ..dirichlet_cfg(1.0)
                }),
                PartitionError::InvalidAlpha { .. }
            ));
        }
        assert_eq!(
            run(PartitionConfig {
                samples_per_device: 0,
                ..label_skew(3, 0, 2, 0, 0)
            }),
            PartitionError::ZeroSamples {
                field: "samples_per_device"
            }
        );
        assert_eq!(
            partition(&train, &test, 0, &label_skew(3, 0, 1, 0, 0)).expect_err("no classes"),
            PartitionError::NoClasses
        );
    }

    #[test]
    fn data_errors() {
        let (train, test) = labels();
        // 10 classes, L = 2: 45 combinations; 60 devices leave fewer than 45 unseen.
        let err =
            partition(&train, &test, 10, &label_skew(60, 0, 2, 45, 0)).expect_err("too few unseen");
        match &err {
            PartitionError::TooFewUnseenCombinations {
                kind,
                available,
                total,
                labels_per_device,
                requested,
            } => {
                assert_eq!(
                    (*kind, *total, *labels_per_device, *requested),
                    ("test", 45, 2, 45)
                );
                assert!(*available < 45);
            }
            other => panic!("expected TooFewUnseenCombinations, got {other:?}"),
        }
        assert!(
            err.to_string().contains("45 zero-shot test devices"),
            "{err}"
        );
        let no_class_3: Vec<u16> = train.iter().copied().filter(|&l| l != 3).collect();
        assert_eq!(
            partition(&no_class_3, &test, 10, &label_skew(5, 0, 2, 0, 0))
                .expect_err("class 3 empty"),
            PartitionError::EmptyClass {
                split: "train",
                class: 3
            }
        );
        // An empty test class only matters when test devices are requested.
        let no_test_9: Vec<u16> = test.iter().copied().filter(|&l| l != 9).collect();
        assert!(partition(&train, &no_test_9, 10, &label_skew(5, 0, 2, 0, 0)).is_ok());
        assert_eq!(
            partition(&train, &no_test_9, 10, &label_skew(5, 0, 2, 3, 0))
                .expect_err("class 9 empty"),
            PartitionError::EmptyClass {
                split: "test",
                class: 9
            }
        );
        // Holding a validation share out of a class of one sample would leave it no training data.
        let mut lone_4: Vec<u16> = train.iter().copied().filter(|&l| l != 4).collect();
        lone_4.push(4);
        let with_validation = PartitionConfig {
            validation_devices: 2,
            ..label_skew(5, 0, 2, 0, 0)
        };
        assert!(partition(&lone_4, &test, 10, &label_skew(5, 0, 2, 0, 0)).is_ok());
        assert_eq!(
            partition(&lone_4, &test, 10, &with_validation).expect_err("class 4 has one sample"),
            PartitionError::TooFewToHoldOut {
                class: 4,
                samples: 1
            }
        );
        let mut bad = train.clone();
        bad[7] = 10;
        assert_eq!(
            partition(&bad, &test, 10, &label_skew(5, 0, 2, 0, 0)).expect_err("label 10 of 10"),
            PartitionError::LabelOutOfRange {
                split: "train",
                index: 7,
                label: 10,
                classes: 10
            }
        );
    }
}
