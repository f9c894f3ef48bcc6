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
    level0: Arc<Mutex<Option<String>>>,
    acks: Arc<Mutex<Vec<Ack>>>,
}

impl AckLog {
    /// Wraps `store` so that each level-0 upload it answers is recorded here.
    pub fn layer(&self, store: Store) -> Store {
        let dir = store.level_dir(0).to_string();
        *self.level0.lock().expect("ack log") = Some(format!("{dir}/"));
        let log = self.clone();
        store.with_layer(move |inner| Arc::new(Recording { inner, log }))
    }

    fn record(&self, key: &Path, header: Option<Bytes>) {
        let t = Instant::now();
        let is_level0 = match &*self.level0.lock().expect("ack log") {
            Some(dir) => key.as_ref().starts_with(dir.as_str()),
            None => false,
        };
        if is_level0 && ltx::parse_file_name(key.filename().unwrap_or_default()).is_some() {
            self.acks.lock().expect("ack log").push(Ack {
                t,
                key: key.clone(),
                header,
            });
        }
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
        self.log.record(location, header);
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
        self.log.record(to, None);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
