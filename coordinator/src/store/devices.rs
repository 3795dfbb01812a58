//! The device registry: enrolment, revocation, authentication.

use ddome_protocol::message::UpdateId;
use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;

use super::{Store, now_unix_ms};
use crate::credential::{Credential, CredentialHash, DeviceName, SALT_LEN};
use crate::error::{AuthError, EnrollError, RevokeError, StoreError};

/// One enrolled device, as the registry holds it (never its credential).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceRecord {
    /// Assigned in enrolment order from 0; the simulator's device index.
    pub id: u64,
    /// The name it was enrolled under.
    pub name: String,
    /// The expert this device anchors, if it is an anchor.
    pub anchor_expert: Option<u32>,
    /// When it was enrolled, unix milliseconds.
    pub enrolled_at_ms: u64,
    /// When it was revoked, unix milliseconds; revoked devices cannot authenticate.
    pub revoked_at_ms: Option<u64>,
    /// The last time the server heard from it, unix milliseconds.
    pub last_seen_ms: Option<u64>,
    /// Updates accepted from it over its lifetime.
    pub updates_accepted: u64,
    /// Failures recorded against it over its lifetime.
    pub failures: u64,
    /// Its last accepted update; `None` before its first (or for updates accepted before
    /// the schema recorded it).
    pub last_accepted: Option<UpdateId>,
}

impl DeviceRecord {
    /// Whether the device has been revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms.is_some()
    }
}

const DEVICE_COLUMNS: &str = "id, name, anchor_expert, enrolled_at_ms, revoked_at_ms, \
                              last_seen_ms, updates_accepted, failures, \
                              last_accepted_round, last_accepted_attempt";

fn device_from_row(row: &Row<'_>) -> rusqlite::Result<DeviceRecord> {
    device_from_row_at(row, 0)
}

impl Store {
    /// Enrols a device under `name`, optionally as the anchor of `anchor_expert`, and
    /// returns its record and its credential. The credential is not stored and cannot be
    /// shown again: hand it to the device now.
    pub fn enroll(
        &mut self,
        name: &str,
        anchor_expert: Option<u32>,
    ) -> Result<(DeviceRecord, Credential), EnrollError> {
        let name = DeviceName::new(name)?;
        let credential = Credential::generate()?;
        let hash = CredentialHash::new(&credential)?;
        let tx = self.write()?;
        let name_taken = tx
            .query_row(
                "SELECT 1 FROM devices WHERE name = ?1",
                [name.as_str()],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if name_taken {
            return Err(EnrollError::DuplicateName {
                name: name.to_string(),
            });
        }
        if let Some(expert) = anchor_expert {
            let holder: Option<String> = tx
                .query_row(
                    "SELECT name FROM devices \
                     WHERE anchor_expert = ?1 AND revoked_at_ms IS NULL",
                    [expert],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(holder) = holder {
                return Err(EnrollError::AnchorTaken { expert, holder });
            }
        }
        let record = tx.query_row(
            &format!(
                "INSERT INTO devices \
                     (id, name, credential_salt, credential_hash, anchor_expert, enrolled_at_ms) \
                 VALUES ((SELECT COALESCE(MAX(id) + 1, 0) FROM devices), ?1, ?2, ?3, ?4, ?5) \
                 RETURNING {DEVICE_COLUMNS}"
            ),
            params![
                name.as_str(),
                hash.salt,
                hash.digest,
                anchor_expert,
                now_unix_ms()
            ],
            device_from_row,
        )?;
        tx.commit()?;
        Ok((record, credential))
    }

    /// Marks a device revoked. Its row stays for audit; it can no longer authenticate, and
    /// if it anchored an expert, another device may now be enrolled as that anchor.
    pub fn revoke(&mut self, name: &str) -> Result<DeviceRecord, RevokeError> {
        let tx = self.write()?;
        let device = tx
            .query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE name = ?1"),
                [name],
                device_from_row,
            )
            .optional()?
            .ok_or_else(|| RevokeError::UnknownDevice {
                name: name.to_string(),
            })?;
        if device.is_revoked() {
            return Err(RevokeError::AlreadyRevoked {
                name: name.to_string(),
            });
        }
        let record = tx.query_row(
            &format!(
                "UPDATE devices SET revoked_at_ms = ?1 WHERE id = ?2 RETURNING {DEVICE_COLUMNS}"
            ),
            params![now_unix_ms(), device.id],
            device_from_row,
        )?;
        tx.commit()?;
        Ok(record)
    }

    /// Checks `credential` (its text form) against the device `name`. The comparison runs in
    /// constant time. A wrong credential is reported as such even for a revoked device, so
    /// only the credential's holder learns of the revocation.
    pub fn authenticate(&self, name: &str, credential: &str) -> Result<DeviceRecord, AuthError> {
        let found = self
            .conn
            .query_row(
                &format!(
                    "SELECT credential_salt, credential_hash, {DEVICE_COLUMNS} \
                     FROM devices WHERE name = ?1"
                ),
                [name],
                |row| {
                    let salt: [u8; SALT_LEN] = row.get(0)?;
                    let digest: [u8; 32] = row.get(1)?;
                    Ok((CredentialHash { salt, digest }, device_from_row_at(row, 2)?))
                },
            )
            .optional()?;
        let Some((hash, device)) = found else {
            return Err(AuthError::UnknownDevice {
                name: name.to_string(),
            });
        };
        let matches = Credential::parse(credential).is_ok_and(|offered| hash.verify(&offered));
        if !matches {
            return Err(AuthError::BadCredential {
                name: name.to_string(),
            });
        }
        if device.is_revoked() {
            return Err(AuthError::Revoked {
                name: name.to_string(),
            });
        }
        Ok(device)
    }

    /// Every enrolled device, revoked ones included, in id order.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"))?;
        let devices = statement
            .query_map([], device_from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(devices)
    }

    /// The device enrolled under `name`, if any.
    pub fn device(&self, name: &str) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE name = ?1"),
                [name],
                device_from_row,
            )
            .optional()?)
    }

    /// Records that the server heard from the device at `now_ms` (unix milliseconds).
    pub fn touch_device(&mut self, device_id: u64, now_ms: u64) -> Result<(), StoreError> {
        let tx = self.write()?;
        let changed = tx.execute(
            "UPDATE devices SET last_seen_ms = ?1 WHERE id = ?2",
            params![now_ms, device_id],
        )?;
        if changed == 0 {
            return Err(StoreError::UnknownDevice { device_id });
        }
        tx.commit()?;
        Ok(())
    }
}

/// [`device_from_row`] for a row whose device columns start at `first`.
fn device_from_row_at(row: &Row<'_>, first: usize) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        id: row.get(first)?,
        name: row.get(first + 1)?,
        anchor_expert: row.get(first + 2)?,
        enrolled_at_ms: row.get(first + 3)?,
        revoked_at_ms: row.get(first + 4)?,
        last_seen_ms: row.get(first + 5)?,
        updates_accepted: row.get(first + 6)?,
        failures: row.get(first + 7)?,
        last_accepted: match (row.get(first + 8)?, row.get(first + 9)?) {
            (Some(round), Some(attempt)) => Some(UpdateId { round, attempt }),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NameError;
    use crate::store::tests::temp_store;

    #[test]
    fn ids_follow_enrolment_order_from_zero_even_past_revocations() {
        let (_dir, mut store) = temp_store();
        let (first, _) = store.enroll("a", None).unwrap();
        let (second, _) = store.enroll("b", Some(0)).unwrap();
        store.revoke("b").unwrap();
        let (third, _) = store.enroll("c", None).unwrap();
        assert_eq!((first.id, second.id, third.id), (0, 1, 2));
        let names: Vec<(u64, String)> = store
            .devices()
            .unwrap()
            .into_iter()
            .map(|device| (device.id, device.name))
            .collect();
        assert_eq!(names, [(0, "a".into()), (1, "b".into()), (2, "c".into())]);
    }

    #[test]
    fn invalid_names_are_refused_before_anything_is_written() {
        let (_dir, mut store) = temp_store();
        for (name, expected) in [
            ("", NameError::Empty),
            (&"n".repeat(65) as &str, NameError::TooLong { len: 65 }),
            (
                "has space",
                NameError::BadCharacter {
                    name: "has space".into(),
                    found: ' ',
                },
            ),
        ] {
            match store.enroll(name, None) {
                Err(EnrollError::InvalidName(found)) => assert_eq!(found, expected),
                other => panic!("{name:?}: expected an invalid name error, got {other:?}"),
            }
        }
        assert!(store.devices().unwrap().is_empty());
    }

    #[test]
    fn a_name_is_enrolled_once_even_after_revocation() {
        let (_dir, mut store) = temp_store();
        store.enroll("pi", None).unwrap();
        assert!(matches!(
            store.enroll("pi", None),
            Err(EnrollError::DuplicateName { name }) if name == "pi"
        ));
        store.revoke("pi").unwrap();
        assert!(matches!(
            store.enroll("pi", None),
            Err(EnrollError::DuplicateName { .. })
        ));
        assert_eq!(store.devices().unwrap().len(), 1);
    }

    #[test]
    fn one_live_anchor_per_expert_and_revocation_frees_the_expert() {
        let (_dir, mut store) = temp_store();
        store.enroll("anchor-3", Some(3)).unwrap();
        store.enroll("anchor-4", Some(4)).unwrap();
        match store.enroll("usurper", Some(3)) {
            Err(EnrollError::AnchorTaken { expert, holder }) => {
                assert_eq!((expert, holder.as_str()), (3, "anchor-3"));
            }
            other => panic!("expected AnchorTaken, got {other:?}"),
        }
        assert!(store.device("usurper").unwrap().is_none());
        store.revoke("anchor-3").unwrap();
        let (replacement, _) = store.enroll("replacement", Some(3)).unwrap();
        assert_eq!(replacement.anchor_expert, Some(3));
        // The revoked anchor keeps its record for audit.
        let old = store.device("anchor-3").unwrap().unwrap();
        assert_eq!(old.anchor_expert, Some(3));
        assert!(old.is_revoked());
    }

    #[test]
    fn authentication_distinguishes_unknown_bad_and_revoked() {
        let (_dir, mut store) = temp_store();
        let (pi, pi_credential) = store.enroll("pi", Some(1)).unwrap();
        let (_, other_credential) = store.enroll("jetson", None).unwrap();
        let pi_credential = pi_credential.reveal();

        assert_eq!(store.authenticate("pi", &pi_credential).unwrap(), pi);
        assert!(matches!(
            store.authenticate("nobody", &pi_credential),
            Err(AuthError::UnknownDevice { name }) if name == "nobody"
        ));
        for wrong in [
            other_credential.reveal(),
            "ddome1.00".to_string(),
            String::new(),
            pi_credential.replace("ddome1.", "ddome2."),
        ] {
            assert!(
                matches!(
                    store.authenticate("pi", &wrong),
                    Err(AuthError::BadCredential { name }) if name == "pi"
                ),
                "{wrong:?}"
            );
        }

        store.revoke("pi").unwrap();
        assert!(matches!(
            store.authenticate("pi", &pi_credential),
            Err(AuthError::Revoked { name }) if name == "pi"
        ));
        // Without the credential, a revoked device looks like any wrong guess.
        assert!(matches!(
            store.authenticate("pi", &other_credential.reveal()),
            Err(AuthError::BadCredential { .. })
        ));
    }

    #[test]
    fn revoking_unknown_or_revoked_devices_is_refused() {
        let (_dir, mut store) = temp_store();
        assert!(matches!(
            store.revoke("ghost"),
            Err(RevokeError::UnknownDevice { name }) if name == "ghost"
        ));
        store.enroll("pi", None).unwrap();
        let revoked = store.revoke("pi").unwrap();
        assert!(revoked.is_revoked());
        assert!(matches!(
            store.revoke("pi"),
            Err(RevokeError::AlreadyRevoked { name }) if name == "pi"
        ));
        // The first revocation time stands.
        assert_eq!(store.device("pi").unwrap().unwrap(), revoked);
    }

    #[test]
    fn credentials_are_not_stored_in_clear() {
        let (dir, mut store) = temp_store();
        let (_, credential) = store.enroll("pi", None).unwrap();
        let text = credential.reveal();
        let raw = hex::decode(&text["ddome1.".len()..]).unwrap();
        // Read the database and its WAL both while open and after a clean close.
        for close in [false, true] {
            if close {
                drop(std::mem::replace(
                    &mut store,
                    Store::open(&dir.path().join("state.sqlite3")).unwrap(),
                ));
            }
            let mut bytes = Vec::new();
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
            }
            assert!(bytes.len() > 4096, "the database files were read");
            let hex_part = &text.as_bytes()["ddome1.".len()..];
            for needle in [&raw[..], hex_part, &raw[..8], &hex_part[..16]] {
                assert!(
                    !bytes.windows(needle.len()).any(|window| window == needle),
                    "credential bytes found in the database files"
                );
            }
        }
        // ... and it still authenticates, so the hash is there.
        store.authenticate("pi", &text).unwrap();
    }

    #[test]
    fn touch_records_last_seen_and_refuses_unknown_ids() {
        let (_dir, mut store) = temp_store();
        let (pi, _) = store.enroll("pi", None).unwrap();
        assert_eq!(pi.last_seen_ms, None);
        store.touch_device(pi.id, 1_700_000_000_123).unwrap();
        assert_eq!(
            store.device("pi").unwrap().unwrap().last_seen_ms,
            Some(1_700_000_000_123)
        );
        assert!(matches!(
            store.touch_device(7, 1),
            Err(StoreError::UnknownDevice { device_id: 7 })
        ));
    }
}
