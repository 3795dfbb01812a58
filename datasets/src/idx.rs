use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::{DatasetError, ImageSet, ImageShape, Split};

/// IDX magic: two zero bytes, element type 0x08 (unsigned byte), then the rank.
const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// File-name stems of the four Fashion-MNIST IDX files, as (images, labels) per split.
pub(crate) const TRAIN_STEMS: (&str, &str) = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte");
const TEST_STEMS: (&str, &str) = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte");

/// Loads Fashion-MNIST from `dir`, which holds `train-images-idx3-ubyte`,
/// `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each
/// either plain or gzip-compressed with a `.gz` suffix (compression is detected from the
/// content). Images are 28×28×1; labels must be below 10.
pub fn load_fashion_mnist(dir: &Path) -> Result<Split, DatasetError> {
    if !dir.is_dir() {
        return Err(DatasetError::Missing {
            path: dir.to_path_buf(),
        });
    }
    Ok(Split {
        train: load_pair(dir, TRAIN_STEMS)?,
        test: load_pair(dir, TEST_STEMS)?,
    })
}

fn load_pair(
    dir: &Path,
    (images_stem, labels_stem): (&str, &str),
) -> Result<ImageSet, DatasetError> {
    let images_path = find_idx(dir, images_stem)?;
    let labels_path = find_idx(dir, labels_stem)?;
    let (dims, images) = read_idx(&images_path, IMAGES_MAGIC, 3)?;
    let (label_dims, raw_labels) = read_idx(&labels_path, LABELS_MAGIC, 1)?;
    if dims[0] != label_dims[0] {
        return Err(DatasetError::CountMismatch {
            images_path,
            images: dims[0],
            labels_path,
            labels: label_dims[0],
        });
    }
    let classes = FASHION_CLASSES.len();
    if let Some(&label) = raw_labels.iter().find(|&&l| usize::from(l) >= classes) {
        return Err(DatasetError::LabelOutOfRange {
            path: labels_path,
            label: label.into(),
            classes,
        });
    }
    Ok(ImageSet {
        images,
        labels: raw_labels.into_iter().map(u16::from).collect(),
        shape: ImageShape::new(dims[1], dims[2], 1),
        classes: FASHION_CLASSES.iter().map(|&c| c.to_owned()).collect(),
    })
}

/// `dir/stem` if present, else `dir/stem.gz`.
pub(crate) fn find_idx(dir: &Path, stem: &str) -> Result<PathBuf, DatasetError> {
    let plain = dir.join(stem);
    if plain.is_file() {
        return Ok(plain);
    }
    let gz = dir.join(format!("{stem}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    Err(DatasetError::Missing {
        path: dir.join(format!("{stem}[.gz]")),
    })
}

/// Reads an unsigned-byte IDX file of the given rank: returns its dimensions and payload.
/// Sizes are checked against the header before the payload buffer is allocated (plain
/// files) or while it is filled, never past one byte beyond the header's size (gzip).
fn read_idx(path: &Path, magic: u32, rank: usize) -> Result<(Vec<usize>, Vec<u8>), DatasetError> {
    let io = |e| DatasetError::io(path, e);
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut buffered = BufReader::new(file);
    let gzip = buffered.fill_buf().map_err(io)?.starts_with(&GZIP_MAGIC);
    let mut reader: Box<dyn Read> = if gzip {
        Box::new(MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };

    let header_len = 4 + 4 * rank;
    let mut header = Vec::with_capacity(header_len);
    read_limited(
        &mut reader,
        header_len as u64,
        &mut header,
        path,
        header_len as u64,
        0,
    )?;
    if header.len() < header_len {
        let actual = header.len() as u64;
        return Err(DatasetError::Truncated {
            path: path.to_path_buf(),
            expected: header_len as u64,
            actual,
        });
    }
    let word = |i: usize| {
        u32::from_be_bytes(
            header[4 * i..4 * i + 4]
                .try_into()
                .expect("header holds 1 + rank words"),
        )
    };
    let found = word(0);
    if found != magic {
        return Err(DatasetError::BadMagic {
            path: path.to_path_buf(),
            expected: magic,
            found,
        });
    }
    let dims: Vec<usize> = (1..=rank).map(|i| word(i) as usize).collect();
    // Saturates: a header whose product overflows cannot describe a real file.
    let payload = dims
        .iter()
        .fold(1u64, |acc, &d| acc.saturating_mul(d as u64));
    let expected = payload.saturating_add(header_len as u64);

    let mut data = if gzip {
        // The decompressed size is only known by decompressing: grow with the data instead
        // of trusting the header with one large allocation.
        Vec::new()
    } else {
        check_size(path, expected, file_len)?;
        Vec::with_capacity(usize::try_from(payload).expect("payload fits the file, hence memory"))
    };
    // One byte past the payload is requested so that trailing data is noticed.
    read_limited(
        &mut reader,
        payload.saturating_add(1),
        &mut data,
        path,
        expected,
        header_len as u64,
    )?;
    check_size(path, expected, header_len as u64 + data.len() as u64)?;
    Ok((dims, data))
}

fn check_size(path: &Path, expected: u64, actual: u64) -> Result<(), DatasetError> {
    let path = path.to_path_buf();
    match actual.cmp(&expected) {
        std::cmp::Ordering::Less => Err(DatasetError::Truncated {
            path,
            expected,
            actual,
        }),
        std::cmp::Ordering::Greater => Err(DatasetError::TrailingData {
            path,
            expected,
            actual,
        }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// Appends at most `limit` bytes to `buf`. A gzip stream that ends early surfaces as
/// `UnexpectedEof`; that is reported as truncation, counting the `before` bytes already
/// consumed plus those decoded here.
fn read_limited(
    reader: &mut dyn Read,
    limit: u64,
    buf: &mut Vec<u8>,
    path: &Path,
    expected: u64,
    before: u64,
) -> Result<(), DatasetError> {
    match reader.take(limit).read_to_end(buf) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(DatasetError::Truncated {
            path: path.to_path_buf(),
            expected,
            actual: before + buf.len() as u64,
        }),
        Err(e) => Err(DatasetError::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Instant;

    use flate2::{Compression, write::GzEncoder};

    use super::*;
    use crate::load_split;
    use crate::test_util::{FASHION_MNIST, temp_dir};

    fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = magic.to_be_bytes().to_vec();
        for d in dims {
            out.extend(d.to_be_bytes());
        }
        out.extend(data);
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(bytes).expect("writing to a Vec succeeds");
        enc.finish().expect("writing to a Vec succeeds")
    }

    /// A tiny Fashion-MNIST-format directory: `n` 3×2 images per split, labels `i % 10`;
    /// the train files are gzipped when `gz`, test files always plain.
    fn write_tiny(dir: &Path, n: u32, gz: bool) {
        for (prefix, compress) in [("train", gz), ("t10k", false)] {
            let pixels: Vec<u8> = (0..n * 6).map(|v| v as u8).collect();
            let labels: Vec<u8> = (0..n).map(|v| (v % 10) as u8).collect();
            for (kind, bytes) in [
                ("images-idx3", idx_bytes(IMAGES_MAGIC, &[n, 3, 2], &pixels)),
                ("labels-idx1", idx_bytes(LABELS_MAGIC, &[n], &labels)),
            ] {
                let (name, bytes) = if compress {
                    (format!("{prefix}-{kind}-ubyte.gz"), gzip(&bytes))
                } else {
                    (format!("{prefix}-{kind}-ubyte"), bytes)
                };
                std::fs::write(dir.join(name), bytes).expect("temp dir is writable");
            }
        }
    }

    #[test]
    fn plain_and_gzip_load_identically() {
        let (plain, gz) = (temp_dir(), temp_dir());
        write_tiny(plain.path(), 12, false);
        write_tiny(gz.path(), 12, true);
        let a = load_fashion_mnist(plain.path()).expect("plain IDX loads");
        assert_eq!(a, load_fashion_mnist(gz.path()).expect("gzip IDX loads"));
        assert_eq!(a, load_split(gz.path()).expect("detected as IDX"));
        assert_eq!(a.train.shape, ImageShape::new(3, 2, 1));
        assert_eq!(a.train.len(), 12);
        assert_eq!(a.train.image(1), &[6, 7, 8, 9, 10, 11]);
        assert_eq!(a.train.labels[11], 1);
        assert_eq!(a.test.num_classes(), 10);
    }

    #[test]
    fn bad_magic_names_the_file() {
        let dir = temp_dir();
        write_tiny(dir.path(), 4, true);
        let victim = dir.path().join("t10k-labels-idx1-ubyte");
        std::fs::write(&victim, idx_bytes(IMAGES_MAGIC, &[4], &[0; 4]))
            .expect("temp dir is writable");
        let err = load_fashion_mnist(dir.path()).expect_err("bad magic is rejected");
        match &err {
            DatasetError::BadMagic {
                path,
                expected: LABELS_MAGIC,
                found: IMAGES_MAGIC,
            } => assert_eq!(path, &victim),
            other => panic!("expected BadMagic, got {other:?}"),
        }
        assert!(err.to_string().contains("t10k-labels-idx1-ubyte"), "{err}");
    }

    #[test]
    fn truncated_plain_and_gzip_name_the_file() {
        let full = idx_bytes(IMAGES_MAGIC, &[4, 3, 2], &[1; 24]);
        // (file name, content, expected bytes, actual bytes)
        let cases = [
            ("train-images-idx3-ubyte", full[..30].to_vec(), 40, 30),
            ("train-images-idx3-ubyte", full[..10].to_vec(), 16, 10),
            ("train-images-idx3-ubyte.gz", gzip(&full[..30]), 40, 30),
            ("train-images-idx3-ubyte.gz", gzip(&full[..10]), 16, 10),
        ];
        for (name, bytes, expected_len, actual_len) in cases {
            let dir = temp_dir();
            write_tiny(dir.path(), 4, false);
            std::fs::remove_file(dir.path().join("train-images-idx3-ubyte"))
                .expect("fixture exists");
            let victim = dir.path().join(name);
            std::fs::write(&victim, &bytes).expect("temp dir is writable");
            let err = load_fashion_mnist(dir.path()).expect_err("truncation is detected");
            match &err {
                DatasetError::Truncated {
                    path,
                    expected,
                    actual,
                } => {
                    assert_eq!(path, &victim);
                    assert_eq!((*expected, *actual), (expected_len, actual_len), "{name}");
                }
                other => panic!("{name}: expected Truncated, got {other:?}"),
            }
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn cut_gzip_stream_is_truncated() {
        let dir = temp_dir();
        let n = 5000u32;
        let pixels: Vec<u8> = (0..n * 6).map(|v| v as u8).collect();
        let images = idx_bytes(IMAGES_MAGIC, &[n, 3, 2], &pixels);
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), images)
            .expect("temp dir is writable");
        // Scrambled labels so that the compressed stream is long enough to cut mid-way.
        let labels: Vec<u8> = (0..n)
            .map(|v| (v.wrapping_mul(2_654_435_761) >> 28) as u8 % 10)
            .collect();
        let labels = gzip(&idx_bytes(LABELS_MAGIC, &[n], &labels));
        let victim = dir.path().join("train-labels-idx1-ubyte.gz");
        std::fs::write(&victim, &labels[..labels.len() / 2]).expect("temp dir is writable");
        match load_fashion_mnist(dir.path()) {
            Err(DatasetError::Truncated {
                path,
                expected,
                actual,
            }) => {
                assert_eq!(path, victim);
                assert_eq!(expected, 8 + u64::from(n));
                assert!(actual < expected, "{actual}");
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[test]
    fn trailing_bytes_count_mismatch_and_bad_label() {
        let dir = temp_dir();
        write_tiny(dir.path(), 4, false);
        let images = dir.path().join("t10k-images-idx3-ubyte");
        std::fs::write(&images, idx_bytes(IMAGES_MAGIC, &[4, 3, 2], &[0; 25]))
            .expect("temp dir is writable");
        assert!(matches!(
            load_fashion_mnist(dir.path()),
            Err(DatasetError::TrailingData { path, expected: 40, actual: 41 }) if path == images
        ));
        std::fs::write(&images, idx_bytes(IMAGES_MAGIC, &[5, 3, 2], &[0; 30]))
            .expect("temp dir is writable");
        match load_fashion_mnist(dir.path()) {
            Err(DatasetError::CountMismatch {
                images_path,
                images: 5,
                labels_path,
                labels: 4,
            }) => {
                assert_eq!(images_path, images);
                assert_eq!(labels_path, dir.path().join("t10k-labels-idx1-ubyte"));
            }
            other => panic!("expected CountMismatch, got {other:?}"),
        }
        write_tiny(dir.path(), 4, false);
        let labels = dir.path().join("train-labels-idx1-ubyte");
        std::fs::write(&labels, idx_bytes(LABELS_MAGIC, &[4], &[0, 1, 10, 2]))
            .expect("temp dir is writable");
        assert!(matches!(
            load_fashion_mnist(dir.path()),
            Err(DatasetError::LabelOutOfRange { path, label: 10, classes: 10 }) if path == labels
        ));
    }

    #[test]
    fn missing_directory_and_file() {
        let dir = temp_dir();
        let absent = dir.path().join("absent");
        assert!(
            matches!(load_fashion_mnist(&absent), Err(DatasetError::Missing { path }) if path == absent)
        );
        write_tiny(dir.path(), 2, false);
        std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte")).expect("fixture exists");
        let err = load_fashion_mnist(dir.path()).expect_err("missing label file is reported");
        assert!(
            err.to_string().contains("t10k-labels-idx1-ubyte[.gz]"),
            "{err}"
        );
    }

    #[test]
    fn real_fashion_mnist_loads() {
        let dir = Path::new(FASHION_MNIST);
        assert!(
            dir.is_dir(),
            "{} not present: run scripts/setup.sh first",
            dir.display()
        );
        let start = Instant::now();
        let split = load_split(dir).expect("real Fashion-MNIST loads");
        eprintln!("Fashion-MNIST (60k + 10k, gzip): {:.2?}", start.elapsed());
        assert_eq!((split.train.len(), split.test.len()), (60_000, 10_000));
        assert_eq!(split.train.shape, ImageShape::new(28, 28, 1));
        assert_eq!(split.train.images.len(), 60_000 * 784);
        assert!(
            split
                .train
                .labels
                .iter()
                .chain(&split.test.labels)
                .all(|&l| l < 10)
        );
        let all: Vec<usize> = (0..60_000).collect();
        assert_eq!(
            crate::label_histogram(&split.train.labels, &all, 10),
            vec![6000; 10]
        );
    }
}
