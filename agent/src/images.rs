//! Image files as a device holds them: files named one by one, or directories searched
//! recursively, decoded as the dataset loaders decode them (grey images keep one channel,
//! colour images become RGB) so the common expert sees the same pixels.

use std::path::{Path, PathBuf};

use ddome_datasets::{DatasetError, ImageSet, decode_image};
use ddome_models::{CommonExpert, CommonExpertError, embed_cached};

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Images that could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file or directory could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file could not be read or decoded as an image.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Nothing to read.
    #[error("no .jpg, .jpeg or .png files in {0:?}")]
    NoImages(Vec<PathBuf>),
    /// The common expert failed on them.
    #[error(transparent)]
    CommonExpert(#[from] CommonExpertError),
}

/// The image files named by `inputs`: files as given, directories searched recursively for
/// `.jpg`, `.jpeg` and `.png` (hidden entries skipped), each directory's files in name order.
pub fn image_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, ImageError> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|source| ImageError::Io {
            path: input.clone(),
            source,
        })?;
        if meta.is_dir() {
            collect(input, &mut files)?;
        } else {
            files.push(input.clone());
        }
    }
    if files.is_empty() {
        return Err(ImageError::NoImages(inputs.to_vec()));
    }
    Ok(files)
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), ImageError> {
    let io = |source| ImageError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect(&path, files)?;
        } else if has_image_extension(&path) {
            files.push(path);
        }
    }
    Ok(())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The files decoded, in order, as runs of one shape: the common expert embeds one image
/// set at a time, and a device's photos need not all be the same size.
pub fn load_runs(files: &[PathBuf]) -> Result<Vec<ImageSet>, ImageError> {
    let mut runs: Vec<ImageSet> = Vec::new();
    for path in files {
        let (shape, pixels) = decode_image(path)?;
        match runs.last_mut() {
            Some(run) if run.shape == shape => {
                run.images.extend_from_slice(&pixels);
                run.labels.push(0);
            }
            _ => runs.push(ImageSet {
                images: pixels,
                labels: vec![0],
                shape,
                classes: Vec::new(),
            }),
        }
    }
    Ok(runs)
}

/// Embeddings of `files`, in order, `[n, d]` row-major; through the embedding cache in
/// `cache_dir` when one is given.
pub fn embed_files(
    expert: &CommonExpert,
    files: &[PathBuf],
    cache_dir: Option<&Path>,
) -> Result<Vec<f32>, ImageError> {
    let mut embeddings = Vec::with_capacity(files.len() * expert.dim());
    for run in load_runs(files)? {
        let rows = match cache_dir {
            Some(dir) => embed_cached(expert, &run, dir)?.0,
            None => expert.embed(&run)?,
        };
        embeddings.extend(rows);
    }
    Ok(embeddings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddome_datasets::ImageShape;

    fn png(path: &Path, width: u32, height: u32, colour: bool) {
        if colour {
            image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]))
                .save(path)
                .unwrap();
        } else {
            image::GrayImage::from_fn(width, height, |x, _| image::Luma([x as u8]))
                .save(path)
                .unwrap();
        }
    }

    #[test]
    fn directories_are_searched_recursively_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/inner")).unwrap();
        std::fs::create_dir_all(root.join(".hidden")).unwrap();
        png(&root.join("b/inner/z.png"), 4, 4, true);
        png(&root.join("b/a.PNG"), 4, 4, true);
        png(&root.join("c.png"), 4, 4, true);
        png(&root.join(".hidden/x.png"), 4, 4, true);
        std::fs::write(root.join("notes.txt"), "not an image").unwrap();
        let files = image_files(&[root.to_path_buf()]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["b/a.PNG", "b/inner/z.png", "c.png"]);
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            image_files(&[empty.path().to_path_buf()]),
            Err(ImageError::NoImages(_))
        ));
    }

    #[test]
    fn runs_split_where_the_shape_changes_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        png(&p("1.png"), 4, 4, true);
        png(&p("2.png"), 4, 4, true);
        png(&p("3.png"), 4, 4, false);
        png(&p("4.png"), 6, 4, true);
        let runs = load_runs(&[p("1.png"), p("2.png"), p("3.png"), p("4.png")]).unwrap();
        let shapes: Vec<(ImageShape, usize)> = runs.iter().map(|r| (r.shape, r.len())).collect();
        assert_eq!(
            shapes,
            [
                (ImageShape::new(4, 4, 3), 2),
                (ImageShape::new(4, 4, 1), 1),
                (ImageShape::new(4, 6, 3), 1)
            ]
        );
        assert_eq!(runs[0].image(1)[..3], [0, 0, 7]);
        std::fs::write(p("bad.jpg"), b"not a jpeg").unwrap();
        let err = load_runs(&[p("bad.jpg")]).unwrap_err();
        assert!(err.to_string().contains("bad.jpg"), "{err}");
    }
}
