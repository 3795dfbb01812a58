use std::path::Path;

use crate::{
    DatasetError, Split, cifar, idx, load_cifar10_binary, load_fashion_mnist,
    load_image_folder_split,
};

/// Loads whatever supported dataset `path` holds, checked in this order: Fashion-MNIST IDX
/// files, CIFAR-10 binary batches (directly or under `cifar-10-batches-bin/`), then an
/// ImageFolder split (`train/` and `test/` subdirectories).
pub fn load_split(path: &Path) -> Result<Split, DatasetError> {
    if !path.exists() {
        return Err(DatasetError::Missing {
            path: path.to_path_buf(),
        });
    }
    if !path.is_dir() {
        return Err(DatasetError::UnknownFormat {
            path: path.to_path_buf(),
        });
    }
    if idx::find_idx(path, idx::TRAIN_STEMS.0).is_ok() {
        return load_fashion_mnist(path);
    }
    if cifar::batches_dir(path).is_some() {
        return load_cifar10_binary(path);
    }
    if path.join("train").is_dir() && path.join("test").is_dir() {
        return load_image_folder_split(path);
    }
    Err(DatasetError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{small_cifar_folder, temp_dir};

    #[test]
    fn image_folder_split_is_detected() {
        let root = small_cifar_folder(1);
        let split = load_split(root.path()).expect("ImageFolder split detected");
        assert_eq!((split.train.len(), split.test.len()), (10, 10));
    }

    #[test]
    fn unknown_and_missing_are_distinguished() {
        let root = temp_dir();
        std::fs::create_dir(root.path().join("train")).expect("temp dir is writable");
        match load_split(root.path()) {
            Err(e @ DatasetError::UnknownFormat { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&root.path().display().to_string())
                        && msg.contains("test_batch.bin"),
                    "{msg}"
                );
            }
            other => panic!("expected UnknownFormat, got {other:?}"),
        }
        let file = root.path().join("f");
        std::fs::write(&file, b"x").expect("temp dir is writable");
        assert!(matches!(
            load_split(&file),
            Err(DatasetError::UnknownFormat { .. })
        ));
        let missing = root.path().join("absent");
        assert!(
            matches!(load_split(&missing), Err(DatasetError::Missing { path }) if path == missing)
        );
    }
}
