//! Applying LTX files, in TXID order, to a page file: the heart of a restore, and of building
//! a compacted file or a snapshot from the replica.
//!
//! Objects are fetched ahead of the one being applied — small ones whole, several at once,
//! large ones piece by piece when their turn comes — and decoded and written by one blocking
//! worker fed through a bounded channel. Memory stays bounded (about
//! [`FETCH_CONCURRENCY`] × [`WHOLE_FETCH_BYTES`] plus the channel) whatever the size of the
//! database or of one object, while the network and the decoding overlap.
//!
//! Nothing is trusted: every object's header must agree with its name and follow the TXID
//! before it, its page size must not change, and its checksum must match — pages are written
//! before an object's checksum is checked at its end, so the page file is only ever a
//! temporary that the caller throws away on any error.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use crate::ltx::{Event, Header, LtxError, StreamDecoder};
use crate::restore::{Progress, RestoreError};
use crate::store::{LtxObject, LtxReader, Store};

/// Objects fetched ahead of the one being applied. A cold start after minutes of steady
/// writes fetches a few thousand small level-0 files; at a cloud store's 30 ms a request,
/// 64 in flight fetch them in well under a second (at most 32 MiB of whole objects held).
pub const FETCH_CONCURRENCY: usize = 64;
/// Objects fetched ahead by background work (compaction, snapshots) while the writer ships.
/// A store that serves requests one at a time (moto; a throttled bucket) queues the writer's
/// next PUT behind every GET already sent: with 64 in flight, each level-1 compaction of a
/// thousand level-0 files held the PUTs for about 100 ms for two seconds (replication lag p99
/// 267–318 ms on moto at 100 commits/s; 52–66 ms with 4 in flight, 92–118 ms with 8,
/// BENCHMARKS.md). Level 1 now merges the bytes the writer holds (see
/// `compactor::Known`) and fetches only what an earlier instance shipped; the higher levels
/// fetch a few dozen files. Eight still keeps compaction ahead on any store: the writer uploads at
/// most `MAX_UPLOADS_IN_FLIGHT` (4) objects per round trip (one, or more beside it for durable
/// waiters), so level 0 grows at most half as fast as compaction can read it.
pub const BACKGROUND_FETCH_CONCURRENCY: usize = 8;
/// Objects up to this size are fetched whole while earlier ones are applied (512 KiB).
pub const WHOLE_FETCH_BYTES: u64 = 512 << 10;
/// Pieces queued for the worker.
const QUEUED_PIECES: usize = 8;

/// The state after applying a run of files.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// TXID reached.
    pub txid: u64,
    /// Database size in pages after the last file.
    pub commit: u32,
    /// Page size.
    pub page_size: u32,
    /// Pages written (some may be past `commit`).
    pub written: PageSet,
    /// Bytes applied (fetched, or held by the caller: see [`Fetching::held`]).
    pub bytes: u64,
    /// The last file's header.
    pub last: Option<Header>,
    /// The latest time a header among the files applied carries (ms since the Unix epoch,
    /// its writer's clock), and the file that carries it. Read once the file's checksum (and,
    /// encrypted, its tag) has proven the header, unlike the time the store lists it with.
    pub latest_written: Option<(i64, LtxObject)>,
    /// The newest writer stamp among the files applied (see [`crate::ltx::Header::node_id`]).
    pub newest_writer: u64,
    /// The file applying stopped at, unapplied: a writer's stamp older than one already
    /// applied, so it was stored by an instance that had lost the replica to a newer one (see
    /// [`Applied::check_writer`]). Everything before it is applied.
    pub stale: Option<LtxObject>,
    /// The file being read carries a stale stamp: its pages are read but not written, and it
    /// counts as stale only once its checksum (and, encrypted, its tag) proves the stamp is
    /// what its writer wrote. A stamp a flipped bit lowered is corruption, not a stale writer.
    stale_stamp: bool,
}

/// A set of page numbers, one bit each.
#[derive(Debug, Clone, Default)]
pub struct PageSet(Vec<u64>);

impl PageSet {
    /// Adds `pgno`.
    pub fn insert(&mut self, pgno: u32) {
        let (word, bit) = ((pgno / 64) as usize, pgno % 64);
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << bit;
    }

    /// Whether `pgno` is in the set.
    pub fn contains(&self, pgno: u32) -> bool {
        let (word, bit) = ((pgno / 64) as usize, pgno % 64);
        self.0.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }
}

/// What the fetching side hands the worker.
enum Feed {
    Start(LtxObject),
    Piece(Bytes),
    End,
}

/// One object as fetched: whole, or opened and read when its turn comes.
enum Fetched {
    Whole(LtxObject, Vec<Bytes>),
    Open(LtxObject, Box<LtxReader>),
}

/// How [`apply_files`] gets its objects.
#[derive(Clone, Copy)]
pub struct Fetching<'a> {
    /// Objects fetched from the store ahead of the one being applied.
    pub ahead: usize,
    /// The bytes of an object the caller already holds (the plaintext LTX file, as the store
    /// would return it), used instead of fetching it. Checked exactly as fetched bytes are.
    pub held: &'a (dyn Fn(&LtxObject) -> Option<Bytes> + Sync),
}

impl Fetching<'static> {
    /// Everything from the store, `ahead` objects ahead.
    pub fn from_store(ahead: usize) -> Fetching<'static> {
        Fetching { ahead, held: &|_| None }
    }
}

/// Applies `files` in order to `file` (at `path`, for error messages), starting after TXID
/// `after` (0 for a chain that must start with a snapshot), fetching as `fetching` says.
///
/// # Errors
/// The first store, decoding, chain or I/O error, naming the object at fault.
pub async fn apply_files(
    store: &Store,
    files: &[LtxObject],
    file: File,
    path: &Path,
    after: u64,
    progress: Option<Progress<'_>>,
    fetching: Fetching<'_>,
) -> Result<(Applied, File), RestoreError> {
    let (tx, rx) = mpsc::channel(QUEUED_PIECES);
    let worker_path = path.to_owned();
    let worker = tokio::task::spawn_blocking(move || apply_worker(rx, file, worker_path, after));
    let fed = feed(store, files, &tx, progress, fetching).await;
    drop(tx);
    let applied = worker
        .await
        .map_err(|e| RestoreError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })
        .and_then(|r| r);
    // A worker that stopped on an error makes the feeding fail too; its error names the cause.
    // One that stopped at a stale file did too, and what it applied stands.
    match (applied, fed) {
        (Err(e), _) => Err(e),
        (Ok((applied, file)), Err(_)) if applied.stale.is_some() => Ok((applied, file)),
        (Ok(_), Err(e)) => Err(e),
        (Ok((mut applied, file)), Ok(bytes)) => {
            applied.bytes = bytes;
            Ok((applied, file))
        }
    }
}

/// Fetches `files` ahead, in order (those the caller holds are not fetched), and hands their
/// bytes to the worker. Returns the bytes applied.
async fn feed(
    store: &Store,
    files: &[LtxObject],
    tx: &mpsc::Sender<Feed>,
    progress: Option<Progress<'_>>,
    fetching: Fetching<'_>,
) -> Result<u64, RestoreError> {
    // Owned futures (a cloned store and object each): borrowing ones trip a rustc limitation
    // (higher-ranked lifetimes) when this runs inside a spawned task.
    let fetches = files.iter().cloned().map(|f| {
        let (store, held) = (store.clone(), (fetching.held)(&f));
        async move {
            match held {
                Some(bytes) => Ok(Fetched::Whole(f, vec![bytes])),
                None => fetch(&store, f).await,
            }
        }
    });
    let mut fetched = futures::stream::iter(fetches).buffered(fetching.ahead);
    let (mut done, mut bytes) = (0, 0u64);
    let stopped = || RestoreError::Io {
        path: PathBuf::new(),
        source: std::io::Error::other("the restore worker stopped"),
    };
    while let Some(next) = fetched.try_next().await? {
        match next {
            Fetched::Whole(object, pieces) => {
                tx.send(Feed::Start(object)).await.map_err(|_| stopped())?;
                for piece in pieces {
                    bytes += piece.len() as u64;
                    tx.send(Feed::Piece(piece)).await.map_err(|_| stopped())?;
                }
            }
            Fetched::Open(object, mut reader) => {
                tx.send(Feed::Start(object)).await.map_err(|_| stopped())?;
                while let Some(piece) = reader.next().await? {
                    bytes += piece.len() as u64;
                    tx.send(Feed::Piece(piece)).await.map_err(|_| stopped())?;
                }
            }
        }
        tx.send(Feed::End).await.map_err(|_| stopped())?;
        done += 1;
        if let Some(report) = progress {
            report(done, files.len(), bytes);
        }
    }
    Ok(bytes)
}

/// Opens `object`; reads it whole if it is small.
async fn fetch(store: &Store, object: LtxObject) -> Result<Fetched, RestoreError> {
    let mut reader = store.open(&object).await?;
    if object.size > WHOLE_FETCH_BYTES {
        return Ok(Fetched::Open(object, Box::new(reader)));
    }
    let mut pieces = Vec::new();
    while let Some(piece) = reader.next().await? {
        pieces.push(piece);
    }
    Ok(Fetched::Whole(object, pieces))
}

/// Why applying stopped, inside the worker.
enum ApplyError {
    Restore(RestoreError),
    Ltx(LtxError),
    Io(std::io::Error),
}

impl From<LtxError> for ApplyError {
    fn from(e: LtxError) -> Self {
        ApplyError::Ltx(e)
    }
}

impl From<std::io::Error> for ApplyError {
    fn from(e: std::io::Error) -> Self {
        ApplyError::Io(e)
    }
}

impl ApplyError {
    fn into_restore_error(self, object: Option<&LtxObject>, path: &Path) -> RestoreError {
        match self {
            ApplyError::Restore(e) => e,
            ApplyError::Ltx(source) => RestoreError::Corrupt {
                key: object.map(|o| o.key.to_string()).unwrap_or_default(),
                source,
            },
            ApplyError::Io(source) => RestoreError::Io {
                path: path.to_owned(),
                source,
            },
        }
    }
}

/// Decodes and writes what the fetching side hands over, object by object.
fn apply_worker(
    mut rx: mpsc::Receiver<Feed>,
    file: File,
    path: PathBuf,
    after: u64,
) -> Result<(Applied, File), RestoreError> {
    let mut applied = Applied {
        txid: after,
        ..Applied::default()
    };
    let mut current: Option<(LtxObject, StreamDecoder)> = None;
    while let Some(feed) = rx.blocking_recv() {
        let step = match feed {
            Feed::Start(object) => {
                current = Some((object, StreamDecoder::new()));
                Ok(())
            }
            Feed::Piece(piece) => {
                let (object, decoder) = current.as_mut().expect("a piece follows a start");
                decoder.feed(&piece, |event| applied.on_event(&file, object, event))
            }
            Feed::End => {
                let (object, decoder) = current.take().expect("an end follows a start");
                let trailer = decoder
                    .finish()
                    .map_err(|e| ApplyError::Ltx(e).into_restore_error(Some(&object), &path))?;
                if applied.stale_stamp {
                    applied.stale = Some(object);
                    return Ok((applied, file));
                }
                if applied
                    .latest_written
                    .as_ref()
                    .is_none_or(|(t, _)| trailer.header.timestamp_ms > *t)
                {
                    applied.latest_written = Some((trailer.header.timestamp_ms, object));
                }
                applied.commit = trailer.header.commit;
                applied.txid = trailer.header.max_txid;
                applied.last = Some(trailer.header);
                Ok(())
            }
        };
        if let Err(e) = step {
            return Err(e.into_restore_error(current.as_ref().map(|(o, _)| o), &path));
        }
    }
    Ok((applied, file))
}

impl Applied {
    fn on_event(&mut self, file: &File, object: &LtxObject, event: Event<'_>) -> Result<(), ApplyError> {
        match event {
            Event::Header(h) => self.check_header(object, h),
            Event::Page(_, _) if self.stale_stamp => Ok(()),
            Event::Page(pgno, page) => {
                file.write_all_at(page, u64::from(pgno - 1) * u64::from(self.page_size))?;
                self.written.insert(pgno);
                Ok(())
            }
        }
    }

    /// The header must agree with the object's name, follow the TXID reached, and keep the
    /// page size.
    fn check_header(&mut self, object: &LtxObject, h: &Header) -> Result<(), ApplyError> {
        let mismatch = |reason: String| {
            ApplyError::Restore(RestoreError::Mismatch {
                key: object.key.to_string(),
                reason,
            })
        };
        if (h.min_txid, h.max_txid) != (object.min_txid, object.max_txid) {
            return Err(mismatch(format!("header says TXIDs {}-{}", h.min_txid, h.max_txid)));
        }
        if h.min_txid > self.txid + 1 || h.max_txid <= self.txid {
            return Err(mismatch(format!(
                "TXIDs {}-{} do not follow TXID {}",
                h.min_txid, h.max_txid, self.txid
            )));
        }
        if self.page_size != 0 && h.page_size != self.page_size {
            return Err(mismatch(format!(
                "page size {} differs from {}",
                h.page_size, self.page_size
            )));
        }
        self.page_size = h.page_size;
        self.check_writer(h.node_id)
    }

    /// Each writer stamps its files with a number larger than every stamp in the history it
    /// took over (its start time in ms, or one more than the newest stamp it restored: see
    /// `replicator::worker`). Along a chain the stamps therefore never decrease — except for
    /// a file stored late by an instance paused past its lease, after the next writer had
    /// taken over and shipped the TXID before it: contiguous by TXID, but from the other
    /// history, and applying it would undo the newer writer's commits. 0 is no stamp (files
    /// from Litestream or from keycast before stamps), and proves nothing either way.
    fn check_writer(&mut self, stamp: u64) -> Result<(), ApplyError> {
        if stamp != 0 && stamp < self.newest_writer {
            // Judged at the file's end, once its checksum is proven (see `stale_stamp`).
            self.stale_stamp = true;
            return Ok(());
        }
        self.newest_writer = self.newest_writer.max(stamp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_set_holds_exactly_what_was_inserted() {
        let mut set = PageSet::default();
        for pgno in [1, 63, 64, 65, 262_145] {
            set.insert(pgno);
        }
        for pgno in [1, 63, 64, 65, 262_145] {
            assert!(set.contains(pgno), "{pgno}");
        }
        for pgno in [0, 2, 62, 66, 262_144, 262_146, u32::MAX] {
            assert!(!set.contains(pgno), "{pgno}");
        }
    }
}
