//! A benchmark-only Python process (onnxruntime or PyTorch) driven over stdin and stdout:
//! one JSON request per line, one JSON answer per line. Keeping the process alive lets a
//! bench alternate runs between the Rust engine and the Python one, so that both see the
//! same machine load.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The interpreter `scripts/bench/setup-python.sh` installs.
pub const DEFAULT_PYTHON: &str = ".cache/pyvenv/bin/python";

/// A running script of `scripts/bench/`.
#[derive(Debug)]
pub struct PythonWorker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    script: PathBuf,
}

impl PythonWorker {
    /// Starts `python script` with `env` added to this process's environment.
    pub fn spawn(python: &Path, script: &Path, env: &[(&str, String)]) -> Result<Self> {
        if !python.exists() {
            bail!(
                "no Python at {}: run scripts/bench/setup-python.sh, or pass --python",
                python.display()
            );
        }
        let mut command = Command::new(python);
        command
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout was piped"));
        Ok(Self {
            child,
            stdin,
            stdout,
            script: script.to_path_buf(),
        })
    }

    /// Sends one request and decodes the answer's fields into `T`.
    pub fn request<T: DeserializeOwned>(&mut self, request: &Value) -> Result<T> {
        let op = request.get("op").and_then(Value::as_str).unwrap_or("?");
        let script = self.script.display().to_string();
        writeln!(self.stdin, "{request}")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("sending {op:?} to {script}"))?;
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .with_context(|| format!("reading the answer to {op:?} from {script}"))?;
        if read == 0 {
            bail!("{script} exited before answering {op:?} (its stderr is above)");
        }
        let value = parse_reply(&line).with_context(|| format!("{script}, request {op:?}"))?;
        serde_json::from_value(value)
            .with_context(|| format!("{script}: unexpected answer to {op:?}: {}", line.trim()))
    }
}

impl Drop for PythonWorker {
    fn drop(&mut self) {
        // A worker that ignores "quit" (stuck in a run) must not outlive the bench.
        let quit = writeln!(self.stdin, "{{\"op\": \"quit\"}}").and_then(|()| self.stdin.flush());
        if quit.is_err() || !wait_briefly(&mut self.child) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_briefly(child: &mut Child) -> bool {
    for _ in 0..50 {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// One answer line: its JSON object if it says `"ok": true`, its error otherwise.
pub fn parse_reply(line: &str) -> Result<Value> {
    let value: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("answer is not JSON: {:?}", line.trim()))?;
    match value.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(value),
        Some(false) => bail!(
            "the script failed: {}",
            value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error given")
        ),
        None => bail!("answer has no \"ok\" field: {}", line.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ok_answer_is_its_object() {
        let value = parse_reply("{\"ok\": true, \"secs\": 1.5}\n").unwrap();
        assert_eq!(value["secs"], 1.5);
    }

    #[test]
    fn a_failed_answer_carries_the_scripts_error() {
        let err = parse_reply("{\"ok\": false, \"error\": \"ValueError: bad side\"}").unwrap_err();
        assert!(
            format!("{err:#}").contains("ValueError: bad side"),
            "{err:#}"
        );
    }

    #[test]
    fn a_line_that_is_not_an_answer_is_an_error() {
        assert!(parse_reply("Traceback (most recent call last):").is_err());
        assert!(parse_reply("{\"secs\": 1.0}").is_err());
    }
}
