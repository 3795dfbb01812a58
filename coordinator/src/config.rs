//! The federation a coordinator runs, as written in its TOML config.

use std::path::{Path, PathBuf};

use ddome_models::{ExpertKind, ModelSpec, TrainConfig};
use ddome_protocol::SelectionConfig;
use ddome_protocol::codec::CodecConfig;
use ddome_protocol::frame::DEFAULT_MAX_FRAME;
use ddome_protocol::message::{ModelDescription, TrainSettings};
use ddome_protocol::round::{RoundConfig, RoundKind};
use serde::{Deserialize, Serialize};

/// `serve`'s configuration. Every field but `model.classes` has the paper's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// `ddome`, or a baseline on the same wire: `fedmix` (gate + all M experts to every
    /// participant, no anchors) or `fedavg` (one model, no gate).
    #[serde(default)]
    pub method: RoundKind,
    /// Seed of the initial model, the selection and the local shuffling.
    #[serde(default)]
    pub seed: u64,
    /// R, rounds to run.
    pub rounds: u64,
    /// M, experts.
    #[serde(default = "default_experts")]
    pub experts: usize,
    /// K, experts per normal device.
    #[serde(default = "default_k")]
    pub k: usize,
    /// N_a, anchors per round.
    #[serde(default = "default_per_round")]
    pub anchors_per_round: usize,
    /// N_c, normal devices per round.
    #[serde(default = "default_per_round")]
    pub normals_per_round: usize,
    /// Uploads needed to aggregate a round at its deadline (all participants otherwise).
    #[serde(default = "default_min_updates")]
    pub min_updates: usize,
    /// Devices that must be online before a round starts (at least N_a + N_c).
    #[serde(default)]
    pub wait_for_devices: usize,
    /// Seconds from a round's start to its deadline.
    #[serde(default = "default_deadline")]
    pub round_deadline_secs: f64,
    /// Codec of the deltas devices upload: f32, f16, int8[:B], with an optional +topk:F.
    /// Lossless by default. (int8 costs no measured accuracy, but an agent's error-feedback
    /// residual is updated before the coordinator acknowledges, so an upload lost in a
    /// coordinator crash is not retried bit-identically yet.)
    #[serde(default)]
    pub codec: CodecConfig,
    /// Codec of the parameters the coordinator sends (f32, f16, int8[:B]; no top-k).
    #[serde(default)]
    pub downlink: CodecConfig,
    /// Largest frame accepted from a device, bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame: usize,
    /// The model.
    pub model: ModelConfig,
    /// Local training.
    #[serde(default)]
    pub train: TrainSection,
}

/// The gate and experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Class names in label order.
    pub classes: Vec<String>,
    /// Width of the common expert's embedding.
    #[serde(default = "default_embedding_dim")]
    pub embedding_dim: usize,
    /// Hidden width of the gate. 64 by default, not DDOME.md's 256: the gate travels to and
    /// from every participant each round, and over 3 seeds a 64-wide gate cost DDOME no
    /// accuracy while it brought int8 DDOME under 1/10 of FedMix's bytes (BENCHMARKS.md).
    #[serde(default = "default_gate_hidden")]
    pub gate_hidden: usize,
    /// Hidden width of the `head` experts.
    #[serde(default = "default_hidden")]
    pub expert_hidden: usize,
    /// SHA-256 of the common expert's ONNX file; devices with another one are refused.
    #[serde(default)]
    pub common_expert_sha256: String,
}

/// Local optimiser settings (the paper's by default).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Local epochs E.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Expert SGD learning rate.
    pub expert_lr: f64,
    /// Gate SGD learning rate.
    pub gate_lr: f64,
    /// SGD momentum.
    pub momentum: f64,
}

impl Default for TrainSection {
    fn default() -> Self {
        let paper = TrainConfig::default();
        Self {
            epochs: paper.epochs,
            batch_size: paper.batch_size,
            expert_lr: paper.expert_lr,
            gate_lr: paper.gate_lr,
            momentum: paper.momentum,
        }
    }
}

fn default_experts() -> usize {
    5
}
fn default_k() -> usize {
    2
}
fn default_per_round() -> usize {
    5
}
fn default_min_updates() -> usize {
    1
}
fn default_deadline() -> f64 {
    600.0
}
fn default_max_frame() -> usize {
    DEFAULT_MAX_FRAME
}
fn default_embedding_dim() -> usize {
    1280
}
fn default_gate_hidden() -> usize {
    64
}

fn default_hidden() -> usize {
    256
}

/// The personalisation service (`[inference]` in the TOML). Every field has a default, so
/// the table may be left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Keep serving `personalize` and `infer` after the last round, until shut down.
    /// Default false: `serve` returns when the federation finishes.
    pub keep_serving: bool,
    /// Most samples (embeddings or images) in one infer request. Default 1024, the
    /// simulator's prediction batch.
    pub max_batch: usize,
    /// Requests one connection may have in progress; its further streams wait unread.
    /// Default 8.
    pub max_requests_per_connection: usize,
    /// Requests computed at once over all connections; 0 (the default) means one per CPU
    /// core. The rest queue.
    pub max_concurrent_requests: usize,
    /// Seconds a request may queue for a compute slot before it is refused as overloaded.
    /// Default 30.
    pub queue_timeout_secs: f64,
    /// The common expert (ONNX) that embeds raw images sent by devices that cannot run it.
    /// Default none: image requests are refused as unavailable.
    pub common_expert: Option<PathBuf>,
    /// Side of the square input the common expert resizes images to. Default 64.
    pub input_side: usize,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            keep_serving: false,
            max_batch: 1024,
            max_requests_per_connection: 8,
            max_concurrent_requests: 0,
            queue_timeout_secs: 30.0,
            common_expert: None,
            input_side: 64,
        }
    }
}

impl InferenceConfig {
    /// Checks the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch == 0 || self.max_requests_per_connection == 0 {
            return Err(ConfigError::Invalid(
                "inference.max_batch and inference.max_requests_per_connection must be positive"
                    .into(),
            ));
        }
        if !(self.queue_timeout_secs.is_finite() && self.queue_timeout_secs > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "inference.queue_timeout_secs must be positive, got {}",
                self.queue_timeout_secs
            )));
        }
        if self.input_side == 0 || !self.input_side.is_multiple_of(32) {
            return Err(ConfigError::Invalid(format!(
                "inference.input_side must be a positive multiple of 32, got {}",
                self.input_side
            )));
        }
        Ok(())
    }

    /// Compute slots: the configured number, or one per CPU core.
    pub fn compute_slots(&self) -> usize {
        match self.max_concurrent_requests {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Everything `serve` reads from its TOML file: the federation, and the optional
/// `[inference]` table of the personalisation service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// The federation.
    pub federation: FederationConfig,
    /// The personalisation service.
    pub inference: InferenceConfig,
}

impl ServeConfig {
    /// Reads and checks a TOML file. Unknown fields are refused in both parts.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let parse = |source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        };
        let mut table: toml::Table = text.parse().map_err(parse)?;
        let (federation, inference) = match table.remove("inference") {
            // Without the table, parse the text itself so errors keep their line numbers.
            None => (
                toml::from_str::<FederationConfig>(&text).map_err(parse)?,
                InferenceConfig::default(),
            ),
            Some(inference) => (
                table.try_into::<FederationConfig>().map_err(parse)?,
                inference.try_into::<InferenceConfig>().map_err(parse)?,
            ),
        };
        federation.validate()?;
        inference.validate()?;
        Ok(Self {
            federation,
            inference,
        })
    }
}

/// A config that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or mistyped fields.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser found.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

impl FederationConfig {
    /// Reads and checks a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.experts == 0 || self.k == 0 || self.k > self.experts {
            return bad(format!(
                "need 1 <= k <= experts, got k = {} and experts = {}",
                self.k, self.experts
            ));
        }
        if self.anchors_per_round > self.experts {
            return bad(format!(
                "anchors_per_round = {} but there are only {} experts (one anchor each)",
                self.anchors_per_round, self.experts
            ));
        }
        let per_round = self.anchors_per_round + self.normals_per_round;
        if per_round == 0 || self.min_updates == 0 || self.min_updates > per_round {
            return bad(format!(
                "need 1 <= min_updates <= anchors_per_round + normals_per_round = {per_round}, got {}",
                self.min_updates
            ));
        }
        if !(self.round_deadline_secs.is_finite() && self.round_deadline_secs > 0.0) {
            return bad(format!(
                "round_deadline_secs must be positive, got {}",
                self.round_deadline_secs
            ));
        }
        if self.model.classes.len() < 2 {
            return bad("model.classes needs at least 2 classes".into());
        }
        if self.downlink.top_k.is_some() {
            return bad("downlink parameters cannot be sparsified (top-k is for deltas)".into());
        }
        self.codec
            .validate()
            .and(self.downlink.validate())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.train.batch_size == 0 || self.train.epochs == 0 {
            return bad("train.batch_size and train.epochs must be positive".into());
        }
        Ok(())
    }

    /// Experts in the model: M, or the one model of FedAvg.
    pub fn model_experts(&self) -> usize {
        match self.method {
            RoundKind::Fedavg => 1,
            RoundKind::Ddome | RoundKind::Fedmix => self.experts,
        }
    }

    /// Whether the model has a gate (every method but FedAvg).
    pub fn has_gate(&self) -> bool {
        self.method != RoundKind::Fedavg
    }

    /// The model every participant trains.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            embedding_dim: self.model.embedding_dim,
            classes: self.model.classes.len(),
            experts: self.model_experts(),
            gate_hidden: self.model.gate_hidden,
            expert: ExpertKind::Head {
                hidden: self.model.expert_hidden,
            },
            pixels: None,
        }
    }

    /// The model as the wire describes it.
    pub fn description(&self) -> ModelDescription {
        ModelDescription {
            embedding_dim: self.model.embedding_dim as u32,
            classes: self.model.classes.clone(),
            experts: self.model_experts() as u32,
            k: self.k as u32,
            gate_hidden: self.model.gate_hidden as u32,
            expert_hidden: self.model.expert_hidden as u32,
            common_expert_sha256: self.model.common_expert_sha256.clone(),
        }
    }

    /// Local training settings on the wire.
    pub fn train_settings(&self) -> TrainSettings {
        TrainSettings {
            epochs: self.train.epochs as u32,
            batch_size: self.train.batch_size as u32,
            expert_lr: self.train.expert_lr,
            gate_lr: self.train.gate_lr,
            momentum: self.train.momentum,
            prox_mu: 0.0,
        }
    }

    /// How rounds run.
    pub fn round_config(&self) -> RoundConfig {
        RoundConfig {
            kind: self.method,
            selection: SelectionConfig {
                anchors: self.anchors_per_round,
                normals: self.normals_per_round,
            },
            experts: self.model_experts(),
            k: self.k,
            min_updates: self.min_updates,
            deadline_ms: (self.round_deadline_secs * 1000.0) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FederationConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, text).unwrap();
        FederationConfig::load(&path)
    }

    #[test]
    fn minimal_config_takes_the_papers_defaults() {
        let c =
            parse("rounds = 10\ncodec = \"int8+topk:0.1\"\n[model]\nclasses = [\"a\", \"b\"]\n")
                .unwrap();
        assert_eq!(
            (c.experts, c.k, c.anchors_per_round, c.normals_per_round),
            (5, 2, 5, 5)
        );
        assert_eq!(c.train.gate_lr, 0.001);
        assert_eq!(c.codec, CodecConfig::int8_top_k(0.1));
        assert_eq!(c.downlink, CodecConfig::LOSSLESS);
        assert_eq!(c.model.gate_hidden, 64);
        assert_eq!(c.method, RoundKind::Ddome);
        let fedavg =
            parse("rounds = 1\nmethod = \"fedavg\"\n[model]\nclasses = [\"a\", \"b\"]\n").unwrap();
        assert_eq!((fedavg.model_experts(), fedavg.has_gate()), (1, false));
    }

    fn parse_serve(text: &str) -> Result<ServeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, text).unwrap();
        ServeConfig::load(&path)
    }

    #[test]
    fn the_inference_table_is_optional_and_checked() {
        let base = "rounds = 3\n[model]\nclasses = [\"a\", \"b\"]\n";
        let plain = parse_serve(base).unwrap();
        assert_eq!(plain.inference, InferenceConfig::default());
        assert_eq!(plain.federation.rounds, 3);
        let with = parse_serve(&format!(
            "{base}[inference]\nkeep_serving = true\nmax_batch = 16\ncommon_expert = \"m.onnx\"\n"
        ))
        .unwrap();
        assert!(with.inference.keep_serving);
        assert_eq!(with.inference.max_batch, 16);
        assert_eq!(with.inference.common_expert, Some(PathBuf::from("m.onnx")));
        assert_eq!(with.federation, plain.federation);
        for (text, needle) in [
            (format!("{base}[inference]\nmax_btch = 3\n"), "max_btch"),
            (format!("{base}[inference]\nmax_batch = 0\n"), "max_batch"),
            (format!("rouns = 1\n{base}[inference]\n"), "rouns"),
            (
                format!("{base}[inference]\ninput_side = 50\n"),
                "input_side",
            ),
        ] {
            let err = parse_serve(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
        // The federation-only loader still refuses the table it does not know.
        assert!(parse(&format!("{base}[inference]\n")).is_err());
    }

    #[test]
    fn bad_configs_name_what_is_wrong() {
        let classes = "[model]\nclasses = [\"a\", \"b\"]\n";
        for (text, needle) in [
            (format!("rounds = 1\nk = 6\n{classes}"), "k = 6"),
            (
                format!("rounds = 1\nmin_updates = 11\n{classes}"),
                "min_updates",
            ),
            (
                format!("rounds = 1\nround_deadline_secs = -1\n{classes}"),
                "deadline",
            ),
            (
                format!("rounds = 1\ndownlink = \"int8+topk:0.5\"\n{classes}"),
                "downlink",
            ),
            (format!("rounds = 1\ncodec = \"int9\"\n{classes}"), "int9"),
            (format!("rounds = 1\nrouns = 3\n{classes}"), "rouns"),
            (
                "rounds = 1\n[model]\nclasses = [\"a\"]\n".to_string(),
                "2 classes",
            ),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }
}
