use std::path::{Path, PathBuf};

use crate::{DatasetError, ImageSet, ImageShape, Split};

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Loads an ImageFolder directory: each subdirectory is a class (sorted by name, hidden
/// ones skipped), holding `.jpg`, `.jpeg` or `.png` files (case-insensitive; other files
/// are ignored), taken in name order. Greyscale images load with 1 channel, colour images
/// with 3 (alpha is dropped). All images must share the first image's shape.
///
/// Decoding runs on every available core; the result does not depend on the core count.
pub fn load_image_folder(dir: &Path) -> Result<ImageSet, DatasetError> {
    if !dir.is_dir() {
        return Err(DatasetError::Missing {
            path: dir.to_path_buf(),
        });
    }
    let classes = sorted_entries(dir, |p| p.is_dir())?;
    if classes.is_empty() {
        return Err(DatasetError::NoClassDirectories {
            path: dir.to_path_buf(),
        });
    }
    let max = usize::from(u16::MAX) + 1;
    if classes.len() > max {
        return Err(DatasetError::TooManyClasses {
            path: dir.to_path_buf(),
            count: classes.len(),
            max,
        });
    }
    let mut files = Vec::new();
    let mut labels = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let class_files =
            sorted_entries(&dir.join(class), |p| p.is_file() && has_image_extension(p))?;
        let label = u16::try_from(label).expect("class count was checked against u16");
        labels.extend(std::iter::repeat_n(label, class_files.len()));
        files.extend(class_files.into_iter().map(|f| dir.join(class).join(f)));
    }
    let Some(first) = files.first() else {
        return Err(DatasetError::NoImages {
            path: dir.to_path_buf(),
        });
    };
    let shape = decode_image(first)?.0;
    let images = decode_all(&files, shape)?;
    Ok(ImageSet {
        images,
        labels,
        shape,
        classes,
    })
}

/// Loads `root/train` and `root/test` as ImageFolders; both must list the same classes and
/// hold images of the same shape.
pub fn load_image_folder_split(root: &Path) -> Result<Split, DatasetError> {
    if !root.is_dir() {
        return Err(DatasetError::Missing {
            path: root.to_path_buf(),
        });
    }
    let (train_dir, test_dir) = (root.join("train"), root.join("test"));
    let train = load_image_folder(&train_dir)?;
    let test = load_image_folder(&test_dir)?;
    if train.classes != test.classes {
        return Err(DatasetError::ClassMismatch {
            train: train_dir,
            test: test_dir,
            train_classes: train.classes,
            test_classes: test.classes,
        });
    }
    if train.shape != test.shape {
        return Err(DatasetError::DimensionMismatch {
            path: test_dir,
            expected: train.shape,
            found: test.shape,
        });
    }
    Ok(Split { train, test })
}

/// Names of the non-hidden entries of `dir` accepted by `keep`, sorted.
fn sorted_entries(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<String>, DatasetError> {
    let io = |e| DatasetError::io(dir, e);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && keep(&entry.path()) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Decodes one file (format sniffed from its content) to 1-channel grey or 3-channel RGB,
/// HWC: what every loader and the agent's `predict` feed the common expert.
pub fn decode_image(path: &Path) -> Result<(ImageShape, Vec<u8>), DatasetError> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    let image = image::load_from_memory(&bytes).map_err(|e| DatasetError::Decode {
        path: path.to_path_buf(),
        source: Box::new(e),
    })?;
    let (height, width) = (image.height() as usize, image.width() as usize);
    Ok(if image.color().has_color() {
        (
            ImageShape::new(height, width, 3),
            image.into_rgb8().into_raw(),
        )
    } else {
        (
            ImageShape::new(height, width, 1),
            image.into_luma8().into_raw(),
        )
    })
}

/// Decodes `files` into one buffer, splitting them into one contiguous run per core. Each
/// thread stops at its first error; runs are in file order, so the first error of the first
/// failing run is the first bad file overall, whatever the core count.
fn decode_all(files: &[PathBuf], shape: ImageShape) -> Result<Vec<u8>, DatasetError> {
    let len = shape.size();
    let mut images = vec![0; files.len() * len];
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(files.len())
        .max(1);
    let per_thread = files.len().div_ceil(threads);
    let results: Vec<Result<(), DatasetError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(per_thread)
            .zip(images.chunks_mut(per_thread * len))
            .map(|(run, out)| scope.spawn(move || decode_run(run, out, shape)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    results.into_iter().collect::<Result<(), _>>()?;
    Ok(images)
}

fn decode_run(files: &[PathBuf], out: &mut [u8], expected: ImageShape) -> Result<(), DatasetError> {
    for (path, dst) in files.iter().zip(out.chunks_exact_mut(expected.size())) {
        let (found, pixels) = decode_image(path)?;
        if found != expected {
            return Err(DatasetError::DimensionMismatch {
                path: path.clone(),
                expected,
                found,
            });
        }
        dst.copy_from_slice(&pixels);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{CIFAR_JPEG, small_cifar_folder, temp_dir};
    use std::time::Instant;

    #[test]
    fn small_folder_loads_sorted_classes_and_exact_pixels() {
        let root = small_cifar_folder(2);
        let set = load_image_folder(&root.path().join("train")).expect("fixture loads");
        let names = [
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
        assert_eq!(set.classes, names);
        assert_eq!(set.shape, ImageShape::new(32, 32, 3));
        assert_eq!(set.len(), 20);
        assert_eq!(set.images.len(), 20 * 32 * 32 * 3);
        let expected_labels: Vec<u16> = (0..10).flat_map(|c| [c, c]).collect();
        assert_eq!(set.labels, expected_labels);
        // Image 3 is the second file of class 1.
        let path = root.path().join("train/automobile/0001.jpg");
        let direct = image::open(&path)
            .expect("fixture decodes")
            .into_rgb8()
            .into_raw();
        assert_eq!(set.image(3), direct.as_slice());

        let split = load_image_folder_split(root.path()).expect("fixture split loads");
        assert_eq!(split.train, set);
        assert_eq!(split.test.len(), 20);
    }

    #[test]
    fn wrong_size_image_names_the_file_and_dims() {
        let root = small_cifar_folder(2);
        let bad = root.path().join("train/cat/0000b.png");
        image::RgbImage::new(16, 20)
            .save(&bad)
            .expect("temp dir is writable");
        // Also a later bad file: only the first must be reported.
        image::RgbImage::new(8, 8)
            .save(root.path().join("train/truck/9999.png"))
            .expect("temp dir is writable");
        let err =
            load_image_folder(&root.path().join("train")).expect_err("wrong size is rejected");
        match &err {
            DatasetError::DimensionMismatch {
                path,
                expected,
                found,
            } => {
                assert_eq!(path, &bad);
                assert_eq!(*expected, ImageShape::new(32, 32, 3));
                assert_eq!(*found, ImageShape::new(20, 16, 3));
            }
            other => panic!("expected DimensionMismatch, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("0000b.png") && msg.contains("20x16x3") && msg.contains("32x32x3"),
            "{msg}"
        );
    }

    #[test]
    fn greyscale_png_folder_loads_one_channel() {
        let root = temp_dir();
        for (class, value) in [("b", 200u8), ("a", 7)] {
            std::fs::create_dir(root.path().join(class)).expect("temp dir is writable");
            image::GrayImage::from_pixel(5, 4, image::Luma([value]))
                .save(root.path().join(class).join("x.PNG"))
                .expect("temp dir is writable");
        }
        std::fs::write(root.path().join("a/notes.txt"), "ignored").expect("temp dir is writable");
        std::fs::create_dir(root.path().join(".hidden")).expect("temp dir is writable");
        let set = load_image_folder(root.path()).expect("grey folder loads");
        assert_eq!(set.classes, ["a", "b"]);
        assert_eq!(set.shape, ImageShape::new(4, 5, 1));
        assert_eq!(set.labels, [0, 1]);
        assert!(set.image(0).iter().all(|&v| v == 7));
        assert!(set.image(1).iter().all(|&v| v == 200));
    }

    #[test]
    fn structural_errors() {
        let root = temp_dir();
        let missing = root.path().join("nope");
        assert!(
            matches!(load_image_folder(&missing), Err(DatasetError::Missing { path }) if path == missing)
        );
        assert!(
            matches!(load_image_folder_split(&missing), Err(DatasetError::Missing { path }) if path == missing)
        );
        assert!(matches!(
            load_image_folder(root.path()),
            Err(DatasetError::NoClassDirectories { .. })
        ));
        std::fs::create_dir(root.path().join("cls")).expect("temp dir is writable");
        assert!(matches!(
            load_image_folder(root.path()),
            Err(DatasetError::NoImages { .. })
        ));
        let junk = root.path().join("cls/junk.jpg");
        std::fs::write(&junk, b"not a jpeg").expect("temp dir is writable");
        match load_image_folder(root.path()) {
            Err(DatasetError::Decode { path, .. }) => assert_eq!(path, junk),
            other => panic!("expected Decode, got {other:?}"),
        }
    }

    #[test]
    fn split_requires_same_classes() {
        let root = small_cifar_folder(1);
        std::fs::remove_dir_all(root.path().join("test/frog")).expect("fixture has frog");
        match load_image_folder_split(root.path()) {
            Err(DatasetError::ClassMismatch {
                train_classes,
                test_classes,
                ..
            }) => {
                assert_eq!(train_classes.len(), 10);
                assert_eq!(test_classes.len(), 9);
            }
            other => panic!("expected ClassMismatch, got {other:?}"),
        }
    }

    #[test]
    fn real_cifar10_image_folder_loads() {
        let root = Path::new(CIFAR_JPEG);
        assert!(
            root.is_dir(),
            "{} not present: run scripts/setup.sh first",
            root.display()
        );
        let start = Instant::now();
        let split = crate::load_split(root).expect("real CIFAR-10 ImageFolder loads");
        eprintln!(
            "CIFAR-10 ImageFolder (50k + 10k JPEG): {:.2?}",
            start.elapsed()
        );
        for (set, per_class) in [(&split.train, 5000), (&split.test, 1000)] {
            assert_eq!(set.len(), 10 * per_class);
            assert_eq!(set.shape, ImageShape::new(32, 32, 3));
            assert_eq!(set.images.len(), set.len() * 3072);
            assert_eq!(set.num_classes(), 10);
            let all: Vec<usize> = (0..set.len()).collect();
            assert_eq!(
                crate::label_histogram(&set.labels, &all, 10),
                vec![per_class; 10]
            );
        }
    }
}
