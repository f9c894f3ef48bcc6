//! Reading committed transactions out of a SQLite WAL file.
//!
//! This module owns the WAL file format (<https://www.sqlite.org/fileformat2.html#walformat>):
//! the 32-byte header, 24-byte frame headers, and the cumulative checksum
//! that tells valid frames from leftovers. It reads; it never writes,
//! checkpoints or locks. Deciding when to read, and what to do when the WAL
//! restarts, belongs to the replicator.
//!
//! A frame is valid when its salts equal the header's and its checksum,
//! seeded with the previous frame's (or the header's), matches. SQLite
//! applies exactly that rule on recovery, and we follow it so we never ship a
//! frame SQLite itself would ignore. Only frames up to the last *commit
//! frame* (non-zero "database size after commit") form complete
//! transactions.

use std::io::{self, Read, Seek, SeekFrom};

/// Size of the WAL file header in bytes.
pub const WAL_HEADER_SIZE: u64 = 32;
/// Size of a frame header in bytes.
pub const FRAME_HEADER_SIZE: u64 = 24;
/// Magic selecting little-endian checksum words.
const MAGIC_LE: u32 = 0x377f_0682;
/// Magic selecting big-endian checksum words.
const MAGIC_BE: u32 = 0x377f_0683;
/// The only WAL format version SQLite has written.
const VERSION: u32 = 3_007_000;

/// Why a WAL file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Reading or seeking the file failed.
    #[error("read wal: {0}")]
    Io(#[from] io::Error),
    /// Fewer than 32 bytes: no header yet (an empty or truncated WAL).
    #[error("wal header too short: {len} bytes")]
    ShortHeader { len: usize },
    /// Not a WAL file.
    #[error("bad wal magic: {0:#010x}")]
    BadMagic(u32),
    /// A format version other than 3007000.
    #[error("unsupported wal version: {0}")]
    BadVersion(u32),
    /// A page size that is not a power of two in 512..=65536.
    #[error("invalid wal page size: {0}")]
    BadPageSize(u32),
    /// The header's own checksum does not match (torn or foreign header).
    #[error("wal header checksum mismatch: stored {stored:08x?}, computed {computed:08x?}")]
    HeaderChecksum { stored: (u32, u32), computed: (u32, u32) },
    /// A resume position that is not on a frame boundary of this WAL.
    #[error("wal position {offset} is not a frame boundary")]
    InvalidPosition { offset: u64 },
}

/// The WAL file header. Compare two with `==` (or their [`salts`]) to tell
/// whether the WAL was restarted in between: SQLite picks new salts on
/// every restart, and frames with the old salts are then dead.
///
/// [`salts`]: WalHeader::salts
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalHeader {
    /// `0x377f0682` (little-endian checksums) or `0x377f0683` (big-endian).
    pub magic: u32,
    /// Format version, always 3007000.
    pub version: u32,
    /// Database page size in bytes.
    pub page_size: u32,
    /// Checkpoint sequence number.
    pub checkpoint_seq: u32,
    /// Salt-1, incremented on each WAL restart.
    pub salt1: u32,
    /// Salt-2, a fresh random value on each WAL restart.
    pub salt2: u32,
    /// First word of the header checksum; seeds the first frame's.
    pub checksum1: u32,
    /// Second word of the header checksum.
    pub checksum2: u32,
}

impl WalHeader {
    /// Parses and validates a header from the first 32 bytes of `bytes`.
    ///
    /// # Errors
    /// [`WalError::ShortHeader`], [`WalError::BadMagic`],
    /// [`WalError::BadVersion`], [`WalError::BadPageSize`] or
    /// [`WalError::HeaderChecksum`], checked in that order.
    pub fn parse(bytes: &[u8]) -> Result<WalHeader, WalError> {
        let short = WalError::ShortHeader { len: bytes.len() };
        let bytes: &[u8; WAL_HEADER_SIZE as usize] = bytes
            .get(..WAL_HEADER_SIZE as usize)
            .and_then(|b| b.try_into().ok())
            .ok_or(short)?;
        let word = |i: usize| be_u32(&bytes[i * 4..i * 4 + 4]);
        let header = WalHeader {
            magic: word(0),
            version: word(1),
            page_size: word(2),
            checkpoint_seq: word(3),
            salt1: word(4),
            salt2: word(5),
            checksum1: word(6),
            checksum2: word(7),
        };
        header.validate(&bytes[..24])?;
        Ok(header)
    }

    /// Reads and parses the header at the start of `wal`.
    ///
    /// # Errors
    /// As [`WalHeader::parse`], plus [`WalError::Io`].
    pub fn read_from<R: Read + Seek>(wal: &mut R) -> Result<WalHeader, WalError> {
        wal.seek(SeekFrom::Start(0))?;
        let mut buf = [0u8; WAL_HEADER_SIZE as usize];
        let len = read_full(wal, &mut buf)?;
        WalHeader::parse(&buf[..len])
    }

    fn validate(&self, checksummed: &[u8]) -> Result<(), WalError> {
        if self.magic != MAGIC_LE && self.magic != MAGIC_BE {
            return Err(WalError::BadMagic(self.magic));
        }
        if self.version != VERSION {
            return Err(WalError::BadVersion(self.version));
        }
        let size = self.page_size;
        if !size.is_power_of_two() || !(512..=65536).contains(&size) {
            return Err(WalError::BadPageSize(size));
        }
        let computed = wal_checksum(self.big_endian_checksums(), checksummed, (0, 0));
        let stored = self.checksum();
        if computed != stored {
            return Err(WalError::HeaderChecksum { stored, computed });
        }
        Ok(())
    }

    /// `(salt1, salt2)`; frames carrying other salts are not part of this WAL.
    pub fn salts(&self) -> (u32, u32) {
        (self.salt1, self.salt2)
    }

    /// The header checksum, which seeds the first frame's checksum.
    pub fn checksum(&self) -> (u32, u32) {
        (self.checksum1, self.checksum2)
    }

    /// Whether checksum words are read big-endian (magic `0x377f0683`).
    pub fn big_endian_checksums(&self) -> bool {
        self.magic & 1 == 1
    }

    /// Bytes per frame: frame header plus one page.
    pub fn frame_size(&self) -> u64 {
        FRAME_HEADER_SIZE + u64::from(self.page_size)
    }
}

/// A place in the WAL just after a valid frame (or the header), with the
/// cumulative checksum there, which seeds the next frame's checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalPosition {
    /// Byte offset of the next frame.
    pub offset: u64,
    /// Cumulative checksum of everything before `offset`.
    pub checksum: (u32, u32),
}

impl WalPosition {
    /// The position of the first frame of the WAL with `header`.
    pub fn start(header: &WalHeader) -> WalPosition {
        WalPosition {
            offset: WAL_HEADER_SIZE,
            checksum: header.checksum(),
        }
    }
}

/// One WAL frame: a page image and, on a commit frame, the database size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Page number the data belongs to.
    pub pgno: u32,
    /// Database size in pages after the commit, or 0 if not a commit frame.
    pub commit: u32,
    /// Byte offset of the frame header in the WAL file.
    pub offset: u64,
    /// The page image, `page_size` bytes.
    pub data: Vec<u8>,
}

/// The complete transactions found after a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Every frame of the complete transactions, in WAL order. A page may
    /// appear more than once; the later frame wins.
    pub frames: Vec<Frame>,
    /// Position after the last commit frame read; the starting position if
    /// there was none. Resume from here next time.
    pub end: WalPosition,
    /// Database size in pages at the last commit, if any.
    pub commit: Option<u32>,
    /// Number of transactions (commit frames) read.
    pub commits: usize,
}

/// Reads every complete transaction in `wal` after `from`.
///
/// Reading stops, without error, at end of file, at a short frame, at a
/// frame with other salts than `header` (left over from before a restart),
/// at a zero page number or at a checksum mismatch. Frames after the last
/// commit frame are not returned. `wal` may be `&mut &std::fs::File`.
///
/// # Errors
/// [`WalError::InvalidPosition`] if `from` is not a frame boundary, and
/// [`WalError::Io`] on read or seek failure.
pub fn read_committed<R: Read + Seek>(
    wal: &mut R,
    header: &WalHeader,
    from: WalPosition,
) -> Result<Committed, WalError> {
    read_committed_limit(wal, header, from, u64::MAX)
}

/// Like [`read_committed`], but stops at the first commit boundary at which
/// at least `max_bytes` of WAL have been consumed since `from`. This bounds
/// the work of one sync while still ending on a whole transaction; a
/// `max_bytes` of 1 reads exactly one transaction.
///
/// # Errors
/// As [`read_committed`].
pub fn read_committed_limit<R: Read + Seek>(
    wal: &mut R,
    header: &WalHeader,
    from: WalPosition,
    max_bytes: u64,
) -> Result<Committed, WalError> {
    let scan = scan(wal, header, from, max_bytes, |frame, data| Frame {
        pgno: frame.pgno,
        commit: frame.commit,
        offset: frame.offset,
        data: data.to_vec(),
    })?;
    Ok(Committed {
        frames: scan.frames,
        end: scan.end,
        commit: scan.commit,
        commits: scan.commits,
    })
}

/// Where one frame of a complete transaction is, without its page: for readers that fetch
/// pages later (see [`read_frame_page`]) rather than holding a whole WAL in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef {
    /// Page number the frame carries.
    pub pgno: u32,
    /// Database size in pages after the commit, or 0 if not a commit frame.
    pub commit: u32,
    /// Byte offset of the frame header in the WAL file.
    pub offset: u64,
}

/// The complete transactions found after a position, as [`FrameRef`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedIndex {
    /// Every frame of the complete transactions, in WAL order.
    pub frames: Vec<FrameRef>,
    /// As [`Committed::end`].
    pub end: WalPosition,
    /// As [`Committed::commit`].
    pub commit: Option<u32>,
    /// As [`Committed::commits`].
    pub commits: usize,
}

/// As [`read_committed_limit`], validating every frame the same way, but keeping only where
/// each frame is: memory stays a few bytes per frame however large the WAL.
///
/// # Errors
/// As [`read_committed`].
pub fn index_committed_limit<R: Read + Seek>(
    wal: &mut R,
    header: &WalHeader,
    from: WalPosition,
    max_bytes: u64,
) -> Result<CommittedIndex, WalError> {
    scan(wal, header, from, max_bytes, |frame, _| *frame).map(CommittedIndex::from)
}

/// Reads the page of the frame at `frame` into `page`, checking that the frame there still
/// carries `frame.pgno` and this WAL's salts: a WAL restarted since it was indexed fails the
/// check (a restart always changes the salts) instead of handing out another page.
///
/// # Errors
/// [`WalError::Io`]; `Ok(false)` when the frame is no longer there.
pub fn read_frame_page(
    file: &std::fs::File,
    header: &WalHeader,
    frame: &FrameRef,
    page: &mut [u8],
) -> Result<bool, WalError> {
    use std::os::unix::fs::FileExt;
    let mut frame_header = [0u8; FRAME_HEADER_SIZE as usize];
    file.read_exact_at(&mut frame_header, frame.offset)?;
    file.read_exact_at(page, frame.offset + FRAME_HEADER_SIZE)?;
    let word = |i: usize| be_u32(&frame_header[i * 4..i * 4 + 4]);
    Ok(word(0) == frame.pgno && (word(2), word(3)) == header.salts())
}

/// Reads frames after `from` until `max_bytes` are consumed or the valid frames end, keeping
/// what `keep` makes of each frame of a complete transaction.
fn scan<R: Read + Seek, F>(
    wal: &mut R,
    header: &WalHeader,
    from: WalPosition,
    max_bytes: u64,
    mut keep: impl FnMut(&FrameRef, &[u8]) -> F,
) -> Result<Scan<F>, WalError> {
    check_position(header, from)?;
    wal.seek(SeekFrom::Start(from.offset))?;
    let mut scan = Scan::new(from);
    let mut buf = vec![0u8; header.frame_size() as usize];
    while scan.end.offset - from.offset < max_bytes {
        if read_full(wal, &mut buf)? < buf.len() {
            break;
        }
        let Some((frame, checksum)) = decode_frame(header, &buf, scan.pos) else {
            break;
        };
        let kept = keep(&frame, &buf[FRAME_HEADER_SIZE as usize..]);
        scan.push(kept, frame.commit, checksum, header.frame_size());
    }
    Ok(scan)
}

fn check_position(header: &WalHeader, pos: WalPosition) -> Result<(), WalError> {
    let past_header = pos.offset.checked_sub(WAL_HEADER_SIZE);
    match past_header {
        Some(n) if n % header.frame_size() == 0 => Ok(()),
        _ => Err(WalError::InvalidPosition { offset: pos.offset }),
    }
}

/// Scan state: transactions completed so far and the frames of the one in
/// progress, which are dropped unless its commit frame turns up.
struct Scan<F> {
    frames: Vec<F>,
    end: WalPosition,
    commit: Option<u32>,
    commits: usize,
    pending: Vec<F>,
    /// Position after the last valid frame, committed or not.
    pos: WalPosition,
}

impl<F> Scan<F> {
    fn new(from: WalPosition) -> Self {
        Scan {
            frames: Vec::new(),
            end: from,
            commit: None,
            commits: 0,
            pending: Vec::new(),
            pos: from,
        }
    }

    fn push(&mut self, frame: F, commit: u32, checksum: (u32, u32), frame_size: u64) {
        self.pos = WalPosition {
            offset: self.pos.offset + frame_size,
            checksum,
        };
        self.pending.push(frame);
        if commit != 0 {
            self.frames.append(&mut self.pending);
            self.end = self.pos;
            self.commit = Some(commit);
            self.commits += 1;
        }
    }
}

impl From<Scan<FrameRef>> for CommittedIndex {
    fn from(scan: Scan<FrameRef>) -> Self {
        CommittedIndex {
            frames: scan.frames,
            end: scan.end,
            commit: scan.commit,
            commits: scan.commits,
        }
    }
}

/// Decodes the frame in `buf` (header + page) found at `pos`. Returns where
/// the frame is and the cumulative checksum after it, or `None` if SQLite
/// would consider it invalid.
fn decode_frame(header: &WalHeader, buf: &[u8], pos: WalPosition) -> Option<(FrameRef, (u32, u32))> {
    let (frame_header, data) = buf.split_at_checked(FRAME_HEADER_SIZE as usize)?;
    let word = |i: usize| be_u32(&frame_header[i * 4..i * 4 + 4]);
    let (pgno, commit) = (word(0), word(1));
    if (word(2), word(3)) != header.salts() || pgno == 0 {
        return None;
    }
    let big_endian = header.big_endian_checksums();
    let checksum = wal_checksum(big_endian, &frame_header[..8], pos.checksum);
    let checksum = wal_checksum(big_endian, data, checksum);
    if checksum != (word(4), word(5)) {
        return None;
    }
    let frame = FrameRef {
        pgno,
        commit,
        offset: pos.offset,
    };
    Some((frame, checksum))
}

/// SQLite's WAL checksum: Fibonacci-weighted sums over pairs of 32-bit
/// words, continuing from `seed`. `data.len()` is a multiple of 8 for every
/// caller (24-byte header prefix, 8-byte frame prefix, page sizes).
fn wal_checksum(big_endian: bool, data: &[u8], seed: (u32, u32)) -> (u32, u32) {
    let word = |b: &[u8]| {
        let mut w = [0u8; 4];
        w.copy_from_slice(b);
        if big_endian {
            u32::from_be_bytes(w)
        } else {
            u32::from_le_bytes(w)
        }
    };
    let (mut s1, mut s2) = seed;
    for pair in data.chunks_exact(8) {
        s1 = s1.wrapping_add(word(&pair[..4])).wrapping_add(s2);
        s2 = s2.wrapping_add(word(&pair[4..])).wrapping_add(s1);
    }
    (s1, s2)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(b);
    u32::from_be_bytes(w)
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests;
