use std::path::{Path, PathBuf};

use crate::{DatasetError, ImageSet, ImageShape, Split};

const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;
/// One label byte, then the R, G and B planes, each 32×32 row-major.
const RECORD: usize = 1 + 3 * PLANE;
pub(crate) const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
const TEST_FILE: &str = "test_batch.bin";
const META_FILE: &str = "batches.meta.txt";
/// The directory the official tarball extracts to.
const TARBALL_DIR: &str = "cifar-10-batches-bin";
const DEFAULT_CLASSES: [&str; 10] = [
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

/// Loads the CIFAR-10 binary batches from `dir` (or from `dir/cifar-10-batches-bin`, the
/// tarball's layout): `data_batch_1.bin` .. `data_batch_5.bin` for training and
/// `test_batch.bin` for testing, each a sequence of 3073-byte records. Class names come from
/// `batches.meta.txt` (one per line) when present, else the standard CIFAR-10 names. Any
/// whole number of records per batch is accepted, which keeps test fixtures small.
pub fn load_cifar10_binary(dir: &Path) -> Result<Split, DatasetError> {
    if !dir.is_dir() {
        return Err(DatasetError::Missing {
            path: dir.to_path_buf(),
        });
    }
    let dir = batches_dir(dir).unwrap_or_else(|| dir.to_path_buf());
    let classes = read_classes(&dir)?;
    let train_paths: Vec<PathBuf> = TRAIN_FILES.iter().map(|f| dir.join(f)).collect();
    Ok(Split {
        train: read_batches(&train_paths, &classes)?,
        test: read_batches(&[dir.join(TEST_FILE)], &classes)?,
    })
}

/// The directory holding `data_batch_1.bin`: `dir` itself or the tarball's subdirectory.
pub(crate) fn batches_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join(TARBALL_DIR)]
        .into_iter()
        .find(|d| d.join(TRAIN_FILES[0]).is_file())
}

fn read_classes(dir: &Path) -> Result<Vec<String>, DatasetError> {
    let path = dir.join(META_FILE);
    if !path.is_file() {
        return Ok(DEFAULT_CLASSES.iter().map(|&c| c.to_owned()).collect());
    }
    // An empty metadata file is treated like a missing one.
    let text = std::fs::read_to_string(&path).map_err(|e| DatasetError::io(&path, e))?;
    let classes: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if classes.is_empty() {
        return Ok(DEFAULT_CLASSES.iter().map(|&c| c.to_owned()).collect());
    }
    // The label is one byte, so more names could never be addressed.
    let max = usize::from(u8::MAX) + 1;
    if classes.len() > max {
        return Err(DatasetError::TooManyClasses {
            path,
            count: classes.len(),
            max,
        });
    }
    Ok(classes)
}

fn read_batches(paths: &[PathBuf], classes: &[String]) -> Result<ImageSet, DatasetError> {
    // Validate every size before allocating the whole set.
    let mut records = 0;
    for path in paths {
        let len = std::fs::metadata(path)
            .map_err(|e| DatasetError::io(path, e))?
            .len();
        records += whole_records(path, len)?;
    }
    let mut images = Vec::with_capacity(records * 3 * PLANE);
    let mut labels = Vec::with_capacity(records);
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
        whole_records(path, bytes.len() as u64)?;
        for record in bytes.chunks_exact(RECORD) {
            let label = record[0];
            if usize::from(label) >= classes.len() {
                return Err(DatasetError::LabelOutOfRange {
                    path: path.clone(),
                    label: label.into(),
                    classes: classes.len(),
                });
            }
            labels.push(u16::from(label));
            let (r, rest) = record[1..].split_at(PLANE);
            let (g, b) = rest.split_at(PLANE);
            // Planar CHW on disk, interleaved HWC in memory.
            for i in 0..PLANE {
                images.extend_from_slice(&[r[i], g[i], b[i]]);
            }
        }
    }
    Ok(ImageSet {
        images,
        labels,
        shape: ImageShape::new(SIDE, SIDE, 3),
        classes: classes.to_vec(),
    })
}

/// Number of records in a batch file of `len` bytes; an empty or partial file is truncated.
fn whole_records(path: &Path, len: u64) -> Result<usize, DatasetError> {
    let record = RECORD as u64;
    if len == 0 || !len.is_multiple_of(record) {
        let expected = len.div_ceil(record).max(1) * record;
        return Err(DatasetError::Truncated {
            path: path.to_path_buf(),
            expected,
            actual: len,
        });
    }
    Ok(usize::try_from(len / record).expect("a file's record count fits in usize"))
}

/// Writes `set` (32×32×3) as one CIFAR binary batch; the inverse of `read_batches`.
#[cfg(test)]
pub(crate) fn write_batch(path: &Path, set: &ImageSet, indices: &[usize]) {
    assert_eq!(
        set.shape,
        ImageShape::new(SIDE, SIDE, 3),
        "CIFAR batches hold 32x32 RGB"
    );
    let mut out = Vec::with_capacity(indices.len() * RECORD);
    for &i in indices {
        out.push(u8::try_from(set.labels[i]).expect("CIFAR labels fit in a byte"));
        let image = set.image(i);
        for c in 0..3 {
            out.extend(image.chunks_exact(3).map(|px| px[c]));
        }
    }
    std::fs::write(path, out).expect("temp dir is writable");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{small_cifar_folder, temp_dir};
    use crate::{load_image_folder, load_split};

    /// Writes `folder` (train and test ImageSets) as a CIFAR binary directory, spreading the
    /// training images over the five batches.
    fn write_cifar_dir(dir: &Path, split: &Split) {
        let n = split.train.len();
        for (b, file) in TRAIN_FILES.iter().enumerate() {
            let indices: Vec<usize> = (0..n).filter(|i| i % TRAIN_FILES.len() == b).collect();
            write_batch(&dir.join(file), &split.train, &indices);
        }
        let all: Vec<usize> = (0..split.test.len()).collect();
        write_batch(&dir.join(TEST_FILE), &split.test, &all);
        std::fs::write(dir.join(META_FILE), split.train.classes.join("\n") + "\n\n")
            .expect("temp dir is writable");
    }

    #[test]
    fn binary_round_trip_matches_image_folder_pixels() {
        let folder = small_cifar_folder(3);
        let train = load_image_folder(&folder.path().join("train")).expect("fixture loads");
        let test = load_image_folder(&folder.path().join("test")).expect("fixture loads");
        let split = Split { train, test };
        let bin = temp_dir();
        write_cifar_dir(bin.path(), &split);

        let loaded = load_cifar10_binary(bin.path()).expect("round trip loads");
        assert_eq!(loaded.test, split.test);
        assert_eq!(loaded.train.classes, split.train.classes);
        // Batches interleave the training images: batch b holds images b, b+5, ...
        let n = split.train.len();
        let order: Vec<usize> = (0..TRAIN_FILES.len())
            .flat_map(|b| (0..n).filter(move |i| i % TRAIN_FILES.len() == b))
            .collect();
        assert_eq!(loaded.train, split.train.subset(&order));
        assert_eq!(
            load_split(bin.path()).expect("detected as CIFAR binary"),
            loaded
        );
    }

    #[test]
    fn tarball_subdirectory_and_default_classes() {
        let folder = small_cifar_folder(1);
        let test = load_image_folder(&folder.path().join("test")).expect("fixture loads");
        let split = Split {
            train: test.clone(),
            test,
        };
        let root = temp_dir();
        let dir = root.path().join(TARBALL_DIR);
        std::fs::create_dir(&dir).expect("temp dir is writable");
        write_cifar_dir(&dir, &split);
        std::fs::remove_file(dir.join(META_FILE)).expect("meta file was written");
        let loaded = load_split(root.path()).expect("nested layout is detected");
        assert_eq!(loaded.test.classes, DEFAULT_CLASSES);
        assert_eq!(loaded.test.images, split.test.images);
    }

    #[test]
    fn partial_record_is_truncated_error_naming_the_file() {
        let folder = small_cifar_folder(1);
        let test = load_image_folder(&folder.path().join("test")).expect("fixture loads");
        let split = Split {
            train: test.clone(),
            test,
        };
        let dir = temp_dir();
        write_cifar_dir(dir.path(), &split);
        let victim = dir.path().join(TRAIN_FILES[2]);
        let bytes = std::fs::read(&victim).expect("batch was written");
        std::fs::write(&victim, &bytes[..bytes.len() - 5]).expect("temp dir is writable");
        match load_cifar10_binary(dir.path()) {
            Err(DatasetError::Truncated {
                path,
                expected,
                actual,
            }) => {
                assert_eq!(path, victim);
                assert_eq!(expected, bytes.len() as u64);
                assert_eq!(actual, bytes.len() as u64 - 5);
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[test]
    fn missing_batch_and_bad_label_are_reported() {
        let folder = small_cifar_folder(1);
        let test = load_image_folder(&folder.path().join("test")).expect("fixture loads");
        let split = Split {
            train: test.clone(),
            test,
        };
        let dir = temp_dir();
        write_cifar_dir(dir.path(), &split);

        let victim = dir.path().join(TEST_FILE);
        let mut bytes = std::fs::read(&victim).expect("batch was written");
        bytes[RECORD] = 10;
        std::fs::write(&victim, &bytes).expect("temp dir is writable");
        match load_cifar10_binary(dir.path()) {
            Err(DatasetError::LabelOutOfRange {
                path,
                label: 10,
                classes: 10,
            }) => assert_eq!(path, victim),
            other => panic!("expected LabelOutOfRange, got {other:?}"),
        }

        let gone = dir.path().join(TRAIN_FILES[4]);
        std::fs::remove_file(&gone).expect("batch was written");
        match load_cifar10_binary(dir.path()) {
            Err(DatasetError::Missing { path }) => assert_eq!(path, gone),
            other => panic!("expected Missing, got {other:?}"),
        }
    }
}
