//! Building LTX segments from the local database: the next batch of committed WAL frames,
//! or a full image of the database. Blocking file I/O; callers run it off the async loop.
//!
//! Pages are read from the WAL or the database file as they are encoded, and the encoded
//! file goes into a [`SpillWriter`]: memory stays bounded by a few bytes per page whatever
//! the size of the database or of one transaction.
//!
//! The reads here are safe against concurrent writers because of two facts kept elsewhere:
//! only the replicator checkpoints (so the database file changes only when it chooses), and
//! WAL frames past the last commit frame are never returned (so half-written transactions
//! are invisible).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::checksum::{lock_page, DbChecksum};
use crate::local_state::WalCursor;
use crate::ltx::{Encoder, Header, LtxError, FLAG_NO_CHECKSUM};
use crate::spill::{Body, SpillWriter, DEFAULT_SPILL_LIMIT};
use crate::wal::{self, FrameRef, WalError, WalHeader, WalPosition};

/// Why a segment could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the WAL {path}: {source}")]
    Wal {
        path: PathBuf,
        #[source]
        source: WalError,
    },
    #[error("cannot encode an LTX segment: {0}")]
    Encode(#[from] LtxError),
    #[error("{0} is not a SQLite database")]
    NotADatabase(PathBuf),
    /// The WAL restarted in a way the replicator did not cause; continuity cannot be proven
    /// and the next segment must be a full image.
    #[error("the WAL was reset by someone other than the replicator")]
    ContinuityLost,
}

/// What the replicator knows about the local files between segments.
#[derive(Debug, Clone, Copy)]
pub struct Cursor {
    /// Last TXID shipped.
    pub txid: u64,
    /// Database size (pages) at `txid`.
    pub commit: u32,
    /// Page size.
    pub page_size: u32,
    /// WAL position after the last shipped frame, if any WAL generation was seen.
    pub wal: Option<WalCursor>,
    /// The replicator checkpointed every frame, so a new WAL generation is expected and
    /// continues the shipped state.
    pub reset_expected: bool,
}

/// One encoded LTX file and the cursor that holds once it is stored.
#[derive(Debug)]
pub struct Segment {
    pub txid: u64,
    /// The encoded LTX file (in a temporary file under the scratch directory when large).
    pub body: Body,
    pub next: Cursor,
    /// SQLite commits folded into this segment (0 for full images).
    pub commits: usize,
    /// It holds everything committed when it was read (it was not cut short by the size
    /// limit): every commit made before the read is in it or in an earlier segment.
    pub reached_end: bool,
}

/// `<db>-wal`
pub fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push("-wal");
    db.with_file_name(name)
}

/// Reads the page size from the database header.
///
/// # Errors
/// I/O errors; [`SegmentError::NotADatabase`] for a file without a SQLite header.
pub fn page_size_of(db: &Path) -> Result<u32, SegmentError> {
    let mut header = [0u8; 100];
    let file = crate::db_file::open(db).map_err(|source| SegmentError::Io {
        path: db.to_owned(),
        source,
    })?;
    file.read_exact_at(&mut header, 0)
        .map_err(|_| SegmentError::NotADatabase(db.to_owned()))?;
    if &header[..16] != b"SQLite format 3\0" {
        return Err(SegmentError::NotADatabase(db.to_owned()));
    }
    Ok(match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n => u32::from(n),
    })
}

/// The next segment of committed WAL frames after `cursor`, or `None` if nothing new is
/// committed. At most about `max_bytes` of WAL go into one segment (it ends on a commit).
/// A large segment is written into a temporary file in `scratch`. `writer` is the writer's
/// stamp, recorded in the file's header (see `apply::Applied::check_writer`).
///
/// # Errors
/// [`SegmentError::ContinuityLost`] when the WAL generation changed unexpectedly.
pub fn next_wal_segment(
    db: &Path,
    cursor: &Cursor,
    max_bytes: u64,
    now_ms: i64,
    writer: u64,
    scratch: &Path,
) -> Result<Option<Segment>, SegmentError> {
    let wal_path = wal_path(db);
    let Some((mut wal, header)) = open_wal(&wal_path)? else {
        // The WAL vanished or was truncated under a cursor that still points into it:
        // someone else checkpointed, possibly over frames not yet shipped.
        return match cursor.wal {
            Some(_) if !cursor.reset_expected => Err(SegmentError::ContinuityLost),
            _ => Ok(None),
        };
    };
    let start = match &cursor.wal {
        Some(c) if c.same_generation(&header) => c.position(),
        // After the replicator's own checkpoint SQLite restarts the WAL in place, adding one
        // to the first salt; any other new generation was made by someone else, and what
        // happened in between cannot be proven.
        Some(c) if cursor.reset_expected && c.restarted_into(&header) => WalPosition::start(&header),
        Some(_) => return Err(SegmentError::ContinuityLost),
        None => WalPosition::start(&header),
    };
    let committed =
        wal::index_committed_limit(&mut wal, &header, start, max_bytes).map_err(|source| SegmentError::Wal {
            path: wal_path.clone(),
            source,
        })?;
    let Some(commit) = committed.commit else {
        return Ok(None);
    };
    if header.page_size != cursor.page_size {
        return Err(SegmentError::ContinuityLost);
    }
    // Each page's newest frame; pages the database grew by without a frame come from the file.
    let mut pages: BTreeMap<u32, Option<FrameRef>> = BTreeMap::new();
    for frame in committed.frames {
        pages.insert(frame.pgno, Some(frame));
    }
    pages.retain(|pgno, _| *pgno <= commit);
    let lock = lock_page(cursor.page_size);
    for pgno in cursor.commit + 1..=commit {
        if pgno != lock {
            pages.entry(pgno).or_insert(None);
        }
    }
    let txid = cursor.txid + 1;
    let (salt1, salt2) = header.salts();
    let ltx_header = Header {
        flags: FLAG_NO_CHECKSUM,
        page_size: cursor.page_size,
        commit,
        min_txid: txid,
        max_txid: txid,
        timestamp_ms: now_ms,
        wal_offset: start.offset as i64,
        wal_size: (committed.end.offset - start.offset) as i64,
        wal_salt1: salt1,
        wal_salt2: salt2,
        node_id: writer,
        ..Header::default()
    };
    let mut encoder = Encoder::with_writer(ltx_header, SpillWriter::new(scratch, DEFAULT_SPILL_LIMIT))?;
    let pages_source = PageSource::open(db, Some((wal, header)))?;
    let mut page = vec![0u8; cursor.page_size as usize];
    for (pgno, frame) in &pages {
        pages_source.read(*pgno, frame.as_ref(), &mut page)?;
        encoder.encode_page(*pgno, &page)?;
    }
    let next = Cursor {
        txid,
        commit,
        page_size: cursor.page_size,
        wal: Some(WalCursor::new(&header, committed.end)),
        reset_expected: false,
    };
    Ok(Some(Segment {
        txid,
        body: finish_body(encoder)?,
        next,
        commits: committed.commits,
        reached_end: committed.end.offset - start.offset < max_bytes,
    }))
}

/// Finishes an LTX file written into a [`SpillWriter`].
fn finish_body(encoder: Encoder<SpillWriter>) -> Result<Body, SegmentError> {
    encoder
        .finish(0)?
        .finish()
        .map_err(|e| SegmentError::Encode(LtxError::Write(e.to_string())))
}

/// Where pages are read from: the WAL (a frame found by [`wal::index_committed_limit`]) or
/// the database file.
struct PageSource {
    /// Never closed: see [`crate::db_file`].
    db: std::sync::Arc<File>,
    db_path: PathBuf,
    wal: Option<(File, WalHeader)>,
}

impl PageSource {
    fn open(db: &Path, wal: Option<(File, WalHeader)>) -> Result<PageSource, SegmentError> {
        let file = crate::db_file::open(db).map_err(|source| SegmentError::Io {
            path: db.to_owned(),
            source,
        })?;
        Ok(PageSource {
            db: file,
            db_path: db.to_owned(),
            wal,
        })
    }

    /// Reads page `pgno` from `frame`, or from the database file (zeros past its end). A frame
    /// that changed since it was indexed means the WAL restarted under the reader:
    /// [`SegmentError::ContinuityLost`].
    fn read(&self, pgno: u32, frame: Option<&FrameRef>, page: &mut [u8]) -> Result<(), SegmentError> {
        match (frame, &self.wal) {
            (Some(frame), Some((wal, header))) => {
                let intact = wal::read_frame_page(wal, header, frame, page).map_err(|source| SegmentError::Wal {
                    path: wal_path(&self.db_path),
                    source,
                })?;
                match intact {
                    true => Ok(()),
                    false => Err(SegmentError::ContinuityLost),
                }
            }
            _ => read_page(&self.db, &self.db_path, pgno, page),
        }
    }
}

/// The current database state as a reader sees it: the database file overlaid with every
/// committed frame of the current WAL generation. Callers must keep commits out while they
/// use it (hold SQLite's write lock) for the image to be one consistent state.
pub struct LiveImage {
    source: PageSource,
    /// Each page's newest committed frame.
    overlay: BTreeMap<u32, FrameRef>,
    /// Database size in pages.
    pub commit: u32,
    pub page_size: u32,
    /// WAL position after the last committed frame, if there is a WAL.
    pub wal: Option<WalCursor>,
}

impl LiveImage {
    /// Reads the WAL's committed frames and opens the database file.
    ///
    /// # Errors
    /// I/O and WAL errors.
    pub fn open(db: &Path) -> Result<LiveImage, SegmentError> {
        Self::open_upto(db, None)
    }

    /// The state at `limit`, a position in the WAL after a commit: the database file
    /// overlaid with the committed frames of `limit`'s generation up to it (with no limit,
    /// every committed frame). A WAL of another generation contributes nothing: everything
    /// before it is in the database file.
    ///
    /// Commits may land meanwhile, as long as nothing past `limit` can reach the database
    /// file: the replicator holds a read snapshot at `limit`, which stops every checkpoint
    /// there, and runs its own checkpoints in the same task.
    ///
    /// # Errors
    /// I/O and WAL errors.
    pub fn open_upto(db: &Path, limit: Option<WalCursor>) -> Result<LiveImage, SegmentError> {
        let page_size = page_size_of(db)?;
        let wal_path = wal_path(db);
        let (mut overlay, mut commit, mut wal_cursor, mut wal_file) = (BTreeMap::new(), None, None, None);
        if let Some((mut wal, header)) = open_wal(&wal_path)? {
            let generation_ok = limit.is_none_or(|l| l.same_generation(&header));
            if header.page_size == page_size && generation_ok {
                let start = WalPosition::start(&header);
                let max_bytes = limit.map_or(u64::MAX, |l| l.offset.saturating_sub(start.offset));
                let committed = wal::index_committed_limit(&mut wal, &header, start, max_bytes).map_err(|source| {
                    SegmentError::Wal {
                        path: wal_path.clone(),
                        source,
                    }
                })?;
                commit = committed.commit;
                wal_cursor = Some(WalCursor::new(&header, committed.end));
                for frame in committed.frames {
                    overlay.insert(frame.pgno, frame);
                }
                wal_file = Some((wal, header));
            }
        }
        let source = PageSource::open(db, wal_file)?;
        let file_pages = source
            .db
            .metadata()
            .map_err(|source| SegmentError::Io {
                path: db.to_owned(),
                source,
            })?
            .len()
            / u64::from(page_size);
        let commit = commit.unwrap_or(file_pages as u32).max(1);
        Ok(LiveImage {
            source,
            overlay,
            commit,
            page_size,
            wal: wal_cursor,
        })
    }

    /// Calls `each(pgno, page)` for pages 1..=commit in order, skipping the lock page.
    ///
    /// # Errors
    /// I/O errors, [`SegmentError::ContinuityLost`] if the WAL restarted under it, or the
    /// first error `each` returns.
    pub fn for_each_page(
        &self,
        mut each: impl FnMut(u32, &[u8]) -> Result<(), SegmentError>,
    ) -> Result<(), SegmentError> {
        let lock = lock_page(self.page_size);
        let mut buf = vec![0u8; self.page_size as usize];
        for pgno in (1..=self.commit).filter(|p| *p != lock) {
            self.source.read(pgno, self.overlay.get(&pgno), &mut buf)?;
            each(pgno, &buf)?;
        }
        Ok(())
    }

    /// The Litestream-style database checksum of this state.
    ///
    /// # Errors
    /// I/O errors.
    pub fn checksum(&self) -> Result<u64, SegmentError> {
        let mut sum = DbChecksum::new();
        self.for_each_page(|pgno, page| {
            sum.add_page(pgno, page);
            Ok(())
        })?;
        Ok(sum.value())
    }
}

/// A segment holding every page of the current database state at TXID `txid`. With
/// `txid == 1` it is a snapshot in LTX terms. Written into a temporary file in `scratch`
/// when large.
///
/// The caller must hold SQLite's write lock so no commit lands while it reads.
///
/// # Errors
/// I/O and encoding errors.
pub fn full_image(db: &Path, txid: u64, now_ms: i64, writer: u64, scratch: &Path) -> Result<Segment, SegmentError> {
    full_image_upto(db, None, txid, now_ms, writer, scratch)
}

/// As [`full_image`], of the state at `limit` (see [`LiveImage::open_upto`]), so the caller
/// need not keep commits out while it reads — only hold a read snapshot at `limit`.
///
/// # Errors
/// I/O and encoding errors.
pub fn full_image_upto(
    db: &Path,
    limit: Option<WalCursor>,
    txid: u64,
    now_ms: i64,
    writer: u64,
    scratch: &Path,
) -> Result<Segment, SegmentError> {
    let image = LiveImage::open_upto(db, limit)?;
    let header = Header {
        flags: FLAG_NO_CHECKSUM,
        page_size: image.page_size,
        commit: image.commit,
        min_txid: txid,
        max_txid: txid,
        timestamp_ms: now_ms,
        node_id: writer,
        ..Header::default()
    };
    let mut encoder = Encoder::with_writer(header, SpillWriter::new(scratch, DEFAULT_SPILL_LIMIT))?;
    image.for_each_page(|pgno, page| Ok(encoder.encode_page(pgno, page)?))?;
    let next = Cursor {
        txid,
        commit: image.commit,
        page_size: image.page_size,
        wal: image.wal,
        reset_expected: false,
    };
    Ok(Segment {
        txid,
        body: finish_body(encoder)?,
        next,
        commits: 0,
        reached_end: true,
    })
}

/// The position right after the last committed frame of the current WAL, if there is one.
///
/// # Errors
/// I/O and WAL errors.
pub fn wal_end(db: &Path) -> Result<Option<WalCursor>, SegmentError> {
    let wal_path = wal_path(db);
    let Some((mut wal, header)) = open_wal(&wal_path)? else {
        return Ok(None);
    };
    let committed =
        wal::index_committed_limit(&mut wal, &header, WalPosition::start(&header), u64::MAX).map_err(|source| {
            SegmentError::Wal {
                path: wal_path.clone(),
                source,
            }
        })?;
    Ok(Some(WalCursor::new(&header, committed.end)))
}

/// Whether the local WAL still holds every frame up to `cursor`: same generation, and its
/// frames from the start form one unbroken checksum chain (page data included) whose commit
/// ends exactly at `cursor`, with the cumulative checksum the cursor recorded — what SQLite's
/// own recovery will accept on the next open — or, when everything up to `cursor` was
/// `checkpointed` into the database file, the WAL was restarted in place after it (or is
/// gone).
/// After a power loss the frames written without an fsync may be gone, torn (a header that
/// survived over a page that did not), or the WAL reset; the replica then holds commits the
/// local file lost. A torn frame is the treacherous one: SQLite drops it and everything
/// after, and the next commit takes its place, ending where the cursor says the shipped ones
/// end.
///
/// # Errors
/// I/O errors.
pub fn wal_reaches(db: &Path, cursor: &WalCursor, checkpointed: bool) -> Result<bool, SegmentError> {
    let wal_path = wal_path(db);
    let Some((mut wal, header)) = open_wal(&wal_path)? else {
        return Ok(checkpointed || cursor.offset <= wal::WAL_HEADER_SIZE);
    };
    if !cursor.same_generation(&header) {
        // A generation SQLite restarted in place after our full checkpoint continues it.
        return Ok(checkpointed && cursor.restarted_into(&header));
    }
    if cursor.offset <= wal::WAL_HEADER_SIZE {
        return Ok(true);
    }
    // Up to the first commit that ends at or past the cursor: a few bytes per frame.
    let reached = wal::index_committed_limit(
        &mut wal,
        &header,
        WalPosition::start(&header),
        cursor.offset - wal::WAL_HEADER_SIZE,
    )
    .map_err(|source| SegmentError::Wal { path: wal_path, source })?;
    Ok(reached.end == cursor.position())
}

/// Opens the WAL and parses its header; `None` if there is no WAL or it holds no header yet.
fn open_wal(path: &Path) -> Result<Option<(File, WalHeader)>, SegmentError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SegmentError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let len = file.seek(SeekFrom::End(0)).map_err(|source| SegmentError::Io {
        path: path.to_owned(),
        source,
    })?;
    if len < wal::WAL_HEADER_SIZE {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(0)).map_err(|source| SegmentError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut bytes = [0u8; wal::WAL_HEADER_SIZE as usize];
    file.read_exact(&mut bytes).map_err(|source| SegmentError::Io {
        path: path.to_owned(),
        source,
    })?;
    let header = WalHeader::parse(&bytes).map_err(|source| SegmentError::Wal {
        path: path.to_owned(),
        source,
    })?;
    Ok(Some((file, header)))
}

/// Reads page `pgno`; a page past the end of the file reads as zeros.
fn read_page(file: &File, path: &Path, pgno: u32, buf: &mut [u8]) -> Result<(), SegmentError> {
    let offset = u64::from(pgno - 1) * buf.len() as u64;
    buf.fill(0);
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(SegmentError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::sqlite;

    /// A database `live.db` with a WAL of three committed transactions (captured from the real
    /// sqlite3 while it held the database open), and the cursor right after its last commit.
    fn database_with_wal(dir: &Path) -> (PathBuf, WalCursor) {
        sqlite(
            dir,
            "PRAGMA page_size=4096; PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;\n\
             CREATE TABLE t(x); INSERT INTO t VALUES (1); INSERT INTO t VALUES (randomblob(5000));\n\
             .shell cp x.db live.db\n.shell cp x.db-wal live.db-wal\n",
        );
        let db = dir.join("live.db");
        let (mut wal, header) = open_wal(&wal_path(&db)).unwrap().unwrap();
        let end = wal::read_committed(&mut wal, &header, WalPosition::start(&header))
            .unwrap()
            .end;
        (db, WalCursor::new(&header, end))
    }

    fn cursor_after(wal: WalCursor, reset_expected: bool) -> Cursor {
        Cursor {
            txid: 7,
            commit: 1,
            page_size: 4096,
            wal: Some(wal),
            reset_expected,
        }
    }

    #[test]
    fn after_our_checkpoint_only_the_generation_sqlite_restarts_into_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (db, now) = database_with_wal(dir.path());
        // The cursor stood in the generation before: SQLite adds one to the first salt when
        // it restarts a fully checkpointed WAL in place.
        let before = WalCursor {
            salt1: now.salt1.wrapping_sub(1),
            salt2: now.salt2 ^ 0x5a5a,
            ..now
        };
        let segment = next_wal_segment(&db, &cursor_after(before, true), u64::MAX, 0, 0, dir.path())
            .unwrap()
            .expect("the new generation's commits are read from its start");
        assert_eq!(segment.txid, 8);
        assert!(segment.reached_end);
        // Any other generation was made by someone else, with who knows what in between.
        let skipped = WalCursor {
            salt1: now.salt1.wrapping_sub(2),
            ..before
        };
        assert!(matches!(
            next_wal_segment(&db, &cursor_after(skipped, true), u64::MAX, 0, 0, dir.path()),
            Err(SegmentError::ContinuityLost)
        ));
        // And without a checkpoint of ours, no new generation at all.
        assert!(matches!(
            next_wal_segment(&db, &cursor_after(before, false), u64::MAX, 0, 0, dir.path()),
            Err(SegmentError::ContinuityLost)
        ));
    }

    #[test]
    fn the_wal_reaches_a_cursor_only_if_the_frame_before_it_is_intact() {
        let dir = tempfile::tempdir().unwrap();
        let (db, end) = database_with_wal(dir.path());
        assert!(wal_reaches(&db, &end, false).unwrap());
        let wrong_checksum = WalCursor {
            checksum2: end.checksum2 ^ 1,
            ..end
        };
        assert!(!wal_reaches(&db, &wrong_checksum, false).unwrap());
        let other_generation = WalCursor {
            salt2: end.salt2 ^ 1,
            ..end
        };
        assert!(!wal_reaches(&db, &other_generation, false).unwrap());
        // A power loss that took the last frames: the WAL is now shorter than the cursor.
        let wal = std::fs::OpenOptions::new().write(true).open(wal_path(&db)).unwrap();
        wal.set_len(end.offset - 100).unwrap();
        assert!(!wal_reaches(&db, &end, false).unwrap());
        // Everything up to a checkpointed cursor is in the database file: a WAL SQLite
        // restarted after it, or none, still reaches it.
        let checkpointed_before = WalCursor {
            salt1: end.salt1.wrapping_sub(1),
            salt2: 1,
            ..end
        };
        assert!(wal_reaches(&db, &checkpointed_before, true).unwrap());
        assert!(!wal_reaches(&db, &checkpointed_before, false).unwrap());
        std::fs::remove_file(wal_path(&db)).unwrap();
        assert!(wal_reaches(&db, &end, true).unwrap());
        assert!(!wal_reaches(&db, &end, false).unwrap());
    }
}
