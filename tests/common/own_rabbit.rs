//! A RabbitMQ node of a test's own, to restart or to configure (TLS) without touching the
//! shared broker that other tests use.

use super::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A RabbitMQ node of its own: its own node name, ports, database and logs (owned by the
/// `rabbitmq` user, which `rabbitmq-server` switches to when started as root).
pub struct OwnRabbit {
    port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnRabbit {
    /// A plain AMQP node in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        let port = free_port();
        Self::configured(dir, port, &format!("listeners.tcp.default = {port}\n"))
    }

    /// An AMQPS-only node in `dir` with the server certificate `cert`/`key` (PEM files).
    pub fn with_tls(dir: PathBuf, cert: &Path, key: &Path) -> Self {
        let port = free_port();
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::copy(cert, dir.join("server.pem")).expect("cert");
        std::fs::copy(key, dir.join("server.key")).expect("key");
        let conf = format!(
            "listeners.tcp = none\nlisteners.ssl.default = {port}\n\
             ssl_options.certfile = {}\nssl_options.keyfile = {}\n\
             ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
            dir.join("server.pem").display(),
            dir.join("server.key").display()
        );
        Self::configured(dir, port, &conf)
    }

    fn configured(dir: PathBuf, port: u16, listeners: &str) -> Self {
        std::fs::create_dir_all(dir.join("mnesia")).expect("dir");
        std::fs::create_dir_all(dir.join("log")).expect("dir");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("{listeners}loopback_users = none\n"),
        )
        .expect("conf");
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            owned,
            "chown to the rabbitmq user (the tests run as root, as CI does)"
        );
        OwnRabbit {
            port,
            dist_port: free_port(),
            dir,
            child: None,
        }
    }

    /// The node's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn node(&self) -> String {
        format!("conveyor-test-{}@localhost", self.port)
    }

    /// Stops (`SIGSTOP`, `true`) or resumes (`SIGCONT`) the node's Erlang VM.
    pub fn pause(&self, on: bool) {
        let pid = std::fs::read_to_string(self.dir.join("pid")).expect("the node's pid file");
        let sig = if on { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([sig, pid.trim()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {}", pid.trim());
    }

    /// `rabbitmqctl` on this node, with `args`; its output, `None` when it failed.
    pub fn ctl(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("rabbitmqctl")
            .args(["-n", &self.node(), "-q"])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl OwnRabbit {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// Starts the node (it takes some seconds to listen).
    pub fn start(&mut self) {
        let d = &self.dir;
        let child = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", self.node())
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", d.join("feature_flags"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server is installed (it runs the local broker too)");
        self.child = Some(child);
    }
    /// `kill -9` of the node.
    pub fn kill9(&mut self) {
        // The Erlang VM is a grandchild of the script: kill it by its pid file.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            let _ = std::fs::remove_file(self.dir.join("pid"));
        }
        let _ = Command::new("pkill")
            .args(["-9", "-f", &self.node()])
            .status();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
