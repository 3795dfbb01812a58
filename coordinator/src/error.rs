//! One error type per operation a caller branches on.

use std::path::PathBuf;

use crate::credential::{NameError, RandomnessError};

/// Why a state directory or its database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The state directory does not exist (or is not a directory).
    #[error("state directory {path} does not exist; create it with `ddome-coordinator init`")]
    MissingDirectory {
        /// The directory asked for.
        path: PathBuf,
    },
    /// A file the state directory must hold is absent.
    #[error("{path} is missing")]
    MissingFile {
        /// The absent file.
        path: PathBuf,
    },
    /// The database file is not an SQLite database, or SQLite found it corrupt.
    #[error("{path} is not a readable database (corrupt or not SQLite)")]
    NotADatabase {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a different version of the coordinator.
    #[error(
        "{path} has schema version {found}; this coordinator reads version {supported} \
         (0 means the file is not a ddome state database)"
    )]
    SchemaVersion {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` found in the file.
        found: i64,
        /// The one version this build reads.
        supported: i64,
    },
    /// Reading a file failed.
    #[error("reading {path}")]
    Io {
        /// The file or directory being read.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// SQLite failed for another reason (permissions, locking, I/O).
    #[error("opening the database {path}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        #[source]
        source: rusqlite::Error,
    },
}

/// Why a state directory or database could not be created.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The target already holds state; `init` never overwrites.
    #[error("{path} already exists and is not empty; refusing to overwrite it")]
    AlreadyExists {
        /// The directory or file that exists.
        path: PathBuf,
    },
    /// Creating or writing a file failed.
    #[error("writing {path}")]
    Io {
        /// The file or directory being written.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// The TLS identity could not be generated.
    #[error(transparent)]
    Identity(#[from] ddome_transport::IdentityError),
    /// SQLite failed while creating the schema.
    #[error("creating the database {path}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        #[source]
        source: rusqlite::Error,
    },
}

/// Why a federation-state operation (models, updates, rounds, events) failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The device already has an accepted update for this round; the first one is kept.
    #[error("device {device_id} already has an accepted update for round {round}")]
    DuplicateUpdate {
        /// The round.
        round: u64,
        /// The device.
        device_id: u64,
    },
    /// The round is already folded into the global model.
    #[error("round {round} is stale: the global model already includes rounds 0..{current}")]
    StaleRound {
        /// The round offered.
        round: u64,
        /// Rounds completed by the latest global model (the first round still open).
        current: u64,
    },
    /// A new global model must complete more rounds than the latest one.
    #[error(
        "a model for {rounds_completed} rounds is not newer than the latest ({current} rounds)"
    )]
    ModelNotNewer {
        /// Rounds completed by the model offered.
        rounds_completed: u64,
        /// Rounds completed by the latest committed model.
        current: u64,
    },
    /// A round attempt must come after the one in progress.
    #[error(
        "round {round} attempt {attempt} does not follow round {current_round} attempt \
         {current_attempt}, which is already begun"
    )]
    RoundNotNewer {
        /// The round offered.
        round: u64,
        /// The attempt offered.
        attempt: u32,
        /// The latest round begun.
        current_round: u64,
        /// Its attempt.
        current_attempt: u32,
    },
    /// No device has this id.
    #[error("no device has id {device_id}")]
    UnknownDevice {
        /// The id asked for.
        device_id: u64,
    },
    /// SQLite failed (I/O, disk full, a value outside SQLite's integer range).
    #[error("database")]
    Database(#[from] rusqlite::Error),
}

/// Why a device could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The name is not a valid device name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A device (live or revoked) already has this name.
    #[error("a device named {name:?} is already enrolled")]
    DuplicateName {
        /// The name asked for.
        name: String,
    },
    /// Another live device already anchors this expert.
    #[error("expert {expert} is already anchored by device {holder:?}")]
    AnchorTaken {
        /// The expert asked for.
        expert: u32,
        /// The device that anchors it.
        holder: String,
    },
    /// No credential could be generated.
    #[error(transparent)]
    Randomness(#[from] RandomnessError),
    /// SQLite failed.
    #[error("database")]
    Database(#[from] rusqlite::Error),
}

/// Why a device could not be revoked.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// No device has this name.
    #[error("no device named {name:?} is enrolled")]
    UnknownDevice {
        /// The name asked for.
        name: String,
    },
    /// The device was revoked before.
    #[error("device {name:?} is already revoked")]
    AlreadyRevoked {
        /// The device.
        name: String,
    },
    /// SQLite failed.
    #[error("database")]
    Database(#[from] rusqlite::Error),
}

/// Why a device was not authenticated. Precise for logs and the admin; a server should
/// answer every variant alike on the wire so a client cannot probe which names exist.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No device has this name.
    #[error("no device named {name:?} is enrolled")]
    UnknownDevice {
        /// The name offered.
        name: String,
    },
    /// The device was revoked.
    #[error("device {name:?} is revoked")]
    Revoked {
        /// The device.
        name: String,
    },
    /// The credential is malformed or is not this device's.
    #[error("wrong credential for device {name:?}")]
    BadCredential {
        /// The device.
        name: String,
    },
    /// SQLite failed.
    #[error("database")]
    Database(#[from] rusqlite::Error),
}
