//! Zero-shot personalisation of a new device (DDOME.md, "Zero-shot personalised
//! inference"): fetch the gate, rank the experts on the device's own unlabelled data,
//! receive the bundle of its top-K, and check it before anything is stored.

use std::io::Write;
use std::path::Path;

use ddome_models::{cpu_device, mean_gate_scores, top_k};
use ddome_protocol::bundle::{Bundle, BundleError};
use ddome_protocol::message::{
    BundleReply, CommonExpertRef, ErrorCode, GateOffer, PersonalizeRequest,
};

use crate::client::{ServiceClient, ServiceError};
use crate::data::LocalData;
use crate::session::{AgentConfig, gate_len, spec_of};

/// How often a request made stale by a new round is retried with the new gate.
const STALE_RETRIES: usize = 3;

/// A verified bundle, ready to store.
#[derive(Debug, Clone)]
pub struct Personalized {
    /// The bundle.
    pub bundle: Bundle,
    /// Its bytes, exactly as received.
    pub bytes: Vec<u8>,
    /// Its payload's SHA-256, hex.
    pub sha256: String,
}

/// Why a bundle from the coordinator is not stored.
#[derive(Debug, thiserror::Error)]
pub enum BundleRefusal {
    /// The bundle itself is invalid: truncated, another version, its hash does not match
    /// its payload, or inconsistent shapes.
    #[error(transparent)]
    Invalid(#[from] BundleError),
    /// The payload does not hash to what the coordinator announced beside it.
    #[error(
        "the coordinator announced SHA-256 {announced}, the bundle's payload hashes to {actual}"
    )]
    AnnouncedHash {
        /// The hash in the reply.
        announced: String,
        /// The hash of the bytes received.
        actual: String,
    },
    /// The bundle is not the one asked for.
    #[error("the bundle holds {what} {found}, the request asked for {asked}")]
    NotAsked {
        /// Which field differs.
        what: &'static str,
        /// What was asked.
        asked: String,
        /// What came.
        found: String,
    },
}

/// Why personalisation failed.
#[derive(Debug, thiserror::Error)]
pub enum PersonalizeError {
    /// The service refused, or could not be reached.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The coordinator's model does not fit this device's embeddings.
    #[error("the coordinator's model does not fit the local data: {0}")]
    Incompatible(String),
    /// The gate offered could not be used.
    #[error("the coordinator's gate is unusable: {0}")]
    Gate(String),
    /// The bundle received was refused.
    #[error("refusing the coordinator's bundle: {0}")]
    Refused(#[from] BundleRefusal),
}

/// Connects as a serve-only device, personalises, and disconnects.
pub async fn personalize(
    config: &AgentConfig,
    data: &LocalData,
    common_expert: &CommonExpertRef,
) -> Result<Personalized, PersonalizeError> {
    let client = ServiceClient::connect(config).await?;
    let outcome = personalize_with(&client, data, common_expert).await;
    client.close().await;
    outcome
}

/// Personalises over an open service connection. A round that ends between fetching the
/// gate and asking for the bundle makes the request stale; it is then made again with the
/// new gate.
pub async fn personalize_with(
    client: &ServiceClient,
    data: &LocalData,
    common_expert: &CommonExpertRef,
) -> Result<Personalized, PersonalizeError> {
    let mut retries = 0;
    loop {
        let offer = client.gate().await?;
        let (data, common_expert) = (data.clone(), common_expert.clone());
        // Ranking runs the gate over every local sample: keep it off the async workers.
        let request =
            tokio::task::spawn_blocking(move || choose_experts(&offer, &data, &common_expert))
                .await
                .map_err(|e| PersonalizeError::Gate(format!("ranking failed: {e}")))??;
        match client.personalize(request.clone()).await {
            Err(ServiceError::Refused(e))
                if e.code == ErrorCode::StaleRound && retries < STALE_RETRIES =>
            {
                tracing::info!(error = %e, "the model moved on; ranking again");
                retries += 1;
            }
            reply => return Ok(verify_bundle(&reply?, &request)?),
        }
    }
}

/// The device's zero-shot choice under `offer`'s gate: the mean gate scores over its samples
/// and their top-K, with the same functions the simulator's evaluation uses.
pub fn choose_experts(
    offer: &GateOffer,
    data: &LocalData,
    common_expert: &CommonExpertRef,
) -> Result<PersonalizeRequest, PersonalizeError> {
    let spec = spec_of(&offer.model);
    if data.features.dim != spec.embedding_dim {
        return Err(PersonalizeError::Incompatible(format!(
            "the model takes {}-wide embeddings, the local common expert makes {}",
            spec.embedding_dim, data.features.dim
        )));
    }
    let pinned = &offer.model.common_expert_sha256;
    let local = data
        .common_expert_sha256
        .as_deref()
        .unwrap_or(&common_expert.sha256);
    for other in [pinned.as_str(), local] {
        if !other.is_empty() && !other.eq_ignore_ascii_case(&common_expert.sha256) {
            return Err(PersonalizeError::Incompatible(format!(
                "embeddings from common expert {}, but {other} is required",
                common_expert.sha256
            )));
        }
    }
    if data.indices.is_empty() {
        return Err(PersonalizeError::Incompatible(
            "no local samples to rank the experts with".into(),
        ));
    }
    let gate = offer
        .gate
        .decode(gate_len(&spec))
        .map_err(|e| PersonalizeError::Gate(e.to_string()))?;
    let scores = mean_gate_scores(&spec, &gate, &data.features, &data.indices, &cpu_device())
        .map_err(|e| PersonalizeError::Gate(e.to_string()))?;
    let experts = top_k(&scores, offer.model.k as usize)
        .into_iter()
        .map(|e| e as u32)
        .collect();
    Ok(PersonalizeRequest {
        round: offer.round,
        experts,
        scores,
        samples: data.indices.len() as u64,
        common_expert: common_expert.clone(),
    })
}

/// Checks a bundle before it is stored: it decodes (header, version, the payload's hash
/// against the header's, shapes), its hash is the one announced, and it holds what was asked.
pub fn verify_bundle(
    reply: &BundleReply,
    request: &PersonalizeRequest,
) -> Result<Personalized, BundleRefusal> {
    let (bundle, sha256) = Bundle::decode(&reply.bytes)?;
    if !sha256.eq_ignore_ascii_case(&reply.sha256) {
        return Err(BundleRefusal::AnnouncedHash {
            announced: reply.sha256.clone(),
            actual: sha256,
        });
    }
    let experts: Vec<u32> = bundle.experts.iter().map(|(e, _)| *e).collect();
    let differs =
        |what, asked: String, found: String| Err(BundleRefusal::NotAsked { what, asked, found });
    if experts != request.experts {
        return differs(
            "experts",
            format!("{:?}", request.experts),
            format!("{experts:?}"),
        );
    }
    if bundle.round != request.round {
        return differs("round", request.round.to_string(), bundle.round.to_string());
    }
    if bundle.scores != request.scores {
        return differs(
            "scores",
            format!("{:?}", request.scores),
            format!("{:?}", bundle.scores),
        );
    }
    if !bundle
        .common_expert
        .sha256
        .eq_ignore_ascii_case(&request.common_expert.sha256)
        || bundle.common_expert.input_size != request.common_expert.input_size
    {
        return differs(
            "common expert",
            format!("{:?}", request.common_expert),
            format!("{:?}", bundle.common_expert),
        );
    }
    Ok(Personalized {
        bundle,
        bytes: reply.bytes.clone(),
        sha256,
    })
}

/// Writes a bundle atomically: a crash leaves the old file or the new one, never half.
pub fn save_bundle(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddome_protocol::message::ModelDescription;

    fn request() -> PersonalizeRequest {
        PersonalizeRequest {
            round: 4,
            experts: vec![1, 0],
            scores: vec![0.4, 0.5, 0.1],
            samples: 30,
            common_expert: CommonExpertRef {
                sha256: "e".repeat(64),
                input_size: [64, 64],
            },
        }
    }

    fn reply(request: &PersonalizeRequest) -> BundleReply {
        let bundle = Bundle {
            device: "new-1".into(),
            model: ModelDescription {
                embedding_dim: 2,
                classes: vec!["a".into(), "b".into()],
                experts: 3,
                k: 2,
                gate_hidden: 2,
                expert_hidden: 2,
                common_expert_sha256: String::new(),
            },
            round: request.round,
            global_model_sha256: "0".repeat(64),
            common_expert: request.common_expert.clone(),
            gate: vec![0.1; 12],
            experts: request
                .experts
                .iter()
                .map(|&e| (e, vec![e as f32; 12]))
                .collect(),
            scores: request.scores.clone(),
            samples: request.samples,
        };
        let (bytes, sha256) = bundle.encode().unwrap();
        BundleReply { sha256, bytes }
    }

    #[test]
    fn a_good_bundle_is_accepted_as_received() {
        let request = request();
        let reply = reply(&request);
        let personalized = verify_bundle(&reply, &request).unwrap();
        assert_eq!(personalized.bytes, reply.bytes);
        assert_eq!(personalized.sha256, reply.sha256);
        assert_eq!(personalized.bundle.expert_indices(), [1, 0]);
    }

    #[test]
    fn a_bundle_whose_hash_does_not_match_is_refused_with_the_reason() {
        let request = request();
        let mut corrupt = reply(&request);
        let last = corrupt.bytes.len() - 1;
        corrupt.bytes[last] ^= 0xff;
        let err = verify_bundle(&corrupt, &request).unwrap_err();
        assert!(
            matches!(
                err,
                BundleRefusal::Invalid(BundleError::HashMismatch { .. })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("hash mismatch"), "{err}");

        let mut announced = reply(&request);
        announced.sha256 = "0".repeat(64);
        let err = verify_bundle(&announced, &request).unwrap_err();
        assert!(matches!(err, BundleRefusal::AnnouncedHash { .. }), "{err}");
        assert!(err.to_string().contains("announced"), "{err}");

        let mut truncated = reply(&request);
        truncated.bytes.truncate(40);
        assert!(matches!(
            verify_bundle(&truncated, &request),
            Err(BundleRefusal::Invalid(BundleError::Truncated { .. }))
        ));
    }

    #[test]
    fn a_bundle_of_other_experts_is_refused() {
        let request = request();
        let mut other = request.clone();
        other.experts = vec![1, 2];
        other.scores = vec![0.1, 0.5, 0.4];
        let err = verify_bundle(&reply(&other), &request).unwrap_err();
        assert!(
            matches!(
                err,
                BundleRefusal::NotAsked {
                    what: "experts",
                    ..
                }
            ),
            "{err}"
        );
    }
}
