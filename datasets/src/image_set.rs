use std::fmt;

use serde::{Deserialize, Serialize};

/// Dimensions of every image in an [`ImageSet`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct ImageShape {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Values per pixel: 1 (grey) or 3 (RGB).
    pub channels: usize,
}

impl ImageShape {
    /// A shape from its three dimensions.
    pub const fn new(height: usize, width: usize, channels: usize) -> Self {
        Self {
            height,
            width,
            channels,
        }
    }

    /// Bytes per image: `height * width * channels`.
    pub const fn size(&self) -> usize {
        self.height * self.width * self.channels
    }
}

impl fmt::Display for ImageShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.height, self.width, self.channels)
    }
}

/// Labelled images in memory: pixels `u8`, HWC order, image `i` at
/// `images[i * len..(i + 1) * len]` with `len = shape.size()`.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageSet {
    /// All pixels, image after image.
    pub images: Vec<u8>,
    /// One class index per image, each `< classes.len()`.
    pub labels: Vec<u16>,
    /// Dimensions shared by every image.
    pub shape: ImageShape,
    /// Class names, indexed by label.
    pub classes: Vec<String>,
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels of image `i` (HWC). Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.shape.size();
        &self.images[i * len..(i + 1) * len]
    }

    /// Number of classes (not all need occur in `labels`).
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// A new set holding images `indices` in that order (repeats allowed), same classes.
    /// Panics if an index is out of range.
    pub fn subset(&self, indices: &[usize]) -> ImageSet {
        let mut images = Vec::with_capacity(indices.len() * self.shape.size());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        ImageSet {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            shape: self.shape,
            classes: self.classes.clone(),
        }
    }
}

// Summarised: a derived Debug would print every pixel.
impl fmt::Debug for ImageSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageSet")
            .field("len", &self.len())
            .field("shape", &self.shape)
            .field("classes", &self.classes)
            .finish_non_exhaustive()
    }
}

/// A dataset's train and test sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Training images.
    pub train: ImageSet,
    /// Held-out images.
    pub test: ImageSet,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ImageSet {
        ImageSet {
            images: (0..12).collect(),
            labels: vec![0, 1, 0],
            shape: ImageShape::new(2, 2, 1),
            classes: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn image_and_subset_index_hwc_blocks() {
        let set = tiny();
        assert_eq!(set.len(), 3);
        assert!(!set.is_empty());
        assert_eq!(set.num_classes(), 2);
        assert_eq!(set.image(1), &[4, 5, 6, 7]);
        let sub = set.subset(&[2, 1, 2]);
        assert_eq!(sub.labels, vec![0, 1, 0]);
        assert_eq!(sub.images, vec![8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(sub.classes, set.classes);
        assert!(set.subset(&[]).is_empty());
    }

    #[test]
    fn shape_displays_and_debug_is_short() {
        assert_eq!(ImageShape::new(32, 32, 3).to_string(), "32x32x3");
        assert_eq!(ImageShape::new(28, 28, 1).size(), 784);
        let debug = format!("{:?}", tiny());
        assert!(debug.contains("len: 3"), "{debug}");
        assert!(!debug.contains("11"), "{debug}");
    }
}
