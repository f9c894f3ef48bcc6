//! When the store answered each level-0 upload: a second measure of replication lag, read at
//! the writer's side of the store instead of by polling the replica.
//!
//! The observer (see [`crate::observe`]) polls S3 every 10 ms so as not to load a store that
//! serves one request at a time, and each poll is a GET: a file it reports was visible up to
//! one poll interval plus one GET earlier. An upload's answer bounds the same moment from the
//! other side: the store makes an object readable before it answers the PUT (S3, GCS and Azure
//! read after write), so a commit's lag measured to that answer is never shorter than the true
//! one, and carries no poll interval. This layer sits between keycast's store client and the
//! network (see [`Store::with_layer`]): it only records; every request goes through unchanged.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::stream::BoxStream;
use keycast_replica::ltx::{self, decode_header};
use keycast_replica::Store;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};

use crate::observe::Obs;

/// One answered level-0 upload: when its answer arrived, its key, and its header when the
/// payload carried it (a copy from a staging object does not; see [`AckLog::observations`]).
#[derive(Debug, Clone)]
struct Ack {
    t: Instant,
    key: Path,
    header: Option<Bytes>,
}

/// The shared record of answered uploads. Cheap to clone.
#[derive(Clone, Default)]
pub struct AckLog {
    acks: Arc<Mutex<Vec<Ack>>>,
}

impl AckLog {
    /// Wraps `store` so that each level-0 upload it answers is recorded here.
    pub fn layer(&self, store: Store) -> Store {
        let level0 = format!("{}/", store.level_dir(0));
        let log = self.clone();
        store.with_layer(move |inner| Arc::new(Recording { inner, log, level0 }))
    }

    /// Every answered level-0 upload as an observation, in the order answered. Headers the
    /// payload did not carry are read back from the store (after the run, off the clock).
    pub async fn observations(&self, store: &Store) -> anyhow::Result<Vec<Obs>> {
        let acks = self.acks.lock().expect("ack log").clone();
        let objects = store.object_store();
        let mut out = Vec::with_capacity(acks.len());
        for ack in acks {
            let name = ack.key.filename().unwrap_or_default();
            let (_, txid) = ltx::parse_file_name(name).ok_or_else(|| anyhow::anyhow!("not an LTX name: {name}"))?;
            let bytes = match ack.header {
                Some(bytes) => bytes,
                None => {
                    let options = GetOptions {
                        range: Some((0..ltx::HEADER_SIZE as u64).into()),
                        ..GetOptions::default()
                    };
                    objects.get_opts(&ack.key, options).await?.bytes().await?
                }
            };
            out.push(Obs {
                t: ack.t,
                txid,
                header: decode_header(&bytes)?,
            });
        }
        Ok(out)
    }
}

impl fmt::Debug for AckLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AckLog")
            .field(&self.acks.lock().expect("ack log").len())
            .finish()
    }
}

/// The payload's first bytes, when they hold a whole LTX header.
fn header_of(payload: &PutPayload) -> Option<Bytes> {
    let mut head = Vec::with_capacity(ltx::HEADER_SIZE);
    for chunk in payload.iter() {
        let want = ltx::HEADER_SIZE - head.len();
        head.extend_from_slice(&chunk[..want.min(chunk.len())]);
        if head.len() == ltx::HEADER_SIZE {
            return Some(Bytes::from(head));
        }
    }
    None
}

#[derive(Debug)]
struct Recording {
    inner: Arc<dyn ObjectStore>,
    log: AckLog,
    /// The level-0 directory's key prefix, `/` included.
    level0: String,
}

impl Recording {
    /// Records an answered upload to `key` if it is a level-0 LTX file.
    fn record(&self, key: &Path, header: Option<Bytes>) {
        let t = Instant::now();
        let is_ltx = ltx::parse_file_name(key.filename().unwrap_or_default()).is_some();
        if key.as_ref().starts_with(&self.level0) && is_ltx {
            self.log.acks.lock().expect("ack log").push(Ack {
                t,
                key: key.clone(),
                header,
            });
        }
    }
}

impl fmt::Display for Recording {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recording({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Recording {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        let header = header_of(&payload);
        let result = self.inner.put_opts(location, payload, opts).await?;
        self.record(location, header);
        Ok(result)
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        // Only staging objects are uploaded in parts; the copy to the final key is recorded.
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await?;
        self.record(to, None);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keycast_replica::{CommitSignal, ReplicaOptions, Replicator};

    use super::*;
    use crate::pools::{self, WalProbe};

    /// The measure records what keycast ships: after a durable commit, an answered level-0
    /// upload's header reaches the commit's end in the WAL, recorded after the commit began.
    /// (Not necessarily after it returned: the replicator can ship the frames while the
    /// writer's answer is on its way back, which the lag counts as 0.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_answered_upload_is_recorded_with_the_wal_range_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let signal = CommitSignal::new();
        let pool = pools::keycast_pool(&db, &signal).await.unwrap();
        pools::create_table(&pool).await.unwrap();
        let log = AckLog::default();
        let store = log.layer(Store::in_memory());
        let replicator = Replicator::start(&db, store.clone(), signal, "acks-test", ReplicaOptions::default())
            .await
            .unwrap();
        let mut probe = WalProbe::new(&db);
        let mut ends = Vec::new();
        for _ in 0..3 {
            let began = Instant::now();
            sqlx::query(pools::INSERT_SMALL).execute(&pool).await.unwrap();
            let end = probe.read().unwrap();
            replicator.wait_durable(Duration::from_secs(10)).await.unwrap();
            ends.push((began, end));
        }
        let seen = log.observations(&store).await.unwrap();
        for (began, end) in ends {
            let holding = seen
                .iter()
                .find(|o| {
                    let h = &o.header;
                    (h.wal_salt1, h.wal_salt2) == (end.salt1, end.salt2) && h.wal_offset + h.wal_size >= end.end as i64
                })
                .expect("an answered upload holds the commit");
            assert!(holding.t >= began, "recorded before the commit began");
        }
        let txids: Vec<u64> = seen.iter().map(|o| o.txid).collect();
        assert!(
            txids.windows(2).all(|w| w[0] < w[1]),
            "answers in TXID order: {txids:?}"
        );
        pool.close().await;
        replicator
            .shutdown(Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
    }

    #[test]
    fn a_header_split_across_chunks_is_joined_and_a_short_payload_has_none() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(ltx::HEADER_SIZE + 10).collect();
        let payload = PutPayload::from_iter([
            Bytes::copy_from_slice(&bytes[..7]),
            Bytes::copy_from_slice(&bytes[7..60]),
            Bytes::copy_from_slice(&bytes[60..]),
        ]);
        assert_eq!(header_of(&payload).as_deref(), Some(&bytes[..ltx::HEADER_SIZE]));
        let short = PutPayload::from(Bytes::copy_from_slice(&bytes[..ltx::HEADER_SIZE - 1]));
        assert_eq!(header_of(&short), None);
    }
}
