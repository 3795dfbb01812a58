//! The coordinator's state as a process sees it: the admin CLI, and durability under
//! SIGKILL.

mod cli;
#[cfg(unix)]
mod crash;
#[cfg(unix)]
mod serve_kill;
