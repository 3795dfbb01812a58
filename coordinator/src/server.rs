//! `serve`: the QUIC endpoint, one task per connection, and one federation task that owns
//! the global model and the round state machine.
//!
//! Connection tasks only authenticate and move frames; every decision about rounds is made
//! by the federation task, one event at a time, so there is no shared mutable model. An
//! update is acknowledged only after it is committed to the store; a new global model is
//! committed before the next round begins.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ddome_models::{GlobalModel, LocalUpdate, ModelSpec, aggregate_round, cpu_device, params};
use ddome_protocol::PROTOCOL_VERSION;
use ddome_protocol::codec::{DecodeError, EncodedDelta, encode};
use ddome_protocol::frame::FrameError;
use ddome_protocol::message::{
    AgentMessage, CoordinatorMessage, ErrorCode, RankRequest, TaskRole, TrainTask, Update, Welcome,
    WireError,
};
use ddome_protocol::round::{Part, Progress, Round, RoundConfig, RoundKind, Step, local_seed};
use ddome_transport::{Identity, TransportError, read_message, within, write_message};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::config::FederationConfig;
use crate::store::{DeviceRecord, Store};

/// Limit on the TLS handshake and on the agent's `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to deliver its last frames.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why `serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] ddome_transport::EndpointError),
    /// The state store failed; the coordinator stops rather than run on without durability.
    #[error("state store: {0}")]
    Store(#[from] crate::error::StoreError),
    /// The stored model does not fit the configuration.
    #[error("stored global model: {0}")]
    Model(String),
    /// The round could not be filled from the enrolled devices.
    #[error("{0}")]
    Selection(#[from] ddome_protocol::SelectionError),
}

/// What a finished `serve` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeReport {
    /// Rounds completed (the configured number).
    pub rounds_completed: u64,
    /// SHA-256 of the final global model's parameters.
    pub model_sha256: String,
}

/// Where the federation stands, published after every durable change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerProgress {
    /// Rounds in the committed global model.
    pub rounds_completed: u64,
    /// Updates committed for the round in progress.
    pub accepted_in_round: usize,
}

/// A running coordinator.
#[derive(Debug)]
pub struct ServerHandle {
    /// Where it listens.
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<ServeReport, ServeError>>,
    progress: tokio::sync::watch::Receiver<ServerProgress>,
}

impl ServerHandle {
    /// Waits until every configured round is done.
    pub async fn finished(self) -> Result<ServeReport, ServeError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Progress updates: wait on them instead of polling.
    pub fn progress(&self) -> tokio::sync::watch::Receiver<ServerProgress> {
        self.progress.clone()
    }

    /// Stops everything at once, mid-round if need be, the way a crash would (minus the
    /// process dying): nothing is flushed or closed gracefully.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Milliseconds since the Unix epoch: round deadlines are stored on this clock so they
/// survive a restart.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Opens the endpoint and runs the federation in the background.
pub async fn start(
    store: Store,
    identity: &Identity,
    config: FederationConfig,
    listen: SocketAddr,
) -> Result<ServerHandle, ServeError> {
    let endpoint = ddome_transport::server(identity, listen)?;
    let local_addr =
        endpoint
            .local_addr()
            .map_err(|source| ddome_transport::EndpointError::Bind {
                addr: listen,
                source,
            })?;
    let store = Arc::new(Mutex::new(store));
    let federation = Federation::load(Arc::clone(&store), config)?;
    let progress = federation.progress.subscribe();
    let task = tokio::spawn(run(endpoint, store, federation));
    Ok(ServerHandle {
        local_addr,
        task,
        progress,
    })
}

/// What a connection task tells the federation task.
enum Event {
    Joined {
        device: DeviceRecord,
        connection: u64,
        outbox: mpsc::UnboundedSender<Outgoing>,
    },
    Left {
        device: u64,
        connection: u64,
    },
    Message {
        device: u64,
        connection: u64,
        message: AgentMessage,
    },
}

/// What the federation task tells a connection's writer.
enum Outgoing {
    Message(CoordinatorMessage),
    /// Deliver what is queued, then close the connection.
    Close,
}

async fn run(
    endpoint: quinn::Endpoint,
    store: Arc<Mutex<Store>>,
    mut federation: Federation,
) -> Result<ServeReport, ServeError> {
    let (events_tx, mut events) = mpsc::channel::<Event>(1024);
    let mut connections = JoinSet::new();
    let max_frame = federation.config.max_frame;
    let mut next_connection = 0u64;
    let result = loop {
        if federation.is_done() {
            break Ok(federation.report());
        }
        if let Err(e) = blocking(|| federation.maybe_start_round()) {
            break Err(e);
        }
        let deadline = federation.time_to_deadline();
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break Ok(federation.report()) };
                next_connection += 1;
                connections.spawn(connection(
                    incoming,
                    next_connection,
                    Arc::clone(&store),
                    events_tx.clone(),
                    max_frame,
                ));
            }
            Some(event) = events.recv() => {
                if let Err(e) = blocking(|| federation.on_event(event)) {
                    break Err(e);
                }
            }
            _ = sleep_opt(deadline) => {
                if let Err(e) = blocking(|| federation.on_deadline()) {
                    break Err(e);
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };
    federation.say_goodbye();
    // Let writers deliver `Finished`, then close.
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    endpoint.close(0u32.into(), b"federation finished");
    result
}

/// Runs synchronous work (SQLite commits that wait for the disk, decoding, aggregation)
/// without stalling the connections' tasks: on a multi-threaded runtime the worker first
/// hands its other tasks over, so acknowledgements keep flowing and peers do not resend.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

async fn sleep_opt(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// One device connection: handshake, then frames in both directions until either side ends.
async fn connection(
    incoming: quinn::Incoming,
    id: u64,
    store: Arc<Mutex<Store>>,
    events: mpsc::Sender<Event>,
    max_frame: usize,
) {
    let Ok(Ok(conn)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await else {
        return;
    };
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await
    else {
        return;
    };
    let record_failure = |device: Option<u64>, code: ErrorCode, detail: &str| {
        let mut store = store.lock().expect("store lock is never poisoned");
        if let Err(e) = store.record_failure(device, code.name(), detail) {
            tracing::error!(error = %e, "cannot record a failure");
        }
    };

    let hello = within(
        HANDSHAKE_TIMEOUT,
        read_message::<AgentMessage>(&mut recv, max_frame),
    )
    .await;
    let device = match hello {
        Ok(Some(AgentMessage::Hello(hello))) => {
            if hello.version != PROTOCOL_VERSION {
                let e = WireError::new(
                    ErrorCode::VersionMismatch,
                    format!(
                        "agent speaks protocol {}, this coordinator {PROTOCOL_VERSION}",
                        hello.version
                    ),
                );
                record_failure(None, e.code, &format!("{}: {}", hello.device, e.message));
                refuse(&mut send, e, max_frame).await;
                close_after_flush(send, &conn).await;
                return;
            }
            let auth = blocking(|| {
                store
                    .lock()
                    .expect("store lock is never poisoned")
                    .authenticate(&hello.device, &hello.credential)
            });
            match auth {
                Ok(device) => device,
                Err(e) => {
                    // The peer learns only that it is refused, not whether the name exists.
                    record_failure(
                        None,
                        ErrorCode::Unauthenticated,
                        &format!("{:?}: {e}", hello.device),
                    );
                    refuse(
                        &mut send,
                        WireError::new(
                            ErrorCode::Unauthenticated,
                            "unknown device or bad credential",
                        ),
                        max_frame,
                    )
                    .await;
                    close_after_flush(send, &conn).await;
                    return;
                }
            }
        }
        Ok(Some(other)) => {
            let e = WireError::new(
                ErrorCode::UnexpectedMessage,
                format!("expected hello, got {}", other.kind()),
            );
            record_failure(None, e.code, &e.message);
            refuse(&mut send, e, max_frame).await;
            close_after_flush(send, &conn).await;
            return;
        }
        Ok(None) => return,
        Err(TransportError::Frame(e)) => {
            let e = frame_error(&e);
            record_failure(None, e.code, &e.message);
            refuse(&mut send, e, max_frame).await;
            close_after_flush(send, &conn).await;
            return;
        }
        Err(_) => return,
    };
    let device_id = device.id;
    let (outbox, mut queue) = mpsc::unbounded_channel();
    if events
        .send(Event::Joined {
            device,
            connection: id,
            outbox: outbox.clone(),
        })
        .await
        .is_err()
    {
        return;
    }

    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        while let Some(out) = queue.recv().await {
            match out {
                Outgoing::Message(message) => {
                    let last = matches!(message, CoordinatorMessage::Finished { .. });
                    if write_message(&mut send, &message, usize::MAX)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if last {
                        break;
                    }
                }
                Outgoing::Close => break,
            }
        }
        close_after_flush(send, &writer_conn).await;
    });

    loop {
        match read_message::<AgentMessage>(&mut recv, max_frame).await {
            Ok(Some(AgentMessage::Hello(_))) => {
                let e = WireError::new(ErrorCode::UnexpectedMessage, "second hello");
                record_failure(Some(device_id), e.code, &e.message);
                let _ = outbox.send(Outgoing::Message(CoordinatorMessage::Error(e)));
            }
            Ok(Some(message)) => {
                let event = Event::Message {
                    device: device_id,
                    connection: id,
                    message,
                };
                if events.send(event).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(TransportError::Frame(e)) => {
                // The stream is out of step after a bad frame: report it and hang up.
                let e = frame_error(&e);
                record_failure(Some(device_id), e.code, &e.message);
                let _ = outbox.send(Outgoing::Message(CoordinatorMessage::Error(e)));
                let _ = outbox.send(Outgoing::Close);
                break;
            }
            Err(_) => break,
        }
    }
    let _ = events
        .send(Event::Left {
            device: device_id,
            connection: id,
        })
        .await;
    drop(outbox);
    let _ = writer.await;
}

/// Sends a refusal on a connection that is about to close; a failure to send changes nothing.
async fn refuse(send: &mut quinn::SendStream, error: WireError, max_frame: usize) {
    let _ = write_message(send, &CoordinatorMessage::Error(error), max_frame).await;
}

fn frame_error(e: &FrameError) -> WireError {
    let code = match e {
        FrameError::Oversized { .. } => ErrorCode::OversizedFrame,
        _ => ErrorCode::MalformedFrame,
    };
    WireError::new(code, e.to_string())
}

async fn close_after_flush(mut send: quinn::SendStream, conn: &quinn::Connection) {
    let _ = send.finish();
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, send.stopped()).await;
    conn.close(0u32.into(), b"bye");
}

/// An online device.
struct Session {
    connection: u64,
    outbox: mpsc::UnboundedSender<Outgoing>,
    anchor_of: Option<usize>,
}

/// The federation task's state.
struct Federation {
    store: Arc<Mutex<Store>>,
    config: FederationConfig,
    round_config: RoundConfig,
    spec: ModelSpec,
    gate_len: usize,
    expert_len: usize,
    global: GlobalModel,
    rounds_completed: u64,
    round: Option<Round>,
    /// Decoded updates accepted in the current attempt, by device.
    pending: BTreeMap<u64, LocalUpdate>,
    sessions: HashMap<u64, Session>,
    progress: tokio::sync::watch::Sender<ServerProgress>,
}

impl Federation {
    /// Loads the latest committed model (or the seed's initial one) and resumes the round
    /// in progress with the updates already accepted for it.
    fn load(store: Arc<Mutex<Store>>, config: FederationConfig) -> Result<Self, ServeError> {
        let spec = config.spec();
        let device = cpu_device();
        let gate_len = if config.has_gate() {
            params::flatten(&spec.gate(&device)).len()
        } else {
            0
        };
        let expert_len = params::flatten(&spec.expert(&device)).len();
        let round_config = config.round_config();
        let mut federation = {
            let guard = store.lock().expect("store lock is never poisoned");
            let (rounds_completed, global) = match guard.global_model()? {
                Some(checkpoint) => {
                    let global: GlobalModel = postcard::from_bytes(&checkpoint.blob)
                        .map_err(|e| ServeError::Model(e.to_string()))?;
                    (checkpoint.rounds_completed, global)
                }
                None => (
                    0,
                    GlobalModel::initial(&spec, config.seed, config.has_gate()),
                ),
            };
            if global.gate.len() != gate_len
                || global.experts.len() != spec.experts
                || global.experts.iter().any(|e| e.len() != expert_len)
            {
                return Err(ServeError::Model(format!(
                    "it has {} experts and a gate of {} values; the config asks for {} experts \
                     and a gate of {gate_len}",
                    global.experts.len(),
                    global.gate.len(),
                    spec.experts
                )));
            }
            drop(guard);
            Self {
                store: Arc::clone(&store),
                config,
                round_config,
                spec,
                gate_len,
                expert_len,
                global,
                rounds_completed,
                round: None,
                pending: BTreeMap::new(),
                sessions: HashMap::new(),
                progress: tokio::sync::watch::Sender::new(ServerProgress::default()),
            }
        };
        federation.resume()?;
        federation.publish();
        if federation.rounds_completed == 0 && federation.store().global_model()?.is_none() {
            let blob = postcard::to_allocvec(&federation.global).expect("models encode");
            federation.store().commit_model(0, &blob)?;
        }
        Ok(federation)
    }

    fn publish(&self) {
        self.progress.send_replace(ServerProgress {
            rounds_completed: self.rounds_completed,
            accepted_in_round: self.pending.len(),
        });
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().expect("store lock is never poisoned")
    }

    fn resume(&mut self) -> Result<(), ServeError> {
        let Some(record) = self.store().current_round()? else {
            return Ok(());
        };
        if record.round != self.rounds_completed {
            return Ok(());
        }
        let devices: HashMap<u64, DeviceRecord> = self
            .store()
            .devices()?
            .into_iter()
            .map(|d| (d.id, d))
            .collect();
        let mut anchors = Vec::new();
        let mut normals = Vec::new();
        for id in &record.selected {
            match devices.get(id).and_then(|d| d.anchor_expert) {
                Some(expert) if self.config.method == RoundKind::Ddome => {
                    anchors.push((*id, expert as usize))
                }
                _ => normals.push(*id),
            }
        }
        let accepted = self.store().accepted_updates(record.round)?;
        for update in accepted {
            if update.attempt != record.attempt {
                continue;
            }
            let message: Update = postcard::from_bytes(&update.blob)
                .map_err(|e| ServeError::Model(format!("stored update: {e}")))?;
            let decoded = self
                .decode_update(&message)
                .map_err(|e| ServeError::Model(format!("stored update: {}", e.message)))?;
            self.pending.insert(update.device_id, decoded);
        }
        let uploaded: Vec<u64> = self.pending.keys().copied().collect();
        self.round = Some(Round::resume(
            record.round,
            record.attempt,
            &anchors,
            &normals,
            record.deadline_ms,
            &uploaded,
            &self.round_config,
        ));
        tracing::info!(
            round = record.round,
            attempt = record.attempt,
            accepted = uploaded.len(),
            "resuming the round in progress"
        );
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.rounds_completed >= self.config.rounds
    }

    fn report(&self) -> ServeReport {
        ServeReport {
            rounds_completed: self.rounds_completed,
            model_sha256: self.global.sha256(),
        }
    }

    fn time_to_deadline(&self) -> Option<Duration> {
        self.round
            .as_ref()
            .map(|r| Duration::from_millis(r.deadline_ms.saturating_sub(now_ms())))
    }

    fn send(&self, device: u64, message: CoordinatorMessage) {
        if let Some(session) = self.sessions.get(&device) {
            let _ = session.outbox.send(Outgoing::Message(message));
        }
    }

    fn refuse(&self, device: u64, error: WireError) {
        tracing::warn!(device, error = %error, "refused");
        if let Err(e) = self
            .store()
            .record_failure(Some(device), error.code.name(), &error.message)
        {
            tracing::error!(error = %e, "cannot record a failure");
        }
        self.send(device, CoordinatorMessage::Error(error));
    }

    fn say_goodbye(&self) {
        for session in self.sessions.values() {
            let _ = session
                .outbox
                .send(Outgoing::Message(CoordinatorMessage::Finished {
                    rounds: self.rounds_completed,
                }));
        }
    }

    /// Starts the next round when none runs and enough devices are online.
    fn maybe_start_round(&mut self) -> Result<(), ServeError> {
        if self.round.is_some() || self.is_done() {
            return Ok(());
        }
        let per_round = self.config.anchors_per_round + self.config.normals_per_round;
        if self.sessions.len() < self.config.wait_for_devices.max(per_round) {
            return Ok(());
        }
        let mut anchors: Vec<(u64, usize)> = Vec::new();
        let mut normals: Vec<u64> = Vec::new();
        for (&device, session) in &self.sessions {
            match (self.config.method, session.anchor_of) {
                (RoundKind::Ddome, Some(expert)) if expert < self.spec.experts => {
                    anchors.push((device, expert))
                }
                // An anchor of an expert the model lacks sits the round out.
                (RoundKind::Ddome, Some(_)) => {}
                // Baselines have no anchors: everyone is drawn alike.
                _ => normals.push(device),
            }
        }
        if self.config.method == RoundKind::Ddome
            && (anchors.len() < self.config.anchors_per_round
                || normals.len() < self.config.normals_per_round)
        {
            return Ok(());
        }
        anchors.sort_unstable();
        normals.sort_unstable();
        let attempt = match self.store().current_round()? {
            Some(r) if r.round == self.rounds_completed => r.attempt + 1,
            _ => 0,
        };
        let round = Round::start(
            self.rounds_completed,
            attempt,
            &anchors,
            &normals,
            &self.round_config,
            self.config.seed,
            now_ms(),
        )?;
        let selected: Vec<u64> = round.participants().map(|(d, _)| d).collect();
        self.store()
            .begin_round(round.round, round.attempt, &selected, round.deadline_ms)?;
        tracing::info!(round = round.round, attempt, ?selected, "round begins");
        self.round = Some(round);
        self.pending.clear();
        for device in selected {
            self.send_step(device);
        }
        Ok(())
    }

    fn encode_params(&self, values: &[f32]) -> EncodedDelta {
        encode(values, self.config.downlink).expect("global parameters are finite")
    }

    /// Sends `device` what the round expects from it next.
    fn send_step(&self, device: u64) {
        let Some(round) = &self.round else { return };
        let Some(step) = round.next_step(device) else {
            return;
        };
        let message = match step {
            Step::Rank => CoordinatorMessage::RankRequest(RankRequest {
                round: round.round,
                attempt: round.attempt,
                gate: self.encode_params(&self.global.gate),
            }),
            Step::Train { part, experts } => CoordinatorMessage::TrainTask(TrainTask {
                round: round.round,
                attempt: round.attempt,
                role: match (part, self.config.method) {
                    (Part::Anchor { .. }, _) => TaskRole::Anchor,
                    (Part::Normal, _) => TaskRole::Normal,
                    (Part::Fixed, RoundKind::Fedavg) => TaskRole::Single,
                    (Part::Fixed, _) => TaskRole::Mixture,
                },
                // Normal devices got the gate with their rank request; FedAvg has none.
                gate: (matches!(part, Part::Anchor { .. })
                    || (part == Part::Fixed && self.config.has_gate()))
                .then(|| self.encode_params(&self.global.gate)),
                experts: experts
                    .iter()
                    .map(|&e| (e as u32, self.encode_params(&self.global.experts[e])))
                    .collect(),
                seed: local_seed(self.config.seed, round.round, device),
                train: self.config.train_settings(),
            }),
            Step::Nothing => return,
        };
        self.send(device, message);
    }

    fn on_event(&mut self, event: Event) -> Result<(), ServeError> {
        match event {
            Event::Joined {
                device,
                connection,
                outbox,
            } => {
                let id = device.id;
                let _ = outbox.send(Outgoing::Message(CoordinatorMessage::Welcome(Welcome {
                    version: PROTOCOL_VERSION,
                    device_id: id,
                    anchor_of: device.anchor_expert,
                    model: self.config.description(),
                    uplink: self.config.codec,
                    rounds_completed: self.rounds_completed,
                })));
                if self.is_done() {
                    let _ = outbox.send(Outgoing::Message(CoordinatorMessage::Finished {
                        rounds: self.rounds_completed,
                    }));
                }
                // A newer connection replaces an older one of the same device.
                self.sessions.insert(
                    id,
                    Session {
                        connection,
                        outbox,
                        anchor_of: device.anchor_expert.map(|e| e as usize),
                    },
                );
                if let Err(e) = self.store().touch_device(id, now_ms()) {
                    tracing::warn!(error = %e, "cannot record last-seen time");
                }
                if let Some(round) = &mut self.round {
                    round.reconnected(id);
                }
                self.send_step(id);
            }
            Event::Left { device, connection } => {
                if self
                    .sessions
                    .get(&device)
                    .is_some_and(|s| s.connection == connection)
                {
                    self.sessions.remove(&device);
                }
            }
            Event::Message {
                device,
                connection,
                message,
            } => {
                if self
                    .sessions
                    .get(&device)
                    .is_none_or(|s| s.connection != connection)
                {
                    return Ok(()); // from a replaced connection
                }
                match message {
                    AgentMessage::Ranking(ranking) => {
                        let Some(round) = &mut self.round else {
                            self.refuse(device, no_round(ranking.round));
                            return Ok(());
                        };
                        match round.on_ranking(
                            device,
                            ranking.round,
                            ranking.attempt,
                            &ranking.experts,
                        ) {
                            Ok(_) => self.send_step(device),
                            Err(e) => self.refuse(device, WireError::new(e.code(), e.to_string())),
                        }
                    }
                    AgentMessage::Update(update) => self.on_update(device, update)?,
                    AgentMessage::Hello(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Checks an upload, commits it, acknowledges it, and closes the round if it was the last.
    fn on_update(&mut self, device: u64, update: Update) -> Result<(), ServeError> {
        let Some(round) = &self.round else {
            self.refuse(device, no_round(update.round));
            return Ok(());
        };
        let experts: Vec<u32> = update.experts.iter().map(|(e, _)| *e).collect();
        if let Err(e) = round.check_update(
            device,
            update.round,
            update.attempt,
            &experts,
            update.gate.is_some(),
        ) {
            self.refuse(device, WireError::new(e.code(), e.to_string()));
            return Ok(());
        }
        let decoded = match self.decode_update(&update) {
            Ok(decoded) => decoded,
            Err(e) => {
                self.refuse(device, e);
                return Ok(());
            }
        };
        let blob = postcard::to_allocvec(&update).expect("updates encode");
        let stored = self
            .store()
            .accept_update(update.round, update.attempt, device, &blob);
        match stored {
            Ok(()) => {}
            Err(crate::error::StoreError::DuplicateUpdate { round, .. }) => {
                self.refuse(
                    device,
                    WireError::new(
                        ErrorCode::DuplicateUpdate,
                        format!("an update for round {round} was already accepted"),
                    ),
                );
                return Ok(());
            }
            Err(crate::error::StoreError::StaleRound { round, current }) => {
                self.refuse(
                    device,
                    WireError::new(
                        ErrorCode::StaleRound,
                        format!("round {round} is closed; {current} rounds are complete"),
                    ),
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let round = self.round.as_mut().expect("checked above");
        round
            .mark_uploaded(device)
            .expect("check_update accepted this device");
        self.pending.insert(device, decoded);
        self.publish();
        tracing::info!(device, round = update.round, "update accepted");
        self.send(
            device,
            CoordinatorMessage::UpdateAccepted {
                round: update.round,
            },
        );
        self.check_progress()
    }

    /// Decodes and validates an update's deltas against the model.
    fn decode_update(&self, update: &Update) -> Result<LocalUpdate, WireError> {
        let decode =
            |delta: &EncodedDelta, len: usize, what: &str| -> Result<Vec<f32>, WireError> {
                // Decoding checks the length and that every value is finite.
                delta.decode(len).map_err(|e| {
                    let code = match e {
                        DecodeError::NonFinite { .. } | DecodeError::BadScale { .. } => {
                            ErrorCode::NotFinite
                        }
                        _ => ErrorCode::BadShape,
                    };
                    WireError::new(code, format!("{what}: {e}"))
                })
            };
        if update.samples == 0 {
            return Err(WireError::new(
                ErrorCode::BadShape,
                "an update with zero samples has no FedAvg weight",
            ));
        }
        let gate_delta = update
            .gate
            .as_ref()
            .map(|g| decode(g, self.gate_len, "gate"))
            .transpose()?;
        let mut expert_deltas = Vec::with_capacity(update.experts.len());
        for (expert, delta) in &update.experts {
            if *expert as usize >= self.spec.experts {
                return Err(WireError::new(
                    ErrorCode::BadShape,
                    format!("expert {expert}, the model has {}", self.spec.experts),
                ));
            }
            expert_deltas.push((
                *expert as usize,
                decode(delta, self.expert_len, &format!("expert {expert}"))?,
            ));
        }
        Ok(LocalUpdate {
            gate_delta,
            expert_deltas,
            samples: update.samples as usize,
            mean_loss: update.mean_loss,
        })
    }

    fn on_deadline(&mut self) -> Result<(), ServeError> {
        self.check_progress()
    }

    /// Aggregates a complete round, or retries a failed attempt.
    fn check_progress(&mut self) -> Result<(), ServeError> {
        let Some(round) = &self.round else {
            return Ok(());
        };
        match round.progress(now_ms()) {
            Progress::Collecting => Ok(()),
            Progress::Complete {
                uploaded,
                stragglers,
            } => {
                for &device in &stragglers {
                    if let Err(e) = self.store().record_failure(
                        Some(device),
                        "deadline_missed",
                        &format!("no update for round {} by its deadline", round.round),
                    ) {
                        tracing::error!(error = %e, "cannot record a failure");
                    }
                }
                // Ascending device order, as the simulator aggregates.
                let updates: Vec<LocalUpdate> = uploaded
                    .iter()
                    .filter_map(|d| self.pending.remove(d))
                    .collect();
                let mut next = self.global.clone();
                aggregate_round(&mut next, &updates)
                    .map_err(|e| ServeError::Model(format!("aggregation: {e}")))?;
                let done = round.round + 1;
                let blob = postcard::to_allocvec(&next).expect("models encode");
                self.store().commit_model(done, &blob)?;
                tracing::info!(
                    round = round.round,
                    updates = updates.len(),
                    ?stragglers,
                    "round complete"
                );
                self.global = next;
                self.rounds_completed = done;
                self.round = None;
                self.pending.clear();
                self.publish();
                Ok(())
            }
            Progress::Failed { uploaded, needed } => {
                let detail = format!(
                    "round {} attempt {}: {uploaded} of {needed} updates by the deadline; retrying",
                    round.round, round.attempt
                );
                tracing::warn!("{detail}");
                if let Err(e) = self.store().record_failure(None, "round_failed", &detail) {
                    tracing::error!(error = %e, "cannot record a failure");
                }
                self.round = None;
                self.pending.clear();
                self.publish();
                Ok(())
            }
        }
    }
}

fn no_round(round: u64) -> WireError {
    WireError::new(
        ErrorCode::StaleRound,
        format!("no round is running (message for round {round})"),
    )
}
