//! One replica location in an object store, laid out exactly as Litestream
//! 0.5.17 lays it out, so stock `litestream restore` reads what keycast
//! writes and keycast reads what Litestream writes.
//!
//! A [`Store`] owns the *where* and the *how* of every request: which key a
//! `(level, min, max)` LTX file lives at on each backend, create-only uploads
//! carrying the creation time Litestream's `-timestamp` restore compares,
//! listing, deletion, keycast's own small objects, and request metrics. It
//! does not know what is inside an LTX file ([`crate::ltx`]) nor when to
//! write, compact or prune one (the replicator's job).
//!
//! # Layout
//!
//! | backend | key of an LTX file |
//! |---|---|
//! | file, gs, az, memory | `<prefix>/ltx/<level, decimal>/<min %016x>-<max %016x>.ltx` |
//! | s3 | `<prefix>/<level, %04x>/<min %016x>-<max %016x>.ltx` |
//!
//! Levels run from 0 to [`SNAPSHOT_LEVEL`]. Only names matching
//! `^[0-9a-f]{16}-[0-9a-f]{16}\.ltx$` directly inside a level directory are
//! LTX files; anything else under the prefix is ignored, as Litestream
//! ignores it. keycast's own objects live under `<prefix>/keycast/`, outside
//! every level directory, so Litestream never sees them.
//!
//! # Creation time
//!
//! Litestream's point-in-time restore compares each file's *CreatedAt*, not
//! its header timestamp. CreatedAt is the file's mtime on the file backend
//! and user metadata (`litestream-timestamp`, or `litestreamtimestamp` on
//! Azure, whose metadata names cannot contain `-`) elsewhere, so
//! [`Store::put_ltx`] sets whichever the backend uses to the header timestamp.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    UpdateVersion,
};

use crate::crypt::{CryptError, ObjectCipher};
use crate::ltx::{file_name, parse_file_name};
use crate::spill::Body;

mod location;
mod probe;
mod stream;

pub use probe::ConditionalWriteError;

use location::{invalid_url, open_azure, open_file, open_gcs, open_s3};
pub use stream::{LtxReader, PART_BYTES};

/// The snapshot level, and the highest level Litestream reads.
pub const SNAPSHOT_LEVEL: u8 = 9;

/// Directory under the prefix that holds keycast's own objects.
const KEYCAST_DIR: &str = "keycast";

/// The kind of object store behind a [`Store`]; it decides the layout and
/// where the creation time is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A local directory (`file://`).
    File,
    /// Amazon S3 or an S3-compatible server (`s3://`).
    S3,
    /// Google Cloud Storage (`gs://`).
    Gcs,
    /// Azure Blob Storage (`az://`, `abs://`).
    Azure,
    /// A process-local store for tests; laid out like `File`.
    Memory,
}

impl Backend {
    /// The user-metadata name Litestream reads CreatedAt from, or `None`
    /// where CreatedAt is the file's mtime.
    fn timestamp_metadata_key(self) -> Option<&'static str> {
        match self {
            Backend::S3 | Backend::Gcs | Backend::Memory => Some("litestream-timestamp"),
            // Azure metadata names must be C# identifiers, so Litestream drops the hyphen.
            Backend::Azure => Some("litestreamtimestamp"),
            Backend::File => None,
        }
    }
}

/// The most uploads the replicator has in flight at once. An instance that dies with uploads
/// in flight can leave level-0 objects stored *past* one that never landed; since a commit is
/// acknowledged only once every TXID up to its own is stored, none of those objects was
/// acknowledged, and they all lie within this many TXIDs of the gap.
pub const MAX_UPLOADS_IN_FLIGHT: u64 = 4;

/// Whether `past` — the files past the end `chain_end` of a contiguous TXID chain — is what
/// a pipelined writer that died leaves behind (see [`MAX_UPLOADS_IN_FLIGHT`]): single-TXID
/// level-0 files, none at `chain_end + 1` (that upload never landed), none further than
/// the pipeline reaches. Anything else past a gap is a damaged replica, not this.
pub fn unacknowledged_tail<'a>(past: impl IntoIterator<Item = &'a LtxObject>, chain_end: u64) -> bool {
    let mut any = false;
    for f in past {
        if f.level != 0 || f.min_txid != f.max_txid || f.min_txid <= chain_end + 1 {
            return false;
        }
        if f.max_txid > chain_end + MAX_UPLOADS_IN_FLIGHT {
            return false;
        }
        any = true;
    }
    any
}

/// The end of the TXID chain in `files` (a [`Store::list_recent`] or [`Store::list_all`]
/// listing), short of an unacknowledged pipelined tail; the newest TXID when the files past
/// the chain are anything else (restore then reports the gap) or no chain starts at TXID 1.
pub fn tip(files: &[LtxObject]) -> u64 {
    let newest = files.iter().map(|f| f.max_txid).max().unwrap_or(0);
    let end = chain_end(files);
    if end > 0 && end < newest && unacknowledged_tail(files.iter().filter(|f| f.max_txid > end), end) {
        end
    } else {
        newest
    }
}

/// How far the TXID chain from TXID 1 reaches in `files`, whatever their levels.
fn chain_end(files: &[LtxObject]) -> u64 {
    let mut end = 0;
    while let Some(next) = files
        .iter()
        .filter(|f| f.min_txid <= end + 1 && f.max_txid > end)
        .map(|f| f.max_txid)
        .max()
    {
        end = next;
    }
    end
}

/// One LTX file found by listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LtxObject {
    /// Compaction level, 0..=9.
    pub level: u8,
    /// First TXID covered, from the file name.
    pub min_txid: u64,
    /// Last TXID covered, from the file name.
    pub max_txid: u64,
    /// Object size in bytes.
    pub size: u64,
    /// The listing's last-modified time: the header timestamp on the file
    /// backend, the upload time elsewhere (see [`Store::created_at`]).
    pub created_at: SystemTime,
    /// Full object key, prefix included.
    pub key: Path,
}

/// What a compare-and-swap update did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum UpdateOutcome {
    /// Replaced; the new version to pass to the next update.
    Updated(UpdateVersion),
    /// The object changed (or vanished) since it was read: someone else won.
    Conflict,
}

/// What a create-only write did.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object did not exist and now holds the given bytes.
    Created,
    /// An object already existed at the key and was left untouched. For a
    /// fenced writer this means another writer got there first.
    AlreadyExists,
}

/// An LTX file ready to upload: addressed and, when the store encrypts, given its nonce —
/// once, so that retries send identical bytes (see [`Store::put_prepared`]).
#[derive(Debug, Clone)]
pub struct PreparedLtx {
    /// Compaction level.
    pub level: u8,
    /// First TXID covered.
    pub min_txid: u64,
    /// Last TXID covered.
    pub max_txid: u64,
    /// Where it goes.
    pub key: Path,
    /// The LTX file. When the store encrypts, what is uploaded is its sealed form under
    /// `nonce`, computed as it is sent: the same body and nonce always seal to the same bytes.
    pub body: Body,
    nonce: Option<[u8; crate::crypt::NONCE_LEN]>,
    created_at: DateTime<Utc>,
}

impl PreparedLtx {
    /// The file as a listing shows it once it is stored (its time: now, the upload's).
    pub fn described(&self) -> LtxObject {
        LtxObject {
            level: self.level,
            min_txid: self.min_txid,
            max_txid: self.max_txid,
            size: self.len(),
            created_at: SystemTime::now(),
            key: self.key.clone(),
        }
    }

    /// How many bytes are uploaded (the sealed form's when encrypted).
    pub fn len(&self) -> u64 {
        self.body.len() + self.nonce.map_or(0, |_| crate::crypt::OVERHEAD)
    }

    /// Whether nothing is uploaded (never, for a valid LTX file).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a [`Store`] operation failed. Messages name the URL or key involved,
/// never credentials.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The replica URL cannot be used.
    #[error("invalid replica url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// A configuration variable is missing or malformed.
    #[error("replica configuration: {variable}: {reason}")]
    Config { variable: &'static str, reason: String },
    /// The directory of a `file://` replica cannot be created or resolved.
    #[error("replica directory {dir}: {source}")]
    LocalDir { dir: PathBuf, source: std::io::Error },
    /// A level outside 0..=9.
    #[error("ltx level {level} is out of range 0..=9")]
    InvalidLevel { level: u8 },
    /// A TXID range that names no valid LTX file.
    #[error("invalid ltx txid range {min_txid:#x}..={max_txid:#x}: need 1 <= min <= max")]
    InvalidTxidRange { min_txid: u64, max_txid: u64 },
    /// A header timestamp that cannot be represented as a date.
    #[error("ltx timestamp {timestamp_ms} ms is out of range")]
    InvalidTimestamp { timestamp_ms: i64 },
    /// A keycast object name that is empty or escapes its directory.
    #[error("invalid object name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// The object does not exist (it may have been pruned since listing).
    #[error("object not found: {key}")]
    NotFound { key: String },
    /// The object store refused or failed a request.
    #[error("{operation} {key}: {source}")]
    Backend {
        operation: &'static str,
        key: String,
        source: object_store::Error,
    },
    /// An object could not be decrypted, or needs a key that was not given.
    #[error(transparent)]
    Crypt(CryptError),
    /// The file backend could not take the lock that stands in for compare-and-swap.
    #[error("lock {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    /// The file backend wrote the file but could not set its mtime to the
    /// header timestamp.
    #[error("set modification time of {path}: {source}")]
    Timestamp { path: PathBuf, source: std::io::Error },
}

/// The request kinds counted in metrics, one label value each.
#[derive(Debug, Clone, Copy)]
enum Operation {
    Put,
    Get,
    List,
    Delete,
    Head,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Put => "put",
            Operation::Get => "get",
            Operation::List => "list",
            Operation::Delete => "delete",
            Operation::Head => "head",
        }
    }
}

/// One replica location: a backend, a key prefix and that backend's layout.
///
/// Cheap to clone; clones share the connection pool and the request counter.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    objects: Arc<dyn ObjectStore>,
    backend: Backend,
    /// Key prefix, without leading or trailing `/`; empty for a bucket root.
    prefix: Path,
    /// Canonical directory of a `file://` replica, for setting mtimes,
    /// which object_store has no API for.
    root: Option<PathBuf>,
    /// What [`Store::describe`] returns; built once, without credentials.
    description: String,
    /// Operations issued through this store (and its clones).
    requests: AtomicU64,
    /// Client-side encryption of LTX objects, when configured.
    cipher: Option<ObjectCipher>,
    /// Requests go through a layer (see [`Store::with_layer`]): the file backend's direct file
    /// access, which would bypass it, is not used.
    layered: bool,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Store").field(&self.inner.description).finish()
    }
}

impl Store {
    /// Opens the replica named by `url`, reading backend settings through
    /// `env` (production passes `std::env::var(..).ok()`; nothing else is
    /// read from the environment).
    ///
    /// - `none` → `Ok(None)`: replication is off.
    /// - `file:///abs/dir` or `file://rel/dir`: a local directory, created if
    ///   missing. The path is taken literally (no percent-decoding).
    /// - `s3://bucket/prefix`: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY`
    ///   (+ `AWS_SESSION_TOKEN`), or ambient web-identity/container/instance
    ///   credentials when neither key is set; `AWS_REGION`, else
    ///   `AWS_DEFAULT_REGION`, else `us-east-1`; `AWS_ENDPOINT_URL` for an
    ///   S3-compatible server, which switches to path-style requests and
    ///   permits `http://`. The prefix must not be empty.
    /// - `gs://bucket/prefix`: `GOOGLE_SERVICE_ACCOUNT` (key file path) or
    ///   `GOOGLE_APPLICATION_CREDENTIALS`, else the metadata server;
    ///   `STORAGE_EMULATOR_HOST` for an emulator (no authentication).
    /// - `az://container/prefix` or `abs://[account@]container/prefix`:
    ///   `AZURE_STORAGE_CONNECTION_STRING`, else account from the URL or
    ///   `AZURE_STORAGE_ACCOUNT_NAME` and `AZURE_STORAGE_ACCOUNT_KEY` (else
    ///   managed identity); `AZURE_STORAGE_USE_EMULATOR=true` for Azurite.
    ///
    /// Makes no network request.
    ///
    /// # Errors
    /// `InvalidUrl` (naming the URL, userinfo passwords redacted) for an
    /// unknown scheme, a missing bucket, a query string, `..` in the prefix
    /// or an S3 bucket root; `Config` naming the variable for half a key
    /// pair, a missing Azure account or a malformed `AWS_ENDPOINT_URL`;
    /// `LocalDir` when a `file://` directory cannot be created; `Backend`
    /// when object_store rejects the configuration.
    pub fn from_url(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Store>, StoreError> {
        let url = url.trim();
        if url == "none" {
            return Ok(None);
        }
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            invalid_url(
                url,
                "expected scheme://location, e.g. s3://bucket/keycast or file:///var/lib/keycast/replica",
            )
        })?;
        if rest.contains(['?', '#']) {
            return Err(invalid_url(
                url,
                "query strings are not supported; configure the backend through environment variables",
            ));
        }
        let env = |name: &str| env(name).filter(|value| !value.is_empty());
        let store = match scheme {
            "file" => open_file(url, rest)?,
            "s3" => open_s3(url, rest, &env)?,
            "gs" => open_gcs(url, rest, &env)?,
            "az" | "abs" => open_azure(url, rest, &env)?,
            _ => {
                return Err(invalid_url(
                    url,
                    format!("unsupported scheme {scheme:?}; expected none, file, s3, gs or az"),
                ))
            }
        };
        Ok(Some(store))
    }

    /// A fresh, empty, process-local store with the file layout, for tests.
    /// It keeps timestamps as metadata, like the cloud backends.
    pub fn in_memory() -> Store {
        Store::new(
            Arc::new(InMemory::new()),
            Backend::Memory,
            Path::default(),
            None,
            "memory://".into(),
        )
    }

    fn new(
        objects: Arc<dyn ObjectStore>,
        backend: Backend,
        prefix: Path,
        root: Option<PathBuf>,
        description: String,
    ) -> Store {
        let inner = Inner {
            objects,
            backend,
            prefix,
            root,
            description,
            requests: AtomicU64::new(0),
            cipher: None,
            layered: false,
        };
        Store { inner: Arc::new(inner) }
    }

    /// The backend kind.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// A human-readable location such as
    /// `s3://bucket/prefix (endpoint http://127.0.0.1:9000, region us-east-1)`.
    /// Never contains credentials.
    pub fn describe(&self) -> String {
        self.inner.description.clone()
    }

    /// The key prefix every object of this replica lives under (empty for a
    /// bucket or directory root).
    pub fn prefix(&self) -> &Path {
        &self.inner.prefix
    }

    /// Operations issued through this store and its clones since it was
    /// opened: one per method call that reached the backend, however many
    /// HTTP requests (pages, retries) it took. Constant while idle.
    pub fn request_count(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// The underlying object store, for tests and diagnostics. Requests made
    /// through it bypass the layout, the metrics and [`Store::request_count`].
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.inner.objects)
    }

    /// The directory holding level `level`'s files: `<prefix>/ltx/<level>`,
    /// or `<prefix>/<level %04x>` on S3. Does not check the level.
    pub fn level_dir(&self, level: u8) -> Path {
        match self.inner.backend {
            Backend::S3 => self.inner.prefix.clone().join(format!("{level:04x}")),
            _ => self.inner.prefix.clone().join("ltx").join(level.to_string()),
        }
    }

    /// The key of the LTX file covering `min_txid..=max_txid` at `level`.
    /// Does not check its arguments.
    pub fn ltx_key(&self, level: u8, min_txid: u64, max_txid: u64) -> Path {
        self.level_dir(level).join(file_name(min_txid, max_txid))
    }

    /// Lists the LTX files at `level`, sorted by `(min_txid, max_txid)`.
    /// Names that are not LTX file names, and anything in subdirectories,
    /// are skipped. A level with no files gives an empty list.
    ///
    /// # Errors
    /// `InvalidLevel` above 9; `Backend` if the listing fails.
    pub async fn list_level(&self, level: u8) -> Result<Vec<LtxObject>, StoreError> {
        check_level(level)?;
        let dir = self.level_dir(level);
        self.begin(Operation::List);
        let metas: Vec<ObjectMeta> = self
            .inner
            .objects
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|source| self.failed(Operation::List, &dir, source))?;
        let mut objects: Vec<LtxObject> = metas
            .into_iter()
            .filter_map(|meta| ltx_object(level, &dir, meta))
            .collect();
        objects.sort_by_key(|o| (o.min_txid, o.max_txid));
        Ok(objects)
    }

    /// Lists the LTX files at `level` whose min TXID is at least `from`, sorted like
    /// [`Store::list_level`]. Names sort by min TXID, so the listing starts there (S3's
    /// `start-after`, GCS's start offset) instead of paging through the level's history.
    ///
    /// # Errors
    /// `Backend` if the listing fails.
    pub async fn list_level_from(&self, level: u8, from: u64) -> Result<Vec<LtxObject>, StoreError> {
        if from <= 1 {
            return self.list_level(level).await;
        }
        check_level(level)?;
        let dir = self.level_dir(level);
        let offset = self.ltx_key(level, from - 1, u64::MAX);
        self.begin(Operation::List);
        let metas: Vec<ObjectMeta> = self
            .inner
            .objects
            .list_with_offset(Some(&dir), &offset)
            .try_collect()
            .await
            .map_err(|source| self.failed(Operation::List, &dir, source))?;
        let mut objects: Vec<LtxObject> = metas
            .into_iter()
            .filter_map(|meta| ltx_object(level, &dir, meta))
            .filter(|o| o.min_txid >= from)
            .collect();
        objects.sort_by_key(|o| (o.min_txid, o.max_txid));
        Ok(objects)
    }

    /// The LTX files that matter for the latest state, sorted as [`Store::list_all`]: levels
    /// 3–9 whole (compaction keeps them short), then levels 2, 1 and 0 each only past what
    /// the levels above cover. Level 0 alone holds a file per shipped batch — tens of
    /// thousands after minutes of steady writes, kept for `l0_retention` — and reading all of
    /// them, a page of 1000 names per round trip, made a cold start's time grow with the
    /// replica's history. Three requests one after another instead, whatever the history
    /// (the whole listing only when those leave the TXID chain short; see the body)
    /// (levels 2–9 in one, see [`Store::list_upper_levels`]; then level 1 and level 0).
    ///
    /// Compaction merges whole files of the level below, newer than its own newest, so the
    /// files past what the levels above cover start right after it, and the newest TXID in
    /// this listing is the replica's newest. A caller that finds no chain in it (a layout
    /// some other tool wrote) falls back to [`Store::list_all`].
    ///
    /// The levels are listed one after another, and a writer compacting meanwhile stores a
    /// level's file, then deletes the files below it covers: a level listed before the store
    /// and the level below listed after the delete leave a hole, and the newest files then
    /// look like a tail of unacknowledged uploads past it — a restore stopped short, saying
    /// nothing. So a listing with such a tail is made again, and believed once two agree;
    /// the cover stored before the first listing's delete is in the second.
    ///
    /// # Errors
    /// `Backend` if a listing fails.
    pub async fn list_recent(&self) -> Result<Vec<LtxObject>, StoreError> {
        let mut previous: Option<u64> = None;
        let mut files = Vec::new();
        for _ in 0..3 {
            files = self.list_recent_once().await?;
            let end = chain_end(&files);
            let tail = files.iter().any(|f| f.max_txid > end);
            if !tail || previous == Some(end) {
                break;
            }
            previous = Some(end);
        }
        Ok(files)
    }

    /// One listing for [`Store::list_recent`].
    async fn list_recent_once(&self) -> Result<Vec<LtxObject>, StoreError> {
        let mut files = self.list_upper_levels().await?;
        let mut past_a_snapshot = false;
        for level in [1, 0] {
            // A snapshot is taken at whatever TXID the database is at, so a compacted file
            // made after it may start at or before it (level 1's 4-7 past a snapshot at 5):
            // a level is listed past the compacted levels above it, the snapshot only when
            // there are none.
            let compacted = files
                .iter()
                .filter(|f| f.level != SNAPSHOT_LEVEL)
                .map(|f| f.max_txid)
                .max();
            let covered = match compacted {
                Some(txid) => txid,
                None => {
                    past_a_snapshot = !files.is_empty();
                    files.iter().map(|f| f.max_txid).max().unwrap_or(0)
                }
            };
            files.extend(self.list_level_from(level, covered + 1).await?);
        }
        // A chain short of the newest file: past a snapshot, a straddling file may have been
        // left out (what follows then looks like a gap, or an unacknowledged tail), so the
        // whole listing decides; so too for anything past the chain that is not such a tail
        // (a real gap, a layout another tool wrote). A tail past compacted levels is in the
        // part listed already.
        let end = chain_end(&files);
        let past = files.iter().filter(|f| f.max_txid > end);
        if past.clone().next().is_some() && (past_a_snapshot || !unacknowledged_tail(past, end)) {
            return self.list_all().await;
        }
        files.sort_by_key(|f| (f.level, f.min_txid, f.max_txid));
        Ok(files)
    }

    /// Every LTX file at levels 2–9. Compaction keeps these levels short, so on a cloud store
    /// it is one listing starting at level 2's directory and stopped past level 9's (level
    /// directories sort in level order in both layouts), not one request per level: each
    /// request is a round trip and a billed operation, and an S3 server like moto scans its
    /// whole bucket for every listing, whatever its prefix. At most one page of other
    /// objects (keycast's own, which sort after the levels on S3) is read past level 9.
    /// Local backends list each level, which costs no request.
    async fn list_upper_levels(&self) -> Result<Vec<LtxObject>, StoreError> {
        const FIRST: u8 = 2;
        let root = match self.inner.backend {
            Backend::File | Backend::Memory => {
                let per_level =
                    futures::future::try_join_all((FIRST..=SNAPSHOT_LEVEL).map(|level| self.list_level(level))).await?;
                return Ok(per_level.into_iter().flatten().collect());
            }
            Backend::S3 => self.inner.prefix.clone(),
            Backend::Gcs | Backend::Azure => self.inner.prefix.clone().join("ltx"),
        };
        let dirs: Vec<(u8, Path)> = (FIRST..=SNAPSHOT_LEVEL)
            .map(|level| (level, self.level_dir(level)))
            .collect();
        let last = self.level_dir(SNAPSHOT_LEVEL);
        let past_last = |key: &Path| key.as_ref() > last.as_ref() && !key.prefix_matches(&last);
        // Keys after "<root>/<level 2>" itself: level 2's files and everything sorting later.
        self.begin(Operation::List);
        let mut metas = self.inner.objects.list_with_offset(Some(&root), &dirs[0].1);
        let mut files = Vec::new();
        while let Some(meta) = metas
            .try_next()
            .await
            .map_err(|source| self.failed(Operation::List, &root, source))?
        {
            if past_last(&meta.location) {
                break;
            }
            if let Some((level, dir)) = dirs.iter().find(|(_, dir)| meta.location.prefix_matches(dir)) {
                files.extend(ltx_object(*level, dir, meta));
            }
        }
        Ok(files)
    }

    /// The LTX files at `level` in TXID order for as long as `wanted` holds, and whether the
    /// listing reached the end of the level. On stores that list names in order (all but
    /// the file backend, whose listing is read whole and cheap) the listing stops at the
    /// first file that fails `wanted`, instead of paging through the rest of the level:
    /// retention looks for the oldest level-0 files this way, not through all of them.
    ///
    /// # Errors
    /// `Backend` if the listing fails.
    pub async fn list_level_while(
        &self,
        level: u8,
        wanted: impl Fn(&LtxObject) -> bool,
    ) -> Result<(Vec<LtxObject>, bool), StoreError> {
        if self.inner.backend == Backend::File {
            let all = self.list_level(level).await?;
            let n = all.iter().take_while(|o| wanted(o)).count();
            let complete = n == all.len();
            return Ok((all.into_iter().take(n).collect(), complete));
        }
        check_level(level)?;
        let dir = self.level_dir(level);
        self.begin(Operation::List);
        let mut metas = self.inner.objects.list(Some(&dir));
        let mut objects = Vec::new();
        while let Some(meta) = metas
            .try_next()
            .await
            .map_err(|source| self.failed(Operation::List, &dir, source))?
        {
            let Some(object) = ltx_object(level, &dir, meta) else {
                continue;
            };
            if !wanted(&object) {
                return Ok((objects, false));
            }
            objects.push(object);
        }
        Ok((objects, true))
    }

    /// The replica's newest TXID (0 when empty), from [`Store::list_recent`]: the end of its
    /// TXID chain — not counting an unacknowledged pipelined tail past a gap (see
    /// [`unacknowledged_tail`]), which the next writer replaces.
    ///
    /// # Errors
    /// `Backend` if a listing fails.
    pub async fn max_txid(&self) -> Result<u64, StoreError> {
        Ok(tip(&self.list_recent().await?))
    }

    /// Lists the LTX files at every level, sorted by level, then
    /// `(min_txid, max_txid)`. Costs one listing per level, issued
    /// concurrently.
    ///
    /// # Errors
    /// `Backend` if any listing fails.
    pub async fn list_all(&self) -> Result<Vec<LtxObject>, StoreError> {
        let levels = (0..=SNAPSHOT_LEVEL).map(|level| self.list_level(level));
        let per_level = futures::future::try_join_all(levels).await?;
        Ok(per_level.into_iter().flatten().collect())
    }

    /// Whether no level holds an LTX file (other objects don't count).
    /// Stops at the first file found.
    ///
    /// # Errors
    /// `Backend` if a listing fails.
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        for level in 0..=SNAPSHOT_LEVEL {
            let dir = self.level_dir(level);
            self.begin(Operation::List);
            let mut metas = self.inner.objects.list(Some(&dir));
            while let Some(meta) = metas
                .try_next()
                .await
                .map_err(|source| self.failed(Operation::List, &dir, source))?
            {
                if ltx_object(level, &dir, meta).is_some() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Reads a whole LTX file.
    ///
    /// # Errors
    /// `NotFound` naming the key if it no longer exists (for example, pruned
    /// after the listing); `Backend` for any other failure.
    pub async fn get(&self, obj: &LtxObject) -> Result<Bytes, StoreError> {
        match self.read(&obj.key).await? {
            Some((bytes, _)) => self.unseal(&obj.key, bytes),
            None => {
                self.count_error(Operation::Get);
                Err(StoreError::NotFound {
                    key: obj.key.to_string(),
                })
            }
        }
    }

    /// Uploads an LTX file to its TXID-derived key, create-only: an existing
    /// object is never overwritten. On success the object's CreatedAt (mtime
    /// on the file backend, metadata elsewhere) is `timestamp_ms`, the
    /// header timestamp. If the process dies between the upload and setting
    /// a file mtime, the file keeps its write time. Equivalent to
    /// [`Store::prepare_ltx`] then [`Store::put_prepared`].
    ///
    /// # Errors
    /// As [`Store::prepare_ltx`] and [`Store::put_prepared`].
    pub async fn put_ltx(
        &self,
        level: u8,
        min_txid: u64,
        max_txid: u64,
        data: Bytes,
        timestamp_ms: i64,
    ) -> Result<PutOutcome, StoreError> {
        let prepared = self.prepare_ltx(level, min_txid, max_txid, Body::from(data), timestamp_ms)?;
        self.put_prepared(&prepared).await
    }

    /// Addresses an LTX file and (if the store encrypts) picks its nonce once, so that every
    /// retry of its upload sends exactly the same bytes: a retry can then recognise its own
    /// earlier upload whose answer was lost (see [`Store::put_prepared`]).
    ///
    /// # Errors
    /// `InvalidLevel`, `InvalidTxidRange` or `InvalidTimestamp` for bad arguments.
    pub fn prepare_ltx(
        &self,
        level: u8,
        min_txid: u64,
        max_txid: u64,
        body: Body,
        timestamp_ms: i64,
    ) -> Result<PreparedLtx, StoreError> {
        check_level(level)?;
        if min_txid == 0 || min_txid > max_txid {
            return Err(StoreError::InvalidTxidRange { min_txid, max_txid });
        }
        let created_at = datetime_from_ms(timestamp_ms)?;
        let key = self.ltx_key(level, min_txid, max_txid);
        Ok(PreparedLtx {
            level,
            min_txid,
            max_txid,
            key,
            body,
            nonce: self.inner.cipher.as_ref().map(|_| ObjectCipher::new_nonce()),
            created_at,
        })
    }

    /// The bytes a small prepared upload sends, all at once.
    fn upload_bytes(&self, prepared: &PreparedLtx) -> Result<Bytes, StoreError> {
        let mut reader = stream::UploadReader::new(self, prepared);
        reader
            .read(prepared.len() as usize)
            .map_err(|e| self.io_failed(&prepared.key, e))
    }

    /// The directory of a `file://` replica, when it is read and written directly.
    fn local_root(&self) -> Option<PathBuf> {
        self.inner.root.clone().filter(|_| !self.inner.layered)
    }

    /// Uploads a prepared LTX file create-only: in one request from memory when it is small,
    /// in parts through a staging object when its body was spilled to disk; on the file
    /// backend always through a staging file, which also gets its mtime before it is made
    /// durable — see [`stream`](self::stream).
    ///
    /// An upload's outcome can be unknown: the store may apply a request whose answer never
    /// arrives, and a retry (object_store's own, or the caller's) then finds the key taken —
    /// by itself. So every collision, and every failed request, is resolved by reading the
    /// stored object (piece by piece): exactly these bytes means the upload happened
    /// (`Created`); other bytes mean another writer's object (`AlreadyExists`).
    ///
    /// # Errors
    /// `Backend` if the upload failed and the object is not there; `Timestamp` if the file
    /// backend cannot set the mtime.
    pub async fn put_prepared(&self, prepared: &PreparedLtx) -> Result<PutOutcome, StoreError> {
        let attributes = match self.inner.backend.timestamp_metadata_key() {
            Some(name) => {
                Attributes::from_iter([(Attribute::Metadata(name.into()), format_rfc3339(prepared.created_at))])
            }
            // The file backend rejects attributes; its CreatedAt is the mtime.
            None => Attributes::new(),
        };
        let key = &prepared.key;
        let put = match (self.local_root(), prepared.body.in_memory()) {
            // A local failure is no lost answer: bytes found in place may not be durable.
            (Some(root), _) => Ok(self.put_file(root, prepared).await?),
            (None, Some(_)) => {
                let bytes = self.upload_bytes(prepared)?;
                self.put_create(key, bytes, attributes).await
            }
            (None, None) => self.put_staged(prepared, attributes).await,
        };
        let failure = match put {
            Ok(PutOutcome::Created) => None,
            Ok(PutOutcome::AlreadyExists) => Some(None),
            Err(e) => Some(Some(e)),
        };
        if let Some(failure) = failure {
            let stored = match self.stored_equals(prepared).await {
                Ok(stored) => stored,
                Err(read) => return Err(failure.unwrap_or(read)),
            };
            match (stored, failure) {
                (Some(true), _) => {
                    metrics::counter!("keycast_replica_lost_answers_total").increment(1);
                    tracing::info!(key = %key, "an upload whose answer was lost had been stored: it counts as done");
                }
                (Some(false), None) => return Ok(PutOutcome::AlreadyExists),
                (None, None) => {
                    // A collision with an object that is gone again (deleted between the two
                    // requests): nothing of ours is there; report the failure to retry.
                    return Err(StoreError::NotFound { key: key.to_string() });
                }
                (_, Some(e)) => return Err(e),
            }
        }
        if self.local_root().is_none() {
            // Written through object_store (a layered file store in tests): the mtime comes after.
            self.set_file_mtime(key, prepared.created_at.into()).await?;
        }
        Ok(PutOutcome::Created)
    }

    /// Deletes one LTX object written by another writer that must not stay: see the
    /// replicator's handling of a stale writer's object. Idempotent.
    ///
    /// # Errors
    /// `Backend` if the deletion fails.
    pub async fn delete_key(&self, key: &Path) -> Result<(), StoreError> {
        self.begin(Operation::Delete);
        match self.inner.objects.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(self.failed(Operation::Delete, key, source)),
        }
    }

    /// Encrypts every LTX object written from now on and decrypts every one read (see
    /// [`crate::crypt`]). Call right after opening, before the store is cloned.
    ///
    /// # Panics
    /// If the store was already cloned.
    pub fn with_encryption(mut self, cipher: ObjectCipher) -> Store {
        Arc::get_mut(&mut self.inner)
            .expect("with_encryption is called before the store is shared")
            .cipher = Some(cipher);
        self
    }

    /// Another handle on the same location, as a second process would open it: same
    /// objects, its own request counter, not yet shared (so it can take
    /// [`Store::with_faults`] of its own).
    pub fn reopen(&self) -> Store {
        let inner = Inner {
            objects: Arc::clone(&self.inner.objects),
            backend: self.inner.backend,
            prefix: self.inner.prefix.clone(),
            root: self.inner.root.clone(),
            description: self.inner.description.clone(),
            requests: AtomicU64::new(0),
            cipher: self.inner.cipher.clone(),
            layered: self.inner.layered,
        };
        Store { inner: Arc::new(inner) }
    }

    /// Routes every request through `faults` (see [`crate::faults`]), for tests and drills.
    /// Call right after opening, before the store is cloned.
    ///
    /// # Panics
    /// If the store was already cloned.
    pub fn with_faults(self, faults: &crate::faults::Faults) -> Store {
        self.with_layer(|objects| Arc::new(crate::faults::FaultyStore::new(objects, faults.clone())))
    }

    /// Routes every request through the object store `layer` builds around this one: a fault
    /// injector, or a benchmark's record of when each upload was answered. The layer must
    /// forward what it does not mean to change. Call right after opening, before the store is
    /// cloned.
    ///
    /// # Panics
    /// If the store was already cloned.
    pub fn with_layer(mut self, layer: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>) -> Store {
        let inner = Arc::get_mut(&mut self.inner).expect("a layer is added before the store is shared");
        inner.objects = layer(inner.objects.clone());
        inner.layered = true;
        self
    }

    /// Whether LTX objects are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.inner.cipher.is_some()
    }

    /// A MAC of `message` under the replica key (see [`ObjectCipher::record_mac`]); `None`
    /// for an unencrypted replica, where there is no key to prove anything with.
    pub fn record_mac(&self, message: &[u8]) -> Option<String> {
        self.inner.cipher.as_ref().map(|cipher| cipher.record_mac(message))
    }

    /// Whether `mac` is the [`Store::record_mac`] of `message`: false without a key or a MAC.
    pub fn verify_record_mac(&self, message: &[u8], mac: Option<&str>) -> bool {
        match (&self.inner.cipher, mac) {
            (Some(cipher), Some(mac)) => cipher.verify_record_mac(message, mac),
            _ => false,
        }
    }

    /// Decrypts an LTX object read from `key`, or explains why it cannot be read.
    fn unseal(&self, key: &Path, bytes: Bytes) -> Result<Bytes, StoreError> {
        match &self.inner.cipher {
            Some(cipher) => cipher
                .open(key.as_ref(), &bytes)
                .map(Bytes::from)
                .map_err(StoreError::Crypt),
            None if crate::crypt::is_sealed(&bytes) => Err(StoreError::Crypt(CryptError::KeyMissing(key.to_string()))),
            None => Ok(bytes),
        }
    }

    /// Deletes LTX files, batched where the backend allows. Idempotent:
    /// files that are already gone are not an error. An empty slice makes no
    /// request.
    ///
    /// # Errors
    /// `Backend` for the first deletion that fails for another reason.
    pub async fn delete(&self, objs: &[LtxObject]) -> Result<(), StoreError> {
        let Some(first) = objs.first() else {
            return Ok(());
        };
        self.begin(Operation::Delete);
        let keys: Vec<_> = objs.iter().map(|obj| Ok(obj.key.clone())).collect();
        let mut results = self.inner.objects.delete_stream(futures::stream::iter(keys).boxed());
        while let Some(result) = results.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => return Err(self.failed(Operation::Delete, &first.key, source)),
            }
        }
        Ok(())
    }

    /// The CreatedAt Litestream's `-timestamp` restore would use for `obj`:
    /// the timestamp metadata where the backend keeps it (one HEAD request),
    /// falling back to the last-modified time for objects written without
    /// it; on the file backend, `obj.created_at` (the mtime), with no request.
    ///
    /// # Errors
    /// `NotFound` naming the key if the object is gone; `Backend` otherwise.
    pub async fn created_at(&self, obj: &LtxObject) -> Result<SystemTime, StoreError> {
        let Some(name) = self.inner.backend.timestamp_metadata_key() else {
            return Ok(obj.created_at);
        };
        self.begin(Operation::Head);
        let head = match self
            .inner
            .objects
            .get_opts(&obj.key, GetOptions::new().with_head(true))
            .await
        {
            Ok(head) => head,
            Err(object_store::Error::NotFound { .. }) => {
                self.count_error(Operation::Head);
                return Err(StoreError::NotFound {
                    key: obj.key.to_string(),
                });
            }
            Err(source) => return Err(self.failed(Operation::Head, &obj.key, source)),
        };
        let metadata = head.attributes.get(&Attribute::Metadata(name.into()));
        let parsed = metadata.and_then(|value| DateTime::parse_from_rfc3339(value).ok());
        Ok(parsed.map_or(head.meta.last_modified.into(), SystemTime::from))
    }

    /// Reads keycast object `name`, a `/`-separated key relative to the
    /// prefix that must start with `keycast/` (e.g. `keycast/lineage.json`),
    /// so it stays outside every level directory Litestream reads. Returns
    /// the version to pass to a later conditional update.
    ///
    /// # Errors
    /// `InvalidName` for a name outside `keycast/` or with empty, `.` or `..`
    /// segments; `Backend` if the read fails. A missing object is `Ok(None)`.
    pub async fn get_object(&self, name: &str) -> Result<Option<(Bytes, UpdateVersion)>, StoreError> {
        let key = self.object_key(name)?;
        let found = self.read(&key).await?;
        Ok(found.map(|(bytes, meta)| {
            (
                bytes,
                UpdateVersion {
                    e_tag: meta.e_tag,
                    version: meta.version,
                },
            )
        }))
    }

    /// The keycast objects under `dir` (named as for [`Store::get_object`], e.g.
    /// `keycast/checksum/<lineage>`), by name, in no particular order.
    ///
    /// # Errors
    /// `InvalidName` as for [`Store::get_object`]; `Backend` if the listing fails.
    pub async fn list_objects(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let key = self.object_key(dir)?;
        self.begin(Operation::List);
        let metas: Vec<ObjectMeta> = self
            .inner
            .objects
            .list(Some(&key))
            .try_collect()
            .await
            .map_err(|source| self.failed(Operation::List, &key, source))?;
        let skip = self.inner.prefix.parts_count();
        Ok(metas
            .into_iter()
            .map(|meta| {
                meta.location
                    .parts()
                    .skip(skip)
                    .map(|part| part.as_ref().to_owned())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect())
    }

    /// Deletes keycast object `name` (see [`Store::get_object`]); one already gone is not an
    /// error.
    ///
    /// # Errors
    /// `InvalidName` as for [`Store::get_object`]; `Backend` if the deletion fails.
    pub async fn delete_object(&self, name: &str) -> Result<(), StoreError> {
        self.delete_key(&self.object_key(name)?).await
    }

    /// Creates keycast object `name` (see [`Store::get_object`]) unless it
    /// already exists, in which case it is left untouched.
    ///
    /// # Errors
    /// `InvalidName` as for [`Store::get_object`]; `Backend` if the upload
    /// fails. `AlreadyExists` is not an error.
    pub async fn put_object_create(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        let key = self.object_key(name)?;
        self.put_create(&key, data, Attributes::new()).await
    }

    /// Replaces keycast object `name` only if it is still at `expected` (the version
    /// [`Store::get_object`] returned): compare-and-swap, the basis of the lease.
    ///
    /// Cloud backends do it natively (`If-Match` / generation match). The local filesystem
    /// cannot, so there the compare and the write happen under an exclusive `flock` on
    /// `<name>.lock`, which serialises every keycast process sharing the directory.
    ///
    /// # Errors
    /// `InvalidName` as for [`Store::get_object`]; `Backend` if the request fails.
    /// A lost race is `Ok(UpdateOutcome::Conflict)`, not an error.
    pub async fn put_object_update(
        &self,
        name: &str,
        data: Bytes,
        expected: &UpdateVersion,
    ) -> Result<UpdateOutcome, StoreError> {
        let key = self.object_key(name)?;
        if let Some(root) = self.inner.root.clone() {
            return self.update_file(root, key, data, expected.clone()).await;
        }
        let options = PutOptions {
            mode: PutMode::Update(expected.clone()),
            ..PutOptions::default()
        };
        self.begin(Operation::Put);
        match self.inner.objects.put_opts(&key, PutPayload::from(data), options).await {
            Ok(result) => Ok(UpdateOutcome::Updated(UpdateVersion::from(result))),
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                Ok(UpdateOutcome::Conflict)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(UpdateOutcome::Conflict),
            Err(source) => Err(self.failed(Operation::Put, &key, source)),
        }
    }

    /// The file backend's compare-and-swap: lock, compare the current e-tag, write, unlock —
    /// in a task of its own. object_store writes a file from a blocking task that goes on
    /// when its caller gives up (a renewal cancelled with a failed round, a stopped
    /// start-up); the lock must go on with it, or another process takes the lock, compares
    /// against the old version and writes, and the first write then lands over it.
    async fn update_file(
        &self,
        root: PathBuf,
        key: Path,
        data: Bytes,
        expected: UpdateVersion,
    ) -> Result<UpdateOutcome, StoreError> {
        let store = self.clone();
        let path = key.parts().fold(root.clone(), |path, part| path.join(part.as_ref()));
        tokio::spawn(async move { store.update_file_locked(root, key, data, expected).await })
            .await
            .map_err(|e| StoreError::Lock {
                path,
                source: std::io::Error::other(e),
            })?
    }

    async fn update_file_locked(
        &self,
        root: PathBuf,
        key: Path,
        data: Bytes,
        expected: UpdateVersion,
    ) -> Result<UpdateOutcome, StoreError> {
        let path = key.parts().fold(root, |path, part| path.join(part.as_ref()));
        let lock_path = path.with_extension("lock");
        let lock = tokio::task::spawn_blocking(move || crate::file_lock::FileLock::exclusive(&lock_path))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|source| StoreError::Lock {
                path: path.clone(),
                source,
            })?;
        let current = self.read(&key).await?.and_then(|(_, meta)| meta.e_tag);
        if current.is_none() || current != expected.e_tag {
            return Ok(UpdateOutcome::Conflict);
        }
        self.begin(Operation::Put);
        let options = PutOptions {
            mode: PutMode::Overwrite,
            ..PutOptions::default()
        };
        let result = self.inner.objects.put_opts(&key, PutPayload::from(data), options).await;
        drop(lock);
        match result {
            Ok(result) => Ok(UpdateOutcome::Updated(UpdateVersion::from(result))),
            Err(source) => Err(self.failed(Operation::Put, &key, source)),
        }
    }

    fn object_key(&self, name: &str) -> Result<Path, StoreError> {
        let bad = |reason| StoreError::InvalidName {
            name: name.to_string(),
            reason,
        };
        let mut segments = name.split('/');
        if segments.next() != Some(KEYCAST_DIR) {
            return Err(bad("keycast objects must be named keycast/..."));
        }
        let mut key = self.inner.prefix.clone().join(KEYCAST_DIR);
        for segment in segments {
            if matches!(segment, "" | "." | "..") {
                return Err(bad("segments must not be empty, \".\" or \"..\""));
            }
            key = key.join(segment);
        }
        if key.parts_count() == self.inner.prefix.parts_count() + 1 {
            return Err(bad("keycast objects must be named keycast/..."));
        }
        Ok(key)
    }

    /// Create-only upload; the backend's precondition failure means another
    /// writer created the key first.
    async fn put_create(&self, key: &Path, data: Bytes, attributes: Attributes) -> Result<PutOutcome, StoreError> {
        let len = data.len() as u64;
        let options = PutOptions {
            mode: PutMode::Create,
            attributes,
            ..PutOptions::default()
        };
        self.begin(Operation::Put);
        match self.inner.objects.put_opts(key, PutPayload::from(data), options).await {
            Ok(_) => {
                metrics::counter!("keycast_replica_bytes_total", "operation" => "put").increment(len);
                Ok(PutOutcome::Created)
            }
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(PutOutcome::AlreadyExists)
            }
            Err(source) => Err(self.failed(Operation::Put, key, source)),
        }
    }

    /// Reads a whole object; `None` if it does not exist.
    async fn read(&self, key: &Path) -> Result<Option<(Bytes, ObjectMeta)>, StoreError> {
        self.begin(Operation::Get);
        let result = match self.inner.objects.get(key).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(source) => return Err(self.failed(Operation::Get, key, source)),
        };
        let meta = result.meta.clone();
        let bytes = result
            .bytes()
            .await
            .map_err(|source| self.failed(Operation::Get, key, source))?;
        metrics::counter!("keycast_replica_bytes_total", "operation" => "get").increment(bytes.len() as u64);
        Ok(Some((bytes, meta)))
    }

    /// Sets a file replica's mtime, which is its CreatedAt; a no-op on
    /// other backends.
    async fn set_file_mtime(&self, key: &Path, time: SystemTime) -> Result<(), StoreError> {
        let Some(root) = &self.inner.root else {
            return Ok(());
        };
        let path = key.parts().fold(root.clone(), |path, part| path.join(part.as_ref()));
        let set = move || {
            let file = std::fs::File::options().write(true).open(&path);
            file.and_then(|file| file.set_modified(time))
                .map_err(|source| StoreError::Timestamp { path, source })
        };
        tokio::task::spawn_blocking(set).await.unwrap_or_else(|join| {
            Err(StoreError::Timestamp {
                path: root.clone(),
                source: std::io::Error::other(join),
            })
        })
    }

    fn begin(&self, operation: Operation) {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keycast_replica_requests_total", "operation" => operation.as_str()).increment(1);
    }

    fn count_error(&self, operation: Operation) {
        metrics::counter!("keycast_replica_request_errors_total", "operation" => operation.as_str()).increment(1);
    }

    fn failed(&self, operation: Operation, key: &Path, source: object_store::Error) -> StoreError {
        self.count_error(operation);
        StoreError::Backend {
            operation: operation.as_str(),
            key: key.to_string(),
            source,
        }
    }
}

/// Turns a listed object into an [`LtxObject`] if it sits directly in `dir`
/// under an LTX file name.
fn ltx_object(level: u8, dir: &Path, meta: ObjectMeta) -> Option<LtxObject> {
    let (min_txid, max_txid) = {
        let mut rest = meta.location.prefix_match(dir)?;
        let name = rest.next()?;
        if rest.next().is_some() {
            return None;
        }
        parse_file_name(name.as_ref())?
    };
    let created_at = meta.last_modified.into();
    Some(LtxObject {
        level,
        min_txid,
        max_txid,
        size: meta.size,
        created_at,
        key: meta.location,
    })
}

fn check_level(level: u8) -> Result<(), StoreError> {
    if level > SNAPSHOT_LEVEL {
        return Err(StoreError::InvalidLevel { level });
    }
    Ok(())
}

fn datetime_from_ms(timestamp_ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(timestamp_ms).ok_or(StoreError::InvalidTimestamp { timestamp_ms })
}

/// Formats like Go's `time.RFC3339Nano` in UTC at millisecond precision, as
/// Litestream writes `litestream-timestamp`: trailing fraction zeros are
/// dropped, and so is the dot when the fraction is zero.
fn format_rfc3339(time: DateTime<Utc>) -> String {
    let mut text = time.format("%Y-%m-%dT%H:%M:%S").to_string();
    let millis = time.timestamp_subsec_millis();
    if millis != 0 {
        text.push_str(format!(".{millis:03}").trim_end_matches('0'));
    }
    text.push('Z');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A writer compacting while someone lists (a `keycast restore` of the live replica):
    /// level 1 listed before the writer stores its new file, level 0 after the writer's
    /// retention deleted a file it covers. Before, the listing ended at 150 with 152 taken
    /// for an unacknowledged tail, and the restore stopped there without a word.
    #[tokio::test]
    async fn a_listing_across_a_compaction_reaches_the_tip() {
        use crate::faults::{Action, Faults, Gate, Op, Rule};
        let base = Store::in_memory();
        let faults = Faults::new();
        let lister = base.reopen().with_faults(&faults);
        let put = |level, min, max| base.put_ltx(level, min, max, Bytes::from_static(b"x"), 0);
        for (level, min, max) in [(1, 1, 150), (0, 151, 151), (0, 152, 152)] {
            assert_eq!(put(level, min, max).await.unwrap(), PutOutcome::Created);
        }
        let gate = Gate::new();
        faults.add(Rule::new(Op::List, Action::Hold(gate.clone())).key("ltx/0").times(1));
        let listing = tokio::spawn(async move { lister.list_recent().await });
        while gate.held() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(put(1, 151, 152).await.unwrap(), PutOutcome::Created);
        let covered: Vec<LtxObject> = base
            .list_level(0)
            .await
            .unwrap()
            .into_iter()
            .filter(|f| f.max_txid == 151)
            .collect();
        base.delete(&covered).await.unwrap();
        gate.open();
        let recent = listing.await.unwrap().unwrap();
        assert_eq!(tip(&recent), 152, "{recent:?}");
    }

    fn open(url: &str, vars: &[(&str, &str)]) -> Result<Option<Store>, StoreError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Store::from_url(url, &move |name| vars.get(name).cloned())
    }

    const MOTO: [(&str, &str); 3] = [
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "s3cr3t-value"),
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
    ];

    #[test]
    fn none_means_replication_is_off() {
        assert!(open("none", &[]).unwrap().is_none());
    }

    #[test]
    fn unknown_scheme_is_invalid_url_naming_it() {
        let err = open("ftp://host/dir", &[]).unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidUrl { url, .. } if url == "ftp://host/dir"),
            "{err}"
        );
        assert!(err.to_string().contains("ftp://host/dir"), "{err}");
    }

    #[test]
    fn url_without_scheme_is_invalid() {
        assert!(matches!(
            open("/var/lib/replica", &[]),
            Err(StoreError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn s3_bucket_root_is_refused() {
        for url in ["s3://bucket", "s3://bucket/", "s3://bucket/./"] {
            let err = open(url, &MOTO).unwrap_err();
            assert!(err.to_string().contains("s3://bucket/prefix"), "{url}: {err}");
        }
    }

    #[test]
    fn s3_prefix_is_cleaned_and_uses_hex_level_dirs() {
        let store = open("s3://bkt//app/./db/", &MOTO).unwrap().unwrap();
        assert_eq!(store.backend(), Backend::S3);
        assert_eq!(store.prefix().as_ref(), "app/db");
        assert_eq!(store.level_dir(9).as_ref(), "app/db/0009");
        assert_eq!(
            store.ltx_key(0, 1, 2).as_ref(),
            "app/db/0000/0000000000000001-0000000000000002.ltx"
        );
    }

    #[test]
    fn dot_dot_in_prefix_is_refused() {
        assert!(matches!(
            open("s3://bkt/a/../b", &MOTO),
            Err(StoreError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn query_string_is_refused() {
        let err = open("s3://bkt/app?endpoint=http://x", &MOTO).unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
    }

    #[test]
    fn s3_endpoint_allows_http_and_is_described_without_secrets() {
        let store = open("s3://bkt/app", &MOTO).unwrap().unwrap();
        let text = store.describe();
        assert_eq!(text, "s3://bkt/app (endpoint http://127.0.0.1:9000, region us-east-1)");
        let debug = format!("{store:?}");
        for shown in [&text, &debug] {
            assert!(!shown.contains("s3cr3t") && !shown.contains("AKIDEXAMPLE"), "{shown}");
        }
    }

    #[test]
    fn endpoint_userinfo_is_not_described() {
        let env = [
            ("AWS_ENDPOINT_URL", "http://user:pw@minio:9000/"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
        ];
        let store = open("s3://bkt/app", &env).unwrap().unwrap();
        assert!(!store.describe().contains("pw"), "{}", store.describe());
    }

    #[test]
    fn a_custom_endpoint_without_keys_names_the_missing_variable() {
        let err = open("s3://bkt/app", &[("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")]).unwrap_err();
        assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
    }

    #[test]
    fn s3_region_falls_back_to_default_region_then_us_east_1() {
        let with_default = open("s3://bkt/app", &[("AWS_DEFAULT_REGION", "eu-west-3")])
            .unwrap()
            .unwrap();
        assert!(with_default.describe().contains("region eu-west-3"));
        let with_none = open("s3://bkt/app", &[]).unwrap().unwrap();
        assert!(with_none.describe().contains("region us-east-1"));
    }

    #[test]
    fn half_an_aws_key_pair_names_the_missing_variable() {
        let err = open("s3://bkt/app", &[("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Config {
                    variable: "AWS_SECRET_ACCESS_KEY",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.to_string().contains("AKIDEXAMPLE"));
    }

    #[test]
    fn endpoint_must_be_http_or_https() {
        let err = open("s3://bkt/app", &[("AWS_ENDPOINT_URL", "ftp://host")]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Config {
                    variable: "AWS_ENDPOINT_URL",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn credentials_in_the_url_are_refused_and_redacted() {
        let err = open("s3://key:secret@bkt/app", &[]).unwrap_err();
        assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn gs_and_az_use_the_ltx_directory_layout() {
        let gcs = open("gs://bkt/app", &[]).unwrap().unwrap();
        assert_eq!(
            gcs.ltx_key(9, 1, 5).as_ref(),
            "app/ltx/9/0000000000000001-0000000000000005.ltx"
        );
        let az = open("az://container/app", &[("AZURE_STORAGE_ACCOUNT_NAME", "acct")])
            .unwrap()
            .unwrap();
        assert_eq!(az.level_dir(1).as_ref(), "app/ltx/1");
        let abs = open("abs://acct@container/app", &[]).unwrap().unwrap();
        assert_eq!(abs.describe(), "az://container/app (account acct)");
    }

    #[test]
    fn az_without_account_names_the_variable() {
        let err = open("az://container/app", &[]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Config {
                    variable: "AZURE_STORAGE_ACCOUNT_NAME",
                    ..
                }
            ),
            "{err}"
        );
    }

    /// The file backend's compare-and-swap, given up by its caller while its write is on the
    /// way (object_store writes from a blocking task, which goes on; the lease's renewals are
    /// cancelled when a round fails or a start-up is stopped). Before, the lock went with the
    /// caller: another process took it, compared against the old version, and wrote, and then
    /// the first write landed over it — both believed they held the lease.
    #[tokio::test]
    async fn a_file_swap_given_up_by_its_caller_still_excludes_the_next_one() {
        use crate::faults::{Action, Faults, Op, Rule};
        use std::time::Duration;
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("file://{}", tmp.path().display());
        let faults = Faults::new();
        let a = open(&url, &[]).unwrap().unwrap().with_faults(&faults);
        let b = open(&url, &[]).unwrap().unwrap();
        let created = b.put_object_create("keycast/lease", Bytes::from_static(b"first")).await;
        assert_eq!(created.unwrap(), PutOutcome::Created);
        let (_, first) = b.get_object("keycast/lease").await.unwrap().unwrap();

        faults.add(Rule::new(Op::Put, Action::Detached(Duration::from_millis(200))).times(1));
        let given_up = tokio::time::timeout(
            Duration::from_millis(20),
            a.put_object_update("keycast/lease", Bytes::from_static(b"a"), &first),
        )
        .await;
        assert!(given_up.is_err(), "the caller gave up before the write landed");
        let b_swap = b
            .put_object_update("keycast/lease", Bytes::from_static(b"b"), &first)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (stored, _) = b.get_object("keycast/lease").await.unwrap().unwrap();
        assert!(
            matches!(b_swap, UpdateOutcome::Conflict) && stored.as_ref() == b"a",
            "b's swap from the version a replaced: {b_swap:?}, and the lease holds {:?}",
            String::from_utf8_lossy(&stored)
        );
    }

    /// The file backend linked an upload into place but could not make the directory entry
    /// durable (EIO; a filesystem that refuses to sync directories). Before, the failure was
    /// settled like a lost answer, by reading the object back from the page cache: the upload
    /// counted as done and its commits as durable, and a power cut could take the entry away.
    #[tokio::test]
    async fn a_file_upload_whose_directory_sync_failed_is_not_acknowledged() {
        if !fail::has_failpoints() {
            eprintln!("SKIPPED: built without fault injection (--features keycast/failpoints)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let store = open(&format!("file://{}", tmp.path().display()), &[]).unwrap().unwrap();
        let prepared = store
            .prepare_ltx(0, 1, 1, Bytes::from_static(b"an LTX body").into(), 1_000)
            .unwrap();
        fail::cfg("replica-dir-sync", "1*return").unwrap();
        let first = store.put_prepared(&prepared).await;
        assert!(first.is_err(), "acknowledged without a durable entry: {first:?}");
        // Tried again, the entry is synced and the upload counts.
        assert_eq!(store.put_prepared(&prepared).await.unwrap(), PutOutcome::Created);
        fail::remove("replica-dir-sync");
    }

    #[test]
    fn file_url_creates_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let store = open(&format!("file://{}", dir.display()), &[]).unwrap().unwrap();
        assert!(dir.is_dir());
        assert_eq!(store.backend(), Backend::File);
        assert_eq!(
            store.ltx_key(0, 1, 1).as_ref(),
            "ltx/0/0000000000000001-0000000000000001.ltx"
        );
    }

    #[test]
    fn timestamps_format_like_go_rfc3339_nano() {
        let format = |ms| format_rfc3339(datetime_from_ms(ms).unwrap());
        assert_eq!(format(1_795_847_805_035), "2026-11-28T06:36:45.035Z");
        assert_eq!(format(1_795_847_805_450), "2026-11-28T06:36:45.45Z");
        assert_eq!(format(1_795_847_805_000), "2026-11-28T06:36:45Z");
    }

    #[test]
    fn object_names_cannot_escape_the_keycast_directory() {
        let store = Store::in_memory();
        assert_eq!(
            store.object_key("keycast/lease/current.json").unwrap().as_ref(),
            "keycast/lease/current.json"
        );
        for name in [
            "",
            "keycast",
            "keycast/",
            "/keycast/x",
            "lineage.json",
            "ltx/0/x",
            "keycast//b",
            "keycast/../ltx/0/x",
            "keycast/a/.",
        ] {
            assert!(
                matches!(store.object_key(name), Err(StoreError::InvalidName { .. })),
                "{name:?}"
            );
        }
    }
}
