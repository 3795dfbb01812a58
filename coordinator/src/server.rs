//! `serve`: the QUIC endpoint, one task per connection, and one federation task that owns
//! the global model and the round state machine.
//!
//! Connection tasks only authenticate and move frames; every decision about rounds is made
//! by the federation task, one event at a time, so there is no shared mutable model. An
//! update is acknowledged only after it is committed to the store; a new global model is
//! committed before the next round begins.
//!
//! Every authenticated connection may also use the personalisation service
//! ([`crate::service`]) on streams of its own; devices that say `Hello` with
//! [`Intent::Serve`] use only the service and are never scheduled into a round. With
//! [`InferenceConfig::keep_serving`] the service outlives the last round until
//! [`ServerHandle::shutdown`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ddome_models::{GlobalModel, LocalUpdate, ModelSpec, aggregate_round, cpu_device, params};
use ddome_protocol::PROTOCOL_VERSION;
use ddome_protocol::codec::{DecodeError, EncodedDelta, encode};
use ddome_protocol::frame::{FrameError, decode_payload};
use ddome_protocol::message::{
    AgentMessage, CoordinatorMessage, ErrorCode, Intent, RankRequest, TaskRole, TrainTask, Update,
    UpdateId, Welcome, WireError, announced_version,
};
use ddome_protocol::round::{Part, Progress, Round, RoundConfig, RoundKind, Step, local_seed};
use ddome_transport::{Identity, TransportError, read_frame, read_message, within, write_message};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::config::{ConfigError, FederationConfig, InferenceConfig};
use crate::service::{Service, ServiceSetupError, ServingModel};
use crate::store::{DeviceRecord, Store};

/// Limit on the TLS handshake and on the agent's `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to deliver its last frames.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a service stream may take to deliver its request once accepted: a slow peer
/// holds one of its connection's request slots at most this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The personalisation service could not be set up.
    #[error("personalisation service: {0}")]
    Service(#[from] ServiceSetupError),
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
    stop: Shutdown,
}

/// Stops a running server from another task (a signal handler) while `finished` is awaited.
#[derive(Debug, Clone)]
pub struct Shutdown(Arc<watch::Sender<bool>>);

impl Shutdown {
    /// Asks the server to stop; see [`ServerHandle::shutdown`].
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl ServerHandle {
    /// Waits until every configured round is done (and, with `keep_serving`, until
    /// [`ServerHandle::shutdown`]).
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

    /// Asks the server to stop: the round in progress is left to resume on restart,
    /// connected devices are told the federation is finished, and `finished` returns.
    pub fn shutdown(&self) {
        self.stop.trigger();
    }

    /// A handle that stops the server from elsewhere.
    pub fn shutdown_trigger(&self) -> Shutdown {
        self.stop.clone()
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

/// Opens the endpoint and runs the federation in the background, with the personalisation
/// service's default limits.
pub async fn start(
    store: Store,
    identity: &Identity,
    config: FederationConfig,
    listen: SocketAddr,
) -> Result<ServerHandle, ServeError> {
    start_with(store, identity, config, InferenceConfig::default(), listen).await
}

/// Opens the endpoint and runs the federation and the personalisation service in the
/// background.
pub async fn start_with(
    store: Store,
    identity: &Identity,
    config: FederationConfig,
    inference: InferenceConfig,
    listen: SocketAddr,
) -> Result<ServerHandle, ServeError> {
    inference.validate()?;
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
    let keep_serving = inference.keep_serving;
    let service = Arc::new(Service::new(
        Arc::clone(&store),
        &federation.config,
        inference,
        federation.serving.subscribe(),
    )?);
    let progress = federation.progress.subscribe();
    let (stop, stop_rx) = watch::channel(false);
    let stop = Shutdown(Arc::new(stop));
    let task = tokio::spawn(run(
        endpoint,
        store,
        service,
        federation,
        keep_serving,
        stop_rx,
    ));
    Ok(ServerHandle {
        local_addr,
        task,
        progress,
        stop,
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

/// What every connection task holds.
#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    /// To the federation task.
    events: mpsc::Sender<Event>,
    service: Arc<Service>,
    /// Becomes true when the server stops.
    closing: watch::Receiver<bool>,
    max_frame: usize,
}

impl Shared {
    fn record_failure(&self, device: Option<u64>, code: ErrorCode, detail: &str) {
        let outcome = blocking(|| {
            self.store
                .lock()
                .expect("store lock is never poisoned")
                .record_failure(device, code.name(), detail)
        });
        if let Err(e) = outcome {
            tracing::error!(error = %e, "cannot record a failure");
        }
    }
}

async fn run(
    endpoint: quinn::Endpoint,
    store: Arc<Mutex<Store>>,
    service: Arc<Service>,
    mut federation: Federation,
    keep_serving: bool,
    mut stop: watch::Receiver<bool>,
) -> Result<ServeReport, ServeError> {
    let (events_tx, mut events) = mpsc::channel::<Event>(1024);
    let (closing_tx, closing) = watch::channel(false);
    let shared = Shared {
        store,
        events: events_tx,
        service,
        closing,
        max_frame: federation.config.max_frame,
    };
    let mut connections = JoinSet::new();
    let mut next_connection = 0u64;
    let mut said_goodbye = false;
    let result = loop {
        if federation.is_done() {
            if !keep_serving {
                break Ok(federation.report());
            }
            if !said_goodbye {
                federation.say_goodbye();
                said_goodbye = true;
                tracing::info!(
                    rounds = federation.rounds_completed,
                    "federation finished; serving personalisation until shut down"
                );
            }
        }
        if let Err(e) = blocking(|| federation.maybe_start_round()) {
            break Err(e);
        }
        let deadline = federation.time_to_deadline();
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break Ok(federation.report()) };
                next_connection += 1;
                connections.spawn(connection(incoming, next_connection, shared.clone()));
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
            () = stopped(&mut stop) => {
                tracing::info!("shutting down");
                break Ok(federation.report());
            }
        }
    };
    if !said_goodbye {
        federation.say_goodbye();
    }
    closing_tx.send_replace(true);
    // Let writers deliver `Finished`, then close.
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    endpoint.close(0u32.into(), b"federation finished");
    result
}

/// Resolves once the handle asked to stop. A dropped handle never stops the server: it runs
/// on, detached, as it did before it could be stopped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs synchronous work (SQLite commits that wait for the disk, decoding, aggregation)
/// without stalling the connections' tasks: on a multi-threaded runtime the worker first
/// hands its other tasks over, so acknowledgements keep flowing and peers do not resend.
pub(crate) fn blocking<T>(work: impl FnOnce() -> T) -> T {
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

/// One device connection: handshake, then the training session or the service session
/// the device asked for in its `Hello`.
async fn connection(incoming: quinn::Incoming, id: u64, shared: Shared) {
    let Ok(Ok(conn)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await else {
        return;
    };
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await
    else {
        return;
    };
    let max_frame = shared.max_frame;
    let first = within(HANDSHAKE_TIMEOUT, read_frame(&mut recv, max_frame)).await;
    // The version is read before the rest: another version's `Hello` may not decode as ours.
    let other_version = match &first {
        Ok(Some(payload)) => announced_version(payload).filter(|&v| v != PROTOCOL_VERSION),
        _ => None,
    };
    let hello = first.and_then(|payload| {
        payload
            .map(|p| decode_payload::<AgentMessage>(&p).map_err(TransportError::from))
            .transpose()
    });
    let refusal = match (other_version, hello) {
        (Some(version), _) => {
            let e = WireError::new(
                ErrorCode::VersionMismatch,
                format!("agent speaks protocol {version}, this coordinator {PROTOCOL_VERSION}"),
            );
            shared.record_failure(None, e.code, &e.message);
            e
        }
        (None, Ok(Some(AgentMessage::Hello(hello)))) => {
            let auth = blocking(|| {
                shared
                    .store
                    .lock()
                    .expect("store lock is never poisoned")
                    .authenticate(&hello.device, &hello.credential)
            });
            match auth {
                Ok(device) => {
                    match hello.intent {
                        Intent::Train => {
                            train_session(conn, id, device, send, recv, shared).await;
                        }
                        Intent::Serve => {
                            serve_session(conn, device, send, recv, shared).await;
                        }
                    }
                    return;
                }
                Err(e) => {
                    // The peer learns only that it is refused, not whether the name exists.
                    shared.record_failure(
                        None,
                        ErrorCode::Unauthenticated,
                        &format!("{:?}: {e}", hello.device),
                    );
                    WireError::new(
                        ErrorCode::Unauthenticated,
                        "unknown device or bad credential",
                    )
                }
            }
        }
        (None, Ok(Some(other))) => {
            // A service request before any `Hello` comes from a caller nobody authenticated.
            let e = if other.is_service_request() {
                WireError::new(
                    ErrorCode::Unauthenticated,
                    format!("{} before hello: authenticate first", other.kind()),
                )
            } else {
                WireError::new(
                    ErrorCode::UnexpectedMessage,
                    format!("expected hello, got {}", other.kind()),
                )
            };
            shared.record_failure(None, e.code, &e.message);
            e
        }
        (None, Ok(None)) => return,
        (None, Err(TransportError::Frame(e))) => {
            let e = frame_error(&e);
            shared.record_failure(None, e.code, &e.message);
            e
        }
        (None, Err(_)) => return,
    };
    refuse(&mut send, refusal, max_frame).await;
    close_after_flush(send, &conn).await;
}

/// A device that trains: it joins the federation, which drives the first stream; its
/// service requests are answered beside it.
async fn train_session(
    conn: quinn::Connection,
    id: u64,
    device: DeviceRecord,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: Shared,
) {
    let device_id = device.id;
    let events = shared.events.clone();
    let (outbox, mut queue) = mpsc::unbounded_channel();
    if events
        .send(Event::Joined {
            device: device.clone(),
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

    let control = async {
        loop {
            match read_message::<AgentMessage>(&mut recv, shared.max_frame).await {
                Ok(Some(AgentMessage::Hello(_))) => {
                    let e = WireError::new(ErrorCode::UnexpectedMessage, "second hello");
                    shared.record_failure(Some(device_id), e.code, &e.message);
                    let _ = outbox.send(Outgoing::Message(CoordinatorMessage::Error(e)));
                }
                Ok(Some(message)) if message.is_service_request() => {
                    let e = WireError::new(
                        ErrorCode::UnexpectedMessage,
                        format!(
                            "{} on the training stream; service requests go on streams of \
                             their own",
                            message.kind()
                        ),
                    );
                    shared.record_failure(Some(device_id), e.code, &e.message);
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
                    shared.record_failure(Some(device_id), e.code, &e.message);
                    let _ = outbox.send(Outgoing::Message(CoordinatorMessage::Error(e)));
                    let _ = outbox.send(Outgoing::Close);
                    break;
                }
                Err(_) => break,
            }
        }
    };
    tokio::select! {
        () = control => {}
        () = serve_requests(&conn, &device, &shared) => {}
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

/// A device that only uses the service: welcomed here, never told to the federation, so no
/// round can select it. The first stream stays open while the device is connected.
async fn serve_session(
    conn: quinn::Connection,
    device: DeviceRecord,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: Shared,
) {
    let welcome = CoordinatorMessage::Welcome(shared.service.welcome(&device));
    if write_message(&mut send, &welcome, usize::MAX)
        .await
        .is_err()
    {
        return;
    }
    let touched = blocking(|| {
        shared
            .store
            .lock()
            .expect("store lock is never poisoned")
            .touch_device(device.id, now_ms())
    });
    if let Err(e) = touched {
        tracing::warn!(error = %e, "cannot record last-seen time");
    }
    tracing::info!(device = %device.name, "serve-only device connected");
    let control = async {
        while let Ok(Some(message)) =
            read_message::<AgentMessage>(&mut recv, shared.max_frame).await
        {
            let e = WireError::new(
                ErrorCode::UnexpectedMessage,
                format!(
                    "{} on the first stream of a serve-only connection; service requests go \
                     on streams of their own",
                    message.kind()
                ),
            );
            shared.record_failure(Some(device.id), e.code, &e.message);
            if write_message(&mut send, &CoordinatorMessage::Error(e), usize::MAX)
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let mut closing = shared.closing.clone();
    tokio::select! {
        () = control => {}
        () = serve_requests(&conn, &device, &shared) => {}
        _ = closing.wait_for(|closing| *closing) => {}
    }
    conn.close(0u32.into(), b"bye");
}

/// Accepts the connection's service streams, at most
/// `max_requests_per_connection` in progress: further streams wait unaccepted, held back by
/// QUIC's flow control. Returns when the connection closes, abandoning what is in progress.
async fn serve_requests(conn: &quinn::Connection, device: &DeviceRecord, shared: &Shared) {
    let slots = Arc::new(Semaphore::new(shared.service.max_requests_per_connection()));
    let mut requests = JoinSet::new();
    loop {
        while requests.try_join_next().is_some() {}
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the per-connection semaphore is never closed");
        let Ok((send, recv)) = conn.accept_bi().await else {
            return;
        };
        let (shared, device) = (shared.clone(), device.clone());
        requests.spawn(async move {
            answer_stream(&shared, &device, send, recv).await;
            drop(slot);
        });
    }
}

/// One service stream: one request in, one answer (or typed error) out.
async fn answer_stream(
    shared: &Shared,
    device: &DeviceRecord,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let request = within(
        REQUEST_TIMEOUT,
        read_message::<AgentMessage>(&mut recv, shared.max_frame),
    )
    .await;
    let outcome = match request {
        Ok(Some(message)) => shared.service.answer(device, message).await,
        Ok(None) => return,
        Err(TransportError::Frame(e)) => Err(frame_error(&e)),
        Err(e) => {
            tracing::debug!(device = %device.name, error = %e, "service stream abandoned");
            return;
        }
    };
    let reply = outcome.unwrap_or_else(|error| {
        shared.service.record(Some(device.id), &error);
        CoordinatorMessage::Error(error)
    });
    if write_message(&mut send, &reply, usize::MAX).await.is_ok() {
        let _ = send.finish();
    }
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
    /// The committed global model, as the personalisation service reads it.
    serving: watch::Sender<Arc<ServingModel>>,
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
            let serving = watch::Sender::new(Arc::new(ServingModel::new(
                rounds_completed,
                global.clone(),
            )));
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
                serving,
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
                // Read now, not at login: events run in order, so an upload this device made
                // on a connection that has since dropped is already in the store.
                let last_accepted = self
                    .store()
                    .device(&device.name)?
                    .and_then(|record| record.last_accepted);
                let _ = outbox.send(Outgoing::Message(CoordinatorMessage::Welcome(Welcome {
                    version: PROTOCOL_VERSION,
                    device_id: id,
                    anchor_of: device.anchor_expert,
                    model: self.config.description(),
                    uplink: self.config.codec,
                    rounds_completed: self.rounds_completed,
                    last_accepted,
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
                    // Connection tasks answer these themselves and never forward them.
                    AgentMessage::Hello(_)
                    | AgentMessage::GetGate
                    | AgentMessage::Personalize(_)
                    | AgentMessage::Infer(_) => {}
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
            CoordinatorMessage::UpdateAccepted(UpdateId {
                round: update.round,
                attempt: update.attempt,
            }),
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
                self.serving
                    .send_replace(Arc::new(ServingModel::new(done, next.clone())));
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
