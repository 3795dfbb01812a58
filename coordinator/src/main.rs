//! `ddome-coordinator`: admin commands over a coordinator state directory.
//!
//! Scriptable: the one value a command produces (a fingerprint, a credential, the status)
//! goes to stdout; messages go to stderr.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ddome_coordinator::StateDir;
use ddome_coordinator::config::ServeConfig;

/// The ddome coordinator: federation server and its admin commands.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a state directory (database and TLS identity) and print the certificate's
    /// SHA-256 fingerprint, which agents pin.
    Init {
        /// State directory to create; it must not exist or must be empty.
        dir: PathBuf,
    },
    /// Enrol a device and print its credential. The credential is shown only this once.
    Enroll {
        /// State directory.
        dir: PathBuf,
        /// Device name: 1 to 64 characters of A-Z a-z 0-9 . _ -
        device: String,
        /// Make the device the anchor of this expert (one live anchor per expert).
        #[arg(long, value_name = "EXPERT")]
        anchor: Option<u32>,
    },
    /// Revoke a device: it can no longer connect; its record stays for audit.
    Revoke {
        /// State directory.
        dir: PathBuf,
        /// Name of the device to revoke.
        device: String,
    },
    /// Run the federation: listen for agents over QUIC and run the configured rounds,
    /// resuming from the state directory's last committed round, while serving zero-shot
    /// personalisation and inference to enrolled devices.
    Serve {
        /// State directory.
        dir: PathBuf,
        /// The federation's TOML config (M, K, anchors, rounds, deadline, codec, model, and
        /// the optional [inference] table).
        #[arg(long)]
        config: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:4433")]
        listen: SocketAddr,
        /// Keep serving personalisation and inference after the last round, until
        /// interrupted (Ctrl-C or SIGTERM); overrides `inference.keep_serving`.
        #[arg(long)]
        keep_serving: bool,
    },
    /// Show rounds, devices and failures.
    Status {
        /// State directory.
        dir: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ddome-coordinator: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init { dir } => {
            let state =
                StateDir::init(&dir).with_context(|| format!("initialising {}", dir.display()))?;
            eprintln!(
                "initialised {}; agents pin this certificate fingerprint:",
                dir.display()
            );
            println!("{}", state.identity().fingerprint());
        }
        Command::Enroll {
            dir,
            device,
            anchor,
        } => {
            let mut state = open(&dir)?;
            let (record, credential) = state
                .store_mut()
                .enroll(&device, anchor)
                .with_context(|| format!("enrolling {device:?}"))?;
            let role = match record.anchor_expert {
                Some(expert) => format!("anchor of expert {expert}"),
                None => "normal device".to_string(),
            };
            eprintln!(
                "enrolled {:?} as device {} ({role}); its credential follows. It is shown \
                 only now: give it to the device",
                record.name, record.id
            );
            println!("{}", credential.reveal());
        }
        Command::Revoke { dir, device } => {
            let mut state = open(&dir)?;
            let record = state
                .store_mut()
                .revoke(&device)
                .with_context(|| format!("revoking {device:?}"))?;
            eprintln!("revoked {:?} (device {})", record.name, record.id);
        }
        Command::Serve {
            dir,
            config,
            listen,
            keep_serving,
        } => {
            let ServeConfig {
                federation,
                mut inference,
            } = ServeConfig::load(&config)?;
            inference.keep_serving |= keep_serving;
            let (store, identity) = open(&dir)?.into_parts();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let report = runtime.block_on(async {
                let server = ddome_coordinator::server::start_with(
                    store, &identity, federation, inference, listen,
                )
                .await?;
                // The bound address on stdout, so scripts (and tests) can use port 0.
                println!("listening {}", server.local_addr);
                eprintln!(
                    "serving on {}; certificate fingerprint {}",
                    server.local_addr,
                    identity.fingerprint()
                );
                let shutdown = server.shutdown_trigger();
                tokio::spawn(async move {
                    interrupted().await;
                    eprintln!("interrupted; shutting down");
                    shutdown.trigger();
                });
                server.finished().await
            })?;
            eprintln!(
                "federation finished: {} rounds, model {}",
                report.rounds_completed, report.model_sha256
            );
        }
        Command::Status { dir, json } => {
            let state = open(&dir)?;
            let status = state.store().status().context("reading the status")?;
            if json {
                let text = serde_json::to_string_pretty(&status).context("encoding the status")?;
                println!("{text}");
            } else {
                print!("{status}");
            }
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM; never if neither can be listened for.
async fn interrupted() {
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        result = tokio::signal::ctrl_c() => {
            if result.is_err() {
                std::future::pending::<()>().await;
            }
        }
        () = terminate => {}
    }
}

fn open(dir: &std::path::Path) -> anyhow::Result<StateDir> {
    StateDir::open(dir).with_context(|| format!("opening {}", dir.display()))
}
