use std::f32::consts::TAU;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::{ImageSet, ImageShape, Split};

/// Per-sample pixel noise; small against the ±(50 + 40) class pattern amplitude.
const NOISE_SD: f32 = 16.0;

/// A tiny deterministic dataset for unit tests: each class has a pattern (a sinusoidal
/// grating whose frequency depends on the class, plus a fixed random texture), and every
/// sample is its class pattern plus Gaussian noise, so a small classifier can learn it.
/// Samples are interleaved by class (sample `j` has label `j % classes`); train and test
/// share the patterns but not the noise.
///
/// Panics if `classes` exceeds what a `u16` label can index.
pub fn synthetic(
    classes: usize,
    per_class_train: usize,
    per_class_test: usize,
    shape: ImageShape,
    seed: u64,
) -> Split {
    assert!(
        classes <= usize::from(u16::MAX) + 1,
        "{classes} classes do not fit u16 labels"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let patterns: Vec<Vec<f32>> = (0..classes).map(|c| pattern(c, shape, &mut rng)).collect();
    let names: Vec<String> = (0..classes).map(|c| format!("class_{c}")).collect();
    let noise = Normal::new(0.0, NOISE_SD).expect("constant standard deviation is valid");
    let mut make = |per_class: usize| {
        let mut images = Vec::with_capacity(per_class * classes * shape.size());
        let mut labels = Vec::with_capacity(per_class * classes);
        for _ in 0..per_class {
            for (c, pattern) in patterns.iter().enumerate() {
                images.extend(
                    pattern
                        .iter()
                        .map(|&p| (p + noise.sample(&mut rng)).round().clamp(0.0, 255.0) as u8),
                );
                labels.push(u16::try_from(c).expect("class count was checked against u16"));
            }
        }
        ImageSet {
            images,
            labels,
            shape,
            classes: names.clone(),
        }
    };
    let train = make(per_class_train);
    let test = make(per_class_test);
    Split { train, test }
}

/// Class `c`'s noiseless image: a grating with class-specific frequencies (distinct for the
/// first 16 classes) and a random phase per channel, plus a random texture.
fn pattern(c: usize, shape: ImageShape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let (kx, ky) = ((c % 4) as f32 + 0.5, ((c / 4) % 4) as f32 + 0.5);
    let phases: Vec<f32> = (0..shape.channels)
        .map(|_| rng.random_range(0.0..TAU))
        .collect();
    let mut out = Vec::with_capacity(shape.size());
    for y in 0..shape.height {
        for x in 0..shape.width {
            let t =
                TAU * (kx * x as f32 / shape.width as f32 + ky * y as f32 / shape.height as f32);
            for &phase in &phases {
                out.push(128.0 + 50.0 * (t + phase).sin() + rng.random_range(-40.0..40.0));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_shaped_and_balanced() {
        let shape = ImageShape::new(6, 5, 3);
        let a = synthetic(4, 7, 3, shape, 11);
        assert_eq!(a, synthetic(4, 7, 3, shape, 11));
        assert_ne!(a.train.images, synthetic(4, 7, 3, shape, 12).train.images);
        assert_eq!((a.train.len(), a.test.len()), (28, 12));
        assert_eq!(a.train.images.len(), 28 * shape.size());
        assert_eq!(a.train.shape, shape);
        assert_eq!(a.test.classes, ["class_0", "class_1", "class_2", "class_3"]);
        assert_eq!(&a.train.labels[..5], &[0, 1, 2, 3, 0]);
        assert!(synthetic(0, 3, 3, shape, 0).train.is_empty());
    }

    #[test]
    fn nearest_centroid_learns_it() {
        let classes = 10;
        let split = synthetic(classes, 20, 10, ImageShape::new(8, 8, 1), 3);
        let size = split.train.shape.size();
        let mut centroids = vec![vec![0f64; size]; classes];
        for i in 0..split.train.len() {
            let c = usize::from(split.train.labels[i]);
            for (m, &v) in centroids[c].iter_mut().zip(split.train.image(i)) {
                *m += f64::from(v) / 20.0;
            }
        }
        let correct = (0..split.test.len())
            .filter(|&i| {
                let dist = |c: &Vec<f64>| -> f64 {
                    c.iter()
                        .zip(split.test.image(i))
                        .map(|(m, &v)| (m - f64::from(v)).powi(2))
                        .sum()
                };
                let best = (0..classes)
                    .min_by(|&a, &b| dist(&centroids[a]).total_cmp(&dist(&centroids[b])))
                    .expect("there are classes");
                best == usize::from(split.test.labels[i])
            })
            .count();
        assert!(
            correct * 10 >= split.test.len() * 9,
            "only {correct}/{} correct",
            split.test.len()
        );
    }
}
