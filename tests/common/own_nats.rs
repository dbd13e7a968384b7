//! A nats-server of a test's own (JetStream on, on a spare loopback port), to kill, restart or
//! stop without touching the shared server other tests use.

use super::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A nats-server of its own, with its JetStream store in `store`.
pub struct OwnNats {
    port: u16,
    store: PathBuf,
    child: Option<Child>,
}

/// A failed test stops its server too.
impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl OwnNats {
    /// A server to be started on a spare port, keeping its store in `store`.
    pub fn new(store: PathBuf) -> OwnNats {
        OwnNats {
            port: free_port(),
            store,
            child: None,
        }
    }
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr())
    }
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// Starts it (again: same port, same store).
    pub fn start(&mut self) {
        self.child = Some(nats_server(self.port, &self.store));
    }
    /// `kill -9`, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// SIGSTOP (`true`) or SIGCONT.
    pub fn pause(&self, on: bool) {
        let pid = self.child.as_ref().expect("started").id().to_string();
        let sig = if on { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill").args([sig, &pid]).status();
        assert!(ok.map(|s| s.success()).unwrap_or(false), "kill {sig} {pid}");
    }
}

fn nats_server(port: u16, store: &Path) -> Child {
    let server = Path::new("/usr/sbin/nats-server");
    let server = if server.exists() {
        server.to_path_buf()
    } else {
        "nats-server".into()
    };
    Command::new(server)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
        .arg("-sd")
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is installed (it runs the local broker too)")
}
