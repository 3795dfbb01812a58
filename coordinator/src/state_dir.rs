//! The state directory: the database and the TLS identity agents pin.
//!
//! ```text
//! <dir>/state.sqlite3   the Store (plus -wal and -shm while open)
//! <dir>/cert.der        self-signed certificate, DER; agents pin its SHA-256
//! <dir>/key.der         its PKCS#8 private key, DER, mode 0600
//! ```

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use ddome_transport::Identity;

use crate::error::{InitError, OpenError};
use crate::store::Store;

/// An opened state directory: the store and the identity, loaded together.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    store: Store,
    identity: Identity,
}

impl StateDir {
    /// The database file's name inside the directory.
    pub const DATABASE_FILE: &'static str = "state.sqlite3";
    /// The certificate file's name.
    pub const CERT_FILE: &'static str = "cert.der";
    /// The private key file's name.
    pub const KEY_FILE: &'static str = "key.der";

    /// Creates a state directory at `root` (which must be absent or empty): a fresh
    /// self-signed identity and an empty database. Never overwrites anything.
    pub fn init(root: &Path) -> Result<Self, InitError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| InitError::Io { path, source }
        };
        match std::fs::read_dir(root) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(InitError::AlreadyExists {
                        path: root.to_path_buf(),
                    });
                }
            }
            Err(err) if err.kind() == ErrorKind::NotFound => create_private_dir(root)?,
            Err(err) if err.kind() == ErrorKind::NotADirectory => {
                return Err(InitError::AlreadyExists {
                    path: root.to_path_buf(),
                });
            }
            Err(err) => return Err(io(root)(err)),
        }

        let identity = Identity::self_signed(&[])?;
        // Identity first, database last: a directory with a database is complete.
        let key_path = root.join(Self::KEY_FILE);
        write_new_file(&key_path, &identity.key_der, 0o600).map_err(io(&key_path))?;
        let cert_path = root.join(Self::CERT_FILE);
        write_new_file(&cert_path, &identity.cert_der, 0o644).map_err(io(&cert_path))?;
        let store = Store::create(&root.join(Self::DATABASE_FILE))?;
        // Make the new directory entries themselves durable: losing the certificate would
        // break every agent's pin.
        File::open(root)
            .and_then(|dir| dir.sync_all())
            .map_err(io(root))?;
        Ok(Self {
            root: root.to_path_buf(),
            store,
            identity,
        })
    }

    /// Opens the state directory at `root`, checking that every file is present and the
    /// database is readable and of this build's schema.
    pub fn open(root: &Path) -> Result<Self, OpenError> {
        if !root.is_dir() {
            return Err(OpenError::MissingDirectory {
                path: root.to_path_buf(),
            });
        }
        let identity = Identity {
            cert_der: read_required(&root.join(Self::CERT_FILE))?,
            key_der: read_required(&root.join(Self::KEY_FILE))?,
        };
        let store = Store::open(&root.join(Self::DATABASE_FILE))?;
        Ok(Self {
            root: root.to_path_buf(),
            store,
            identity,
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The coordinator's TLS identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The state database, to read.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The state database, to write.
    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    /// The store and the identity, for a server that owns them.
    pub fn into_parts(self) -> (Store, Identity) {
        (self.store, self.identity)
    }
}

/// Creates `root` and any missing parents, the last one readable by its owner only.
fn create_private_dir(root: &Path) -> Result<(), InitError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(root).map_err(|source| InitError::Io {
        path: root.to_path_buf(),
        source,
    })
}

/// Writes a file that must not exist yet, created with `mode` on unix so a key is never
/// readable by others even for an instant, and flushed to disk.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut options = File::options();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn read_required(path: &Path) -> Result<Vec<u8>, OpenError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => OpenError::MissingFile {
            path: path.to_path_buf(),
        },
        _ => OpenError::Io {
            path: path.to_path_buf(),
            source,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_identity_and_database_and_open_reads_them_back() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("nested").join("state");
        let mut state = StateDir::init(&root).unwrap();
        let fingerprint = state.identity().fingerprint();
        state.store_mut().enroll("pi", None).unwrap();
        drop(state);

        for file in [
            StateDir::DATABASE_FILE,
            StateDir::CERT_FILE,
            StateDir::KEY_FILE,
        ] {
            assert!(root.join(file).is_file(), "{file}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&root.join(StateDir::KEY_FILE)), 0o600);
            assert_eq!(mode(&root), 0o700);
        }
        let cert = std::fs::read(root.join(StateDir::CERT_FILE)).unwrap();
        assert_eq!(ddome_transport::fingerprint(&cert), fingerprint);

        let state = StateDir::open(&root).unwrap();
        assert_eq!(state.root(), root);
        assert_eq!(state.identity().fingerprint(), fingerprint);
        assert_eq!(state.store().devices().unwrap().len(), 1);
        let (_store, identity) = state.into_parts();
        assert_eq!(identity.cert_der, cert);
    }

    #[test]
    fn init_accepts_an_empty_directory_but_never_overwrites() {
        let empty = tempfile::tempdir().unwrap();
        StateDir::init(empty.path()).unwrap();
        let before = std::fs::read(empty.path().join(StateDir::CERT_FILE)).unwrap();
        let err = StateDir::init(empty.path()).unwrap_err();
        assert!(
            matches!(&err, InitError::AlreadyExists { path } if path == empty.path()),
            "{err}"
        );
        assert_eq!(
            std::fs::read(empty.path().join(StateDir::CERT_FILE)).unwrap(),
            before
        );

        let unrelated = tempfile::tempdir().unwrap();
        std::fs::write(unrelated.path().join("notes.txt"), "mine").unwrap();
        assert!(matches!(
            StateDir::init(unrelated.path()),
            Err(InitError::AlreadyExists { .. })
        ));
        assert!(!unrelated.path().join(StateDir::DATABASE_FILE).exists());

        let file = unrelated.path().join("notes.txt");
        assert!(matches!(
            StateDir::init(&file),
            Err(InitError::AlreadyExists { path }) if path == file
        ));
    }

    #[test]
    fn open_names_the_missing_directory_or_file() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("state");
        assert!(matches!(
            StateDir::open(&root),
            Err(OpenError::MissingDirectory { path }) if path == root
        ));

        StateDir::init(&root).unwrap();
        for file in [
            StateDir::DATABASE_FILE,
            StateDir::CERT_FILE,
            StateDir::KEY_FILE,
        ] {
            let path = root.join(file);
            let saved = std::fs::read(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            let err = StateDir::open(&root).unwrap_err();
            assert!(
                matches!(&err, OpenError::MissingFile { path: p } if *p == path),
                "{file}: {err}"
            );
            assert!(err.to_string().contains(file));
            std::fs::write(&path, saved).unwrap();
        }
        StateDir::open(&root).unwrap();
    }

    #[test]
    fn open_reports_a_corrupt_database() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("state");
        StateDir::init(&root).unwrap();
        let database = root.join(StateDir::DATABASE_FILE);
        std::fs::write(&database, vec![0xA5; 16 * 1024]).unwrap();
        let err = StateDir::open(&root).unwrap_err();
        assert!(
            matches!(&err, OpenError::NotADatabase { path, .. } if *path == database),
            "{err}"
        );
    }
}
