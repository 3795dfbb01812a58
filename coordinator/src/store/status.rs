//! A snapshot of the whole state for the admin: `ddome-coordinator status`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::Store;
use super::devices::DeviceRecord;
use super::federation::FailureRecord;
use crate::error::StoreError;

/// Failures listed in [`Status::recent_failures`].
const RECENT_FAILURES: u64 = 20;

/// Everything an admin asks about, read in one transaction so the parts agree.
/// `Display` renders it as tables; serialise it for JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// Rounds folded into the newest global model (0 before any model).
    pub rounds_completed: u64,
    /// `rounds_completed` of each checkpoint kept, newest first; empty before any model.
    pub checkpoints: Vec<u64>,
    /// The round attempt in progress, if one has begun.
    pub round_in_progress: Option<RoundStatus>,
    /// Every device, revoked ones included, by id.
    pub devices: Vec<DeviceRecord>,
    /// Failures ever recorded, by kind.
    pub failure_counts: BTreeMap<String, u64>,
    /// The latest 20 failures, newest first.
    pub recent_failures: Vec<FailureRecord>,
}

/// The round attempt in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoundStatus {
    /// The round number.
    pub round: u64,
    /// The attempt, from 0.
    pub attempt: u32,
    /// Device ids selected for this attempt, ascending.
    pub selected: Vec<u64>,
    /// Updates accepted for this round so far (from any attempt).
    pub updates_accepted: u64,
    /// When the attempt stops taking updates, unix milliseconds.
    pub deadline_ms: u64,
}

impl Store {
    /// A consistent snapshot of rounds, devices and failures.
    pub fn status(&self) -> Result<Status, StoreError> {
        // One read transaction: a concurrent writer cannot land between the queries.
        let snapshot = self.conn.unchecked_transaction()?;
        let round_in_progress = match self.current_round()? {
            Some(round) => Some(RoundStatus {
                updates_accepted: self.count_updates(round.round)?,
                round: round.round,
                attempt: round.attempt,
                selected: round.selected,
                deadline_ms: round.deadline_ms,
            }),
            None => None,
        };
        let status = Status {
            rounds_completed: self.rounds_completed()?,
            checkpoints: self.checkpoints()?,
            round_in_progress,
            devices: self.devices()?,
            failure_counts: self.failure_counts()?,
            recent_failures: self.recent_failures(RECENT_FAILURES)?,
        };
        snapshot.finish()?;
        Ok(status)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.checkpoints.is_empty() {
            writeln!(f, "global model:      none committed yet")?;
        } else {
            let kept: Vec<String> = self.checkpoints.iter().map(u64::to_string).collect();
            writeln!(
                f,
                "rounds completed:  {} (checkpoints kept: {})",
                self.rounds_completed,
                kept.join(", ")
            )?;
        }
        match &self.round_in_progress {
            Some(round) => writeln!(
                f,
                "round in progress: {} attempt {}: {} of {} selected updates in, deadline {}\n\
                 \x20 selected devices: {}",
                round.round,
                round.attempt,
                round.updates_accepted,
                round.selected.len(),
                utc(round.deadline_ms),
                id_list(&round.selected),
            )?,
            None => writeln!(f, "round in progress: none")?,
        }

        writeln!(f, "\ndevices ({}):", self.devices.len())?;
        if !self.devices.is_empty() {
            let name_width = self
                .devices
                .iter()
                .map(|device| device.name.len())
                .max()
                .unwrap_or(0)
                .max("NAME".len());
            writeln!(
                f,
                "  {:>4}  {:<name_width$}  {:>6}  {:<7}  {:<20}  {:>7}  {:>8}",
                "ID", "NAME", "ANCHOR", "STATE", "LAST SEEN (UTC)", "UPDATES", "FAILURES"
            )?;
            for device in &self.devices {
                let anchor = device
                    .anchor_expert
                    .map_or_else(|| "-".to_string(), |expert| expert.to_string());
                let state = if device.is_revoked() {
                    "revoked"
                } else {
                    "active"
                };
                let last_seen = device.last_seen_ms.map_or_else(|| "never".to_string(), utc);
                writeln!(
                    f,
                    "  {:>4}  {:<name_width$}  {:>6}  {:<7}  {:<20}  {:>7}  {:>8}",
                    device.id,
                    device.name,
                    anchor,
                    state,
                    last_seen,
                    device.updates_accepted,
                    device.failures
                )?;
            }
        }

        if self.failure_counts.is_empty() {
            writeln!(f, "\nfailures: none")?;
        } else {
            let counts: Vec<String> = self
                .failure_counts
                .iter()
                .map(|(kind, count)| format!("{kind} {count}"))
                .collect();
            writeln!(f, "\nfailures by kind: {}", counts.join(", "))?;
            writeln!(f, "recent failures (newest first):")?;
            for failure in &self.recent_failures {
                let device = failure
                    .device_id
                    .map_or_else(|| "-".to_string(), |id| format!("device {id}"));
                writeln!(
                    f,
                    "  {}  {}  {}: {}",
                    utc(failure.at_ms),
                    device,
                    failure.kind,
                    failure.detail.escape_debug()
                )?;
            }
        }
        Ok(())
    }
}

fn id_list(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "none".to_string();
    }
    ids.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` (UTC), without a date library.
fn utc(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000;
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) date: Howard Hinnant's `civil_from_days`
/// for the proleptic Gregorian calendar, restricted to dates from 1970.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March = 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::store_with_devices;

    #[test]
    fn status_gathers_rounds_devices_and_failures() {
        let (_dir, mut store) = store_with_devices(3);
        store.enroll("anchor", Some(0)).unwrap();
        store.revoke("device-2").unwrap();
        store.commit_model(0, b"initial").unwrap();
        store.commit_model(1, b"one").unwrap();
        store
            .begin_round(1, 2, &[0, 1, 3], 1_700_000_000_000)
            .unwrap();
        store.accept_update(1, 2, 3, b"u").unwrap();
        store.touch_device(3, 1_700_000_000_500).unwrap();
        for i in 0..25 {
            store
                .record_failure(Some(1), "bad_frame", &format!("#{i}"))
                .unwrap();
        }

        let status = store.status().unwrap();
        assert_eq!(status.rounds_completed, 1);
        assert_eq!(status.checkpoints, [1, 0]);
        assert_eq!(
            status.round_in_progress,
            Some(RoundStatus {
                round: 1,
                attempt: 2,
                selected: vec![0, 1, 3],
                updates_accepted: 1,
                deadline_ms: 1_700_000_000_000,
            })
        );
        assert_eq!(status.devices.len(), 4);
        assert!(status.devices[2].is_revoked());
        assert_eq!(status.devices[3].anchor_expert, Some(0));
        assert_eq!(status.devices[3].last_seen_ms, Some(1_700_000_000_500));
        assert_eq!(status.devices[3].updates_accepted, 1);
        assert_eq!(status.devices[1].failures, 25);
        assert_eq!(status.failure_counts["bad_frame"], 25);
        assert_eq!(status.recent_failures.len(), 20);
        assert_eq!(status.recent_failures[0].detail, "#24");

        let table = status.to_string();
        for expected in [
            "rounds completed:  1 (checkpoints kept: 1, 0)",
            "round in progress: 1 attempt 2: 1 of 3 selected updates in, deadline 2023-11-14 22:13:20",
            "anchor",
            "revoked",
            "bad_frame 25",
            "#24",
        ] {
            assert!(
                table.contains(expected),
                "{expected:?} missing from\n{table}"
            );
        }
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json["round_in_progress"]["selected"],
            serde_json::json!([0, 1, 3])
        );
        assert_eq!(json["devices"][3]["name"], "anchor");
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        // 2000-02-29 23:59:59 UTC: a leap day in a century leap year.
        assert_eq!(utc(951_868_799_000), "2000-02-29 23:59:59");
        // 2024-12-31 12:34:56.789 UTC.
        assert_eq!(utc(1_735_648_496_789), "2024-12-31 12:34:56");
        assert_eq!(utc(1_709_251_200_000), "2024-03-01 00:00:00");
    }
}
