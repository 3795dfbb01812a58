//! `ddome-agent run --backend`: a GPU backend that cannot start is reported by name, and the
//! agent trains on the CPU instead unless `--no-fallback` says otherwise. Built without the
//! `wgpu` feature (how most fleets get it), the backend is missing; built with it, the test
//! hides every adapter from wgpu (no Vulkan driver, no EGL vendor), as on a device without a
//! GPU driver.

use std::process::{Command, Output};

fn run_agent(extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ddome-agent"));
    if cfg!(feature = "wgpu") {
        let nothing = dir.path().join("no-driver.json");
        command
            .env("VK_ICD_FILENAMES", &nothing)
            .env("VK_DRIVER_FILES", &nothing)
            .env("__EGL_VENDOR_LIBRARY_FILENAMES", &nothing);
    }
    command
        .args([
            "run",
            "--coordinator",
            "127.0.0.1:9",
            "--fingerprint",
            &"ab".repeat(32),
        ])
        .args(["--device", "pi-1", "--data"])
        .arg(dir.path().join("no-such-folder"))
        .args(extra)
        .env("DDOME_CREDENTIAL", "secret")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn wgpu_that_cannot_start_fails_by_name_or_falls_back_to_the_cpu() {
    let refused = run_agent(&["--backend", "wgpu", "--no-fallback"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    let reason = if cfg!(feature = "wgpu") {
        "wgpu could not start on any adapter"
    } else {
        "rebuild with `--features wgpu`"
    };
    assert!(
        stderr.contains("starting the wgpu backend") && stderr.contains(reason),
        "{stderr}"
    );

    // Falling back: the agent says so, then goes on to its data (which is missing here).
    let fell_back = run_agent(&["--backend", "wgpu"]);
    let stderr = String::from_utf8_lossy(&fell_back.stderr);
    assert!(
        stderr.contains("falling back to the ndarray backend"),
        "{stderr}"
    );
    assert!(stderr.contains("training on ndarray"), "{stderr}");
    assert!(stderr.contains("no-such-folder"), "{stderr}");

    let unknown = run_agent(&["--backend", "cuda"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success());
    assert!(stderr.contains("unknown backend \"cuda\""), "{stderr}");
}
