//! LTX v3 files, byte-compatible with Litestream 0.5.17.
//!
//! This module owns the on-storage format of one LTX file: the 100-byte
//! header, LZ4-compressed page frames, the end marker, the page index, the
//! trailer and the CRC-64 file checksum, plus the `<min>-<max>.ltx` naming
//! rule. Files are written to any `Write` and read piece by piece
//! ([`StreamDecoder`]), so none has to fit in memory; where files live
//! (levels, object keys), how they chain and how they are restored belong
//! elsewhere.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! header (100) | page frame* | end marker (6 zero bytes) | index | trailer (16)
//! page frame   = be32 pgno | be16 flags=0x0001 | be32 len | LZ4 block (len)
//! index        = (uvarint pgno, uvarint offset, uvarint size)* | uvarint 0 | be64 index length
//! trailer      = be64 post-apply checksum | be64 file checksum
//! ```
//!
//! The source of truth is `shared/reference/ltx-format.md`.

mod cursor;
mod decode;
mod encode;
mod header;
mod legacy;

#[cfg(test)]
mod fixtures;

pub use decode::{decode, decode_header, Decoded, Event, StreamDecoder, Trailer};
pub use encode::Encoder;
pub use header::Header;

use crate::checksum::CHECKSUM_FLAG;

/// Size of the LTX header in bytes.
pub const HEADER_SIZE: usize = 100;
/// Size of a page frame header (pgno + flags) in bytes.
pub const PAGE_HEADER_SIZE: usize = 6;
/// Size of the trailer (post-apply checksum + file checksum) in bytes.
pub const TRAILER_SIZE: usize = 16;
/// Header flag: the file carries no database checksums. Litestream 0.5.17
/// sets it on every file it writes, and it is the only valid header flag.
pub const FLAG_NO_CHECKSUM: u32 = 0x2;
/// Page flag: a be32 length follows and the data is a raw LZ4 block.
pub const PAGE_FLAG_SIZE: u16 = 0x0001;
/// Smallest valid page size.
pub const MIN_PAGE_SIZE: u32 = 512;
/// Largest valid page size.
pub const MAX_PAGE_SIZE: u32 = 65536;

/// Why an LTX file could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LtxError {
    /// The input ended inside the named part of the file.
    #[error("truncated ltx file: incomplete {0}")]
    Truncated(&'static str),
    /// The file does not start with "LTX1".
    #[error("bad magic: not an ltx file")]
    BadMagic,
    /// Header flags other than [`FLAG_NO_CHECKSUM`].
    #[error("invalid flags: {0:#010x}")]
    InvalidFlags(u32),
    /// Page size not a power of two in 512..=65536.
    #[error("invalid page size: {0}")]
    InvalidPageSize(u32),
    /// A zero transaction id, or min > max.
    #[error("invalid transaction ids: min {min}, max {max}")]
    InvalidTxid { min: u64, max: u64 },
    /// Commit (database size in pages) of zero.
    #[error("commit must be non-zero")]
    ZeroCommit,
    /// Inconsistent WAL offset, size and salts.
    #[error("invalid wal fields: {0}")]
    InvalidWalFields(&'static str),
    /// Pre-apply checksum not allowed here, or malformed.
    #[error("invalid pre-apply checksum: {0}")]
    InvalidPreApplyChecksum(&'static str),
    /// Post-apply checksum not allowed here, or malformed.
    #[error("invalid post-apply checksum: {0}")]
    InvalidPostApplyChecksum(&'static str),
    /// A page frame with page number zero that is not the end marker.
    #[error("page number required")]
    ZeroPgno,
    /// Page flags other than [`PAGE_FLAG_SIZE`].
    #[error("invalid flags {flags:#06x} on page {pgno}")]
    InvalidPageFlags { pgno: u32, flags: u16 },
    /// Page numbers not strictly ascending.
    #[error("page {pgno} out of order after page {prev}")]
    PageOrder { pgno: u32, prev: u32 },
    /// A page beyond the commit size.
    #[error("page {pgno} is beyond commit size {commit}")]
    PageOutOfBounds { pgno: u32, commit: u32 },
    /// The SQLite lock page, which is never stored.
    #[error("page {pgno} is the lock page and is never stored")]
    LockPage { pgno: u32 },
    /// Page data whose length is not the page size.
    #[error("page {pgno} has {len} bytes, expected {page_size}")]
    PageLength { pgno: u32, len: usize, page_size: u32 },
    /// A snapshot page that does not follow its predecessor.
    #[error("snapshot page {pgno} out of sequence, expected page {expected}")]
    SnapshotGap { pgno: u32, expected: u32 },
    /// A snapshot that stops before its commit size.
    #[error("snapshot incomplete: last page {last}, commit {commit}")]
    SnapshotIncomplete { last: u32, commit: u32 },
    /// Page data that does not inflate to exactly one page.
    #[error("lz4 decompress page {pgno}: {reason}")]
    Lz4 { pgno: u32, reason: String },
    /// A page index that is malformed or disagrees with the page frames.
    #[error("invalid page index: {0}")]
    InvalidIndex(&'static str),
    /// Bytes after the trailer.
    #[error("{0} unexpected bytes after trailer")]
    TrailingData(usize),
    /// The trailer's file checksum does not match the content.
    #[error("file checksum mismatch: trailer has {expected:#018x}, content gives {actual:#018x}")]
    ChecksumMismatch { expected: u64, actual: u64 },
    /// The writer an [`Encoder`] writes to failed.
    #[error("cannot write the ltx file: {0}")]
    Write(String),
}

/// Returns the object name of a file covering `min..=max`:
/// `%016x-%016x.ltx`, lowercase.
pub fn file_name(min_txid: u64, max_txid: u64) -> String {
    format!("{min_txid:016x}-{max_txid:016x}.ltx")
}

/// Parses a name made by [`file_name`] into `(min_txid, max_txid)`.
///
/// Accepts only `^[0-9a-f]{16}-[0-9a-f]{16}\.ltx$`, as litestream does:
/// uppercase hex, other suffixes and temporary files are ignored (`None`).
pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".ltx")?;
    let (min, max) = stem.split_once('-')?;
    Some((parse_txid_hex(min)?, parse_txid_hex(max)?))
}

fn parse_txid_hex(s: &str) -> Option<u64> {
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if s.len() != 16 || !s.bytes().all(lower_hex) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// One page index entry: where a page frame starts and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexEntry {
    pgno: u32,
    /// Absolute offset of the frame's page header.
    offset: u64,
    /// Frame length: page header, length field and compressed data.
    size: u64,
}

/// Checks that `pgno` may follow `prev` (0 for the first page) in a file
/// with `header`. Shared by encoder and decoder so both enforce one rule.
fn check_page_order(header: &Header, prev: u32, pgno: u32) -> Result<(), LtxError> {
    if pgno == 0 {
        return Err(LtxError::ZeroPgno);
    }
    if pgno > header.commit {
        let commit = header.commit;
        return Err(LtxError::PageOutOfBounds { pgno, commit });
    }
    if pgno == header.lock_page() {
        return Err(LtxError::LockPage { pgno });
    }
    if header.is_snapshot() {
        let expected = next_snapshot_pgno(header, prev);
        if pgno != expected {
            return Err(LtxError::SnapshotGap { pgno, expected });
        }
    } else if pgno <= prev {
        return Err(LtxError::PageOrder { pgno, prev });
    }
    Ok(())
}

/// The page a snapshot must contain after `prev`, hopping over the lock page.
fn next_snapshot_pgno(header: &Header, prev: u32) -> u32 {
    let next = prev.saturating_add(1);
    if next == header.lock_page() {
        next.saturating_add(1)
    } else {
        next
    }
}

/// Checks that a snapshot whose last page is `last` holds every page up to
/// its commit size (the lock page excepted). Other files always pass.
fn check_snapshot_complete(header: &Header, last: u32) -> Result<(), LtxError> {
    if !header.is_snapshot() {
        return Ok(());
    }
    let commit = header.commit;
    let expected_last = if commit == header.lock_page() {
        commit - 1
    } else {
        commit
    };
    if last != expected_last {
        return Err(LtxError::SnapshotIncomplete { last, commit });
    }
    Ok(())
}

/// Checks the trailer's post-apply checksum against the header's mode.
///
/// With [`FLAG_NO_CHECKSUM`] it must be zero: litestream's restore fails with
/// "post-apply checksum not allowed" otherwise.
fn check_post_apply(header: &Header, post_apply: u64) -> Result<(), LtxError> {
    if header.no_checksum() {
        if post_apply != 0 {
            return Err(LtxError::InvalidPostApplyChecksum(
                "not allowed with the no-checksum flag",
            ));
        }
    } else if post_apply & CHECKSUM_FLAG == 0 {
        return Err(LtxError::InvalidPostApplyChecksum("required, with bit 63 set"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::lock_page;
    use crate::ltx::fixtures::snapshot_header;

    #[test]
    fn snapshot_sequence_hops_over_lock_page() {
        let lock = lock_page(512);
        let header = snapshot_header(512, lock + 1, 1);
        assert_eq!(next_snapshot_pgno(&header, 0), 1);
        assert_eq!(next_snapshot_pgno(&header, lock - 1), lock + 1);
        assert_eq!(check_page_order(&header, lock - 1, lock + 1), Ok(()));
        let err = LtxError::LockPage { pgno: lock };
        assert_eq!(check_page_order(&header, lock - 1, lock), Err(err));
    }

    #[test]
    fn snapshot_ending_on_lock_page_is_complete_without_it() {
        let lock = lock_page(512);
        let header = snapshot_header(512, lock, 1);
        assert_eq!(check_snapshot_complete(&header, lock - 1), Ok(()));
        let err = LtxError::SnapshotIncomplete {
            last: lock - 2,
            commit: lock,
        };
        assert_eq!(check_snapshot_complete(&header, lock - 2), Err(err));
    }

    #[test]
    fn file_name_is_zero_padded_lowercase_hex() {
        assert_eq!(file_name(1, 0xab), "0000000000000001-00000000000000ab.ltx");
        assert_eq!(file_name(u64::MAX, u64::MAX), "ffffffffffffffff-ffffffffffffffff.ltx");
    }

    #[test]
    fn parse_file_name_round_trips() {
        for (min, max) in [(1, 1), (2, 0x1234_5678_9abc), (u64::MAX, u64::MAX)] {
            assert_eq!(parse_file_name(&file_name(min, max)), Some((min, max)));
        }
    }

    #[test]
    fn parse_file_name_rejects_anything_litestream_ignores() {
        for name in [
            "0000000000000001-00000000000000AB.ltx",
            "0000000000000001-0000000000000001.LTX",
            "0000000000000001-0000000000000001.ltx.tmp",
            "000000000000001-0000000000000001.ltx",
            "00000000000000001-0000000000000001.ltx",
            "0000000000000001_0000000000000001.ltx",
            "0000000000000001-000000000000000g.ltx",
            "+000000000000001-0000000000000001.ltx",
            "0000000000000001-0000000000000001-0000000000000001.ltx",
            "lock.json",
            "README",
            "",
            ".ltx",
        ] {
            assert_eq!(parse_file_name(name), None, "{name}");
        }
    }
}
