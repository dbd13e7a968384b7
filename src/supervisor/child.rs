//! One supervised child process: spawned with piped output, each line passed through with a
//! `[name] ` prefix, its exit reported once through a callback.

use super::ChildSpec;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fmt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How often the supervisor looks whether a child has exited. The child is reaped only here,
/// under the same lock as every signal sent to it, so no signal can reach a reaped pid (which
/// the system may have given to another process).
const REAP_POLL: Duration = Duration::from_millis(50);

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
    /// The process until it is reaped, with its status once reaped.
    process: Arc<Mutex<Reaping>>,
}

/// A child process, reaped by whoever first sees it exit (the waiter, or a signal sender).
struct Reaping {
    child: tokio::process::Child,
    status: Option<std::io::Result<std::process::ExitStatus>>,
}

impl Reaping {
    /// Reaps the child if it has exited; true once it is reaped.
    fn reaped(&mut self) -> bool {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => self.status = Some(Ok(status)),
                Err(e) => self.status = Some(Err(e)),
            }
        }
        self.status.is_some()
    }
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
        let process = Arc::new(Mutex::new(Reaping {
            child,
            status: None,
        }));
        let reaping = process.clone();
        tokio::spawn(async move {
            let status = loop {
                {
                    let mut p = reaping.lock().unwrap_or_else(|e| e.into_inner());
                    if p.reaped() {
                        break p
                            .status
                            .take()
                            .unwrap_or_else(|| Err(std::io::Error::other("status read twice")));
                    }
                }
                tokio::time::sleep(REAP_POLL).await;
            };
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
            process,
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

    /// Sends `sig` unless the child has exited: true when sent. The check and the send hold the
    /// lock under which the child is reaped, so the pid is still the child's.
    fn signal(&self, sig: Signal) -> bool {
        let mut p = self.process.lock().unwrap_or_else(|e| e.into_inner());
        if p.reaped() {
            return false;
        }
        match i32::try_from(self.pid) {
            Ok(pid) if pid > 0 => kill(Pid::from_raw(pid), sig).is_ok(),
            _ => false,
        }
    }

    /// Asks it to stop (SIGTERM); false when it had exited already.
    pub fn terminate(&self) -> bool {
        self.signal(Signal::SIGTERM)
    }

    /// Waits for it to exit until `deadline`, or until `force` fires: then it gets a second
    /// SIGTERM (a Conveyor process stops draining and hands its jobs back) and `FORCE_GRACE`
    /// more. Whatever still runs then is killed (SIGKILL).
    pub async fn wait_or_force(
        mut self,
        deadline: Instant,
        force: &tokio_util::sync::CancellationToken,
    ) {
        tokio::select! {
            _ = &mut self.exited => return,
            _ = tokio::time::sleep_until(deadline) => {}
            _ = force.cancelled() => {
                self.signal(Signal::SIGTERM);
                let grace = Instant::now() + FORCE_GRACE;
                if tokio::time::timeout_at(grace.min(deadline), &mut self.exited).await.is_ok() {
                    return;
                }
            }
        }
        tracing::warn!(pid = self.pid, "child did not stop in time; killing it");
        self.signal(Signal::SIGKILL);
        let _ = self.exited.await;
    }
}

/// How long a child gets to exit after the second SIGTERM of a forced stop.
pub const FORCE_GRACE: Duration = Duration::from_secs(3);

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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(script: &str) -> ChildSpec {
        ChildSpec {
            name: "t".into(),
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_reaped_child_is_never_signalled() {
        let (tx, rx) = oneshot::channel();
        let child = Child::spawn(&spec("exit 0"), move |exit| {
            let _ = tx.send(exit);
        })
        .expect("spawns");
        let exit = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("exits in time")
            .expect("exit reported");
        assert_eq!(exit, Exit::Code(0));
        assert!(!child.terminate(), "a signal went to a reaped pid");
        assert!(!child.signal(Signal::SIGKILL));
    }

    #[tokio::test]
    async fn a_running_child_is_signalled() {
        let (tx, rx) = oneshot::channel();
        let child = Child::spawn(&spec("sleep 30"), move |exit| {
            let _ = tx.send(exit);
        })
        .expect("spawns");
        assert!(child.terminate());
        let exit = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("exits in time")
            .expect("exit reported");
        assert_eq!(exit, Exit::Signal("SIGTERM".into()));
    }
}
