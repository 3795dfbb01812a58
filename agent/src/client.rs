//! A client of the coordinator's personalisation service: one authenticated QUIC connection
//! that says `Hello` with [`Intent::Serve`] (so no round ever selects it), then one stream per
//! request. Requests on one client may run concurrently.

use std::time::Duration;

use ddome_protocol::PROTOCOL_VERSION;
use ddome_protocol::message::{
    AgentMessage, BundleReply, CoordinatorMessage, GateOffer, Hello, InferReply, InferRequest,
    Intent, PersonalizeRequest, Welcome, WireError,
};
use ddome_transport::{SERVER_NAME, TransportError, read_message, within, write_message};

use crate::session::AgentConfig;

/// Why a service request failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The coordinator refused the request (or the connection) with a typed error.
    #[error("the coordinator refused: {0}")]
    Refused(WireError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] ddome_transport::EndpointError),
    /// The coordinator could not be reached.
    #[error("connecting to {addr}: {reason}")]
    Connect {
        /// The coordinator's address.
        addr: std::net::SocketAddr,
        /// Why not.
        reason: String,
    },
    /// A frame could not be sent or received, or the peer took too long.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The coordinator ended the stream without an answer.
    #[error("the coordinator closed the stream without answering")]
    NoAnswer,
    /// An answer of the wrong kind.
    #[error("expected {expected}, the coordinator sent {got}")]
    Unexpected {
        /// What the request calls for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
}

/// An authenticated service connection.
#[derive(Debug)]
pub struct ServiceClient {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    /// The first stream: kept open while the client lives, finished to say goodbye.
    control: quinn::SendStream,
    welcome: Welcome,
    max_frame: usize,
    timeout: Duration,
}

impl ServiceClient {
    /// Connects, authenticates as `config.device` and waits for the `Welcome`.
    pub async fn connect(config: &AgentConfig) -> Result<Self, ServiceError> {
        let endpoint = ddome_transport::client(&config.fingerprint)?;
        let addr = config.coordinator;
        let connect_error = |reason: String| ServiceError::Connect { addr, reason };
        let connecting = endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|e| connect_error(e.to_string()))?;
        let connection = tokio::time::timeout(config.handshake_timeout, connecting)
            .await
            .map_err(|_| connect_error(format!("no handshake in {:?}", config.handshake_timeout)))?
            .map_err(|e| connect_error(e.to_string()))?;
        let (mut control, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let hello = AgentMessage::Hello(Hello {
            version: PROTOCOL_VERSION,
            device: config.device.clone(),
            credential: config.credential.clone(),
            intent: Intent::Serve,
        });
        write_message(&mut control, &hello, config.max_frame).await?;
        let reply = within(
            config.handshake_timeout,
            read_message::<CoordinatorMessage>(&mut recv, config.max_frame),
        )
        .await?;
        let welcome = match reply {
            Some(CoordinatorMessage::Welcome(welcome)) => welcome,
            Some(CoordinatorMessage::Error(e)) => return Err(ServiceError::Refused(e)),
            Some(other) => {
                return Err(ServiceError::Unexpected {
                    expected: "welcome",
                    got: other.kind(),
                });
            }
            None => return Err(ServiceError::NoAnswer),
        };
        Ok(Self {
            endpoint,
            connection,
            control,
            welcome,
            max_frame: config.max_frame,
            timeout: config.request_timeout,
        })
    }

    /// What the coordinator said when it let this device in.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The current gate and model description.
    pub async fn gate(&self) -> Result<GateOffer, ServiceError> {
        match self.request(&AgentMessage::GetGate).await? {
            CoordinatorMessage::Gate(offer) => Ok(offer),
            other => Err(unexpected("gate", &other)),
        }
    }

    /// The bundle of the experts in `request`.
    pub async fn personalize(
        &self,
        request: PersonalizeRequest,
    ) -> Result<BundleReply, ServiceError> {
        match self.request(&AgentMessage::Personalize(request)).await? {
            CoordinatorMessage::Bundle(reply) => Ok(reply),
            other => Err(unexpected("bundle", &other)),
        }
    }

    /// Predictions of the batch in `request`, computed on the coordinator.
    pub async fn infer(&self, request: InferRequest) -> Result<InferReply, ServiceError> {
        match self.request(&AgentMessage::Infer(request)).await? {
            CoordinatorMessage::Predictions(reply) => Ok(reply),
            other => Err(unexpected("predictions", &other)),
        }
    }

    /// Sends any message on a stream of its own and returns the one answer; a typed error
    /// from the coordinator is [`ServiceError::Refused`].
    pub async fn request(
        &self,
        message: &AgentMessage,
    ) -> Result<CoordinatorMessage, ServiceError> {
        let exchange = async {
            let (mut send, mut recv) = self.connection.open_bi().await?;
            write_message(&mut send, message, self.max_frame).await?;
            // Finishing tells the coordinator no second request follows on this stream.
            let _ = send.finish();
            read_message::<CoordinatorMessage>(&mut recv, self.max_frame).await
        };
        match within(self.timeout, exchange).await? {
            Some(CoordinatorMessage::Error(e)) => Err(ServiceError::Refused(e)),
            Some(answer) => Ok(answer),
            None => Err(ServiceError::NoAnswer),
        }
    }

    /// Says goodbye and waits (briefly) for the coordinator to acknowledge it.
    pub async fn close(mut self) {
        let _ = self.control.finish();
        self.connection.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

fn unexpected(expected: &'static str, got: &CoordinatorMessage) -> ServiceError {
    ServiceError::Unexpected {
        expected,
        got: got.kind(),
    }
}
