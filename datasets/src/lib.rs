//! Datasets and federated partitioners for DDOME.
//!
//! Loaders turn the on-disk formats the experiments use into an in-memory [`ImageSet`]
//! (`u8` pixels in HWC order, one `u16` label per image, class names):
//!
//! - [`load_fashion_mnist`]: the four IDX files, gzip-compressed or not;
//! - [`load_cifar10_binary`]: the canonical `data_batch_{1..5}.bin` / `test_batch.bin` batches;
//! - [`load_image_folder`] / [`load_image_folder_split`]: one subdirectory of JPEG or PNG
//!   files per class, decoded in parallel;
//! - [`load_split`]: picks one of the above from what the directory contains;
//! - [`synthetic`]: a tiny learnable dataset for unit tests.
//!
//! [`partition()`] spreads a dataset over simulated devices the way the paper does: anchor
//! devices holding disjoint label groups, normal devices under label skew or Dirichlet skew,
//! and zero-shot test devices whose label combinations never occur in training. Every
//! partition is a pure function of its [`PartitionConfig`] (seed included).

mod cifar;
mod detect;
mod error;
mod folder;
mod idx;
mod image_set;
mod partition;
mod synthetic;
#[cfg(test)]
mod test_util;

pub use cifar::load_cifar10_binary;
pub use detect::load_split;
pub use error::DatasetError;
pub use folder::{decode_image, load_image_folder, load_image_folder_split};
pub use idx::load_fashion_mnist;
pub use image_set::{ImageSet, ImageShape, Split};
pub use partition::{
    DeviceData, Partition, PartitionConfig, PartitionError, Skew, VALIDATION_HOLDOUT,
    label_histogram, partition,
};
pub use synthetic::synthetic;
