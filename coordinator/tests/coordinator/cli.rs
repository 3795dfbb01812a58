//! The admin commands, run as the built binary.

use std::path::Path;
use std::process::{Command, Output};

use ddome_coordinator::StateDir;

fn coordinator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddome-coordinator"))
        .args(args)
        .output()
        .expect("the coordinator binary runs")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn failure_message(output: &Output) -> String {
    assert!(!output.status.success(), "command should have failed");
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

#[test]
fn init_prints_the_fingerprint_of_the_certificate_it_wrote() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("state");
    let fingerprint = stdout_of(&coordinator(&["init", arg(&dir)]));
    let cert = std::fs::read(dir.join(StateDir::CERT_FILE)).unwrap();
    assert_eq!(fingerprint.trim(), ddome_transport::fingerprint(&cert));

    let again = failure_message(&coordinator(&["init", arg(&dir)]));
    assert!(again.contains("refusing to overwrite"), "{again}");
    assert_eq!(std::fs::read(dir.join(StateDir::CERT_FILE)).unwrap(), cert);
}

#[test]
fn enrolled_credentials_authenticate_until_revoked() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("state");
    stdout_of(&coordinator(&["init", arg(&dir)]));
    let pi = stdout_of(&coordinator(&[
        "enroll",
        arg(&dir),
        "pi-01",
        "--anchor",
        "2",
    ]));
    let jetson = stdout_of(&coordinator(&["enroll", arg(&dir), "jetson"]));
    let (pi, jetson) = (pi.trim(), jetson.trim());
    assert!(pi.starts_with("ddome1.") && pi != jetson);

    let state = StateDir::open(&dir).unwrap();
    let device = state.store().authenticate("pi-01", pi).unwrap();
    assert_eq!((device.id, device.anchor_expert), (0, Some(2)));
    assert_eq!(state.store().authenticate("jetson", jetson).unwrap().id, 1);
    drop(state);

    let taken = failure_message(&coordinator(&[
        "enroll",
        arg(&dir),
        "pi-02",
        "--anchor",
        "2",
    ]));
    assert!(
        taken.contains("already anchored by device \"pi-01\""),
        "{taken}"
    );
    let bad = failure_message(&coordinator(&["enroll", arg(&dir), "pi/01"]));
    assert!(bad.contains("contains '/'"), "{bad}");

    stdout_of(&coordinator(&["revoke", arg(&dir), "pi-01"]));
    let state = StateDir::open(&dir).unwrap();
    assert!(matches!(
        state.store().authenticate("pi-01", pi),
        Err(ddome_coordinator::AuthError::Revoked { .. })
    ));
    let unknown = failure_message(&coordinator(&["revoke", arg(&dir), "nobody"]));
    assert!(unknown.contains("no device named \"nobody\""), "{unknown}");
}

#[test]
fn status_prints_tables_or_json() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("state");
    stdout_of(&coordinator(&["init", arg(&dir)]));
    stdout_of(&coordinator(&[
        "enroll",
        arg(&dir),
        "anchor-0",
        "--anchor",
        "0",
    ]));
    stdout_of(&coordinator(&["enroll", arg(&dir), "phone"]));
    stdout_of(&coordinator(&["revoke", arg(&dir), "phone"]));

    let table = stdout_of(&coordinator(&["status", arg(&dir)]));
    for expected in ["none committed yet", "devices (2):", "anchor-0", "revoked"] {
        assert!(
            table.contains(expected),
            "{expected:?} missing from\n{table}"
        );
    }

    let json = stdout_of(&coordinator(&["status", arg(&dir), "--json"]));
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["rounds_completed"], 0);
    assert_eq!(status["devices"][0]["name"], "anchor-0");
    assert_eq!(status["devices"][0]["anchor_expert"], 0);
    assert!(status["devices"][1]["revoked_at_ms"].is_u64());
}

#[test]
fn commands_on_missing_or_corrupt_state_fail_naming_the_problem() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("state");
    let missing = failure_message(&coordinator(&["status", arg(&dir)]));
    assert!(missing.contains("does not exist"), "{missing}");

    stdout_of(&coordinator(&["init", arg(&dir)]));
    std::fs::write(
        dir.join(StateDir::DATABASE_FILE),
        b"garbage garbage garbage",
    )
    .unwrap();
    let corrupt = failure_message(&coordinator(&["enroll", arg(&dir), "pi"]));
    assert!(
        corrupt.contains("state.sqlite3 is not a readable database"),
        "{corrupt}"
    );
}
