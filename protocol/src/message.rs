//! What crosses the wire: one enum per direction, postcard-encoded, one per frame.
//!
//! Wire types are plain data, independent of the model code's own types, so that the
//! model code can change without changing the protocol (and the other way round).

use serde::{Deserialize, Serialize};

use crate::codec::{CodecConfig, EncodedDelta};

/// Why a device connects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Take part in training rounds when selected (and use the personalisation service).
    #[default]
    Train,
    /// Only personalise and infer: such a connection is never scheduled into a round, so a
    /// new device can fetch its experts without the federation waiting on it.
    Serve,
}

/// The first message on every connection, agent to coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// Name the device was enrolled under.
    pub device: String,
    /// The credential issued at enrolment.
    pub credential: String,
    /// Whether the device trains or only uses the personalisation service.
    pub intent: Intent,
}

/// The model every participant trains, as the coordinator describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDescription {
    /// Width of the common expert's embedding.
    pub embedding_dim: u32,
    /// Class names, in label order: a device maps its own folder names onto them.
    pub classes: Vec<String>,
    /// M, experts.
    pub experts: u32,
    /// K, experts per normal device.
    pub k: u32,
    /// Hidden width of the gate.
    pub gate_hidden: u32,
    /// Hidden width of `head` experts.
    pub expert_hidden: u32,
    /// SHA-256 of the common expert's ONNX file the embeddings must come from.
    pub common_expert_sha256: String,
}

/// Local optimiser settings for a round (mirrors the model crate's training config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Local epochs.
    pub epochs: u32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Expert learning rate.
    pub expert_lr: f64,
    /// Gate learning rate.
    pub gate_lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// FedProx μ (0: off).
    pub prox_mu: f64,
}

/// Coordinator's answer to a good [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The coordinator's protocol version.
    pub version: u32,
    /// The device's numeric id (enrolment order).
    pub device_id: u64,
    /// The expert this device is the anchor of, if any.
    pub anchor_of: Option<u32>,
    /// The model being trained.
    pub model: ModelDescription,
    /// How the agent must encode its deltas.
    pub uplink: CodecConfig,
    /// Rounds completed so far.
    pub rounds_completed: u64,
    /// The last update accepted from this device, durably; `None` if there was none (and
    /// always for a service-only connection). An agent whose upload was never confirmed
    /// learns here whether it was applied before the link or the coordinator went down.
    pub last_accepted: Option<UpdateId>,
}

/// Which upload: a round and the attempt of that round it answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UpdateId {
    /// Round.
    pub round: u64,
    /// Attempt of that round (a round whose deadline passed without enough updates is
    /// retried as a new attempt).
    pub attempt: u32,
}

/// What a device does with a training task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskRole {
    /// Train the gate and the listed experts jointly (mixture loss).
    Normal,
    /// Train the gate and the one expert this device anchors.
    Anchor,
    /// FedMix baseline: train the gate and every expert jointly (mixture loss).
    Mixture,
    /// FedAvg baseline: train the one model; no gate.
    Single,
}

/// Coordinator to a normal device: rank the experts on your data with this gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankRequest {
    /// Round number (0-based).
    pub round: u64,
    /// Attempt of the round (a round whose deadline passed without enough updates is retried).
    pub attempt: u32,
    /// The gate W_r.
    pub gate: EncodedDelta,
}

/// A normal device's answer: the top-K experts of its mean gate scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ranking {
    /// Round being answered.
    pub round: u64,
    /// Attempt being answered.
    pub attempt: u32,
    /// Indices of the K experts with the largest mean gate probability, best first.
    pub experts: Vec<u32>,
    /// The device's sample count.
    pub samples: u64,
}

/// Coordinator to a participant: train these parameters for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainTask {
    /// Round number.
    pub round: u64,
    /// Attempt.
    pub attempt: u32,
    /// What to train.
    pub role: TaskRole,
    /// The gate W_r (anchors get it here; normal devices got it in the [`RankRequest`] and
    /// get `None`).
    pub gate: Option<EncodedDelta>,
    /// (expert index, parameters) for each expert to train.
    pub experts: Vec<(u32, EncodedDelta)>,
    /// Seed of the local shuffling.
    pub seed: u64,
    /// Optimiser settings.
    pub train: TrainSettings,
}

/// A participant's result of a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// Round.
    pub round: u64,
    /// Attempt.
    pub attempt: u32,
    /// Samples trained on (the FedAvg weight).
    pub samples: u64,
    /// Mean local training loss.
    pub mean_loss: f32,
    /// Δ W_r.
    pub gate: Option<EncodedDelta>,
    /// (expert index, Δ W_e).
    pub experts: Vec<(u32, EncodedDelta)>,
}

/// The common expert whose embeddings chose a device's experts. A bundle holds only with
/// the same model and the same preprocessing, so both are named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonExpertRef {
    /// SHA-256 of the ONNX file, 64 lower-case hex digits.
    pub sha256: String,
    /// Height and width images are resized to before embedding.
    pub input_size: [u32; 2],
}

/// Coordinator to a device that asked for [`AgentMessage::GetGate`]: what it needs to rank
/// the experts on its own unlabelled data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateOffer {
    /// Rounds folded into the global model the gate comes from.
    pub round: u64,
    /// SHA-256 of that global model's parameters.
    pub model_sha256: String,
    /// The model.
    pub model: ModelDescription,
    /// The gate W_r, always lossless: the device's ranking must be the simulator's.
    pub gate: EncodedDelta,
}

/// A device's zero-shot choice of experts, computed on the device from unlabelled data:
/// the top-K of its mean gate scores under the gate of `round`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonalizeRequest {
    /// Round of the [`GateOffer`] the scores were computed with.
    pub round: u64,
    /// The chosen experts, best first: the top-K of `scores`.
    pub experts: Vec<u32>,
    /// Mean gate probability of every expert over the device's samples (M values).
    pub scores: Vec<f32>,
    /// Samples the scores average over.
    pub samples: u64,
    /// The common expert that embedded those samples.
    pub common_expert: CommonExpertRef,
}

/// A model bundle (see `docs/bundle.md`): the bytes to store, and the SHA-256 their header
/// must carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleReply {
    /// SHA-256 of the bundle's payload, hex.
    pub sha256: String,
    /// The encoded bundle ([`crate::bundle::Bundle::encode`]).
    pub bytes: Vec<u8>,
}

/// What an infer request predicts on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InferInput {
    /// Common-expert embeddings, row-major, `dim` values per sample.
    Embeddings {
        /// Width of each row; must be the model's embedding width.
        dim: u32,
        /// The rows.
        values: Vec<f32>,
    },
    /// Raw images (u8, HWC, one shape for the batch), for a device that cannot run the
    /// common expert: the coordinator embeds them.
    Images {
        /// Rows of pixels.
        height: u32,
        /// Columns.
        width: u32,
        /// 1 (grey) or 3 (RGB).
        channels: u32,
        /// Image after image.
        pixels: Vec<u8>,
    },
}

/// Predict a batch with the given experts of the coordinator's current global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    /// The device's experts (from its personalisation), best first.
    pub experts: Vec<u32>,
    /// The batch.
    pub input: InferInput,
}

/// One sample's prediction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The class predicted by the expert the gate ranks first among the device's (the
    /// paper's rule).
    pub class: u16,
    /// That expert's global index.
    pub expert: u32,
    /// That expert's softmax probability of `class`.
    pub confidence: f32,
    /// The class of the gate-weighted mixture of the device's experts.
    pub mixture_class: u16,
    /// The mixture's probability of `mixture_class`.
    pub mixture_confidence: f32,
}

/// Predictions of one infer request, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferReply {
    /// Rounds folded into the global model that predicted.
    pub round: u64,
    /// One per sample.
    pub predictions: Vec<Prediction>,
}

/// Why the coordinator refused something. Sent to the peer; also counted in `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame could not be decoded (malformed, truncated).
    MalformedFrame,
    /// The frame's declared length exceeds the limit.
    OversizedFrame,
    /// The agent speaks another protocol version.
    VersionMismatch,
    /// Unknown device, revoked device or wrong credential (deliberately not told apart).
    Unauthenticated,
    /// A message that makes no sense in the connection's state.
    UnexpectedMessage,
    /// A delta whose shapes do not match the model.
    BadShape,
    /// A delta holding NaN or an infinity.
    NotFinite,
    /// An update or ranking for a round (or attempt) that is no longer running.
    StaleRound,
    /// A second upload for the same round.
    DuplicateUpdate,
    /// The device was not selected for this round, or not for these experts.
    NotSelected,
    /// The coordinator failed internally (its state is unchanged).
    Internal,
    /// A request names an expert the model does not have.
    UnknownExpert,
    /// An infer request holds more samples than the coordinator's limit.
    OversizedBatch,
    /// A request whose fields contradict each other (duplicate experts, experts that are
    /// not the top-K of the scores sent with them).
    InvalidRequest,
    /// The device's embeddings come from another common expert than the federation's.
    CommonExpertMismatch,
    /// The coordinator cannot serve this (no gate to personalise with, or no common
    /// expert to embed raw images with).
    Unavailable,
    /// Every compute slot stayed busy past the queue limit; try again later.
    Overloaded,
}

impl ErrorCode {
    /// Stable lower-case name, used in `status` and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::OversizedFrame => "oversized_frame",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::BadShape => "bad_shape",
            ErrorCode::NotFinite => "not_finite",
            ErrorCode::StaleRound => "stale_round",
            ErrorCode::DuplicateUpdate => "duplicate_update",
            ErrorCode::NotSelected => "not_selected",
            ErrorCode::Internal => "internal",
            ErrorCode::UnknownExpert => "unknown_expert",
            ErrorCode::OversizedBatch => "oversized_batch",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::CommonExpertMismatch => "common_expert_mismatch",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Overloaded => "overloaded",
        }
    }
}

/// An error reported to the peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct WireError {
    /// What kind of error.
    pub code: ErrorCode,
    /// Human-readable detail naming what was wrong.
    pub message: String,
}

impl WireError {
    /// An error of `code` with a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Agent to coordinator.
///
/// `Hello`, `Ranking` and `Update` travel on the connection's first stream. The service
/// requests (`GetGate`, `Personalize`, `Infer`) each open a stream of their own after the
/// `Hello`, carry one request and get one answer, so requests run concurrently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message: version and credentials. It stays the first variant, with `version`
    /// its first field, in every protocol version: see [`announced_version`].
    Hello(Hello),
    /// Answer to a [`RankRequest`].
    Ranking(Ranking),
    /// Result of a [`TrainTask`].
    Update(Update),
    /// Service: send me the current gate and model description ([`GateOffer`]).
    GetGate,
    /// Service: send me the bundle of these experts ([`BundleReply`]).
    Personalize(PersonalizeRequest),
    /// Service: predict this batch ([`InferReply`]).
    Infer(InferRequest),
}

/// Coordinator to agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    /// The device is in.
    Welcome(Welcome),
    /// Rank the experts with this gate.
    RankRequest(RankRequest),
    /// Train.
    TrainTask(TrainTask),
    /// The update for this round and attempt was committed durably.
    UpdateAccepted(UpdateId),
    /// The federation has run all its rounds; nothing more to do.
    Finished {
        /// Rounds completed.
        rounds: u64,
    },
    /// Something the agent sent was refused.
    Error(WireError),
    /// Answer to [`AgentMessage::GetGate`].
    Gate(GateOffer),
    /// Answer to [`AgentMessage::Personalize`].
    Bundle(BundleReply),
    /// Answer to [`AgentMessage::Infer`].
    Predictions(InferReply),
}

impl AgentMessage {
    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentMessage::Hello(_) => "hello",
            AgentMessage::Ranking(_) => "ranking",
            AgentMessage::Update(_) => "update",
            AgentMessage::GetGate => "get_gate",
            AgentMessage::Personalize(_) => "personalize",
            AgentMessage::Infer(_) => "infer",
        }
    }

    /// Whether this is a service request, which travels on a stream of its own.
    pub fn is_service_request(&self) -> bool {
        matches!(
            self,
            AgentMessage::GetGate | AgentMessage::Personalize(_) | AgentMessage::Infer(_)
        )
    }
}

impl CoordinatorMessage {
    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CoordinatorMessage::Welcome(_) => "welcome",
            CoordinatorMessage::RankRequest(_) => "rank_request",
            CoordinatorMessage::TrainTask(_) => "train_task",
            CoordinatorMessage::UpdateAccepted(_) => "update_accepted",
            CoordinatorMessage::Finished { .. } => "finished",
            CoordinatorMessage::Error(_) => "error",
            CoordinatorMessage::Gate(_) => "gate",
            CoordinatorMessage::Bundle(_) => "bundle",
            CoordinatorMessage::Predictions(_) => "predictions",
        }
    }
}

/// The protocol version a `Hello` frame announces, read without decoding the rest of it.
/// Fields after `version` change between versions, so an agent of another version may send
/// a `Hello` that does not decode as this version's; its version can still be named, and it
/// gets `VersionMismatch` rather than `MalformedFrame`. `None` if the payload does not start
/// like a `Hello`.
pub fn announced_version(payload: &[u8]) -> Option<u32> {
    const HELLO_VARIANT: u32 = 0;
    let (variant, rest): (u32, _) = postcard::take_from_bytes(payload).ok()?;
    if variant != HELLO_VARIANT {
        return None;
    }
    let (version, _): (u32, _) = postcard::take_from_bytes(rest).ok()?;
    Some(version)
}

#[cfg(test)]
mod version_tests {
    use super::*;

    /// Protocol 1's `Hello`, which had no `intent`.
    #[derive(Serialize)]
    enum AgentMessageV1 {
        Hello {
            version: u32,
            device: String,
            credential: String,
        },
    }

    #[test]
    fn an_older_hello_is_named_by_its_version_though_it_does_not_decode() {
        let old = postcard::to_allocvec(&AgentMessageV1::Hello {
            version: 1,
            device: "pi-0".into(),
            credential: "ddome1.00".into(),
        })
        .unwrap();
        assert!(crate::frame::decode_payload::<AgentMessage>(&old).is_err());
        assert_eq!(announced_version(&old), Some(1));
    }

    #[test]
    fn the_current_hello_announces_its_version_and_other_messages_none() {
        let hello = AgentMessage::Hello(Hello {
            version: crate::PROTOCOL_VERSION,
            device: "pi-0".into(),
            credential: "c".into(),
            intent: Intent::Serve,
        });
        let bytes = postcard::to_allocvec(&hello).unwrap();
        assert_eq!(announced_version(&bytes), Some(crate::PROTOCOL_VERSION));
        let other = postcard::to_allocvec(&AgentMessage::GetGate).unwrap();
        assert_eq!(announced_version(&other), None);
        assert_eq!(announced_version(&[]), None);
        assert_eq!(announced_version(&[0, 0xff, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
