//! Durability under SIGKILL: a child process commits updates and models as fast as it can
//! and reports each commit on stdout; it is killed at an arbitrary moment, and everything it
//! reported must be in the database when it is reopened.
//!
//! The child is this test binary itself, re-run with [`CHILD_DIR_VAR`] set so that only
//! [`helper_sigkill_child`] runs, which keeps the writer out of the shipped binary.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use ddome_coordinator::{StateDir, StoreError};

/// Set (to the state directory) in the child's environment only.
const CHILD_DIR_VAR: &str = "DDOME_SIGKILL_CHILD_STATE_DIR";
/// Marks the child's commit reports among libtest's own output.
const REPORT: &str = "COMMITTED";
const DEVICES: u64 = 12;
/// How long to wait for any one line from the child before declaring it hung.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);

/// Payloads large enough (many pages) that a kill often lands inside a commit.
fn update_blob(round: u64, device_id: u64) -> Vec<u8> {
    let seed = round * 1_000 + device_id;
    (0..48 * 1024u64)
        .map(|i| (seed.wrapping_mul(31) ^ i) as u8)
        .collect()
}

fn model_blob(rounds_completed: u64) -> Vec<u8> {
    (0..160 * 1024u64)
        .map(|i| (rounds_completed.wrapping_mul(131) ^ (i >> 3)) as u8)
        .collect()
}

/// Not a test on its own: the body of the child process that
/// [`reported_commits_survive_sigkill`] spawns. Without [`CHILD_DIR_VAR`] it returns at
/// once. It resumes from whatever state it finds, like a restarted coordinator.
#[test]
fn helper_sigkill_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    let mut state = StateDir::open(Path::new(&dir)).expect("the parent initialised the state");
    let store = state.store_mut();
    let devices: Vec<u64> = (0..DEVICES).collect();
    let mut out = std::io::stdout().lock();
    // Runs until killed; the bound only stops a forgotten child eventually.
    for _ in 0..100_000 {
        let round = store.rounds_completed().unwrap();
        if store
            .current_round()
            .unwrap()
            .is_none_or(|r| r.round != round)
        {
            store
                .begin_round(round, 0, &devices, u64::MAX >> 2)
                .unwrap();
        }
        for &device_id in &devices {
            match store.accept_update(round, 0, device_id, &update_blob(round, device_id)) {
                Ok(()) => writeln!(out, "{REPORT} update {round} {device_id}").unwrap(),
                // Committed before the previous kill: already reported then.
                Err(StoreError::DuplicateUpdate { .. }) => {}
                Err(err) => panic!("accepting an update: {err}"),
            }
            out.flush().unwrap();
        }
        store
            .commit_model(round + 1, &model_blob(round + 1))
            .unwrap();
        writeln!(out, "{REPORT} model {}", round + 1).unwrap();
        out.flush().unwrap();
    }
}

/// What a child reported as committed.
#[derive(Default)]
struct Reported {
    updates: BTreeSet<(u64, u64)>,
    newest_model: Option<u64>,
}

impl Reported {
    fn take(&mut self, line: &str) -> bool {
        let Some(report) = line.split_once(REPORT).map(|(_, rest)| rest) else {
            return false;
        };
        let fields: Vec<&str> = report.split_whitespace().collect();
        let number = |i: usize| -> u64 { fields[i].parse().expect("a number in a report") };
        match fields[0] {
            "update" => {
                self.updates.insert((number(1), number(2)));
            }
            "model" => self.newest_model = Some(number(1)),
            other => panic!("unknown report {other:?}"),
        }
        true
    }
}

/// Reads lines from the child on a thread, so that a hung child fails the test instead of
/// blocking it.
fn line_channel(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

#[test]
fn reported_commits_survive_sigkill() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("state");
    let mut state = StateDir::init(&dir).unwrap();
    for i in 0..DEVICES {
        state
            .store_mut()
            .enroll(&format!("device-{i}"), None)
            .unwrap();
    }
    drop(state);

    let mut reported = Reported::default();
    let clock = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    for kill in 0..4 {
        // Kill after an arbitrary number of reports, different on every run.
        let reports_before_kill = 3 + (clock / 7 + kill * 13) % 40;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash::helper_sigkill_child", "--nocapture"])
            .arg("--test-threads=1")
            .env(CHILD_DIR_VAR, &dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the test binary can re-run itself");
        let lines = line_channel(child.stdout.take().unwrap());
        let mut seen = 0;
        while seen < reports_before_kill {
            let line = lines
                .recv_timeout(LINE_TIMEOUT)
                .expect("the child keeps reporting commits");
            if reported.take(&line) {
                seen += 1;
            }
        }
        child.kill().unwrap(); // SIGKILL on unix: no destructor, no flush, no close
        let exit = child.wait().unwrap();
        assert!(!exit.success(), "the child was killed, not finished");
        // Lines already in the pipe were printed after their commit: they count too.
        while let Ok(line) = lines.recv_timeout(LINE_TIMEOUT) {
            reported.take(&line);
        }

        assert_integrity(&dir.join(StateDir::DATABASE_FILE));
        let state = StateDir::open(&dir).expect("the state opens cleanly after SIGKILL");
        let store = state.store();
        let model = store.global_model().unwrap();
        let rounds_completed = model.as_ref().map_or(0, |m| m.rounds_completed);
        if let Some(newest) = reported.newest_model {
            assert!(rounds_completed >= newest, "reported model {newest} lost");
        }
        if let Some(model) = model {
            assert_eq!(model.blob, model_blob(model.rounds_completed));
        }
        let mut open_round_updates_checked = 0;
        for &(round, device_id) in &reported.updates {
            if round < rounds_completed {
                continue; // folded into the model, as designed
            }
            open_round_updates_checked += 1;
            let updates = store.accepted_updates(round).unwrap();
            let update = updates
                .iter()
                .find(|update| update.device_id == device_id)
                .unwrap_or_else(|| panic!("reported update ({round}, {device_id}) lost"));
            assert_eq!(update.blob, update_blob(round, device_id));
        }
        eprintln!(
            "kill {kill}: {} updates reported in all, {rounds_completed} rounds committed, \
             {open_round_updates_checked} unfolded updates found intact",
            reported.updates.len()
        );
        // Nothing half-written either: every update present is whole.
        for update in store.accepted_updates(rounds_completed).unwrap() {
            assert_eq!(update.blob, update_blob(rounds_completed, update.device_id));
        }
    }
    assert!(
        reported.newest_model.is_some(),
        "the children got past round 0"
    );
}

/// SQLite's own consistency check over every page and index.
fn assert_integrity(database: &Path) {
    let conn = rusqlite::Connection::open(database).unwrap();
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(verdict, "ok");
}
