//! The personalisation service: zero-shot personalisation and inference for enrolled
//! devices, served beside the federation by the same endpoint.
//!
//! After its `Hello`, a device opens one bidirectional stream per request (`GetGate`,
//! `Personalize`, `Infer`) and gets one answer on it, so its requests run concurrently.
//! Backpressure is layered: a connection has at most
//! [`InferenceConfig::max_requests_per_connection`] streams in progress (QUIC flow control
//! holds the rest), and all connections share
//! [`InferenceConfig::compute_slots`] slots for the work itself, which runs on blocking
//! threads. A refused request is answered with a typed error on its own stream and counted
//! in `status`; nothing a device sends stops the service for anyone else.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ddome_datasets::{ImageSet, ImageShape};
use ddome_models::{
    CommonExpert, GlobalModel, Mixture, MixtureError, ModelSpec, cpu_device, top_k,
};
use ddome_protocol::PROTOCOL_VERSION;
use ddome_protocol::bundle::Bundle;
use ddome_protocol::codec::{CodecConfig, encode};
use ddome_protocol::message::{
    AgentMessage, BundleReply, CommonExpertRef, CoordinatorMessage, ErrorCode, GateOffer,
    InferInput, InferReply, InferRequest, ModelDescription, PersonalizeRequest, Prediction,
    Welcome, WireError,
};
use tokio::sync::{Semaphore, watch};

use crate::config::{FederationConfig, InferenceConfig};
use crate::server::blocking;
use crate::store::{DeviceRecord, Store};

/// Largest image side accepted from a device: far above any camera the fleet has, far below
/// what would let one request hold gigabytes.
const MAX_IMAGE_SIDE: u32 = 4096;

/// A committed global model as the service uses it. Its hash and its loaded modules are made
/// on first use, so a federation nobody asks for inference pays nothing per round.
pub(crate) struct ServingModel {
    round: u64,
    global: Arc<GlobalModel>,
    sha256: OnceLock<String>,
    mixture: OnceLock<Result<Arc<Mixture>, String>>,
}

impl ServingModel {
    /// The model that folds in `round` rounds.
    pub(crate) fn new(round: u64, global: GlobalModel) -> Self {
        Self {
            round,
            global: Arc::new(global),
            sha256: OnceLock::new(),
            mixture: OnceLock::new(),
        }
    }

    fn sha256(&self) -> &str {
        self.sha256.get_or_init(|| self.global.sha256())
    }

    /// The gate and all M experts, loaded once.
    fn mixture(&self, spec: &ModelSpec) -> Result<Arc<Mixture>, WireError> {
        self.mixture
            .get_or_init(|| {
                let experts: Vec<(usize, &[f32])> = self
                    .global
                    .experts
                    .iter()
                    .enumerate()
                    .map(|(e, w)| (e, w.as_slice()))
                    .collect();
                Mixture::load(spec, &self.global.gate, &experts, &cpu_device())
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| {
                WireError::new(
                    ErrorCode::Internal,
                    format!("the global model does not load: {e}"),
                )
            })
    }
}

/// What the service needs, shared by every connection.
pub(crate) struct Service {
    store: Arc<Mutex<Store>>,
    limits: InferenceConfig,
    description: ModelDescription,
    uplink: CodecConfig,
    spec: ModelSpec,
    has_gate: bool,
    /// The common expert every device's embeddings must come from, when one is known.
    pinned_common_expert: Option<String>,
    common_expert: Option<Arc<CommonExpert>>,
    model: watch::Receiver<Arc<ServingModel>>,
    slots: Arc<Semaphore>,
}

/// Why the service could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServiceSetupError {
    /// The configured common expert could not be loaded.
    #[error(transparent)]
    CommonExpert(#[from] ddome_models::CommonExpertError),
    /// The configured common expert is not the one the federation pins.
    #[error(
        "inference.common_expert has SHA-256 {loaded}, but model.common_expert_sha256 pins {pinned}"
    )]
    CommonExpertMismatch {
        /// The hash of the loaded file.
        loaded: String,
        /// The hash in the config.
        pinned: String,
    },
}

impl Service {
    /// The service for `config`'s federation, answering from the models `model` publishes.
    pub(crate) fn new(
        store: Arc<Mutex<Store>>,
        config: &FederationConfig,
        limits: InferenceConfig,
        model: watch::Receiver<Arc<ServingModel>>,
    ) -> Result<Self, ServiceSetupError> {
        let common_expert = match &limits.common_expert {
            Some(path) => Some(Arc::new(blocking(|| {
                CommonExpert::load(ddome_models::CommonExpertConfig::efficientnet_lite0(
                    path.clone(),
                    limits.input_side,
                ))
            })?)),
            None => None,
        };
        let configured = &config.model.common_expert_sha256;
        let pinned_common_expert = match (&common_expert, configured.is_empty()) {
            (Some(expert), false) if expert.model_sha256() != configured => {
                return Err(ServiceSetupError::CommonExpertMismatch {
                    loaded: expert.model_sha256().to_string(),
                    pinned: configured.clone(),
                });
            }
            (_, false) => Some(configured.to_ascii_lowercase()),
            (Some(expert), true) => Some(expert.model_sha256().to_string()),
            (None, true) => None,
        };
        let slots = Arc::new(Semaphore::new(limits.compute_slots()));
        Ok(Self {
            store,
            description: config.description(),
            uplink: config.codec,
            spec: config.spec(),
            has_gate: config.has_gate(),
            pinned_common_expert,
            common_expert,
            model,
            slots,
            limits,
        })
    }

    /// Requests one connection may have in progress.
    pub(crate) fn max_requests_per_connection(&self) -> usize {
        self.limits.max_requests_per_connection
    }

    /// The `Welcome` of a device that connects only for the service.
    pub(crate) fn welcome(&self, device: &DeviceRecord) -> Welcome {
        Welcome {
            version: PROTOCOL_VERSION,
            device_id: device.id,
            anchor_of: device.anchor_expert,
            model: self.description.clone(),
            uplink: self.uplink,
            rounds_completed: self.current().round,
            last_accepted: None,
        }
    }

    /// Answers one service request from `device`.
    pub(crate) async fn answer(
        self: &Arc<Self>,
        device: &DeviceRecord,
        message: AgentMessage,
    ) -> Result<CoordinatorMessage, WireError> {
        match message {
            AgentMessage::GetGate => {
                self.require_gate()?;
                let service = Arc::clone(self);
                self.compute(move || service.gate_offer())
                    .await
                    .map(CoordinatorMessage::Gate)
            }
            AgentMessage::Personalize(request) => {
                self.check_personalize(&request)?;
                let service = Arc::clone(self);
                let name = device.name.clone();
                self.compute(move || service.personalize(&name, request))
                    .await
                    .map(CoordinatorMessage::Bundle)
            }
            AgentMessage::Infer(request) => {
                self.check_infer(&request)?;
                let service = Arc::clone(self);
                self.compute(move || service.infer(request))
                    .await
                    .map(CoordinatorMessage::Predictions)
            }
            other => Err(WireError::new(
                ErrorCode::UnexpectedMessage,
                format!(
                    "{} is not a service request; it belongs on the connection's first stream",
                    other.kind()
                ),
            )),
        }
    }

    /// Records a refused request against `device` in the store, for `status`.
    pub(crate) fn record(&self, device: Option<u64>, error: &WireError) {
        tracing::warn!(?device, error = %error, "service request refused");
        let outcome = blocking(|| {
            self.store
                .lock()
                .expect("store lock is never poisoned")
                .record_failure(device, error.code.name(), &error.message)
        });
        if let Err(e) = outcome {
            tracing::error!(error = %e, "cannot record a failure");
        }
    }

    fn current(&self) -> Arc<ServingModel> {
        Arc::clone(&self.model.borrow())
    }

    /// Runs `work` on a blocking thread once a compute slot is free.
    async fn compute<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, WireError> + Send + 'static,
    ) -> Result<T, WireError> {
        let wait = Duration::from_secs_f64(self.limits.queue_timeout_secs);
        let slot = tokio::time::timeout(wait, Arc::clone(&self.slots).acquire_owned())
            .await
            .map_err(|_| {
                WireError::new(
                    ErrorCode::Overloaded,
                    format!("no compute slot came free within {wait:?}"),
                )
            })?
            .expect("the compute semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work()
        })
        .await
        .unwrap_or_else(|panic| {
            Err(WireError::new(
                ErrorCode::Internal,
                format!("the request's computation failed: {panic}"),
            ))
        })
    }

    fn require_gate(&self) -> Result<(), WireError> {
        if self.has_gate {
            Ok(())
        } else {
            Err(WireError::new(
                ErrorCode::Unavailable,
                "this federation's method has no gate, so there is nothing to personalise",
            ))
        }
    }

    fn gate_offer(&self) -> Result<GateOffer, WireError> {
        let serving = self.current();
        Ok(GateOffer {
            round: serving.round,
            model_sha256: serving.sha256().to_string(),
            model: self.description.clone(),
            gate: encode(&serving.global.gate, CodecConfig::LOSSLESS).map_err(internal)?,
        })
    }

    /// Checks the experts of a request against the model: 1 to M distinct, each in range.
    fn check_experts(&self, experts: &[u32]) -> Result<(), WireError> {
        let m = self.spec.experts;
        if experts.is_empty() || experts.len() > m {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("{} experts requested; the model has {m}", experts.len()),
            ));
        }
        if let Some(&unknown) = experts.iter().find(|&&e| e as usize >= m) {
            return Err(WireError::new(
                ErrorCode::UnknownExpert,
                format!("expert {unknown} does not exist; the model has experts 0..{m}"),
            ));
        }
        for (i, e) in experts.iter().enumerate() {
            if experts[..i].contains(e) {
                return Err(WireError::new(
                    ErrorCode::InvalidRequest,
                    format!("expert {e} is requested twice"),
                ));
            }
        }
        Ok(())
    }

    fn check_personalize(&self, request: &PersonalizeRequest) -> Result<(), WireError> {
        self.require_gate()?;
        let m = self.spec.experts;
        if request.scores.len() != m {
            return Err(WireError::new(
                ErrorCode::BadShape,
                format!("{} scores for a model of {m} experts", request.scores.len()),
            ));
        }
        if let Some(i) = request.scores.iter().position(|s| !s.is_finite()) {
            return Err(WireError::new(
                ErrorCode::NotFinite,
                format!("score {i} is not finite"),
            ));
        }
        self.check_experts(&request.experts)?;
        if request.samples == 0 {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                "scores over zero samples choose nothing",
            ));
        }
        // The zero-shot rule: the experts are the top-K of the scores, so a bundle always
        // carries the evidence for its choice.
        let top: Vec<u32> = top_k(&request.scores, request.experts.len())
            .into_iter()
            .map(|e| e as u32)
            .collect();
        if top != request.experts {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "experts {:?} are not the top-{} of the scores sent, which are {top:?}",
                    request.experts,
                    request.experts.len()
                ),
            ));
        }
        let sha = &request.common_expert.sha256;
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("common expert hash {sha:?} is not 64 hex digits"),
            ));
        }
        if let Some(pinned) = &self.pinned_common_expert
            && !sha.eq_ignore_ascii_case(pinned)
        {
            return Err(WireError::new(
                ErrorCode::CommonExpertMismatch,
                format!("embeddings from common expert {sha}; this federation uses {pinned}"),
            ));
        }
        Ok(())
    }

    /// The global model of `round`: the current one, or an older checkpoint still kept.
    fn model_at(&self, round: u64) -> Result<Arc<ServingModel>, WireError> {
        let current = self.current();
        if current.round == round {
            return Ok(current);
        }
        let checkpoint = self
            .store
            .lock()
            .expect("store lock is never poisoned")
            .model_at(round)
            .map_err(internal)?;
        let Some(checkpoint) = checkpoint else {
            return Err(WireError::new(
                ErrorCode::StaleRound,
                format!(
                    "the gate of round {round} is no longer kept (the model is at round {}); \
                     fetch the gate again",
                    current.round
                ),
            ));
        };
        let global: GlobalModel = postcard::from_bytes(&checkpoint.blob).map_err(internal)?;
        Ok(Arc::new(ServingModel::new(round, global)))
    }

    fn personalize(
        &self,
        device: &str,
        request: PersonalizeRequest,
    ) -> Result<BundleReply, WireError> {
        let serving = self.model_at(request.round)?;
        let global = &serving.global;
        let PersonalizeRequest {
            round,
            experts,
            scores,
            samples,
            common_expert,
        } = request;
        let bundle = Bundle {
            device: device.to_string(),
            model: self.description.clone(),
            round,
            global_model_sha256: serving.sha256().to_string(),
            common_expert: CommonExpertRef {
                sha256: common_expert.sha256.to_ascii_lowercase(),
                input_size: common_expert.input_size,
            },
            gate: global.gate.clone(),
            experts: experts
                .iter()
                .map(|&e| (e, global.experts[e as usize].clone()))
                .collect(),
            scores,
            samples,
        };
        let (bytes, sha256) = bundle.encode().map_err(internal)?;
        tracing::info!(device, round, ?experts, %sha256, "bundle issued");
        Ok(BundleReply { sha256, bytes })
    }

    fn check_infer(&self, request: &InferRequest) -> Result<(), WireError> {
        self.require_gate()?;
        self.check_experts(&request.experts)?;
        let rows = match &request.input {
            InferInput::Embeddings { dim, values } => {
                let expected = self.spec.embedding_dim;
                if *dim as usize != expected {
                    return Err(WireError::new(
                        ErrorCode::BadShape,
                        format!("embeddings {dim} wide; the model takes {expected}"),
                    ));
                }
                if !values.len().is_multiple_of(expected) {
                    return Err(WireError::new(
                        ErrorCode::BadShape,
                        format!("{} values are not whole rows of {expected}", values.len()),
                    ));
                }
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(WireError::new(
                        ErrorCode::NotFinite,
                        format!("embedding value {i} is not finite"),
                    ));
                }
                values.len() / expected
            }
            InferInput::Images {
                height,
                width,
                channels,
                pixels,
            } => {
                if self.common_expert.is_none() {
                    return Err(WireError::new(
                        ErrorCode::Unavailable,
                        "this coordinator has no common expert to embed images with; send \
                         embeddings",
                    ));
                }
                if !matches!(channels, 1 | 3)
                    || !(1..=MAX_IMAGE_SIDE).contains(height)
                    || !(1..=MAX_IMAGE_SIDE).contains(width)
                {
                    return Err(WireError::new(
                        ErrorCode::BadShape,
                        format!(
                            "images of {height}x{width}x{channels}; sides 1 to \
                             {MAX_IMAGE_SIDE}, 1 or 3 channels"
                        ),
                    ));
                }
                let per_image = (*height as usize) * (*width as usize) * (*channels as usize);
                if !pixels.len().is_multiple_of(per_image) {
                    return Err(WireError::new(
                        ErrorCode::BadShape,
                        format!(
                            "{} bytes are not whole {height}x{width}x{channels} images",
                            pixels.len()
                        ),
                    ));
                }
                pixels.len() / per_image
            }
        };
        if rows > self.limits.max_batch {
            return Err(WireError::new(
                ErrorCode::OversizedBatch,
                format!(
                    "{rows} samples in one request; the limit is {}",
                    self.limits.max_batch
                ),
            ));
        }
        Ok(())
    }

    fn infer(&self, request: InferRequest) -> Result<InferReply, WireError> {
        let serving = self.current();
        let mixture = serving.mixture(&self.spec)?;
        let embeddings = match request.input {
            InferInput::Embeddings { values, .. } => values,
            InferInput::Images {
                height,
                width,
                channels,
                pixels,
            } => self.embed(
                ImageShape::new(height as usize, width as usize, channels as usize),
                pixels,
            )?,
        };
        let selected: Vec<usize> = request.experts.iter().map(|&e| e as usize).collect();
        let predictions = mixture
            .predict(&selected, &embeddings)
            .map_err(mixture_error)?;
        Ok(InferReply {
            round: serving.round,
            predictions: (0..predictions.len())
                .map(|i| Prediction {
                    class: predictions.by_top_expert[i],
                    expert: predictions.top_expert[i] as u32,
                    confidence: predictions.confidence[i],
                    mixture_class: predictions.by_mixture[i],
                    mixture_confidence: predictions.mixture_confidence[i],
                })
                .collect(),
        })
    }

    /// Embeds raw images with the coordinator's common expert.
    fn embed(&self, shape: ImageShape, pixels: Vec<u8>) -> Result<Vec<f32>, WireError> {
        let expert = self
            .common_expert
            .as_ref()
            .expect("check_infer refuses images without a common expert");
        let count = pixels.len() / shape.size();
        let images = ImageSet {
            images: pixels,
            labels: vec![0; count],
            shape,
            classes: Vec::new(),
        };
        expert.embed(&images).map_err(|e| match e {
            ddome_models::CommonExpertError::Input { .. } => {
                WireError::new(ErrorCode::BadShape, e.to_string())
            }
            other => internal(other),
        })
    }
}

fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Internal, e.to_string())
}

fn mixture_error(e: MixtureError) -> WireError {
    let code = match e {
        MixtureError::UnknownExpert { .. } => ErrorCode::UnknownExpert,
        MixtureError::DuplicateExpert(_) | MixtureError::NoExperts => ErrorCode::InvalidRequest,
        MixtureError::Width { .. } => ErrorCode::BadShape,
        MixtureError::Params(_) | MixtureError::NeedsPixels => ErrorCode::Internal,
    };
    WireError::new(code, e.to_string())
}
