//! `deploy/` checked against the binary (issue 15): the Cloud Run service YAML sets only
//! variables keycast knows and keeps one writer, its probes answer on a real `keycast serve`
//! as declared — through a deploy's hand-over —, the Dockerfile follows its rules, and the
//! `gcloud`/`gsutil` commands the docs give name only files that exist.

mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::api::post_json;
use harness::{stores, Launch, TEST_MASTER_KEY};
use keycast::config::SETTINGS;
use serde_json::{json, Value};

/// The largest database the deployment is sized for (docs/OPERATIONS.md#sizing).
const LARGEST_DATABASE_MIB: f64 = 256.0;
/// A restore rate no real GCS download falls below (keycast restores 256 MiB from S3 on
/// loopback at ~85 MiB/s, BENCHMARKS.md); the startup budget must hold even at this rate.
const SLOWEST_RESTORE_MIB_PER_SEC: f64 = 10.0;
/// Cloud Run's ceiling for failureThreshold × periodSeconds of a service's startup probe.
const CLOUD_RUN_MAX_STARTUP_SECS: f64 = 240.0;
/// keycast's default `KEYCAST_REPLICA_LEASE_WAIT_SECS`: how long a new instance may wait
/// for the old one to hand the replica over before it restores.
const DEFAULT_LEASE_WAIT_SECS: f64 = 60.0;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// `deploy/cloudrun-sqlite.yaml`, parsed.
fn service() -> Value {
    serde_yaml_ng::from_str(&read("deploy/cloudrun-sqlite.yaml")).expect("deploy/cloudrun-sqlite.yaml is YAML")
}

fn container(service: &Value) -> &Value {
    let containers = service["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("spec.template.spec.containers");
    assert_eq!(containers.len(), 1, "one container: keycast itself (no sidecar)");
    &containers[0]
}

/// The container's environment, in order.
fn env_of(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_owned();
            let value = e["value"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: a literal value (secrets are files, read with *_FILE)"));
            (name, value.to_owned())
        })
        .collect()
}

/// Every variable is a keycast setting (or its `_FILE` form), none is `PORT`, and no secret
/// is given inline.
fn assert_known_settings(env: &[(String, String)]) {
    let secret_settings = [
        "KEYCAST_MASTER_KEY",
        "KEYCAST_MASTER_KEY_PREVIOUS",
        "KEYCAST_SMTP_URL",
        "KEYCAST_METRICS_TOKEN",
        "KEYCAST_REPLICA_ENCRYPTION_KEY",
        "DATABASE_URL",
    ];
    for (name, _) in env {
        assert_ne!(
            name, "PORT",
            "Cloud Run reserves PORT and sets it to the container port"
        );
        let known = SETTINGS
            .iter()
            .any(|s| *name == s.env || *name == format!("{}_FILE", s.env));
        assert!(known, "{name} is not a keycast setting (crates/keycast/src/config.rs)");
        assert!(
            !secret_settings.contains(&name.as_str()),
            "{name} is a secret: mount it and set {name}_FILE"
        );
    }
}

/// Every `*_FILE` names a file inside a mounted secret volume.
fn assert_secret_files_mounted(service: &Value, container: &Value, env: &[(String, String)]) {
    let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
    let volumes = service["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    for (name, path) in env.iter().filter(|(n, _)| n.ends_with("_FILE")) {
        let mount = mounts
            .iter()
            .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
            .unwrap_or_else(|| panic!("{name}={path} is not under a mounted volume"));
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("volume {} is not declared", mount["name"]));
        let file = path.rsplit('/').next().unwrap();
        let items = volume["secret"]["items"]
            .as_array()
            .expect("a secret volume with items");
        assert!(
            items.iter().any(|i| i["path"] == file),
            "{name}: no item {file} in {volume}"
        );
    }
}

fn secs(value: &Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is a number of seconds"))
}

#[test]
fn the_service_yaml_sets_only_variables_keycast_knows_and_keeps_one_writer() {
    let service = service();
    let container = container(&service);
    let env = env_of(container);
    assert_known_settings(&env);
    assert!(
        env.iter().any(|(n, _)| n == "KEYCAST_MASTER_KEY_FILE"),
        "the master key comes from Secret Manager"
    );
    assert!(
        env.iter()
            .any(|(n, v)| n == "KEYCAST_REPLICA_URL" && v.starts_with("gs://")),
        "replicated to GCS"
    );

    assert_secret_files_mounted(&service, container, &env);

    // One writer, always running, CPU between requests, a full Linux sandbox.
    let annotations = &service["spec"]["template"]["metadata"]["annotations"];
    for (key, want) in [
        ("autoscaling.knative.dev/maxScale", "1"),
        ("autoscaling.knative.dev/minScale", "1"),
        ("run.googleapis.com/cpu-throttling", "false"),
        ("run.googleapis.com/execution-environment", "gen2"),
    ] {
        assert_eq!(annotations[key], json!(want), "{key}");
    }

    // The probes, on the container's port.
    let port = container["ports"][0]["containerPort"].as_u64().expect("containerPort");
    let startup = &container["startupProbe"];
    let liveness = &container["livenessProbe"];
    assert_eq!(startup["httpGet"]["path"], "/healthz/startup");
    assert_eq!(liveness["httpGet"]["path"], "/healthz/live");
    for probe in [startup, liveness] {
        assert_eq!(probe["httpGet"]["port"].as_u64(), Some(port), "{probe}");
    }
    // The startup budget covers the longest start-up the sizing allows: the hand-over wait,
    // then restoring the largest database at the slowest rate, with half a minute to spare.
    let lease_wait = env
        .iter()
        .find(|(n, _)| n == "KEYCAST_REPLICA_LEASE_WAIT_SECS")
        .map_or(DEFAULT_LEASE_WAIT_SECS, |(_, v)| v.parse().unwrap());
    let budget = secs(&startup["periodSeconds"], "periodSeconds")
        * secs(&startup["failureThreshold"], "failureThreshold")
        + startup["initialDelaySeconds"].as_f64().unwrap_or(0.0);
    let needed = lease_wait + LARGEST_DATABASE_MIB / SLOWEST_RESTORE_MIB_PER_SEC + 30.0;
    assert!(budget >= needed, "startup budget {budget} s < {needed} s");
    assert!(budget <= CLOUD_RUN_MAX_STARTUP_SECS, "Cloud Run allows at most 240 s");

    // The image and the service agree on where the data lives and which port is served.
    let dockerfile = read("deploy/Dockerfile");
    let data_dir = env
        .iter()
        .find(|(n, _)| n == "KEYCAST_DATA_DIR")
        .map(|(_, v)| v.as_str());
    assert!(
        dockerfile.contains(&format!("KEYCAST_DATA_DIR={}", data_dir.unwrap_or("/data"))),
        "the Dockerfile's KEYCAST_DATA_DIR"
    );
    assert!(
        dockerfile.contains(&format!("EXPOSE {port}")),
        "the Dockerfile exposes {port}"
    );
    // Memory holds the disk: the database and a verification's restored copy, plus keycast.
    let memory = container["resources"]["limits"]["memory"]
        .as_str()
        .expect("a memory limit");
    let mib = match memory.strip_suffix("Gi") {
        Some(gi) => gi.parse::<f64>().unwrap() * 1024.0,
        None => memory.strip_suffix("Mi").expect("Mi or Gi").parse::<f64>().unwrap(),
    };
    assert!(mib >= 2.0 * LARGEST_DATABASE_MIB + 256.0, "memory {memory}");
    // The runbook sizes for the same database.
    let sizing = format!("databases up to {LARGEST_DATABASE_MIB} MiB");
    assert!(
        read("docs/OPERATIONS.md").contains(&sizing),
        "docs/OPERATIONS.md: {sizing}"
    );
}

/// The service's environment with every location outside this machine replaced by a local
/// one of the same kind: the bucket by a prefix on the GCS emulator, the public relays by a
/// relay on loopback, the Secret Manager mounts by files under `secrets`.
struct LocalService {
    env: Vec<(String, String)>,
    _relay: harness::nostr::Relay,
}

fn local_service(secrets: &Path) -> Option<LocalService> {
    let replica = stores::gcs("deploy")?;
    let relay = harness::nostr::Relay::start()?;
    let mut env = Vec::new();
    for (name, value) in env_of(container(&service())) {
        let value = match name.as_str() {
            // The harness gives every instance its own data directory.
            "KEYCAST_DATA_DIR" => continue,
            "KEYCAST_REPLICA_URL" => replica.url.clone(),
            "BUNKER_RELAYS" => relay.url().to_owned(),
            _ if name.ends_with("_FILE") => {
                let setting = name.strip_suffix("_FILE").unwrap();
                let content = match setting {
                    "KEYCAST_MASTER_KEY" => TEST_MASTER_KEY.to_owned(),
                    // Nothing listens there: a mail that cannot be delivered is only logged.
                    "KEYCAST_SMTP_URL" => "smtp://127.0.0.1:9".to_owned(),
                    "KEYCAST_METRICS_TOKEN" => "0123456789abcdef0123456789abcdef".to_owned(),
                    // Another key than the master key (refused otherwise).
                    "KEYCAST_REPLICA_ENCRYPTION_KEY" => "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=".to_owned(),
                    other => panic!("the test has no value for the secret {other}"),
                };
                let file = secrets.join(value.trim_start_matches('/'));
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, format!("{content}\n")).unwrap();
                file.display().to_string()
            }
            _ => value,
        };
        env.push((name, value));
    }
    env.extend(replica.env.iter().cloned());
    // The public URL is https, under which keycast refuses its test routes.
    env.push(("KEYCAST_TEST_ROUTES".into(), "false".into()));
    Some(LocalService { env, _relay: relay })
}

fn launch(data: &Path, service: &LocalService) -> Launch {
    service
        .env
        .iter()
        .fold(Launch::new(data), |launch, (k, v)| launch.env(k, v))
}

/// Cloud Run counts an HTTP probe as passed for any status from 200 to 399.
fn passes(status: u16) -> bool {
    (200..400).contains(&status)
}

#[test]
fn the_probes_answer_as_the_service_yaml_expects_through_a_deploy() {
    let dir = tempfile::tempdir().unwrap();
    let Some(service) = local_service(&dir.path().join("secrets")) else {
        return;
    };
    let yaml = service_probe_paths();

    // The running revision: both probes pass, and it takes a registration.
    let old = launch(&dir.path().join("old"), &service).start();
    for path in [&yaml.startup, &yaml.liveness] {
        assert!(
            passes(old.get(path).0),
            "{path} on the running instance; log:\n{}",
            old.log()
        );
    }
    let registered = post_json(
        &old,
        "/api/auth/register",
        None,
        &json!({"email": "deploy@example.org", "password": "correct horse battery staple"}),
    );
    assert_eq!(registered.status, 201, "{}", registered.body);

    // A new revision starts beside it on an empty disk: its startup probe fails until it has
    // the replica and has restored it, and the old instance stays alive meanwhile.
    let new = launch(&dir.path().join("new"), &service).spawn_started_later();
    let mut startup_failed_first = false;
    let deadline = Instant::now() + harness::START_TIMEOUT;
    loop {
        let status = new.status(&yaml.startup);
        if passes(status) {
            break;
        }
        startup_failed_first = true;
        assert!(
            passes(old.get(&yaml.liveness).0),
            "the old instance failed liveness during the hand-over"
        );
        assert!(
            Instant::now() < deadline,
            "the new instance never passed its startup probe"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        startup_failed_first,
        "the startup probe passed before the new instance had the replica"
    );
    let new = new.into_keycast();
    assert!(passes(new.get(&yaml.liveness).0));
    // The old instance gave the replica up (handed over, or let its idle lease lapse): it
    // refuses writes, but stays alive (liveness fails only when fenced) until Cloud Run
    // sends it SIGTERM — and then it exits 0.
    let late = post_json(
        &old,
        "/api/auth/register",
        None,
        &json!({"email": "late@example.org", "password": "correct horse battery staple"}),
    );
    assert_eq!(
        late.status, 503,
        "a write on the old instance after the hand-over: {}",
        late.body
    );
    assert!(
        passes(old.get(&yaml.liveness).0),
        "giving the replica up is not a reason to restart"
    );
    old.stop();

    let login = post_json(
        &new,
        "/api/auth/login",
        None,
        &json!({"email": "deploy@example.org", "password": "correct horse battery staple"}),
    );
    assert_eq!(login.status, 200, "the account made before the deploy: {}", login.body);
    new.stop();
}

struct ProbePaths {
    startup: String,
    liveness: String,
}

fn service_probe_paths() -> ProbePaths {
    let service = service();
    let container = container(&service);
    let path = |probe: &str| {
        container[probe]["httpGet"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{probe}.httpGet.path"))
            .to_owned()
    };
    ProbePaths {
        startup: path("startupProbe"),
        liveness: path("livenessProbe"),
    }
}

#[test]
fn the_dockerfile_builds_locked_caches_dependencies_and_ships_only_the_binary() {
    let dockerfile = read("deploy/Dockerfile");
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    let cargo_runs: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.contains("cargo ") && !l.trim_start().starts_with('#'))
        .filter(|l| {
            ["cargo build", "cargo install", "chef cook"]
                .iter()
                .any(|c| l.contains(c))
        })
        .collect();
    assert!(!cargo_runs.is_empty());
    for line in &cargo_runs {
        assert!(line.contains("--locked"), "not --locked: {line}");
    }
    // Dependencies are compiled from the recipe before the sources are copied in.
    let build = stages
        .iter()
        .find(|s| s.contains("chef cook"))
        .expect("a stage that cooks the recipe");
    let cook = build.find("chef cook").unwrap();
    let sources = build.find("COPY . .").expect("the build stage copies the sources");
    let compile = build.find("cargo build").unwrap();
    assert!(
        cook < sources && sources < compile,
        "cook, then copy the sources, then build"
    );
    // The final stage: no package manager run, no shell, only the binary and the data dir.
    let last = stages.last().unwrap();
    assert!(
        last.starts_with("gcr.io/distroless/cc"),
        "final stage: {}",
        last.lines().next().unwrap()
    );
    assert!(!last.contains("\nRUN "), "nothing runs in the final stage");
    let copies: Vec<&str> = last.lines().filter(|l| l.starts_with("COPY")).collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    assert!(copies.iter().any(|c| c.ends_with("/usr/local/bin/keycast")));
    assert!(copies
        .iter()
        .any(|c| c.contains("--chown=10001:10001") && c.ends_with(" /data")));
    let dockerignore = read(".dockerignore");
    for pattern in ["target/", "data/", "**/*.db"] {
        assert!(
            dockerignore.lines().any(|l| l == pattern),
            ".dockerignore lacks {pattern}"
        );
    }
}

/// Every `gcloud`/`gsutil` command in the docs and the deploy files' comments, with its
/// continuation lines joined, and where it was found.
fn documented_commands() -> Vec<(String, String)> {
    let mut sources: Vec<String> = vec!["README.md".into()];
    for dir in ["docs", "deploy"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            // Pictures (the README's screenshot) hold no commands.
            if name.ends_with(".png") {
                continue;
            }
            sources.push(format!("{dir}/{name}"));
        }
    }
    let mut commands = Vec::new();
    for source in sources {
        let text = read(&source);
        let mut pending: Option<String> = None;
        for line in text.lines() {
            let line = line.trim().trim_start_matches('#').trim();
            let line = line.strip_prefix("$ ").unwrap_or(line);
            let current = match pending.take() {
                Some(mut command) => {
                    command.push(' ');
                    command.push_str(line);
                    Some(command)
                }
                None if ["gcloud ", "gsutil "].iter().any(|p| line.starts_with(p)) => Some(line.to_owned()),
                None => None,
            };
            if let Some(command) = current {
                match command.strip_suffix('\\') {
                    Some(open) => pending = Some(open.trim_end().to_owned()),
                    None => commands.push((source.clone(), command)),
                }
            }
        }
    }
    commands
}

/// The local paths a command names: arguments that end like a file this repository keeps
/// (`.yaml`, `.json`, `.toml`, `Dockerfile`), with `--flag=` stripped.
fn named_files(command: &str) -> Vec<String> {
    command
        .split_whitespace()
        .map(|t| t.trim_matches(|c| c == '"' || c == '\''))
        .map(|t| t.rsplit_once('=').map_or(t, |(_, v)| v))
        .filter(|t| !t.contains("://") && !t.starts_with('$') && !t.contains('@'))
        .filter(|t| {
            [".yaml", ".yml", ".json", ".toml", "Dockerfile"]
                .iter()
                .any(|e| t.ends_with(e))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn documented_gcloud_commands_name_only_files_that_exist() {
    let commands = documented_commands();
    assert!(
        commands.iter().any(|(_, c)| c.contains("deploy/cloudrun-sqlite.yaml")),
        "the docs deploy the service YAML: {commands:?}"
    );
    // Files a documented step writes (`> FILE`, `-o FILE`, `--output-file FILE`) exist for the
    // commands after it.
    let mut written = BTreeMap::new();
    for source in ["README.md", "docs/OPERATIONS.md"] {
        let Ok(text) = std::fs::read_to_string(root().join(source)) else {
            continue;
        };
        for window in text.split_whitespace().collect::<Vec<_>>().windows(2) {
            if [">", "-o", "--output-file"].contains(&window[0]) {
                written.insert(window[1].trim_matches('`').to_owned(), source);
            }
        }
    }
    let mut missing = Vec::new();
    for (source, command) in &commands {
        for file in named_files(command) {
            if !root().join(&file).exists() && !written.contains_key(file.as_str()) {
                missing.push(format!("{source}: `{command}` names {file}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "documented commands name files that do not exist:\n{}",
        missing.join("\n")
    );
}

#[test]
fn named_files_finds_paths_and_ignores_urls() {
    assert_eq!(
        named_files("gcloud run services replace deploy/cloudrun-sqlite.yaml --region=x"),
        vec!["deploy/cloudrun-sqlite.yaml"]
    );
    assert_eq!(
        named_files("gcloud builds submit --config=deploy/cloudbuild.yaml gs://b/x.json"),
        vec!["deploy/cloudbuild.yaml"]
    );
    assert!(named_files("gsutil ls gs://bucket/keycast").is_empty());
}

#[test]
fn the_postgres_service_yaml_sets_only_variables_keycast_knows_and_keycast_accepts_it() {
    let service: Value =
        serde_yaml_ng::from_str(&read("deploy/cloudrun-postgres.yaml")).expect("deploy/cloudrun-postgres.yaml is YAML");
    let container = container(&service);
    let env = env_of(container);
    assert_known_settings(&env);
    assert_secret_files_mounted(&service, container, &env);
    for (name, _) in &env {
        assert!(
            !name.starts_with("KEYCAST_REPLICA_") && name != "KEYCAST_DATA_DIR",
            "{name}: PostgreSQL keeps the data; there is no replica and no local database"
        );
    }
    assert!(
        env.iter().any(|(n, _)| n == "DATABASE_URL_FILE"),
        "the database URL (with its password) comes from Secret Manager"
    );

    // Several instances, at least one always running with CPU, on one Cloud SQL instance.
    let annotations = &service["spec"]["template"]["metadata"]["annotations"];
    let max: u32 = annotations["autoscaling.knative.dev/maxScale"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(max > 1, "PostgreSQL is the mode for several instances");
    assert_eq!(annotations["autoscaling.knative.dev/minScale"], json!("1"));
    assert_eq!(annotations["run.googleapis.com/cpu-throttling"], json!("false"));
    let instance = annotations["run.googleapis.com/cloudsql-instances"]
        .as_str()
        .expect("a Cloud SQL connection");
    assert_eq!(
        instance.split(':').count(),
        3,
        "PROJECT:REGION:INSTANCE, not {instance}"
    );
    // The documented URL names the socket of that same instance.
    let url = format!("postgres://keycast:pw@/keycast?host=/cloudsql/{instance}");
    assert!(
        read("deploy/cloudrun-postgres.yaml").contains(&url.replace("keycast:pw", "keycast:PASSWORD")),
        "the comment's DATABASE_URL names /cloudsql/{instance}"
    );
    // Connections: every instance's pool plus its own connections fit the 1.7 GB tier's 50.
    // (Before, the count was pool + 1: 4 instances made 56 at full scale. `pool.rs` counts
    // them on a real server.)
    let pool: u32 = env
        .iter()
        .find(|(n, _)| n == "KEYCAST_DATABASE_MAX_CONNECTIONS")
        .map_or(10, |(_, v)| v.parse().unwrap());
    let own = keycast_db::pool::CONNECTIONS_BESIDE_THE_POOL;
    assert!(
        max * (pool + own) < 50,
        "{max} instances × ({pool} + {own}) connections"
    );

    assert_eq!(container["startupProbe"]["httpGet"]["path"], "/healthz/startup");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz/live");

    // keycast accepts this environment as PostgreSQL, with the secrets read from files.
    let secrets = tempfile::tempdir().unwrap();
    let mut lookup = BTreeMap::new();
    for (name, value) in &env {
        let value = match name.as_str() {
            "DATABASE_URL_FILE" => write_secret(secrets.path(), "database-url", &url),
            "KEYCAST_MASTER_KEY_FILE" => write_secret(secrets.path(), "master-key", TEST_MASTER_KEY),
            "KEYCAST_SMTP_URL_FILE" => write_secret(secrets.path(), "smtp-url", "smtp://127.0.0.1:2525"),
            other if other.ends_with("_FILE") => panic!("{other}: add a stand-in secret to this test"),
            _ => value.clone(),
        };
        lookup.insert(name.clone(), value);
    }
    let config = keycast::config::Sources::default()
        .with_env(|name| lookup.get(name).cloned())
        .build()
        .unwrap_or_else(|e| panic!("keycast refuses deploy/cloudrun-postgres.yaml's environment: {e}"));
    assert!(
        matches!(config.database, keycast::config::Database::Postgres(_)),
        "DATABASE_URL_FILE makes keycast run on PostgreSQL"
    );
    assert!(config.replica.is_none(), "no replica with PostgreSQL");
}

/// Writes a stand-in secret file and returns its path.
fn write_secret(dir: &Path, name: &str, value: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    path.display().to_string()
}
