//! `ddome-coordinator serve` killed with SIGKILL in the middle of a round, then restarted
//! on the same address: the agents reconnect, the federation completes, and the final model
//! is bit-identical to an uninterrupted run, so no accepted update was lost or applied twice.
//! With a lossy codec the same holds only if each agent keeps the error-feedback residual
//! of exactly the uploads the coordinator applied, which the second test checks.
//!
//! The agents train on small synthetic embeddings (a test double for the common expert's
//! output: this test is about the process, not the features).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use ddome_agent::{AgentConfig, LocalData};
use ddome_coordinator::StateDir;
use ddome_models::Features;

const DEVICES: usize = 6;
const ANCHORS: usize = 3;
const ROUNDS: u64 = 6;
const DIM: usize = 16;
const CLASSES: usize = 6;
const LINE_TIMEOUT: Duration = Duration::from_secs(120);

/// Class c's samples cluster around a direction of its own, so the task is learnable.
fn features() -> Arc<Features> {
    let per_device = 120;
    let mut embeddings = Vec::new();
    let mut labels = Vec::new();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut noise = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 1000) as f32 / 1000.0 - 0.5
    };
    for device in 0..DEVICES {
        for i in 0..per_device {
            // Two labels per device.
            let label = (device * 2 + i % 2) % CLASSES;
            for d in 0..DIM {
                let centre = if d % CLASSES == label { 2.0 } else { 0.0 };
                embeddings.push(centre + noise());
            }
            labels.push(label as u16);
        }
    }
    Arc::new(Features {
        embeddings,
        dim: DIM,
        labels,
        pixels: None,
    })
}

fn config_toml(dir: &Path, codec: &str) -> std::path::PathBuf {
    let classes: Vec<String> = (0..CLASSES).map(|c| format!("\"c{c}\"")).collect();
    let text = format!(
        "rounds = {ROUNDS}\ncodec = \"{codec}\"\nseed = 3\nexperts = {ANCHORS}\nk = 2\nanchors_per_round = 2\n\
         normals_per_round = 2\nmin_updates = 4\nwait_for_devices = {DEVICES}\n\
         round_deadline_secs = 120\n[model]\nclasses = [{}]\nembedding_dim = {DIM}\n\
         gate_hidden = 8\nexpert_hidden = 8\n[train]\nbatch_size = 32\n",
        classes.join(", ")
    );
    let path = dir.join("federation.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `serve`; returns the child, its bound address, and its stderr lines.
fn serve(state: &Path, config: &Path, listen: &str) -> (Child, SocketAddr, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddome-coordinator"))
        .args(["serve", state.to_str().unwrap(), "--config"])
        .arg(config)
        .args(["--listen", listen])
        .env("RUST_LOG", "ddome_coordinator=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("serve printed {line:?}"))
        .parse()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, addr, rx)
}

/// Waits for a stderr line containing `needle`; returns it.
fn wait_for(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        let line = lines
            .recv_timeout(LINE_TIMEOUT)
            .unwrap_or_else(|e| panic!("no {needle:?} from serve: {e}"));
        if line.contains(needle) {
            return line;
        }
    }
}

fn enroll(state: &Path) -> Vec<(String, String)> {
    let mut dir = StateDir::init(state).unwrap();
    (0..DEVICES)
        .map(|i| {
            let name = format!("dev-{i}");
            let anchor = (i < ANCHORS).then_some(i as u32);
            let (_, credential) = dir.store_mut().enroll(&name, anchor).unwrap();
            (name, credential.reveal())
        })
        .collect()
}

fn spawn_agents(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    fingerprint: &str,
    credentials: &[(String, String)],
) -> Vec<tokio::task::JoinHandle<Result<ddome_agent::AgentSummary, ddome_agent::AgentError>>> {
    let features = features();
    credentials
        .iter()
        .enumerate()
        .map(|(i, (name, credential))| {
            let mut config = AgentConfig::new(addr, fingerprint, name, credential);
            config.initial_backoff = Duration::from_millis(20);
            config.max_backoff = Duration::from_millis(200);
            let data = LocalData {
                features: Arc::clone(&features),
                indices: (i * 120..(i + 1) * 120).collect(),
                common_expert_sha256: None,
                class_names: None,
            };
            runtime.spawn(async move { ddome_agent::run(&config, &data).await })
        })
        .collect()
}

/// Runs the federation, killing `serve` with SIGKILL once if `kill_in_round` is given;
/// returns the final model's hash as `serve` reports it.
fn federation(codec: &str, kill_in_round: Option<u64>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let credentials = enroll(&state);
    let fingerprint = StateDir::open(&state).unwrap().identity().fingerprint();
    let config = config_toml(dir.path(), codec);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (mut child, addr, mut lines) = serve(&state, &config, "127.0.0.1:0");
    let agents = spawn_agents(&runtime, addr, &fingerprint, &credentials);
    if let Some(round) = kill_in_round {
        // Mid-round: it has begun and at least one of its updates was committed.
        wait_for(&lines, &format!("round begins round={round}"));
        wait_for(&lines, "update accepted");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let restarted = serve(&state, &config, &addr.to_string());
        (child, lines) = (restarted.0, restarted.2);
        let resumed = wait_for(&lines, "resuming the round in progress");
        assert!(resumed.contains(&format!("round={round}")), "{resumed}");
    }
    let finished = wait_for(&lines, "federation finished");
    assert!(child.wait().unwrap().success());
    for agent in agents {
        let summary = runtime
            .block_on(async { tokio::time::timeout(LINE_TIMEOUT, agent).await })
            .expect("agents finish")
            .unwrap()
            .expect("agents end cleanly");
        assert_eq!(summary.rounds_completed, ROUNDS);
    }
    assert!(finished.contains(&format!("{ROUNDS} rounds")), "{finished}");
    finished.rsplit("model ").next().unwrap().trim().to_string()
}

#[test]
fn serve_killed_mid_round_resumes_and_matches_an_uninterrupted_run() {
    let uninterrupted = federation("f32", None);
    let killed = federation("f32", Some(2));
    assert_eq!(uninterrupted.len(), 64);
    assert_eq!(killed, uninterrupted);
}

/// Agents whose uploads were committed but never confirmed learn it from their next
/// `Welcome`; the others drop the residual of an upload that was lost with the coordinator.
#[test]
fn with_lossy_deltas_a_killed_serve_still_matches_an_uninterrupted_run() {
    let codec = "int8+topk:0.3";
    let uninterrupted = federation(codec, None);
    let killed = federation(codec, Some(2));
    assert_eq!(killed, uninterrupted);
    assert_ne!(
        uninterrupted,
        federation("f32", None),
        "the codec is lossy, so the test exercises the residuals"
    );
}
