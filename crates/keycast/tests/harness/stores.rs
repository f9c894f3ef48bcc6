//! Replica locations on every backend the test script starts, each as the replica URL
//! plus the variables an operator would set for that provider: a local directory, S3
//! (moto, `AWS_ENDPOINT_URL`), GCS (fake-gcs-server, `STORAGE_EMULATOR_HOST`) and Azure
//! (Azurite, `AZURE_STORAGE_CONNECTION_STRING`). Tests that must hold on every backend
//! take a [`Replica`] and get one `#[test]` per backend.

use std::path::Path;

use super::{new_bucket, peer, s3_env};

/// One replica location and the environment that reaches it.
pub struct Replica {
    /// `KEYCAST_REPLICA_URL`.
    pub url: String,
    /// The provider's variables (credentials, endpoint), without the URL.
    pub env: Vec<(String, String)>,
}

impl Replica {
    /// The URL and the provider's variables together, as `KEYCAST_REPLICA_URL` first.
    pub fn full_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("KEYCAST_REPLICA_URL".to_string(), self.url.clone())];
        env.extend(self.env.iter().cloned());
        env
    }
}

/// `file://<dir>`.
pub fn file(dir: &Path) -> Option<Replica> {
    Some(Replica {
        url: format!("file://{}", dir.display()),
        env: Vec::new(),
    })
}

/// A fresh bucket on moto.
pub fn s3(hint: &str) -> Option<Replica> {
    let endpoint = peer("KEYCAST_TEST_S3_ENDPOINT")?;
    let bucket = new_bucket(&endpoint, hint);
    let mut env = s3_env(&endpoint, &bucket, "keycast");
    let url = env.remove(0).1;
    Some(Replica { url, env })
}

/// A fresh prefix in the test script's bucket on fake-gcs-server.
pub fn gcs(hint: &str) -> Option<Replica> {
    let host = peer("KEYCAST_TEST_GCS_EMULATOR_HOST")?;
    let bucket = peer("KEYCAST_TEST_GCS_BUCKET")?;
    Some(Replica {
        url: format!("gs://{bucket}/{}", fresh_prefix(hint)),
        env: vec![("STORAGE_EMULATOR_HOST".into(), host)],
    })
}

/// A fresh prefix in the test script's container on Azurite.
pub fn azure(hint: &str) -> Option<Replica> {
    let connection = peer("KEYCAST_TEST_AZURE_CONNECTION_STRING")?;
    let container = peer("KEYCAST_TEST_AZURE_CONTAINER")?;
    Some(Replica {
        url: format!("az://{container}/{}", fresh_prefix(hint)),
        env: vec![("AZURE_STORAGE_CONNECTION_STRING".into(), connection)],
    })
}

/// `<hint>-<pid>-<n>-<nanos>`: unique across tests and runs sharing a bucket.
fn fresh_prefix(hint: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{hint}-{}-{n}-{nanos}", std::process::id())
}
