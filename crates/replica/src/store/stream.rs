//! Objects too large to hold in memory: uploading a spilled [`Body`] create-only, reading an
//! object piece by piece, and telling whether a stored object holds exactly what an upload
//! sent.
//!
//! # Create-only, in parts
//! object_store's multipart uploads cannot be conditional, and a single PUT needs its whole
//! payload in memory. So a large object goes up in parts to a *staging* key of its own
//! (`<prefix>/keycast/staging/…`, where Litestream never looks), and is then copied into place
//! with [`CopyMode::Create`]: the server-side copy is the create-only write (`If-None-Match`
//! on S3's completing request, `ifGenerationMatch=0` on GCS, `If-None-Match: *` on Azure). The
//! staging object is deleted afterwards (on Azure only by retention, an hour later: its copy
//! may still be running, see `put_staged`); one left behind by a crash is removed by retention.
//! On the file backend every LTX object, small or spilled, is written to a hidden staging file
//! next to the target, given its mtime and hard-linked into place, which fails if the target
//! exists.
//!
//! S3 copies in parts do not carry user metadata over, so a large object on S3 has no
//! `litestream-timestamp`: its CreatedAt falls back to the time it was stored, which is later
//! than its header timestamp — a point-in-time restore then treats it as newer than it is,
//! which can only make it restore an earlier state, never a wrong one.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, FuturesUnordered};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{Attributes, CopyMode, CopyOptions, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutPayload};

use super::{Backend, Operation, PreparedLtx, PutOutcome, Store, StoreError};
use crate::crypt::{CryptError, Sealer, MAGIC, NONCE_LEN, TAG_LEN};
use crate::spill::Body;

/// Size of each part of a multipart upload (S3 needs at least 5 MiB but for the last).
pub const PART_BYTES: usize = 8 << 20;
/// Parts in flight at once.
const PARTS_IN_FLIGHT: usize = 2;
/// How much of a file is read at a time on the file backend.
const FILE_CHUNK: usize = 1 << 20;

/// The bytes an upload sends, produced front to back: the LTX file, or its sealed form
/// (magic, nonce, ciphertext, tag) computed on the fly. The same prepared upload always
/// produces the same bytes.
pub(super) struct UploadReader {
    body: Body,
    sealer: Option<Sealer>,
    /// Magic and nonce, when sealing.
    prefix: Vec<u8>,
    /// The tag, once the body is done.
    tag: Option<[u8; TAG_LEN]>,
    /// Bytes produced so far.
    pos: u64,
    total: u64,
}

impl UploadReader {
    pub(super) fn new(store: &Store, prepared: &PreparedLtx) -> UploadReader {
        let sealer = match (&store.inner.cipher, prepared.nonce) {
            (Some(cipher), Some(nonce)) => Some(cipher.sealer(prepared.key.as_ref(), nonce)),
            _ => None,
        };
        let prefix = sealer.as_ref().map(|s| s.prefix().to_vec()).unwrap_or_default();
        UploadReader {
            body: prepared.body.clone(),
            sealer,
            prefix,
            tag: None,
            pos: 0,
            total: prepared.len(),
        }
    }

    /// The next `max` bytes (fewer only at the end; empty once done). Blocking when the body
    /// is in a temporary file.
    pub(super) fn read(&mut self, max: usize) -> io::Result<Bytes> {
        let want = (self.total - self.pos).min(max as u64) as usize;
        let mut out = BytesMut::with_capacity(want);
        while out.len() < want {
            let room = want - out.len();
            let prefix_len = self.prefix.len() as u64;
            let body_end = prefix_len + self.body.len();
            if self.pos < prefix_len {
                let from = self.pos as usize;
                let n = room.min(self.prefix.len() - from);
                out.extend_from_slice(&self.prefix[from..from + n]);
                self.pos += n as u64;
            } else if self.pos < body_end {
                let mut chunk = self.body.read_chunk(self.pos - prefix_len, room)?.to_vec();
                if let Some(sealer) = &mut self.sealer {
                    sealer.update(&mut chunk);
                }
                self.pos += chunk.len() as u64;
                out.extend_from_slice(&chunk);
            } else {
                if self.tag.is_none() {
                    self.tag = Some(self.sealer.take().expect("only sealed uploads have a tag").finish());
                }
                let tag = self.tag.expect("just set");
                let from = (self.pos - body_end) as usize;
                let n = room.min(TAG_LEN - from);
                out.extend_from_slice(&tag[from..from + n]);
                self.pos += n as u64;
            }
        }
        Ok(out.freeze())
    }

    /// As [`UploadReader::read`], off the async threads.
    async fn read_async(mut self, max: usize) -> (UploadReader, io::Result<Bytes>) {
        match tokio::task::spawn_blocking(move || {
            let chunk = self.read(max);
            (self, chunk)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => panic!("reading an upload's body panicked: {e}"),
        }
    }
}

/// Makes `dir`'s entries durable (fail point `replica-dir-sync` fails it).
fn sync_dir(dir: &std::path::Path) -> io::Result<()> {
    fail::fail_point!("replica-dir-sync", |_| Err(io::Error::other(
        "injected: the directory could not be synced"
    )));
    File::open(dir)?.sync_all()
}

impl Store {
    /// The file backend, for any body: write a hidden staging file with its mtime (the
    /// object's CreatedAt), make it durable, hard-link it into place (refused if the target
    /// exists), make the directory entry durable — also when the target was there already,
    /// since that may be this upload's own earlier attempt whose directory sync failed. One
    /// trip to the blocking pool: a durable commit waits for all of it. A failure here is
    /// the truth, never a lost answer: the caller does not settle it by reading back.
    pub(super) async fn put_file(&self, root: PathBuf, prepared: &PreparedLtx) -> Result<PutOutcome, StoreError> {
        let key = prepared.key.clone();
        let target = key.parts().fold(root, |path, part| path.join(part.as_ref()));
        let mut reader = UploadReader::new(self, prepared);
        self.begin(Operation::Put);
        let len = prepared.len();
        let created_at: std::time::SystemTime = prepared.created_at.into();
        let written = tokio::task::spawn_blocking(move || -> io::Result<bool> {
            let dir = target.parent().expect("an object key has a directory");
            std::fs::create_dir_all(dir)?;
            let staging = staging_path(&target);
            let result = (|| {
                let mut file = File::options().write(true).create_new(true).open(&staging)?;
                loop {
                    let chunk = reader.read(FILE_CHUNK)?;
                    if chunk.is_empty() {
                        break;
                    }
                    file.write_all(&chunk)?;
                }
                file.set_modified(created_at)?;
                file.sync_all()?;
                match std::fs::hard_link(&staging, &target) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e),
                }
            })();
            let _ = std::fs::remove_file(&staging);
            if result.is_ok() {
                sync_dir(dir)?;
            }
            result
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        match written {
            Ok(true) => {
                metrics::counter!("keycast_replica_bytes_total", "operation" => "put").increment(len);
                Ok(PutOutcome::Created)
            }
            Ok(false) => Ok(PutOutcome::AlreadyExists),
            Err(e) => Err(self.failed(
                Operation::Put,
                &key,
                object_store::Error::Generic {
                    store: "file",
                    source: Box::new(e),
                },
            )),
        }
    }

    /// Every other backend, for a spilled body: multipart upload to a staging key,
    /// create-only copy into place, staging object deleted — except on Azure, where Copy Blob
    /// may answer `202 Accepted` with the copy still `pending` (object_store does not wait for
    /// it), and deleting the source then would fail the copy and leave a broken object at a
    /// key already counted as stored. There the staging blob stays until retention prunes
    /// staging objects older than an hour, long after any copy within one account has
    /// finished.
    pub(super) async fn put_staged(
        &self,
        prepared: &PreparedLtx,
        attributes: Attributes,
    ) -> Result<PutOutcome, StoreError> {
        let staging = self.staging_key()?;
        self.begin(Operation::Put);
        let uploaded = self.upload_parts(&staging, prepared, attributes).await;
        if let Err(e) = uploaded {
            let _ = self.inner.objects.delete(&staging).await;
            return Err(self.failed(Operation::Put, &prepared.key, e));
        }
        let copy = CopyOptions {
            mode: CopyMode::Create,
            ..CopyOptions::default()
        };
        let copied = self.inner.objects.copy_opts(&staging, &prepared.key, copy).await;
        // A refused or failed copy copies nothing, so its source can go at once.
        if self.inner.backend != Backend::Azure || copied.is_err() {
            let _ = self.inner.objects.delete(&staging).await;
        }
        match copied {
            Ok(()) => {
                metrics::counter!("keycast_replica_bytes_total", "operation" => "put").increment(prepared.len());
                Ok(PutOutcome::Created)
            }
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(PutOutcome::AlreadyExists)
            }
            Err(source) => Err(self.failed(Operation::Put, &prepared.key, source)),
        }
    }

    /// Uploads the prepared bytes to `staging` in parts, a few in flight at once.
    async fn upload_parts(
        &self,
        staging: &Path,
        prepared: &PreparedLtx,
        attributes: Attributes,
    ) -> Result<(), object_store::Error> {
        let options = PutMultipartOptions {
            attributes,
            ..PutMultipartOptions::default()
        };
        let mut upload = self.inner.objects.put_multipart_opts(staging, options).await?;
        let mut reader = UploadReader::new(self, prepared);
        let mut in_flight = FuturesUnordered::new();
        let result = async {
            loop {
                let (next, chunk) = reader.read_async(PART_BYTES).await;
                reader = next;
                let chunk = chunk.map_err(|e| object_store::Error::Generic {
                    store: "keycast",
                    source: Box::new(e),
                })?;
                if chunk.is_empty() {
                    break;
                }
                while in_flight.len() >= PARTS_IN_FLIGHT {
                    in_flight.next().await.expect("not empty")?;
                }
                in_flight.push(upload.put_part(PutPayload::from(chunk)));
            }
            while let Some(part) = in_flight.next().await {
                part?;
            }
            upload.complete().await.map(|_| ())
        }
        .await;
        if result.is_err() {
            let _ = upload.abort().await;
        }
        result
    }

    /// A fresh staging key under `keycast/staging/`.
    fn staging_key(&self) -> Result<Path, StoreError> {
        let mut id = [0u8; 12];
        getrandom::fill(&mut id).expect("the OS random number generator is unavailable");
        let name: String = id.iter().map(|b| format!("{b:02x}")).collect();
        self.object_key(&format!("{STAGING_DIR}/{name}.ltx"))
    }

    /// Deletes staging objects last modified before `before`: uploads in parts that a crash
    /// interrupted between the upload and the copy. Returns how many were deleted.
    ///
    /// # Errors
    /// `Backend` if the listing or a deletion fails.
    pub async fn prune_staging(&self, before: std::time::SystemTime) -> Result<usize, StoreError> {
        use futures::TryStreamExt;
        let dir = self.object_key(&format!("{STAGING_DIR}/x"))?;
        let dir: Path = dir.parts().take(dir.parts().count() - 1).collect();
        self.begin(Operation::List);
        let stale: Vec<Path> = self
            .inner
            .objects
            .list(Some(&dir))
            .try_filter(|meta| std::future::ready(std::time::SystemTime::from(meta.last_modified) < before))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(|source| self.failed(Operation::List, &dir, source))?;
        for key in &stale {
            self.delete_key(key).await?;
        }
        let files = match self.inner.root.clone() {
            Some(root) => {
                let dirs: Vec<PathBuf> = (0..=crate::store::SNAPSHOT_LEVEL)
                    .map(|level| {
                        self.level_dir(level)
                            .parts()
                            .fold(root.clone(), |path, part| path.join(part.as_ref()))
                    })
                    .collect();
                tokio::task::spawn_blocking(move || prune_staging_files(&dirs, before))
                    .await
                    .map_err(io::Error::other)
                    .and_then(|r| r)
                    .map_err(|e| self.io_failed(&dir, e))?
            }
            None => 0,
        };
        Ok(stale.len() + files)
    }

    /// Whether the object at `prepared.key` holds exactly the bytes `prepared` uploads, read
    /// piece by piece; `None` if there is no object.
    pub(super) async fn stored_equals(&self, prepared: &PreparedLtx) -> Result<Option<bool>, StoreError> {
        let Some(mut stored) = self.raw_stream(&prepared.key).await? else {
            return Ok(None);
        };
        let mut ours = UploadReader::new(self, prepared);
        while let Some(chunk) = stored.next().await {
            let chunk = chunk?;
            let (next, mine) = ours.read_async(chunk.len()).await;
            ours = next;
            let mine = mine.map_err(|e| self.io_failed(&prepared.key, e))?;
            if mine != chunk {
                return Ok(Some(false));
            }
        }
        Ok(Some(ours.pos == ours.total))
    }

    /// The stored bytes of `key`, piece by piece; `None` if there is no object.
    pub(super) async fn raw_stream(
        &self,
        key: &Path,
    ) -> Result<Option<BoxStream<'static, Result<Bytes, StoreError>>>, StoreError> {
        self.begin(Operation::Get);
        if let Some(root) = self.local_root() {
            let path = key.parts().fold(root, |path, part| path.join(part.as_ref()));
            return match File::open(&path) {
                Ok(file) => Ok(Some(file_stream(self.clone(), key.clone(), file))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.io_failed(key, e)),
            };
        }
        let result = match self.inner.objects.get(key).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(source) => return Err(self.failed(Operation::Get, key, source)),
        };
        let (store, key) = (self.clone(), key.clone());
        Ok(Some(
            result
                .into_stream()
                .map(move |chunk| {
                    chunk
                        .inspect(|bytes| {
                            metrics::counter!("keycast_replica_bytes_total", "operation" => "get")
                                .increment(bytes.len() as u64)
                        })
                        .map_err(|source| store.failed(Operation::Get, &key, source))
                })
                .boxed(),
        ))
    }

    /// Opens an LTX object for reading piece by piece, decrypted when the store encrypts.
    ///
    /// # Errors
    /// `NotFound` naming the key if it no longer exists; `Backend` for any other failure.
    pub async fn open(&self, obj: &super::LtxObject) -> Result<LtxReader, StoreError> {
        let Some(raw) = self.raw_stream(&obj.key).await? else {
            self.count_error(Operation::Get);
            return Err(StoreError::NotFound {
                key: obj.key.to_string(),
            });
        };
        Ok(LtxReader {
            raw,
            key: obj.key.to_string(),
            cipher: self.inner.cipher.clone(),
            phase: Phase::Head(Vec::new()),
            held: Vec::new(),
            ready: None,
            done: false,
        })
    }

    pub(super) fn io_failed(&self, key: &Path, e: io::Error) -> StoreError {
        self.failed(
            Operation::Get,
            key,
            object_store::Error::Generic {
                store: "keycast",
                source: Box::new(e),
            },
        )
    }
}

/// Where staging objects live under the prefix (see the module docs).
pub(super) const STAGING_DIR: &str = "keycast/staging";

/// Deletes the file backend's staging files (`<target>#keycast-<hex>`, see [`staging_path`])
/// last modified before `before` in `dirs`: what a crash between writing one and linking it
/// into place leaves behind. object_store's listing never shows them. Returns how many.
fn prune_staging_files(dirs: &[PathBuf], before: std::time::SystemTime) -> io::Result<usize> {
    let mut removed = 0;
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if !entry.file_name().to_string_lossy().contains("#keycast-") {
                continue;
            }
            if entry.metadata()?.modified()? < before {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(removed)
}

/// `<target>#keycast-<hex>`: object_store's listing skips names with `#`, and the LTX
/// listing skips anything that is not an LTX file name.
fn staging_path(target: &std::path::Path) -> PathBuf {
    let mut id = [0u8; 6];
    getrandom::fill(&mut id).expect("the OS random number generator is unavailable");
    let suffix: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let mut name = target.as_os_str().to_owned();
    name.push(format!("#keycast-{suffix}"));
    PathBuf::from(name)
}

/// Reads a file on the file backend in large pieces, off the async threads.
fn file_stream(store: Store, key: Path, file: File) -> BoxStream<'static, Result<Bytes, StoreError>> {
    futures::stream::unfold(Some(file), move |file| {
        let (store, key) = (store.clone(), key.clone());
        async move {
            let mut file = file?;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; FILE_CHUNK];
                let mut filled = 0;
                while filled < buf.len() {
                    match file.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(filled);
                Ok((file, buf))
            })
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
            match read {
                Ok((_, buf)) if buf.is_empty() => None,
                Ok((file, buf)) => {
                    metrics::counter!("keycast_replica_bytes_total", "operation" => "get").increment(buf.len() as u64);
                    Some((Ok(Bytes::from(buf)), Some(file)))
                }
                Err(e) => Some((Err(store.io_failed(&key, e)), None)),
            }
        }
    })
    .boxed()
}

/// Reads one LTX object piece by piece; see [`Store::open`]. With encryption the pieces are
/// decrypted as they come and the tag is checked at the end: a piece is not authenticated
/// until [`LtxReader::next`] has returned `None`.
pub struct LtxReader {
    raw: BoxStream<'static, Result<Bytes, StoreError>>,
    key: String,
    cipher: Option<crate::crypt::ObjectCipher>,
    phase: Phase,
    /// With encryption: the last bytes seen, which may be the tag.
    held: Vec<u8>,
    /// Plaintext to hand out next.
    ready: Option<Bytes>,
    done: bool,
}

/// How far an [`LtxReader`] has got.
enum Phase {
    /// The first bytes, until it is known whether the object is sealed.
    Head(Vec<u8>),
    /// Not sealed (and no key): bytes pass through.
    Plain,
    /// Sealed: bytes are decrypted.
    Sealed(Box<crate::crypt::Opener>),
}

impl LtxReader {
    /// The next piece of the LTX file; `None` at its end (after the tag was checked).
    ///
    /// # Errors
    /// `Backend` if reading fails; `Crypt` if the object is sealed without a key given, not
    /// sealed with one given, or its tag does not match.
    pub async fn next(&mut self) -> Result<Option<Bytes>, StoreError> {
        loop {
            if let Some(out) = self.ready.take() {
                return Ok(Some(out));
            }
            if self.done {
                return Ok(None);
            }
            match self.raw.next().await.transpose()? {
                Some(chunk) => self.take(chunk)?,
                None => {
                    self.done = true;
                    self.end()?;
                }
            }
        }
    }

    /// The length of the head that decides whether the object is sealed.
    fn head_len(&self) -> usize {
        match self.cipher {
            Some(_) => MAGIC.len() + NONCE_LEN,
            None => MAGIC.len(),
        }
    }

    /// Takes the next raw piece.
    fn take(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let head_len = self.head_len();
        match &mut self.phase {
            Phase::Plain => self.ready = Some(chunk),
            Phase::Sealed(_) => self.sealed(&chunk),
            Phase::Head(head) if head.is_empty() && self.cipher.is_none() && chunk.len() >= MAGIC.len() => {
                self.decide(chunk)?;
            }
            Phase::Head(head) => {
                head.extend_from_slice(&chunk);
                if head.len() >= head_len {
                    let head = Bytes::from(std::mem::take(head));
                    self.decide(head)?;
                }
            }
        }
        Ok(())
    }

    /// With enough of the head read: sealed or not, and does that suit the key (or its absence)?
    fn decide(&mut self, head: Bytes) -> Result<(), StoreError> {
        match &self.cipher {
            None if crate::crypt::is_sealed(&head) => Err(StoreError::Crypt(CryptError::KeyMissing(self.key.clone()))),
            None => {
                self.phase = Phase::Plain;
                self.ready = Some(head);
                Ok(())
            }
            Some(_) if !head.starts_with(MAGIC) => Err(StoreError::Crypt(CryptError::NotEncrypted(self.key.clone()))),
            Some(cipher) => {
                let prefix = MAGIC.len() + NONCE_LEN;
                let nonce: [u8; NONCE_LEN] = head[MAGIC.len()..prefix].try_into().expect("12 bytes");
                self.phase = Phase::Sealed(Box::new(cipher.opener(&self.key, nonce)));
                self.sealed(&head[prefix..]);
                Ok(())
            }
        }
    }

    /// Decrypts what can be decrypted, holding back the last bytes, which may be the tag.
    fn sealed(&mut self, chunk: &[u8]) {
        self.held.extend_from_slice(chunk);
        if self.held.len() <= TAG_LEN {
            return;
        }
        let keep = self.held.split_off(self.held.len() - TAG_LEN);
        let mut out = std::mem::replace(&mut self.held, keep);
        if let Phase::Sealed(opener) = &mut self.phase {
            opener.update(&mut out);
        }
        self.ready = Some(Bytes::from(out));
    }

    /// At the end of the raw bytes: a sealed object's tag must match; a short object is
    /// judged by what there is of its head.
    fn end(&mut self) -> Result<(), StoreError> {
        match std::mem::replace(&mut self.phase, Phase::Plain) {
            Phase::Plain => Ok(()),
            Phase::Sealed(opener) if self.held.len() == TAG_LEN => {
                opener.finish(&self.held, &self.key).map_err(StoreError::Crypt)
            }
            Phase::Sealed(_) => Err(StoreError::Crypt(CryptError::Undecryptable(self.key.clone()))),
            Phase::Head(head) => match self.cipher {
                Some(_) if head.starts_with(MAGIC) => {
                    Err(StoreError::Crypt(CryptError::Undecryptable(self.key.clone())))
                }
                Some(_) => Err(StoreError::Crypt(CryptError::NotEncrypted(self.key.clone()))),
                None => {
                    self.ready = (!head.is_empty()).then(|| Bytes::from(head));
                    Ok(())
                }
            },
        }
    }
}
