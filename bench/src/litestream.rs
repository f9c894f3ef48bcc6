//! Litestream as a child process: its configuration, start, and SIGTERM stop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where Litestream replicates to.
#[derive(Debug, Clone)]
pub enum Replica {
    /// A local directory (`type: file`).
    File(PathBuf),
    /// `s3://bucket/prefix` on the endpoint in `AWS_ENDPOINT_URL`.
    S3 { bucket: String, prefix: String },
}

/// `None` keeps Litestream's shipped defaults (`monitor-interval` and `sync-interval` 1 s);
/// `Some(d)` sets both to `d` (keys checked against litestream 0.5.17: its startup log
/// echoes `sync-interval`, and L0 files then appear every `d`).
pub type Interval = Option<String>;

/// Writes `dir/litestream.yml` for `db` and returns its path.
pub fn write_config(dir: &Path, db: &Path, replica: &Replica, interval: &Interval) -> anyhow::Result<PathBuf> {
    let mut yml = String::new();
    if let Replica::S3 { .. } = replica {
        let key = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".into());
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "test".into());
        yml.push_str(&format!("access-key-id: {key}\nsecret-access-key: {secret}\n"));
    }
    yml.push_str(&format!("dbs:\n  - path: {}\n", db.display()));
    if let Some(i) = interval {
        yml.push_str(&format!("    monitor-interval: {i}\n"));
    }
    yml.push_str("    replicas:\n");
    match replica {
        Replica::File(path) => {
            yml.push_str(&format!("      - type: file\n        path: {}\n", path.display()));
        }
        Replica::S3 { bucket, prefix } => {
            let endpoint = std::env::var("AWS_ENDPOINT_URL").context("AWS_ENDPOINT_URL must name the S3 endpoint")?;
            let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
            yml.push_str(&format!(
                "      - url: s3://{bucket}/{prefix}\n        endpoint: {endpoint}\n        region: {region}\n        force-path-style: true\n"
            ));
        }
    }
    if let Some(i) = interval {
        yml.push_str(&format!("        sync-interval: {i}\n"));
    }
    let path = dir.join("litestream.yml");
    std::fs::write(&path, yml)?;
    Ok(path)
}

/// A running `litestream replicate`.
pub struct Process {
    child: Child,
    pub log: PathBuf,
}

/// A `litestream` command with the environment it needs (`AWS_CA_BUNDLE` breaks its S3
/// client on this machine).
pub fn command() -> Command {
    let mut c = Command::new(std::env::var("LITESTREAM").unwrap_or_else(|_| "litestream".into()));
    c.env_remove("AWS_CA_BUNDLE");
    c
}

/// Starts `litestream replicate -config <config>`, logging to `<dir>/litestream.log`.
pub fn start(dir: &Path, config: &Path) -> anyhow::Result<Process> {
    let log = dir.join("litestream.log");
    let out = File::create(&log)?;
    let child = command()
        .arg("replicate")
        .arg("-config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("cannot start litestream (is it on PATH? source /var/tmp/keycast-peers/env.sh)")?;
    Ok(Process { child, log })
}

impl Process {
    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process already exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "litestream exited early ({status}); log {}:\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// SIGTERM, then waits up to 20 s (SIGKILL after that). Returns whether it exited 0.
    pub fn stop(mut self) -> anyhow::Result<bool> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Splits `s3://bucket/prefix`.
pub fn split_s3_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .with_context(|| format!("{url}: expected s3://bucket/prefix"))?;
    let (bucket, prefix) = rest
        .split_once('/')
        .with_context(|| format!("{url}: expected s3://bucket/prefix"))?;
    Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
}

/// The replica URL form `litestream restore` takes for `url` (adds the endpoint for S3).
pub fn restore_url(url: &str) -> anyhow::Result<String> {
    if url.starts_with("s3://") {
        let endpoint = std::env::var("AWS_ENDPOINT_URL").context("AWS_ENDPOINT_URL must name the S3 endpoint")?;
        let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
        Ok(format!("{url}?endpoint={endpoint}&region={region}&forcePathStyle=true"))
    } else {
        Ok(url.to_owned())
    }
}
