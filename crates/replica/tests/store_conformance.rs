//! One conformance suite for [`Store`], run against every backend the test
//! script can start: in memory, `file://` in a temporary directory, a real S3
//! API server (moto; `KEYCAST_TEST_S3_ENDPOINT`), fake-gcs-server for `gs://`
//! (`KEYCAST_TEST_GCS_EMULATOR_HOST`, through the XML-upload shim described in
//! `scripts/peers/gcs_xml_upload_shim.py`) and Azurite for `az://`
//! (`KEYCAST_TEST_AZURE_CONNECTION_STRING`), all started by `scripts/test.sh`.
//! Each behaviour in `cases` becomes one test per backend, e.g.
//! `gcs::delete_removes_files_and_is_idempotent`. GCS and Azure tests share one
//! bucket or container (made by the script) and each gets a fresh prefix.
//!
//! The per-backend tests at the end check what Litestream itself reads,
//! bypassing `Store`: the exact file path and mtime on disk, and the exact S3
//! key and `litestream-timestamp` metadata as moto's HTTP API reports them.
//!
//! Without `KEYCAST_TEST_S3_ENDPOINT` the S3 tests print `SKIPPED` and pass,
//! unless `KEYCAST_REQUIRE_PEERS=1` (set by the test script), where they fail.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keycast_replica::store::{Backend, PutOutcome, Store};

/// Header timestamp used for every write, and how Litestream renders it.
const TIMESTAMP_MS: i64 = 1_795_847_805_035;
const TIMESTAMP_TEXT: &str = "2026-11-28T06:36:45.035Z";

fn timestamp() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(TIMESTAMP_MS as u64)
}

/// A store, a second client of the same location (another process, as far as the
/// backend can tell), plus whatever must outlive them.
struct Fixture {
    store: Store,
    rival: Store,
    _dir: Option<tempfile::TempDir>,
    s3: Option<S3Bucket>,
}

impl Fixture {
    /// Opens `url` twice with the variables `vars`.
    fn open(url: &str, vars: &[(&str, &str)]) -> Fixture {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let open = || {
            Store::from_url(url, &|name| vars.get(name).cloned())
                .unwrap_or_else(|err| panic!("open {url}: {err}"))
                .expect("a store")
        };
        Fixture {
            store: open(),
            rival: open(),
            _dir: None,
            s3: None,
        }
    }
}

fn memory() -> Option<Fixture> {
    let store = Store::in_memory();
    Some(Fixture {
        rival: store.clone(),
        store,
        _dir: None,
        s3: None,
    })
}

fn file() -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("create temp dir");
    let fixture = Fixture::open(&format!("file://{}", dir.path().display()), &[]);
    Some(Fixture {
        _dir: Some(dir),
        ..fixture
    })
}

fn s3() -> Option<Fixture> {
    let bucket = S3Bucket::create(&s3_endpoint()?);
    let vars = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", bucket.endpoint.as_str()),
    ];
    let fixture = Fixture::open(&format!("s3://{}/app", bucket.name), &vars);
    Some(Fixture {
        s3: Some(bucket),
        ..fixture
    })
}

/// The S3 API server from the test script, or `None` (after a loud message)
/// when running outside it.
fn s3_endpoint() -> Option<String> {
    peer("KEYCAST_TEST_S3_ENDPOINT").map(|endpoint| endpoint.trim_end_matches('/').to_string())
}

/// A peer's setting from the test script: fails under `KEYCAST_REQUIRE_PEERS=1`,
/// skips loudly elsewhere.
fn peer(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if std::env::var("KEYCAST_REQUIRE_PEERS").as_deref() == Ok("1") => {
            panic!("{var} is not set but KEYCAST_REQUIRE_PEERS=1: run scripts/test.sh, which starts the peer")
        }
        _ => {
            eprintln!("SKIPPED: this store test needs {var}; run scripts/test.sh");
            None
        }
    }
}

/// A prefix no other test uses, for backends where tests share a bucket.
fn fresh_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    format!(
        "kc-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `gs://<bucket>/<fresh prefix>` on fake-gcs-server, configured the way Google's tools
/// are pointed at an emulator: `STORAGE_EMULATOR_HOST`.
fn gcs() -> Option<Fixture> {
    let host = peer("KEYCAST_TEST_GCS_EMULATOR_HOST")?;
    let bucket = peer("KEYCAST_TEST_GCS_BUCKET")?;
    let url = format!("gs://{bucket}/{}", fresh_prefix());
    Some(Fixture::open(&url, &[("STORAGE_EMULATOR_HOST", &host)]))
}

/// `az://<container>/<fresh prefix>` on Azurite, configured the way Azure's tools are:
/// `AZURE_STORAGE_CONNECTION_STRING`.
fn azure() -> Option<Fixture> {
    let connection = peer("KEYCAST_TEST_AZURE_CONNECTION_STRING")?;
    let container = peer("KEYCAST_TEST_AZURE_CONTAINER")?;
    let url = format!("az://{container}/{}", fresh_prefix());
    Some(Fixture::open(&url, &[("AZURE_STORAGE_CONNECTION_STRING", &connection)]))
}

/// A fresh bucket on the S3 server, so tests never see each other's objects.
/// Raw requests go through `curl --aws-sigv4`, independent of the client
/// under test, and signed, because moto refuses anonymous object reads.
struct S3Bucket {
    endpoint: String,
    name: String,
}

impl S3Bucket {
    fn create(endpoint: &str) -> S3Bucket {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!(
            "kc-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let bucket = S3Bucket {
            endpoint: endpoint.to_string(),
            name,
        };
        bucket.curl(&["-X", "PUT"], "");
        bucket
    }

    /// Every key in the bucket, from a raw ListObjectsV2 response.
    fn keys(&self) -> BTreeSet<String> {
        let body = self.curl(&[], "?list-type=2");
        body.split("<Key>")
            .skip(1)
            .map(|rest| rest.split("</Key>").next().unwrap().to_string())
            .collect()
    }

    /// One response header (lowercase name) of a raw HEAD of `key`.
    fn head_header(&self, key: &str, header: &str) -> Option<String> {
        let response = self.curl(&["--head"], &format!("/{key}"));
        response.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case(header).then(|| value.trim().to_string())
        })
    }

    /// Runs a signed request against `<endpoint>/<bucket><path>` and returns
    /// the output; panics on any HTTP error.
    fn curl(&self, args: &[&str], path: &str) -> String {
        let url = format!("{}/{}{path}", self.endpoint, self.name);
        let output = std::process::Command::new("curl")
            .args([
                "-fsS",
                "--max-time",
                "60",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
                "--user",
                "test:test",
            ])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .args(args)
            .arg(&url)
            .output()
            .expect("run curl");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "curl {args:?} {url}: {stderr}");
        String::from_utf8(output.stdout).expect("utf-8 response")
    }
}

/// One test per behaviour in `cases`, per backend.
macro_rules! suite {
    ($backend:ident, [$($case:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(fixture) = super::$backend() else { return };
                    super::cases::$case(&fixture.store, &fixture.rival).await;
                }
            )*
        }
    };
}

macro_rules! every_backend {
    ($($case:ident),* $(,)?) => {
        suite!(memory, [$($case),*]);
        suite!(file, [$($case),*]);
        suite!(s3, [$($case),*]);
        suite!(gcs, [$($case),*]);
        suite!(azure, [$($case),*]);
    };
}

every_backend!(
    empty_store_lists_nothing,
    put_files_are_listed_sorted_with_level_txids_and_size,
    the_recent_listing_skips_what_the_levels_above_cover,
    the_recent_listing_reads_levels_two_to_nine_in_one_request,
    get_returns_the_written_bytes,
    second_put_at_same_key_is_already_exists_and_keeps_first_content,
    get_of_missing_file_is_not_found_naming_its_key,
    delete_removes_files_and_is_idempotent,
    listing_ignores_names_that_are_not_ltx_files,
    created_at_is_the_header_timestamp,
    keycast_objects_are_created_once_and_invisible_to_ltx_listing,
    out_of_range_level_is_rejected,
    request_count_counts_operations_and_stays_flat_while_idle,
    create_only_is_enforced_by_the_backend_across_clients,
    compare_and_swap_takes_the_current_version_and_refuses_a_stale_one,
    compare_and_swap_race_between_clients_has_exactly_one_winner,
    large_objects_go_up_create_only_and_read_back_piece_by_piece,
    large_encrypted_objects_seal_and_open_piece_by_piece,
    staging_left_overs_are_pruned_once_old,
);

/// The behaviours every backend must share, each taking a fresh, empty store.
mod cases {
    use std::time::Duration;

    use std::io::Write;

    use bytes::Bytes;
    use futures::TryStreamExt;
    use keycast_replica::spill::{Body, SpillWriter};
    use keycast_replica::store::{Backend, LtxObject, PutOutcome, Store, StoreError, UpdateOutcome};
    use object_store::path::Path;
    use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

    /// Distinct content per file, so a mix-up shows.
    fn content(level: u8, min: u64, max: u64) -> Bytes {
        Bytes::from(format!("ltx level {level} {min}-{max}").repeat(usize::from(level) + 1))
    }

    async fn put(store: &Store, level: u8, min: u64, max: u64) {
        let outcome = store
            .put_ltx(level, min, max, content(level, min, max), super::TIMESTAMP_MS)
            .await;
        assert_eq!(outcome.expect("put_ltx"), PutOutcome::Created, "L{level} {min}-{max}");
    }

    fn txids(files: &[LtxObject]) -> Vec<(u8, u64, u64)> {
        files.iter().map(|f| (f.level, f.min_txid, f.max_txid)).collect()
    }

    pub async fn empty_store_lists_nothing(store: &Store, _rival: &Store) {
        assert!(store.is_empty().await.unwrap());
        assert!(store.list_all().await.unwrap().is_empty());
        assert!(store.list_level(0).await.unwrap().is_empty());
        assert!(store.list_level(9).await.unwrap().is_empty());
    }

    pub async fn put_files_are_listed_sorted_with_level_txids_and_size(store: &Store, _rival: &Store) {
        // Written out of order, so sorting is the store's doing.
        for (level, min, max) in [(0, 3, 3), (9, 1, 2), (0, 1, 1), (1, 1, 3), (0, 2, 2), (0, 16, 16)] {
            put(store, level, min, max).await;
        }
        let level0 = store.list_level(0).await.unwrap();
        assert_eq!(txids(&level0), [(0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 16, 16)]);
        let all = store.list_all().await.unwrap();
        assert_eq!(
            txids(&all),
            [(0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 16, 16), (1, 1, 3), (9, 1, 2)]
        );
        for file in &all {
            let expected = content(file.level, file.min_txid, file.max_txid);
            assert_eq!(file.size, expected.len() as u64, "{}", file.key);
            assert_eq!(file.key, store.ltx_key(file.level, file.min_txid, file.max_txid));
        }
        assert!(!store.is_empty().await.unwrap());
    }

    pub async fn the_recent_listing_skips_what_the_levels_above_cover(store: &Store, _rival: &Store) {
        // Level 2 covers 1–20 (from level 1's 1–10 and 11–20), level 1 then 21–30; level 0
        // holds every TXID from 1 to 35 (retention has not pruned it), past 0x10 so that
        // names with more than one hex digit are compared too.
        for txid in 1..=35 {
            put(store, 0, txid, txid).await;
        }
        for (level, min, max) in [(1, 1, 10), (1, 11, 20), (1, 21, 30), (2, 1, 20)] {
            put(store, level, min, max).await;
        }
        let recent = store.list_recent().await.unwrap();
        assert_eq!(
            txids(&recent),
            [
                (0, 31, 31),
                (0, 32, 32),
                (0, 33, 33),
                (0, 34, 34),
                (0, 35, 35),
                (1, 21, 30),
                (2, 1, 20)
            ]
        );
        assert_eq!(store.max_txid().await.unwrap(), 35);
        assert_eq!(
            txids(&store.list_level_from(0, 0x20).await.unwrap()),
            [(0, 32, 32), (0, 33, 33), (0, 34, 34), (0, 35, 35)]
        );
        assert!(store.list_level_from(1, 31).await.unwrap().is_empty());
    }

    pub async fn the_recent_listing_reads_levels_two_to_nine_in_one_request(store: &Store, _rival: &Store) {
        // Files on every upper level, plus level 1 and 0 past them, plus keycast's own objects
        // (on S3 they sort right after level 9's directory) and a stray object in a level-2
        // subdirectory: only the LTX files count, and each level keeps its own.
        let layout = [
            (9, 1, 40),
            (8, 1, 40),
            (5, 1, 30),
            (3, 1, 20),
            (2, 1, 10),
            (2, 11, 41),
            (1, 42, 45),
        ];
        for (level, min, max) in layout {
            put(store, level, min, max).await;
        }
        for txid in 44..=47 {
            put(store, 0, txid, txid).await;
        }
        for name in ["keycast/lineage.json", "keycast/checksum/x/0000000000000001.json"] {
            let _ = store.put_object_create(name, Bytes::from_static(b"{}")).await.unwrap();
        }
        let stray = store
            .level_dir(2)
            .join("sub")
            .join("0000000000000001-0000000000000001.ltx");
        store
            .object_store()
            .put(&stray, PutPayload::from_static(b"x"))
            .await
            .unwrap();

        let before = store.request_count();
        let recent = store.list_recent().await.unwrap();
        let requests = store.request_count() - before;
        assert_eq!(
            txids(&recent),
            [
                (0, 46, 46),
                (0, 47, 47),
                (1, 42, 45),
                (2, 1, 10),
                (2, 11, 41),
                (3, 1, 20),
                (5, 1, 30),
                (8, 1, 40),
                (9, 1, 40)
            ]
        );
        // On a cloud store each request is a round trip and a billed operation: levels 2–9
        // in one, then level 1 and level 0 (it was one per level, ten in all).
        if matches!(store.backend(), Backend::S3 | Backend::Gcs | Backend::Azure) {
            assert_eq!(requests, 3, "{:?}", store.backend());
        }
        assert_eq!(store.max_txid().await.unwrap(), 47);
    }

    pub async fn get_returns_the_written_bytes(store: &Store, _rival: &Store) {
        put(store, 0, 1, 1).await;
        put(store, 9, 1, 7).await;
        for file in store.list_all().await.unwrap() {
            let bytes = store.get(&file).await.unwrap();
            assert_eq!(bytes, content(file.level, file.min_txid, file.max_txid));
        }
    }

    pub async fn second_put_at_same_key_is_already_exists_and_keeps_first_content(store: &Store, _rival: &Store) {
        put(store, 0, 5, 5).await;
        let second = store
            .put_ltx(0, 5, 5, Bytes::from_static(b"a different writer"), 0)
            .await
            .unwrap();
        assert_eq!(second, PutOutcome::AlreadyExists);
        let files = store.list_level(0).await.unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(store.get(&files[0]).await.unwrap(), content(0, 5, 5));
    }

    pub async fn get_of_missing_file_is_not_found_naming_its_key(store: &Store, _rival: &Store) {
        put(store, 0, 1, 1).await;
        let file = store.list_level(0).await.unwrap().remove(0);
        store.delete(std::slice::from_ref(&file)).await.unwrap();
        let err = store.get(&file).await.unwrap_err();
        let key = file.key.to_string();
        assert!(matches!(&err, StoreError::NotFound { key: k } if *k == key), "{err:?}");
        assert!(err.to_string().contains(&key), "{err}");
    }

    pub async fn delete_removes_files_and_is_idempotent(store: &Store, _rival: &Store) {
        for txid in 1..=3 {
            put(store, 0, txid, txid).await;
        }
        let files = store.list_level(0).await.unwrap();
        store.delete(&files[..2]).await.unwrap();
        assert_eq!(txids(&store.list_level(0).await.unwrap()), [(0, 3, 3)]);
        store
            .delete(&files[..2])
            .await
            .expect("deleting deleted files again is fine");
        store.delete(&[]).await.unwrap();
        store.delete(&files).await.unwrap();
        assert!(store.is_empty().await.unwrap());
    }

    pub async fn listing_ignores_names_that_are_not_ltx_files(store: &Store, _rival: &Store) {
        let level0 = store.level_dir(0);
        // The level directory of the *other* backend family's layout.
        let other_layout = match store.backend() {
            Backend::S3 => store.prefix().clone().join("ltx").join("0"),
            _ => store.prefix().clone().join("0000"),
        };
        let junk = [
            level0.clone().join("README"),
            level0.clone().join("0000000000000001-0000000000000002.LTX"),
            level0.clone().join("000000000000000A-000000000000000B.ltx"),
            level0.clone().join("0000000000000001-0000000000000002.ltx.tmp"),
            level0.clone().join("1-2.ltx"),
            level0.clone().join("sub").join("0000000000000001-0000000000000002.ltx"),
            store.prefix().clone().join("0000000000000001-0000000000000002.ltx"),
            other_layout.clone().join("0000000000000001-0000000000000002.ltx"),
            store
                .prefix()
                .clone()
                .join("ltx")
                .join("09")
                .join("0000000000000001-0000000000000002.ltx"),
        ];
        let raw = store.object_store();
        for key in &junk {
            raw.put(key, PutPayload::from_static(b"not ltx")).await.unwrap();
        }
        assert!(store.is_empty().await.unwrap(), "junk counted as LTX");
        assert!(store.list_all().await.unwrap().is_empty());
        put(store, 0, 1, 1).await;
        assert_eq!(txids(&store.list_all().await.unwrap()), [(0, 1, 1)]);
        assert!(
            raw.head(&Path::from(junk[0].as_ref())).await.is_ok(),
            "listing must not touch junk"
        );
    }

    pub async fn created_at_is_the_header_timestamp(store: &Store, _rival: &Store) {
        put(store, 0, 1, 1).await;
        let file = store.list_level(0).await.unwrap().remove(0);
        assert_eq!(store.created_at(&file).await.unwrap(), super::timestamp());
    }

    pub async fn keycast_objects_are_created_once_and_invisible_to_ltx_listing(store: &Store, _rival: &Store) {
        let name = "keycast/lineage.json";
        assert!(store.get_object(name).await.unwrap().is_none());
        let first = Bytes::from_static(br#"{"lineage":"a"}"#);
        assert_eq!(
            store.put_object_create(name, first.clone()).await.unwrap(),
            PutOutcome::Created
        );
        let second = Bytes::from_static(br#"{"lineage":"b"}"#);
        assert_eq!(
            store.put_object_create(name, second).await.unwrap(),
            PutOutcome::AlreadyExists
        );
        let (bytes, version) = store.get_object(name).await.unwrap().expect("object exists");
        assert_eq!(bytes, first);
        assert!(
            version.e_tag.is_some() || version.version.is_some(),
            "no version to update against"
        );
        assert!(store.is_empty().await.unwrap(), "keycast objects are not LTX files");
        assert!(matches!(
            store.get_object("lineage.json").await,
            Err(StoreError::InvalidName { .. })
        ));
    }

    pub async fn out_of_range_level_is_rejected(store: &Store, _rival: &Store) {
        let put = store.put_ltx(10, 1, 1, Bytes::from_static(b"x"), 0).await;
        assert!(matches!(put, Err(StoreError::InvalidLevel { level: 10 })), "{put:?}");
        let list = store.list_level(10).await;
        assert!(matches!(list, Err(StoreError::InvalidLevel { level: 10 })), "{list:?}");
        let range = store.put_ltx(0, 2, 1, Bytes::from_static(b"x"), 0).await;
        assert!(matches!(range, Err(StoreError::InvalidTxidRange { .. })), "{range:?}");
        assert_eq!(store.request_count(), 0, "invalid arguments must not reach the backend");
    }

    pub async fn request_count_counts_operations_and_stays_flat_while_idle(store: &Store, _rival: &Store) {
        let start = store.request_count();
        put(store, 0, 1, 1).await;
        let files = store.list_level(0).await.unwrap();
        store.get(&files[0]).await.unwrap();
        assert_eq!(store.request_count(), start + 3);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.request_count(), start + 3, "requests while idle");
        assert_eq!(
            store.clone().request_count(),
            store.request_count(),
            "clones share the counter"
        );
    }

    /// Two clients (two processes, as far as the backend can tell) write the same LTX key:
    /// the backend, not the client, refuses the second.
    pub async fn create_only_is_enforced_by_the_backend_across_clients(store: &Store, rival: &Store) {
        let mine = store
            .put_ltx(0, 7, 7, "mine".into(), super::TIMESTAMP_MS)
            .await
            .unwrap();
        let theirs = rival
            .put_ltx(0, 7, 7, "theirs".into(), super::TIMESTAMP_MS)
            .await
            .unwrap();
        assert_eq!((mine, theirs), (PutOutcome::Created, PutOutcome::AlreadyExists));
        let file = rival.list_level(0).await.unwrap().remove(0);
        assert_eq!(rival.get(&file).await.unwrap(), "mine");
        let name = "keycast/lease/current.json";
        assert_eq!(
            store.put_object_create(name, "a".into()).await.unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            rival.put_object_create(name, "b".into()).await.unwrap(),
            PutOutcome::AlreadyExists
        );
        assert_eq!(rival.get_object(name).await.unwrap().unwrap().0, "a");
    }

    /// The lease's primitive: an update from the version last read wins and yields the
    /// next version; an update from any older version is a conflict and changes nothing.
    pub async fn compare_and_swap_takes_the_current_version_and_refuses_a_stale_one(store: &Store, rival: &Store) {
        let name = "keycast/lease/current.json";
        assert_eq!(
            store.put_object_create(name, "v1".into()).await.unwrap(),
            PutOutcome::Created
        );
        let (_, v1) = store.get_object(name).await.unwrap().unwrap();
        let UpdateOutcome::Updated(v2) = store.put_object_update(name, "v2".into(), &v1).await.unwrap() else {
            panic!("an update from the current version must succeed")
        };
        assert_ne!(v1, v2, "a new version after an update");
        let stale = rival.put_object_update(name, "stale".into(), &v1).await.unwrap();
        assert_eq!(stale, UpdateOutcome::Conflict, "an update from a stale version");
        assert_eq!(rival.get_object(name).await.unwrap().unwrap().0, "v2");
        let (_, read) = rival.get_object(name).await.unwrap().unwrap();
        let next = rival.put_object_update(name, "v3".into(), &read).await.unwrap();
        assert!(matches!(next, UpdateOutcome::Updated(_)), "{next:?}");
        let missing = store
            .put_object_update("keycast/lease/absent.json", "x".into(), &v2)
            .await
            .unwrap();
        assert_eq!(missing, UpdateOutcome::Conflict, "an update of a missing object");
        assert!(store.get_object("keycast/lease/absent.json").await.unwrap().is_none());
    }

    /// Both clients read the same version and update at once: exactly one wins, and the
    /// object holds the winner's bytes.
    pub async fn compare_and_swap_race_between_clients_has_exactly_one_winner(store: &Store, rival: &Store) {
        let name = "keycast/lease/current.json";
        assert_eq!(
            store.put_object_create(name, "start".into()).await.unwrap(),
            PutOutcome::Created
        );
        for round in 0..5 {
            let (_, version) = store.get_object(name).await.unwrap().unwrap();
            let (a, b) = tokio::join!(
                store.put_object_update(name, format!("a{round}").into(), &version),
                rival.put_object_update(name, format!("b{round}").into(), &version),
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            let winner = match (&a, &b) {
                (UpdateOutcome::Updated(_), UpdateOutcome::Conflict) => "a",
                (UpdateOutcome::Conflict, UpdateOutcome::Updated(_)) => "b",
                _ => panic!("round {round}: exactly one update must win: {a:?} / {b:?}"),
            };
            let (bytes, _) = store.get_object(name).await.unwrap().unwrap();
            assert_eq!(bytes, format!("{winner}{round}"), "round {round}");
        }
    }

    /// A body written to a temporary file (as segments, full images and compactions larger
    /// than the spill limit are), holding `len` bytes derived from `seed`.
    fn spilled(len: usize, seed: u8) -> Body {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SpillWriter::new(dir.path(), 0);
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        writer.write_all(&bytes).unwrap();
        let body = writer.finish().unwrap();
        assert!(body.in_memory().is_none());
        body
    }

    /// Every byte of `obj`, read piece by piece through [`Store::open`].
    async fn read_pieces(store: &Store, obj: &LtxObject) -> Vec<u8> {
        let mut reader = store.open(obj).await.unwrap();
        let mut out = Vec::new();
        while let Some(piece) = reader.next().await.unwrap() {
            out.extend_from_slice(&piece);
        }
        out
    }

    /// Objects under the staging directory (left-overs of uploads in parts).
    async fn staging_objects(store: &Store) -> usize {
        let staging = store.prefix().clone().join("keycast").join("staging");
        let listed: Vec<_> = store.object_store().list(Some(&staging)).try_collect().await.unwrap();
        listed.len()
    }

    pub async fn large_objects_go_up_create_only_and_read_back_piece_by_piece(store: &Store, rival: &Store) {
        // More than one part of a multipart upload.
        let len = keycast_replica::store::PART_BYTES + 1000;
        let mine = spilled(len, 1);
        let prepared = store.prepare_ltx(9, 1, 9, mine.clone(), super::TIMESTAMP_MS).unwrap();
        assert_eq!(store.put_prepared(&prepared).await.unwrap(), PutOutcome::Created);
        let files = store.list_level(9).await.unwrap();
        assert_eq!(txids(&files), [(9, 1, 9)]);
        assert_eq!(files[0].size, len as u64);
        let expected = mine.to_bytes().unwrap();
        assert!(
            read_pieces(store, &files[0]).await == expected,
            "read back piece by piece"
        );
        assert!(store.get(&files[0]).await.unwrap() == expected, "read back whole");
        // Created "at" its header timestamp — except on S3, whose part copies drop metadata:
        // there it is the time it was stored, never earlier (see store/stream.rs).
        let created = store.created_at(&files[0]).await.unwrap();
        match store.backend() {
            Backend::S3 => assert!(created >= super::timestamp() - Duration::from_secs(1), "{created:?}"),
            _ => assert_eq!(created, super::timestamp()),
        }
        // Sending the same upload again (its first answer lost) finds its own bytes: done.
        assert_eq!(store.put_prepared(&prepared).await.unwrap(), PutOutcome::Created);
        // Another writer's bytes at the same key (another client, as a second instance is)
        // are refused by the backend, and the first stay.
        let theirs = rival
            .prepare_ltx(9, 1, 9, spilled(len, 2), super::TIMESTAMP_MS)
            .unwrap();
        assert_eq!(rival.put_prepared(&theirs).await.unwrap(), PutOutcome::AlreadyExists);
        assert!(
            read_pieces(store, &files[0]).await == expected,
            "the first object stays"
        );
        // Azure may finish a copy after answering it (202, copy pending): the staging blob
        // stays until retention prunes it, since deleting it could fail the copy.
        let left = usize::from(store.backend() == Backend::Azure);
        assert_eq!(
            staging_objects(store).await,
            left,
            "staging objects are removed (kept on Azure)"
        );
        if left > 0 {
            let now = std::time::SystemTime::now();
            assert_eq!(
                store.prune_staging(now - Duration::from_secs(3600)).await.unwrap(),
                0,
                "kept while young"
            );
            assert_eq!(
                store.prune_staging(now + Duration::from_secs(5)).await.unwrap(),
                1,
                "pruned once old"
            );
            assert!(
                read_pieces(store, &files[0]).await == expected,
                "the object outlives its staging blob"
            );
        }
    }

    pub async fn staging_left_overs_are_pruned_once_old(store: &Store, _rival: &Store) {
        // What a crash between an upload in parts and its copy into place leaves behind.
        let left = store.prefix().clone().join("keycast").join("staging").join("abc.ltx");
        store
            .object_store()
            .put(&left, PutPayload::from_static(b"half"))
            .await
            .unwrap();
        put(store, 0, 1, 1).await;
        // The file backend writes its staging files next to their target, where listings
        // never show them.
        let staging_file = (store.backend() == Backend::File).then(|| {
            let root = std::path::PathBuf::from(store.describe().strip_prefix("file://").unwrap());
            let file = root
                .join("ltx")
                .join("0")
                .join("0000000000000007-0000000000000007.ltx#keycast-0a0b0c0d0e0f");
            std::fs::write(&file, b"half").unwrap();
            file
        });
        let now = std::time::SystemTime::now();
        assert_eq!(
            store.prune_staging(now - Duration::from_secs(3600)).await.unwrap(),
            0,
            "too young"
        );
        assert_eq!(staging_objects(store).await, 1);
        assert_eq!(
            store.prune_staging(now + Duration::from_secs(5)).await.unwrap(),
            1 + usize::from(staging_file.is_some())
        );
        assert_eq!(staging_objects(store).await, 0);
        assert!(staging_file.is_none_or(|f| !f.exists()), "the staging file is removed");
        assert_eq!(store.list_level(0).await.unwrap().len(), 1, "LTX files are not touched");
    }

    pub async fn large_encrypted_objects_seal_and_open_piece_by_piece(store: &Store, _rival: &Store) {
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let sealed = store
            .reopen()
            .with_encryption(keycast_replica::crypt::ObjectCipher::from_base64(key).unwrap());
        let body = spilled(3 << 20, 7);
        let prepared = sealed.prepare_ltx(0, 4, 4, body.clone(), super::TIMESTAMP_MS).unwrap();
        assert_eq!(sealed.put_prepared(&prepared).await.unwrap(), PutOutcome::Created);
        assert_eq!(
            sealed.put_prepared(&prepared).await.unwrap(),
            PutOutcome::Created,
            "its own bytes again"
        );
        let file = sealed.list_level(0).await.unwrap().remove(0);
        assert_eq!(file.size, body.len() + keycast_replica::crypt::OVERHEAD);
        assert!(read_pieces(&sealed, &file).await == body.to_bytes().unwrap());
        // The same bytes through the one-shot path.
        assert!(sealed.get(&file).await.unwrap() == body.to_bytes().unwrap());
        // Without the key, or with another one, nothing is handed out as plaintext.
        let mut reader = store.open(&file).await.unwrap();
        assert!(matches!(reader.next().await, Err(StoreError::Crypt(_))));
        let wrong = store.reopen().with_encryption(
            keycast_replica::crypt::ObjectCipher::from_base64("HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=").unwrap(),
        );
        let mut reader = wrong.open(&file).await.unwrap();
        let mut result = Ok(Some(Bytes::new()));
        while let Ok(Some(_)) = result {
            result = reader.next().await;
        }
        assert!(matches!(result, Err(StoreError::Crypt(_))), "{result:?}");
    }
}

#[tokio::test]
async fn file_backend_uses_litestream_paths_and_sets_mtime_to_the_header_timestamp() {
    let fixture = file().unwrap();
    let (store, dir) = (&fixture.store, fixture._dir.as_ref().unwrap().path());
    assert_eq!(store.backend(), Backend::File);
    assert_eq!(
        store.put_ltx(0, 1, 1, "l0".into(), TIMESTAMP_MS).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store.put_ltx(9, 1, 5, "snapshot".into(), TIMESTAMP_MS).await.unwrap(),
        PutOutcome::Created
    );

    let l0 = dir.join("ltx/0/0000000000000001-0000000000000001.ltx");
    let l9 = dir.join("ltx/9/0000000000000001-0000000000000005.ltx");
    assert_eq!(std::fs::read(&l0).unwrap(), b"l0");
    assert_eq!(std::fs::read(&l9).unwrap(), b"snapshot");
    assert_eq!(
        files_under(dir),
        BTreeSet::from([l0.clone(), l9]),
        "exactly the LTX files, nothing else"
    );
    assert_eq!(std::fs::metadata(&l0).unwrap().modified().unwrap(), timestamp());
    for file in store.list_all().await.unwrap() {
        assert_eq!(file.created_at, timestamp(), "listing reports the mtime");
    }
}

fn files_under(dir: &std::path::Path) -> BTreeSet<std::path::PathBuf> {
    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.insert(path);
        }
    }
    files
}

#[tokio::test]
async fn s3_backend_uses_litestream_keys_and_timestamp_metadata() {
    let Some(fixture) = s3() else { return };
    let (store, bucket) = (&fixture.store, fixture.s3.as_ref().unwrap());
    assert_eq!(store.backend(), Backend::S3);
    assert_eq!(
        store.put_ltx(0, 1, 1, "l0".into(), TIMESTAMP_MS).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store.put_ltx(9, 1, 5, "snapshot".into(), TIMESTAMP_MS).await.unwrap(),
        PutOutcome::Created
    );

    let l0 = "app/0000/0000000000000001-0000000000000001.ltx";
    let l9 = "app/0009/0000000000000001-0000000000000005.ltx";
    assert_eq!(
        bucket.keys(),
        BTreeSet::from([l0.to_string(), l9.to_string()]),
        "exactly the LTX keys, nothing else"
    );
    for key in [l0, l9] {
        let metadata = bucket.head_header(key, "x-amz-meta-litestream-timestamp");
        assert_eq!(metadata.as_deref(), Some(TIMESTAMP_TEXT), "{key}");
    }
}
