//! Checkpoints of simulated runs, so that a run of hundreds of rounds can stop (a session
//! ends, a machine is needed) and go on later. A round's other inputs, its participants and
//! every device's shuffle, derive from the seed and the round number, so the global model
//! and the rounds completed are all the state there is: a resumed run ends on the same
//! model, bit for bit, as one that never stopped.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ddome_datasets::Partition;
use ddome_models::{Features, GlobalModel};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::simulate::{RoundMetrics, SimConfig, Timings};

/// Leads every checkpoint file; the version changes with the layout.
const MAGIC: &[u8; 16] = b"ddome-sim-ckpt1\n";

/// A simulated run's state after `rounds_completed` rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The configuration the rounds so far ran under.
    pub config: SimConfig,
    /// [`setup_sha256`] of the data and partition they trained on.
    pub setup_sha256: String,
    /// Rounds completed.
    pub rounds_completed: usize,
    /// The global model after them.
    pub global: GlobalModel,
    /// Metrics at each evaluation point so far.
    pub history: Vec<RoundMetrics>,
    /// Where the time went so far.
    pub timings: Timings,
    /// Seconds the rounds so far took, summed over every process that ran them.
    pub elapsed_secs: f64,
}

/// A checkpoint that cannot be read or does not continue the run asked for.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a checkpoint of this version, or is truncated or damaged.
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The checkpoint belongs to another run: its setting differs from the one asked for.
    #[error(
        "checkpoint {path} is of another run: its {what} differs from this run's \
         (only --rounds, --threads and --eval-every may change on resuming)"
    )]
    OtherRun {
        /// The file.
        path: PathBuf,
        /// The setting that differs.
        what: &'static str,
    },
    /// The checkpoint has already run past the rounds asked for.
    #[error("checkpoint {path} has completed {completed} rounds, more than the {rounds} asked for")]
    PastTheEnd {
        /// The file.
        path: PathBuf,
        /// Rounds the checkpoint completed.
        completed: usize,
        /// Rounds asked for.
        rounds: usize,
    },
}

/// A checkpoint checked by [`Checkpoint::resume`] to continue the run it starts.
#[derive(Debug)]
pub struct Resume {
    checkpoint: Checkpoint,
}

impl Resume {
    /// The checked checkpoint; its `setup_sha256` is the run's.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The checkpoint, to continue from.
    pub fn into_checkpoint(self) -> Checkpoint {
        self.checkpoint
    }
}

/// SHA-256 over what a run trains and is evaluated on, besides its configuration: the
/// training embeddings and labels and the partition. A checkpoint continues only a run with
/// the same, so a changed common expert, dataset or split cannot be resumed by mistake.
pub fn setup_sha256(train: &Features, partition: &Partition) -> String {
    let mut hasher = Sha256::new();
    hasher.update((train.dim as u64).to_le_bytes());
    for v in &train.embeddings {
        hasher.update(v.to_le_bytes());
    }
    for label in &train.labels {
        hasher.update(label.to_le_bytes());
    }
    hasher.update(postcard::to_allocvec(partition).expect("a partition always serialises"));
    hex::encode(hasher.finalize())
}

/// The file's layout after [`MAGIC`], postcard throughout except the configuration, which
/// goes as JSON: its types use serde features (tagged enums) that postcard cannot decode.
/// (JSON would not do for the rest: serde_json's parser may move an f64 by one ulp.)
#[derive(Serialize, Deserialize)]
struct OnDisk {
    config_json: String,
    setup_sha256: String,
    rounds_completed: usize,
    global: GlobalModel,
    history: Vec<RoundMetrics>,
    timings: Timings,
    elapsed_secs: f64,
}

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically: a reader (or a crash) sees the previous
    /// checkpoint or this one, never half of one.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        let on_disk = OnDisk {
            config_json: serde_json::to_string(&self.config).expect("a config always serialises"),
            setup_sha256: self.setup_sha256.clone(),
            rounds_completed: self.rounds_completed,
            global: self.global.clone(),
            history: self.history.clone(),
            timings: self.timings,
            elapsed_secs: self.elapsed_secs,
        };
        let mut bytes = MAGIC.to_vec();
        bytes.extend(postcard::to_allocvec(&on_disk).expect("a checkpoint always serialises"));
        let partial = path.with_extension("partial");
        let mut file = fs::File::create(&partial).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&partial, path).map_err(io)
    }

    /// Reads a checkpoint written by [`Checkpoint::save`].
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let bytes = fs::read(path).map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let corrupt = |reason: String| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| corrupt("it does not start with a ddome checkpoint header".into()))?;
        let (on_disk, trailing): (OnDisk, _) = postcard::take_from_bytes(body)
            .map_err(|e| corrupt(format!("decoding its contents failed: {e}")))?;
        if !trailing.is_empty() {
            return Err(corrupt(format!(
                "{} bytes follow its contents",
                trailing.len()
            )));
        }
        let config = serde_json::from_str(&on_disk.config_json)
            .map_err(|e| corrupt(format!("decoding its configuration failed: {e}")))?;
        let checkpoint = Checkpoint {
            config,
            setup_sha256: on_disk.setup_sha256,
            rounds_completed: on_disk.rounds_completed,
            global: on_disk.global,
            history: on_disk.history,
            timings: on_disk.timings,
            elapsed_secs: on_disk.elapsed_secs,
        };
        let global = &checkpoint.global;
        if global
            .gate
            .iter()
            .chain(global.experts.iter().flatten())
            .any(|v| !v.is_finite())
        {
            return Err(corrupt(
                "its model holds a NaN or infinite parameter".into(),
            ));
        }
        Ok(checkpoint)
    }

    /// This checkpoint as the start of a run of `config` on `train` and `partition`, once
    /// checked to belong to that run (`path` names it in errors).
    pub fn resume(
        self,
        config: &SimConfig,
        train: &Features,
        partition: &Partition,
        path: &Path,
    ) -> Result<Resume, CheckpointError> {
        self.check_continues(config, &setup_sha256(train, partition), path)?;
        Ok(Resume { checkpoint: self })
    }

    /// Checks that this checkpoint can continue a run of `config` on the setup whose
    /// [`setup_sha256`] is `setup`, as read from `path`.
    pub fn check_continues(
        &self,
        config: &SimConfig,
        setup: &str,
        path: &Path,
    ) -> Result<(), CheckpointError> {
        let other = |what| CheckpointError::OtherRun {
            path: path.to_path_buf(),
            what,
        };
        // The checkpoint's configuration came through JSON, whose parser may round a long
        // float differently; this one takes the same path, so equal settings compare equal.
        let config: &SimConfig = &serde_json::to_string(config)
            .and_then(|json| serde_json::from_str(&json))
            .expect("a config survives JSON");
        // These do not change what a round computes; every other field does.
        let comparable = SimConfig {
            rounds: config.rounds,
            threads: config.threads,
            eval_every: config.eval_every,
            ..self.config.clone()
        };
        if comparable.method != config.method {
            return Err(other("method"));
        }
        if comparable.seed != config.seed {
            return Err(other("seed"));
        }
        if comparable.backend != config.backend {
            return Err(other("backend"));
        }
        if comparable != *config {
            return Err(other("model or federation setting"));
        }
        // Last, as the partition follows from the seed: a changed seed is named as such.
        if self.setup_sha256 != setup {
            return Err(other("data or partition"));
        }
        if self.rounds_completed > config.rounds {
            return Err(CheckpointError::PastTheEnd {
                path: path.to_path_buf(),
                completed: self.rounds_completed,
                rounds: config.rounds,
            });
        }
        Ok(())
    }
}
