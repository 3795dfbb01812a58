use std::path::PathBuf;

use crate::ImageShape;

/// Why a dataset could not be loaded. Every variant names the file or directory at fault.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file or directory the format requires does not exist.
    #[error("missing {}", path.display())]
    Missing {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// Reading a file or listing a directory failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file or directory being read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An IDX file starts with the wrong magic number (wrong file, element type or rank).
    #[error("{}: bad IDX magic number: expected {expected:#010x}, found {found:#010x}", path.display())]
    BadMagic {
        /// The IDX file.
        path: PathBuf,
        /// The magic number this file should carry.
        expected: u32,
        /// The magic number it carries.
        found: u32,
    },
    /// A file holds fewer bytes than its header (or record size) requires.
    #[error("{}: truncated: expected {expected} bytes, found {actual}", path.display())]
    Truncated {
        /// The short file.
        path: PathBuf,
        /// Bytes the header or record layout requires (decompressed, for gzip files).
        expected: u64,
        /// Bytes actually present.
        actual: u64,
    },
    /// A file holds more bytes than its header says, so the header cannot be trusted.
    #[error("{}: trailing data: expected {expected} bytes, found at least {actual}", path.display())]
    TrailingData {
        /// The over-long file.
        path: PathBuf,
        /// Bytes the header requires (decompressed, for gzip files).
        expected: u64,
        /// Bytes present (reading stops one byte past `expected`).
        actual: u64,
    },
    /// An image file and its label file disagree on the number of samples.
    #[error(
        "{} holds {images} images but {} holds {labels} labels",
        images_path.display(),
        labels_path.display()
    )]
    CountMismatch {
        /// The file holding the images.
        images_path: PathBuf,
        /// Number of images in it.
        images: usize,
        /// The file holding the labels.
        labels_path: PathBuf,
        /// Number of labels in it.
        labels: usize,
    },
    /// A stored label is not a valid class index.
    #[error("{}: label {label} is out of range for {classes} classes", path.display())]
    LabelOutOfRange {
        /// The file holding the label.
        path: PathBuf,
        /// The offending label.
        label: usize,
        /// Number of classes the dataset declares.
        classes: usize,
    },
    /// An image's dimensions differ from those of the first image of the set.
    #[error("{}: image is {found} (HxWxC), expected {expected} like the first image", path.display())]
    DimensionMismatch {
        /// The first file whose dimensions differ.
        path: PathBuf,
        /// Dimensions of the first image.
        expected: ImageShape,
        /// Dimensions of this image.
        found: ImageShape,
    },
    /// An image file could not be decoded as JPEG or PNG.
    #[error("cannot decode image {}: {source}", path.display())]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The decoder's error, boxed because it is large.
        #[source]
        source: Box<image::ImageError>,
    },
    /// An ImageFolder directory has no class subdirectories.
    #[error("{}: no class subdirectories", path.display())]
    NoClassDirectories {
        /// The ImageFolder directory.
        path: PathBuf,
    },
    /// An ImageFolder directory has class subdirectories but no JPEG or PNG file in any.
    #[error("{}: no .jpg, .jpeg or .png files in any class subdirectory", path.display())]
    NoImages {
        /// The ImageFolder directory.
        path: PathBuf,
    },
    /// More classes than the format's labels can index.
    #[error("{}: {count} classes exceed the {max} its labels can index", path.display())]
    TooManyClasses {
        /// The directory or metadata file listing the classes.
        path: PathBuf,
        /// Number of classes found.
        count: usize,
        /// Most classes the format supports.
        max: usize,
    },
    /// The train and test directories of an ImageFolder split list different classes.
    #[error(
        "class directories differ: {} has {train_classes:?}, {} has {test_classes:?}",
        train.display(),
        test.display()
    )]
    ClassMismatch {
        /// The train directory.
        train: PathBuf,
        /// The test directory.
        test: PathBuf,
        /// Classes found under `train`.
        train_classes: Vec<String>,
        /// Classes found under `test`.
        test_classes: Vec<String>,
    },
    /// No supported dataset layout was recognised in a directory.
    #[error(
        "{}: no known dataset format: expected Fashion-MNIST IDX files \
         (train-images-idx3-ubyte[.gz], ...), CIFAR-10 binary batches \
         (data_batch_1.bin .. data_batch_5.bin, test_batch.bin, directly or under \
         cifar-10-batches-bin/), or train/ and test/ ImageFolder directories",
        path.display()
    )]
    UnknownFormat {
        /// The directory that was inspected.
        path: PathBuf,
    },
}

impl DatasetError {
    /// Wraps an I/O error, turning "not found" into [`DatasetError::Missing`].
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::Missing {
                path: path.to_path_buf(),
            }
        } else {
            Self::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}
