//! `deploy/`: the compose file as `docker-compose config` renders it (Debian's docker-compose
//! needs no Docker engine for that), for each broker choice and with scaled workers; the
//! Dockerfile's stages; and the RabbitMQ entrypoint that sets the role passwords.

use serde_norway::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `docker-compose <args> config` in `deploy/`, with no CONVEYOR_* variables of the caller's.
fn compose_config(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("docker-compose");
    cmd.current_dir(root().join("deploy"))
        .args(args)
        .arg("config")
        .stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("CONVEYOR_") || key.starts_with("COMPOSE_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "docker-compose is needed ({e}): apt-get install docker-compose (scripts/test.sh does)"
        )
    })
}

fn rendered(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = compose_config(args, env);
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        text(&out)
    );
    serde_norway::from_slice(&out.stdout).expect("docker-compose config prints YAML")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn seconds(v: &Value) -> Duration {
    humantime::parse_duration(v.as_str().unwrap_or("0s")).expect("a duration")
}

/// The value after `flag` in a command line.
fn flag(command: &[String], flag: &str) -> Option<String> {
    command
        .iter()
        .position(|a| a == flag)
        .and_then(|i| command.get(i + 1).cloned())
}

/// What holds whichever broker is chosen.
fn check_common(config: &Value, scheme: &str) {
    let services = &config["services"];
    let names: BTreeSet<String> = services
        .as_mapping()
        .expect("services")
        .keys()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    let expected: BTreeSet<String> = ["broker", "aggregator", "worker", "producer"]
        .map(String::from)
        .into();
    assert_eq!(names, expected);

    assert!(
        services["broker"]["healthcheck"]["test"].is_sequence(),
        "broker health check"
    );
    for (service, role) in [
        ("aggregator", "aggregator"),
        ("worker", "worker"),
        ("producer", "producer"),
    ] {
        let s = &services[service];
        let url = s["environment"]["CONVEYOR_BROKER"]
            .as_str()
            .expect("broker URL");
        assert!(
            url.starts_with(&format!("{scheme}://{role}:")),
            "{service} connects as its role over {scheme}: {url}"
        );
        assert!(
            url.contains("@broker:"),
            "{service} reaches the broker service"
        );
        assert_eq!(
            s["depends_on"]["broker"]["condition"], "service_healthy",
            "{service} waits for a healthy broker"
        );
    }

    let aggregator = &services["aggregator"];
    assert!(aggregator["healthcheck"]["test"].is_sequence());
    assert!(strings(&aggregator["volumes"])
        .iter()
        .any(|v| v.starts_with("aggregator-store:")));
    assert!(config["volumes"]["aggregator-store"].is_mapping());
    assert_eq!(aggregator["build"]["target"], "aggregator");

    let worker = &services["worker"];
    assert_eq!(worker["build"]["target"], "worker");
    let command = strings(&worker["command"]);
    assert_eq!(
        command.first().map(String::as_str),
        Some("conveyor-supervisor")
    );
    let split = command.iter().position(|a| a == "--").expect("-- COMMAND");
    assert_eq!(command[split + 1], "conveyor-worker");
    let supervisor_drain = flag(&command[..split], "--drain-timeout").expect("supervisor drain");
    let worker_drain = flag(&command[split..], "--drain-timeout").expect("worker drain");
    let supervisor_drain = humantime::parse_duration(&supervisor_drain).expect("duration");
    let worker_drain = humantime::parse_duration(&worker_drain).expect("duration");
    let grace = seconds(&worker["stop_grace_period"]);
    assert!(
        worker_drain < supervisor_drain && supervisor_drain < grace,
        "graceful stop: worker drain {worker_drain:?} < supervisor {supervisor_drain:?} < compose {grace:?}"
    );
    assert!(
        worker["container_name"].is_null(),
        "replicas need generated names"
    );
    assert!(worker["ports"].is_null(), "replicas publish no ports");
    assert_eq!(worker["restart"], "unless-stopped");

    let producer = &services["producer"];
    assert_eq!(producer["restart"], "no", "the demo producer runs once");
    assert_eq!(
        producer["depends_on"]["aggregator"]["condition"],
        "service_healthy"
    );
}

fn replicas(config: &Value) -> u64 {
    let r = &config["services"]["worker"]["deploy"]["replicas"];
    r.as_u64()
        .or_else(|| r.as_str().and_then(|s| s.parse().ok()))
        .expect("worker replicas")
}

#[test]
fn compose_defaults_to_nats() {
    let config = rendered(&[], &[]);
    check_common(&config, "nats");
    let broker = &config["services"]["broker"];
    assert!(broker["image"].as_str().unwrap_or("").starts_with("nats:"));
    let volumes = strings(&broker["volumes"]);
    assert!(volumes.iter().any(|v| v.starts_with("nats-data:/data")));
    assert!(volumes
        .iter()
        .any(|v| v.contains("broker-config/nats-server.conf:")));
    assert!(strings(&broker["command"]).contains(&"-sd".to_string()));
    assert!(broker["environment"]["CONVEYOR_WORKER_PASSWORD"].is_string());
    assert_eq!(replicas(&config), 3);
}

#[test]
fn compose_on_rabbitmq() {
    let config = rendered(&["--env-file", "rabbitmq.env"], &[]);
    check_common(&config, "amqp");
    let broker = &config["services"]["broker"];
    let image = broker["image"].as_str().unwrap_or("");
    assert!(
        image.starts_with("rabbitmq:") && image.contains("management"),
        "{image}"
    );
    let volumes = strings(&broker["volumes"]);
    for file in [
        "definitions.json",
        "rabbitmq.conf",
        "rabbitmq-entrypoint.sh",
    ] {
        assert!(
            volumes
                .iter()
                .any(|v| v.contains(&format!("broker-config/{file}:"))),
            "{file} mounted: {volumes:?}"
        );
    }
    assert!(volumes
        .iter()
        .any(|v| v.starts_with("rabbitmq-data:/var/lib/rabbitmq")));
    let url = config["services"]["worker"]["environment"]["CONVEYOR_BROKER"]
        .as_str()
        .unwrap_or("");
    assert!(url.ends_with("@broker:5672/conveyor"), "{url}");
}

#[test]
fn compose_scales_workers() {
    let config = rendered(&[], &[("CONVEYOR_WORKER_REPLICAS", "5")]);
    assert_eq!(replicas(&config), 5);
    // An override file, as a deployment would add one.
    let dir = tempfile::tempdir().expect("tempdir");
    let over = dir.path().join("override.yaml");
    std::fs::write(
        &over,
        "services:\n  worker:\n    deploy:\n      replicas: 7\n",
    )
    .expect("write");
    let over = over.to_string_lossy().into_owned();
    let config = rendered(&["-f", "compose.yaml", "-f", &over], &[]);
    assert_eq!(replicas(&config), 7);
    check_common(&config, "nats");
}

#[test]
fn compose_refuses_a_missing_password() {
    let out = compose_config(&[], &[("CONVEYOR_WORKER_PASSWORD", "")]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("CONVEYOR_WORKER_PASSWORD"),
        "the error names the variable: {}",
        text(&out)
    );
}

#[test]
fn dockerfile_stages_match_the_workspace_and_compose() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let members: Vec<&str> = manifest
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("workspace members")
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|m| *m != ".")
        .collect();
    assert!(members.len() >= 4, "{members:?}");
    for member in &members {
        assert!(
            dockerfile.contains(&format!("COPY {member}/Cargo.toml {member}/")),
            "the dependency layer has {member}'s manifest"
        );
        assert!(
            dockerfile.contains(&format!("COPY {member}/src {member}/src")),
            "the build copies {member}'s sources"
        );
    }
    let stages: BTreeSet<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .filter_map(|l| l.split(" AS ").nth(1))
        .collect();
    let config = rendered(&[], &[]);
    for service in ["aggregator", "worker", "producer"] {
        let target = config["services"][service]["build"]["target"]
            .as_str()
            .expect("target");
        assert!(stages.contains(target), "stage {target} exists: {stages:?}");
    }
    let user = dockerfile
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(!user.contains("root") && !user.ends_with(" 0"), "{user}");
    let aggregator_stage = dockerfile
        .split("AS aggregator")
        .nth(1)
        .and_then(|rest| rest.split("\nFROM ").next())
        .expect("aggregator stage");
    assert!(aggregator_stage.contains("HEALTHCHECK"));
    assert!(
        !dockerfile.to_lowercase().contains("password="),
        "no credentials in the image"
    );
}

/// Runs `broker-config/rabbitmq-entrypoint.sh` against stand-ins for the image's
/// `docker-entrypoint.sh` and `rabbitmqctl` that record what they were asked.
struct Entrypoint {
    dir: tempfile::TempDir,
}

impl Entrypoint {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        let calls = dir.path().join("calls");
        let write = |name: &str, body: String| {
            let path = bin.join(name);
            std::fs::write(&path, body).expect("write stand-in");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        };
        write("docker-entrypoint.sh", "#!/bin/sh\nexec sleep 30\n".into());
        write(
            "rabbitmqctl",
            format!("#!/bin/sh\necho \"$*\" >> {}\n", calls.display()),
        );
        Entrypoint { dir }
    }

    fn ready(&self) -> PathBuf {
        self.dir.path().join("ready")
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default()
    }

    fn spawn(&self, env: &[(&str, String)]) -> std::process::Child {
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("sh");
        cmd.arg(root().join("broker-config/rabbitmq-entrypoint.sh"))
            .env("PATH", path)
            .env("CONVEYOR_READY_FILE", self.ready())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars() {
            if key.starts_with("CONVEYOR_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.spawn().expect("sh")
    }
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn rabbitmq_entrypoint_sets_role_passwords() {
    let e = Entrypoint::new();
    let secret = e.dir.path().join("admin-secret");
    std::fs::write(&secret, "admin-from-file").expect("secret file");
    let mut child = e.spawn(&[
        ("CONVEYOR_PRODUCER_PASSWORD", "p-1".into()),
        ("CONVEYOR_WORKER_PASSWORD", "w-2".into()),
        ("CONVEYOR_AGGREGATOR_PASSWORD", "a-3".into()),
        (
            "CONVEYOR_ADMIN_PASSWORD_FILE",
            secret.to_string_lossy().into_owned(),
        ),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !e.ready().exists() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "entrypoint exited early"
        );
        assert!(
            Instant::now() < deadline,
            "never became ready: {}",
            e.calls()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let calls = e.calls();
    for line in [
        "change_password producer p-1",
        "change_password worker w-2",
        "change_password aggregator a-3",
        "change_password admin admin-from-file",
    ] {
        assert!(calls.contains(line), "{line:?} in:\n{calls}");
    }
    // SIGTERM reaches the server, and the entrypoint exits with it.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    wait_exit(&mut child, Duration::from_secs(10));
}

#[test]
fn rabbitmq_entrypoint_refuses_a_missing_password() {
    let e = Entrypoint::new();
    let mut child = e.spawn(&[
        ("CONVEYOR_PRODUCER_PASSWORD", "p-1".into()),
        ("CONVEYOR_AGGREGATOR_PASSWORD", "a-3".into()),
        ("CONVEYOR_ADMIN_PASSWORD", "x-4".into()),
    ]);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let out = child.wait_with_output().expect("output");
    assert!(!status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CONVEYOR_WORKER_PASSWORD"), "{stderr}");
    assert!(!e.ready().exists(), "not marked ready");
    assert!(
        !e.calls().contains("change_password worker"),
        "{}",
        e.calls()
    );
}
