//! The agent's life on the network: connect, authenticate, answer rankings, train, upload,
//! and reconnect with backoff whenever the link drops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ddome_models::params::ParamLenError;
use ddome_models::{
    Device, ExpertKind, LocalUpdate, ModelSpec, Received, Role, TrainConfig, TrainError,
    cpu_device, mean_gate_scores, top_k, train_local,
};
use ddome_protocol::PROTOCOL_VERSION;
use ddome_protocol::codec::{CodecConfig, DecodeError, EncodeError, ErrorFeedback};
use ddome_protocol::frame::DEFAULT_MAX_FRAME;
use ddome_protocol::message::{
    AgentMessage, CoordinatorMessage, ErrorCode, Hello, Intent, ModelDescription, RankRequest,
    Ranking, TaskRole, TrainTask, Update, UpdateId, Welcome, WireError,
};
use ddome_transport::{SERVER_NAME, TransportError, read_message, within, write_message};

use crate::data::LocalData;

/// How to reach the coordinator and who this device is.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The coordinator's QUIC address.
    pub coordinator: SocketAddr,
    /// SHA-256 fingerprint of the coordinator's certificate.
    pub fingerprint: String,
    /// Enrolled device name.
    pub device: String,
    /// Credential issued at enrolment.
    pub credential: String,
    /// Largest frame accepted from the coordinator.
    pub max_frame: usize,
    /// First reconnection delay; doubles per failure up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest reconnection delay.
    pub max_backoff: Duration,
    /// Limit on connecting and on the coordinator's answer to `Hello`.
    pub handshake_timeout: Duration,
    /// Limit on one personalisation-service request, from opening its stream to the answer.
    pub request_timeout: Duration,
    /// Where local training runs (the CPU unless the binary picked a GPU).
    pub train_device: Device,
}

impl AgentConfig {
    /// Defaults for everything but where and who.
    pub fn new(coordinator: SocketAddr, fingerprint: &str, device: &str, credential: &str) -> Self {
        Self {
            coordinator,
            fingerprint: fingerprint.to_string(),
            device: device.to_string(),
            credential: credential.to_string(),
            max_frame: DEFAULT_MAX_FRAME,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            train_device: cpu_device(),
        }
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The coordinator refused this device for good (credentials, protocol version).
    #[error("the coordinator refused this device: {0}")]
    Refused(WireError),
    /// The coordinator's model does not fit this device's data.
    #[error("the coordinator's model does not fit the local data: {0}")]
    Incompatible(String),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] ddome_transport::EndpointError),
}

/// What one agent run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentSummary {
    /// Updates the coordinator accepted.
    pub updates_accepted: u64,
    /// Rankings answered.
    pub rankings: u64,
    /// Times the agent had to reconnect.
    pub reconnects: u64,
    /// UDP payload bytes sent, summed over connections (QUIC headers and TLS included).
    pub bytes_sent: u64,
    /// Of `bytes_sent`, bytes QUIC declared lost and sent again (on loopback these are
    /// spurious: acknowledgements delayed by a busy CPU).
    pub bytes_lost: u64,
    /// UDP payload bytes received.
    pub bytes_received: u64,
    /// Rounds the federation completed, as the coordinator last reported.
    pub rounds_completed: u64,
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Fatal(#[from] AgentError),
    #[error("link: {0}")]
    Link(String),
}

impl From<TransportError> for SessionError {
    fn from(e: TransportError) -> Self {
        SessionError::Link(e.to_string())
    }
}

/// A training task the coordinator sent that this agent cannot carry out.
#[derive(Debug, thiserror::Error)]
enum TaskError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Params(#[from] ParamLenError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("{0}")]
    Protocol(String),
}

/// Runs the agent until the federation finishes, or until the coordinator refuses it.
/// Link failures are retried forever with exponential backoff.
pub async fn run(config: &AgentConfig, data: &LocalData) -> Result<AgentSummary, AgentError> {
    let endpoint = ddome_transport::client(&config.fingerprint)?;
    let mut state = AgentState {
        feedback: ErrorFeedback::new(),
        unconfirmed: None,
        summary: AgentSummary::default(),
        gate: None,
    };
    let mut backoff = config.initial_backoff;
    loop {
        let mut welcomed = false;
        let outcome = session(&endpoint, config, data, &mut state, &mut welcomed).await;
        match outcome {
            Ok(()) => {
                endpoint.close(0u32.into(), b"done");
                return Ok(state.summary);
            }
            Err(SessionError::Fatal(e)) => {
                endpoint.close(1u32.into(), b"refused");
                return Err(e);
            }
            Err(SessionError::Link(why)) => {
                if welcomed {
                    backoff = config.initial_backoff;
                }
                tracing::warn!(device = %config.device, %why, ?backoff, "link lost; reconnecting");
                state.summary.reconnects += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
    }
}

/// What survives a reconnection.
struct AgentState {
    /// Residuals of lossy uplink codecs, per parameter set. Those of the last upload stay
    /// staged until the coordinator confirms it was applied (see [`AgentState::settle`]).
    feedback: ErrorFeedback<String>,
    /// The upload whose residuals are staged in `feedback`, if any.
    unconfirmed: Option<UpdateId>,
    summary: AgentSummary,
    /// The gate of the round being ranked (round, attempt, parameters).
    gate: Option<(u64, u32, Vec<f32>)>,
}

impl AgentState {
    /// Settles the staged residuals of the unconfirmed upload: kept if the coordinator
    /// applied that upload (`accepted` names it), forgotten otherwise, so the residual
    /// always equals what the coordinator has not received, whatever was lost on the way.
    fn settle(&mut self, accepted: Option<UpdateId>) {
        let Some(unconfirmed) = self.unconfirmed.take() else {
            return;
        };
        if accepted == Some(unconfirmed) {
            self.feedback.commit();
        } else {
            self.feedback.discard();
        }
    }
}

async fn session(
    endpoint: &quinn::Endpoint,
    config: &AgentConfig,
    data: &LocalData,
    state: &mut AgentState,
    welcomed: &mut bool,
) -> Result<(), SessionError> {
    let connecting = endpoint
        .connect(config.coordinator, SERVER_NAME)
        .map_err(|e| SessionError::Link(e.to_string()))?;
    let connection = tokio::time::timeout(config.handshake_timeout, connecting)
        .await
        .map_err(|_| SessionError::Link("connecting timed out".into()))?
        .map_err(|e| SessionError::Link(e.to_string()))?;
    let result = converse(&connection, config, data, state, welcomed).await;
    let stats = connection.stats();
    state.summary.bytes_sent += stats.udp_tx.bytes;
    state.summary.bytes_received += stats.udp_rx.bytes;
    state.summary.bytes_lost += stats.path.lost_bytes;
    if result.is_ok() {
        connection.close(0u32.into(), b"finished");
    }
    result
}

async fn converse(
    connection: &quinn::Connection,
    config: &AgentConfig,
    data: &LocalData,
    state: &mut AgentState,
    welcomed: &mut bool,
) -> Result<(), SessionError> {
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| SessionError::Link(e.to_string()))?;
    let max = config.max_frame;
    let hello = AgentMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        device: config.device.clone(),
        credential: config.credential.clone(),
        intent: Intent::Train,
    });
    write_message(&mut send, &hello, max).await?;
    let reply = within(
        config.handshake_timeout,
        read_message::<CoordinatorMessage>(&mut recv, max),
    )
    .await?;
    let welcome = match reply {
        Some(CoordinatorMessage::Welcome(w)) => w,
        Some(CoordinatorMessage::Error(e))
            if matches!(
                e.code,
                ErrorCode::Unauthenticated | ErrorCode::VersionMismatch
            ) =>
        {
            return Err(AgentError::Refused(e).into());
        }
        Some(other) => {
            return Err(SessionError::Link(format!(
                "expected welcome, got {}",
                other.kind()
            )));
        }
        None => return Err(SessionError::Link("coordinator closed the stream".into())),
    };
    *welcomed = true;
    let data = &data
        .aligned_to(&welcome.model.classes)
        .map_err(|e| AgentError::Incompatible(e.to_string()))?;
    let spec = model_spec(&welcome, data)?;
    state.summary.rounds_completed = welcome.rounds_completed;
    // The coordinator's durable record says whether an upload it never confirmed (the link
    // or the coordinator went down) was applied.
    state.settle(welcome.last_accepted);
    tracing::info!(device = %config.device, id = welcome.device_id, "welcomed");
    let Welcome { model, uplink, .. } = welcome;

    loop {
        let Some(message) = read_message::<CoordinatorMessage>(&mut recv, max).await? else {
            return Err(SessionError::Link("coordinator closed the stream".into()));
        };
        let reply = match message {
            CoordinatorMessage::RankRequest(request) => {
                match rank(&spec, &model, data, &request, state) {
                    Ok(ranking) => {
                        state.summary.rankings += 1;
                        Some(AgentMessage::Ranking(ranking))
                    }
                    Err(e) => {
                        tracing::error!(device = %config.device, error = %e, "cannot rank");
                        None
                    }
                }
            }
            CoordinatorMessage::TrainTask(task) => {
                // Confirmations precede the next task on this stream: an upload still
                // unconfirmed now was refused.
                state.settle(None);
                match train(&spec, data, &config.train_device, task, uplink, state).await {
                    Ok(update) => {
                        state.unconfirmed = Some(UpdateId {
                            round: update.round,
                            attempt: update.attempt,
                        });
                        Some(AgentMessage::Update(update))
                    }
                    Err(e) => {
                        tracing::error!(device = %config.device, error = %e, "cannot train");
                        None
                    }
                }
            }
            CoordinatorMessage::UpdateAccepted(accepted) => {
                state.summary.updates_accepted += 1;
                state.settle(Some(accepted));
                tracing::debug!(device = %config.device, round = accepted.round, attempt = accepted.attempt, "update accepted");
                None
            }
            CoordinatorMessage::Finished { rounds } => {
                state.summary.rounds_completed = rounds;
                send.finish().ok();
                return Ok(());
            }
            CoordinatorMessage::Error(e) => {
                tracing::warn!(device = %config.device, error = %e, "coordinator refused a message");
                if matches!(
                    e.code,
                    ErrorCode::Unauthenticated | ErrorCode::VersionMismatch
                ) {
                    return Err(AgentError::Refused(e).into());
                }
                None
            }
            CoordinatorMessage::Welcome(_) => {
                return Err(SessionError::Link("second welcome".into()));
            }
            // Service answers come on streams of their own; this session asks for none.
            other @ (CoordinatorMessage::Gate(_)
            | CoordinatorMessage::Bundle(_)
            | CoordinatorMessage::Predictions(_)) => {
                tracing::warn!(device = %config.device, kind = other.kind(), "unrequested service answer");
                None
            }
        };
        if let Some(reply) = reply {
            write_message(&mut send, &reply, max).await?;
        }
    }
}

/// The model the coordinator describes, checked against the local data.
fn model_spec(welcome: &Welcome, data: &LocalData) -> Result<ModelSpec, AgentError> {
    let m = &welcome.model;
    if m.embedding_dim as usize != data.features.dim {
        return Err(AgentError::Incompatible(format!(
            "the model takes {}-wide embeddings, the local common expert makes {}",
            m.embedding_dim, data.features.dim
        )));
    }
    if let Some(local) = &data.common_expert_sha256
        && !m.common_expert_sha256.is_empty()
        && *local != m.common_expert_sha256
    {
        return Err(AgentError::Incompatible(format!(
            "common expert {} locally, {} on the coordinator",
            &local[..12.min(local.len())],
            &m.common_expert_sha256[..12.min(m.common_expert_sha256.len())]
        )));
    }
    Ok(spec_of(m))
}

/// The shapes of the model the coordinator describes (agents train and run `head` experts).
pub(crate) fn spec_of(m: &ModelDescription) -> ModelSpec {
    ModelSpec {
        embedding_dim: m.embedding_dim as usize,
        classes: m.classes.len(),
        experts: m.experts as usize,
        gate_hidden: m.gate_hidden as usize,
        expert: ExpertKind::Head {
            hidden: m.expert_hidden as usize,
        },
        pixels: None,
    }
}

pub(crate) fn gate_len(spec: &ModelSpec) -> usize {
    ddome_models::params::flatten(&spec.gate(&cpu_device())).len()
}

fn expert_len(spec: &ModelSpec) -> usize {
    ddome_models::params::flatten(&spec.expert(&cpu_device())).len()
}

/// Top-K of the mean gate scores on the local data (DDOME.md, "One round", step 2).
fn rank(
    spec: &ModelSpec,
    model: &ModelDescription,
    data: &LocalData,
    request: &RankRequest,
    state: &mut AgentState,
) -> Result<Ranking, TaskError> {
    let gate = request.gate.decode(gate_len(spec))?;
    let scores = mean_gate_scores(spec, &gate, &data.features, &data.indices, &cpu_device())?;
    let experts = top_k(&scores, model.k as usize)
        .into_iter()
        .map(|e| e as u32)
        .collect();
    state.gate = Some((request.round, request.attempt, gate));
    Ok(Ranking {
        round: request.round,
        attempt: request.attempt,
        experts,
        samples: data.indices.len() as u64,
    })
}

/// Trains with the shared local-training code and encodes the deltas for the uplink.
async fn train(
    spec: &ModelSpec,
    data: &LocalData,
    train_device: &Device,
    task: TrainTask,
    uplink: CodecConfig,
    state: &mut AgentState,
) -> Result<Update, TaskError> {
    let gate = match task.gate {
        Some(gate) => Some(gate.decode(gate_len(spec))?),
        None if task.role == TaskRole::Single => None,
        None => match state.gate.take() {
            Some((round, attempt, gate)) if round == task.round && attempt == task.attempt => {
                Some(gate)
            }
            _ => {
                return Err(TaskError::Protocol(format!(
                    "a normal task for round {} came without a gate and none was ranked",
                    task.round
                )));
            }
        },
    };
    let expert_len = expert_len(spec);
    let mut experts = Vec::with_capacity(task.experts.len());
    for (index, params) in &task.experts {
        if *index as usize >= spec.experts {
            return Err(TaskError::Protocol(format!(
                "task names expert {index}, the model has {}",
                spec.experts
            )));
        }
        experts.push((*index as usize, params.decode(expert_len)?));
    }
    let role = match task.role {
        TaskRole::Anchor => match experts.as_slice() {
            [(expert, _)] => Role::Anchor { expert: *expert },
            _ => {
                return Err(TaskError::Protocol(format!(
                    "an anchor task must carry one expert, this one carries {}",
                    experts.len()
                )));
            }
        },
        TaskRole::Normal | TaskRole::Mixture => Role::Normal {
            experts: experts.iter().map(|(e, _)| *e).collect(),
        },
        TaskRole::Single => Role::Single,
    };
    let s = task.train;
    let train_config = TrainConfig {
        epochs: s.epochs as usize,
        batch_size: s.batch_size as usize,
        expert_lr: s.expert_lr,
        gate_lr: s.gate_lr,
        momentum: s.momentum,
        prox_mu: s.prox_mu,
        // The protocol carries the paper's joint gate training only; the switch is a
        // simulator ablation (BENCHMARKS.md, "Separating the two causes").
        normals_train_gate: true,
    };
    // Training is CPU-bound: keep it off the runtime's threads.
    let features = Arc::clone(&data.features);
    let indices = data.indices.clone();
    let spec_owned = *spec;
    let seed = task.seed;
    let train_device = train_device.clone();
    let update: LocalUpdate = tokio::task::spawn_blocking(move || {
        let expert_params: Vec<&[f32]> = experts.iter().map(|(_, p)| p.as_slice()).collect();
        train_local(
            &spec_owned,
            Received {
                gate: gate.as_deref(),
                experts: &expert_params,
            },
            &role,
            &features,
            &indices,
            &train_config,
            seed,
            &train_device.autodiff(),
        )
    })
    .await
    .map_err(|e| TaskError::Protocol(format!("training task panicked: {e}")))??;

    let gate_delta = update
        .gate_delta
        .as_deref()
        .map(|d| state.feedback.stage("gate".to_string(), d, uplink))
        .transpose()?;
    let mut expert_deltas = Vec::with_capacity(update.expert_deltas.len());
    for (expert, delta) in &update.expert_deltas {
        let encoded = state
            .feedback
            .stage(format!("expert/{expert}"), delta, uplink)?;
        expert_deltas.push((*expert as u32, encoded));
    }
    Ok(Update {
        round: task.round,
        attempt: task.attempt,
        samples: update.samples as u64,
        mean_loss: update.mean_loss,
        gate: gate_delta,
        experts: expert_deltas,
    })
}
