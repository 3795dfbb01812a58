//! QUIC endpoints: the coordinator's server and the agent's client, TLS 1.3 only, ring as the
//! crypto provider, and agents trusting only the pinned certificate fingerprint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::tls::{Identity, fingerprint};

/// ALPN of protocol version 1; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"ddome/1";

/// A connection that stays silent this long is dead; agents send keep-alives well inside it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// UDP buffer each endpoint asks the kernel for, each way. When many agents upload at once,
/// Linux's default receive buffer (208 KiB) fills faster than the coordinator drains it, the
/// kernel drops datagrams, and QUIC resends them: measured as 15–25% extra uplink bytes with
/// 100 agents (BENCHMARKS.md). The kernel caps the request at `net.core.rmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// An endpoint that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The TLS configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Creating or binding the UDP socket failed.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A pinned fingerprint that is not 64 hex digits.
    #[error("certificate fingerprint {0:?} is not a SHA-256 hex digest (64 hex digits)")]
    BadFingerprint(String),
    /// The QUIC layer refused the TLS configuration.
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("30 s is a valid idle timeout"),
        ))
        .keep_alive_interval(Some(KEEP_ALIVE));
    Arc::new(transport)
}

/// A server endpoint bound to `addr` presenting `identity`.
pub fn server(identity: &Identity, addr: SocketAddr) -> Result<quinn::Endpoint, EndpointError> {
    let cert = CertificateDer::from(identity.cert_der.clone());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config());
    endpoint(addr, Some(config))
}

/// A client endpoint (bound to an ephemeral port) that trusts only the certificate whose
/// SHA-256 fingerprint is `pinned`.
pub fn client(pinned: &str) -> Result<quinn::Endpoint, EndpointError> {
    let pinned = pinned.trim().to_ascii_lowercase();
    if pinned.len() != 64 || !pinned.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(EndpointError::BadFingerprint(pinned));
    }
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCertificate { pinned, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    let addr: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut endpoint = endpoint(addr, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// An endpoint on a UDP socket with enlarged kernel buffers (must run inside tokio).
fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, EndpointError> {
    let bind = |source| EndpointError::Bind { addr, source };
    let socket = udp_socket(addr).map_err(bind)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime).map_err(bind)
}

/// A UDP socket bound to `addr` that asked for [`SOCKET_BUFFER_BYTES`] each way. A smaller
/// grant is not an error (the endpoint still works, it only drops more under bursts), but it
/// is logged with the setting that lifts the cap.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a refusal leaves the default size, which the check below reports.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    let granted = socket.recv_buffer_size()?;
    // Linux reports twice the usable size it granted (the rest is bookkeeping).
    if granted < SOCKET_BUFFER_BYTES {
        tracing::warn!(
            granted,
            wanted = SOCKET_BUFFER_BYTES,
            "small UDP receive buffer: bursts of uploads will be dropped and resent; \
             raise net.core.rmem_max (sysctl) to at least {SOCKET_BUFFER_BYTES}"
        );
    }
    Ok(socket.into())
}

/// Accepts exactly one certificate, named by its fingerprint, and checks the handshake
/// signatures against it: pinning replaces the CA chain, not the proof of key possession.
#[derive(Debug)]
struct PinnedCertificate {
    pinned: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Both ends are configured for TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOfferedOrEnabled,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel grants at most `net.core.rmem_max`; the socket must get what it allows.
    #[cfg(target_os = "linux")]
    #[test]
    fn udp_socket_gets_the_buffer_the_kernel_allows() {
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .expect("rmem_max is readable on Linux")
            .trim()
            .parse()
            .expect("rmem_max is a number");
        let socket = udp_socket(([127, 0, 0, 1], 0).into()).expect("binds to loopback");
        let granted = socket2::SockRef::from(&socket)
            .recv_buffer_size()
            .expect("reads SO_RCVBUF");
        assert!(
            granted >= SOCKET_BUFFER_BYTES.min(cap),
            "granted {granted} bytes, kernel cap {cap}, wanted {SOCKET_BUFFER_BYTES}"
        );
    }
}
