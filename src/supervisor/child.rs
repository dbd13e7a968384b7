//! One supervised child process: spawned with piped output, each line passed through with a
//! `[name] ` prefix, its exit reported once through a callback.

use super::ChildSpec;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fmt;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How a child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exit code.
    Code(i32),
    /// Killed by a signal.
    Signal(String),
    /// Its status could not be read.
    Unknown(String),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by {s}"),
            Exit::Unknown(e) => write!(f, "unknown status ({e})"),
        }
    }
}

fn exit_of(status: std::io::Result<std::process::ExitStatus>) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(sig)) => Exit::Signal(
                Signal::try_from(sig)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {sig}")),
            ),
            (None, None) => Exit::Unknown("no code, no signal".into()),
        },
        Err(e) => Exit::Unknown(e.to_string()),
    }
}

/// A running child.
pub struct Child {
    pid: u32,
    started: Instant,
    exited: oneshot::Receiver<()>,
}

impl Child {
    /// Starts `spec`; `on_exit` is called once when it ends.
    pub fn spawn(
        spec: &ChildSpec,
        on_exit: impl FnOnce(Exit) + Send + 'static,
    ) -> std::io::Result<Child> {
        let mut child = tokio::process::Command::new(&spec.program)
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env(
                crate::shutdown::SUPERVISOR_PID_ENV,
                std::process::id().to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // A process group of its own: a terminal's Ctrl-C reaches only the supervisor, which
            // forwards one SIGTERM (a second signal would force the worker's shutdown).
            .process_group(0)
            .spawn()?;
        let pid = child.id().unwrap_or(0);
        let prefix = format!("[{}] ", spec.name);
        let mut relays = Vec::new();
        if let Some(out) = child.stdout.take() {
            relays.push(tokio::spawn(relay(out, prefix.clone(), false)));
        }
        if let Some(err) = child.stderr.take() {
            relays.push(tokio::spawn(relay(err, prefix, true)));
        }
        let (done, exited) = oneshot::channel();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Pass on everything it wrote before reporting it gone. (A grandchild that keeps
            // the pipe open could hold this up: give it a moment, no more.)
            for r in relays {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), r).await;
            }
            on_exit(exit_of(status));
            let _ = done.send(());
        });
        Ok(Child {
            pid,
            started: Instant::now(),
            exited,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How long it has been running.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    fn signal(&self, sig: Signal) {
        if let Ok(pid) = i32::try_from(self.pid) {
            if pid > 0 {
                let _ = kill(Pid::from_raw(pid), sig);
            }
        }
    }

    /// Asks it to stop (SIGTERM).
    pub fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// Waits for it to exit until `deadline`, then kills it (SIGKILL) and waits again.
    pub async fn wait_or_kill(mut self, deadline: Instant) {
        if tokio::time::timeout_at(deadline, &mut self.exited)
            .await
            .is_err()
        {
            tracing::warn!(pid = self.pid, "child did not stop in time; killing it");
            self.signal(Signal::SIGKILL);
            let _ = self.exited.await;
        }
    }
}

/// Copies lines from a child's stdout or stderr to ours, each with the prefix.
async fn relay(from: impl AsyncRead + Unpin, prefix: String, to_stderr: bool) {
    let mut lines = BufReader::new(from).lines();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Ok(Some(line)) = lines.next_line().await {
        let text = format!("{prefix}{line}\n");
        let written = if to_stderr {
            stderr.write_all(text.as_bytes()).await
        } else {
            stdout.write_all(text.as_bytes()).await
        };
        if written.is_err() {
            return;
        }
    }
    let _ = if to_stderr {
        stderr.flush().await
    } else {
        stdout.flush().await
    };
}
