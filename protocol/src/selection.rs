//! Choosing a round's participants (DDOME.md, "One round", step 1).

use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::seed::{Purpose, derive};

/// How many of each kind of device a round takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectionConfig {
    /// N_a: anchors per round (paper: 5 of M = 5).
    pub anchors: usize,
    /// N_c: normal devices per round (paper: 5).
    pub normals: usize,
}

/// The devices of one round, in ascending id order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// Anchor devices chosen this round.
    pub anchors: Vec<usize>,
    /// Normal devices chosen this round.
    pub normals: Vec<usize>,
}

/// A round that cannot be filled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectionError {
    /// More devices of a kind were asked for than exist.
    #[error("a round wants {wanted} {kind} devices but only {available} exist")]
    TooFew {
        /// "anchor" or "normal".
        kind: &'static str,
        /// Devices asked for.
        wanted: usize,
        /// Devices available.
        available: usize,
    },
}

/// Draws N_a of `anchors` and N_c of `normals` uniformly without replacement. The draw depends
/// only on `(seed, round)`, so the coordinator and the simulator pick the same devices.
pub fn select_participants(
    anchors: &[usize],
    normals: &[usize],
    config: SelectionConfig,
    seed: u64,
    round: u64,
) -> Result<Selection, SelectionError> {
    let mut rng = ChaCha8Rng::seed_from_u64(derive(seed, Purpose::Selection, &[round]));
    let mut pick = |pool: &[usize], wanted: usize, kind| {
        if wanted > pool.len() {
            return Err(SelectionError::TooFew {
                kind,
                wanted,
                available: pool.len(),
            });
        }
        let mut chosen: Vec<usize> = sample(&mut rng, pool.len(), wanted)
            .into_iter()
            .map(|i| pool[i])
            .collect();
        chosen.sort_unstable();
        Ok(chosen)
    };
    Ok(Selection {
        anchors: pick(anchors, config.anchors, "anchor")?,
        normals: pick(normals, config.normals, "normal")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_requested_counts_from_each_pool() {
        let anchors: Vec<usize> = (0..5).collect();
        let normals: Vec<usize> = (5..100).collect();
        let config = SelectionConfig {
            anchors: 3,
            normals: 7,
        };
        let s = select_participants(&anchors, &normals, config, 7, 3).unwrap();
        assert_eq!(s.anchors.len(), 3);
        assert_eq!(s.normals.len(), 7);
        assert!(s.anchors.iter().all(|a| anchors.contains(a)));
        assert!(s.normals.iter().all(|n| normals.contains(n)));
        assert!(
            s.normals.windows(2).all(|w| w[0] < w[1]),
            "sorted, distinct"
        );
        assert_eq!(
            s,
            select_participants(&anchors, &normals, config, 7, 3).unwrap()
        );
        assert_ne!(
            s,
            select_participants(&anchors, &normals, config, 7, 4).unwrap()
        );
    }

    #[test]
    fn too_few_devices_is_an_error() {
        let err = select_participants(
            &[0, 1],
            &[2],
            SelectionConfig {
                anchors: 3,
                normals: 1,
            },
            0,
            0,
        )
        .unwrap_err();
        assert_eq!(
            err,
            SelectionError::TooFew {
                kind: "anchor",
                wanted: 3,
                available: 2
            }
        );
    }
}
