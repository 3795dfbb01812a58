//! Fixtures shared by the unit tests.

use std::path::Path;

use tempfile::TempDir;

/// The CIFAR-10 ImageFolder copy in the workspace (absent on some machines).
pub(crate) const CIFAR_JPEG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/cifar10-jpeg");
/// The system's Fashion-MNIST IDX files (absent on some machines).
pub(crate) const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

const CIFAR_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

pub(crate) fn temp_dir() -> TempDir {
    tempfile::tempdir().expect("a temp dir can be created")
}

/// A CIFAR-10-shaped ImageFolder with `per_class` JPEGs per class in `train/` and `test/`,
/// copied from the real dataset when present, otherwise generated.
pub(crate) fn small_cifar_folder(per_class: usize) -> TempDir {
    let root = temp_dir();
    for split in ["train", "test"] {
        for (c, class) in CIFAR_CLASSES.iter().enumerate() {
            let dst = root.path().join(split).join(class);
            std::fs::create_dir_all(&dst).expect("temp dir is writable");
            for i in 0..per_class {
                let name = format!("{i:04}.jpg");
                let src = Path::new(CIFAR_JPEG).join(split).join(class).join(&name);
                if src.is_file() {
                    std::fs::copy(&src, dst.join(&name)).expect("real JPEG can be copied");
                } else {
                    let image = image::RgbImage::from_fn(32, 32, |x, y| {
                        image::Rgb([(x * 8) as u8, (y * 8) as u8, (c * 25 + i) as u8])
                    });
                    image.save(dst.join(&name)).expect("temp dir is writable");
                }
            }
        }
    }
    root
}
