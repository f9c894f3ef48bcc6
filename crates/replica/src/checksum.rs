//! Page and database checksums in the form LTX uses (CRC-64/GO-ISO).
//!
//! This module owns the checksum arithmetic only: the CRC flavour, the
//! per-page checksum, the rolling database checksum and the SQLite lock page
//! that the database checksum skips. It knows nothing about LTX files or the
//! WAL; `ltx` reuses [`CRC64`] for its file checksum.
//!
//! Every checksum has bit 63 set ([`CHECKSUM_FLAG`]) so that zero can mean
//! "no checksum" in LTX headers and trailers.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use crc::{Crc, Digest, Table, CRC_64_GO_ISO};

/// The CRC used throughout LTX: Go's `crc64.ISO` table, i.e. CRC-64/GO-ISO.
///
/// Not ECMA-182/XZ: litestream rejects files checksummed with that. Slice-by-16 tables
/// (32 KiB): every byte a restore fetches, and every page of a database checksum, goes
/// through this CRC, and the crate's default byte-at-a-time table made it the largest single
/// cost of a restore (about a third of a 64 MiB one).
pub static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_GO_ISO);

/// A running [`CRC64`].
pub type Crc64Digest = Digest<'static, u64, Table<16>>;

/// Bit 63, set on every page, database and file checksum.
pub const CHECKSUM_FLAG: u64 = 1 << 63;

/// Byte offset of SQLite's lock byte range (1 GiB); the page holding it is
/// never written by SQLite and is excluded from checksums and LTX files.
const LOCK_BYTE_OFFSET: u32 = 0x4000_0000;

/// Returns the page number of SQLite's lock page for `page_size`.
///
/// `page_size` is expected to be a valid SQLite page size; zero is treated
/// as one rather than panicking.
pub fn lock_page(page_size: u32) -> u32 {
    LOCK_BYTE_OFFSET / page_size.max(1) + 1
}

/// Returns the checksum of one page: `CHECKSUM_FLAG | crc64(be32(pgno) ‖ page)`.
pub fn page_checksum(pgno: u32, page: &[u8]) -> u64 {
    let mut digest = CRC64.digest();
    digest.update(&pgno.to_be_bytes());
    digest.update(page);
    CHECKSUM_FLAG | digest.finalize()
}

/// Rolling checksum of a whole database, as LTX defines it.
///
/// Each step is `c = FLAG | (c ^ page_checksum)`. Because every page checksum
/// has bit 63 set, the low 63 bits are simply the XOR of all page checksums:
/// the result is independent of page order, and removing a page is the same
/// operation as adding it. That is what makes [`DbChecksum::replace`] valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DbChecksum(u64);

impl DbChecksum {
    /// The checksum of an empty database.
    pub const EMPTY: DbChecksum = DbChecksum(CHECKSUM_FLAG);

    /// Returns the checksum of an empty database.
    pub const fn new() -> Self {
        Self::EMPTY
    }

    /// Wraps a previously computed value (for example a post-apply checksum).
    pub const fn from_value(value: u64) -> Self {
        DbChecksum(value | CHECKSUM_FLAG)
    }

    /// Returns the checksum value, always with bit 63 set.
    pub const fn value(self) -> u64 {
        self.0
    }

    /// Folds in a page checksum from [`page_checksum`].
    ///
    /// The caller must not pass the lock page; see [`lock_page`].
    pub fn add(&mut self, page_cksum: u64) {
        self.0 = CHECKSUM_FLAG | (self.0 ^ page_cksum);
    }

    /// Folds in a page by number and content.
    pub fn add_page(&mut self, pgno: u32, page: &[u8]) {
        self.add(page_checksum(pgno, page));
    }

    /// Removes a page checksum previously added (XOR is its own inverse).
    pub fn remove(&mut self, page_cksum: u64) {
        self.add(page_cksum);
    }

    /// Updates the checksum for a page whose content changed from the one
    /// with checksum `old` to the one with checksum `new`.
    pub fn replace(&mut self, old: u64, new: u64) {
        self.remove(old);
        self.add(new);
    }
}

impl Default for DbChecksum {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Computes the database checksum of a database image read from `reader`:
/// pages 1..=n in file order, skipping the lock page.
///
/// # Errors
/// Returns `InvalidInput` for a page size of zero, `InvalidData` if the
/// image ends with a partial page, and any read error from `reader`.
pub fn database_checksum<R: Read>(mut reader: R, page_size: u32) -> io::Result<u64> {
    if page_size == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "page size must be non-zero",
        ));
    }
    let lock = lock_page(page_size);
    let mut page = vec![0u8; page_size as usize];
    let mut sum = DbChecksum::new();
    let mut pgno: u32 = 0;
    while read_page(&mut reader, &mut page)? {
        pgno = pgno.checked_add(1).ok_or_else(too_many_pages)?;
        if pgno != lock {
            sum.add_page(pgno, &page);
        }
    }
    Ok(sum.value())
}

/// Computes [`database_checksum`] of a database file no connection of this process has
/// open (a restored copy): read through a descriptor of its own, closed after.
///
/// # Errors
/// As [`database_checksum`], plus any error opening the file.
pub fn copy_checksum_path(path: &Path, page_size: u32) -> io::Result<u64> {
    database_checksum(io::BufReader::new(File::open(path)?), page_size)
}

/// Computes [`database_checksum`] of the live database file at `path`.
///
/// # Errors
/// As [`database_checksum`], plus any error opening the file.
pub fn database_checksum_path(path: &Path, page_size: u32) -> io::Result<u64> {
    // Through the process's one descriptor of the file (see `crate::db_file`), read by
    // position so that no other reader's offset moves.
    let file = crate::db_file::open(path)?;
    database_checksum(io::BufReader::new(Positioned { file: &file, at: 0 }), page_size)
}

/// Reads a shared file from its own position (`pread`).
struct Positioned<'a> {
    file: &'a File,
    at: u64,
}

impl Read for Positioned<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Fills `page` from `reader`. Returns `false` at a clean end of input.
fn read_page<R: Read>(reader: &mut R, page: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < page.len() {
        match reader.read(&mut page[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    match filled {
        0 => Ok(false),
        n if n == page.len() => Ok(true),
        n => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("database ends with a partial page of {n} bytes"),
        )),
    }
}

fn too_many_pages() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "database has too many pages")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::sqlite;

    #[test]
    fn crc_is_go_iso_flavour() {
        // Published check value of CRC-64/GO-ISO over "123456789".
        assert_eq!(CRC64.checksum(b"123456789"), 0xb909_56c7_75a4_1001);
    }

    #[test]
    fn lock_page_is_first_page_past_one_gib() {
        assert_eq!(lock_page(512), 2_097_153);
        assert_eq!(lock_page(4096), 262_145);
        assert_eq!(lock_page(65536), 16_385);
    }

    #[test]
    fn page_checksum_covers_pgno_and_sets_flag() {
        let page = [7u8; 512];
        let mut manual = Vec::from(3u32.to_be_bytes());
        manual.extend_from_slice(&page);
        assert_eq!(page_checksum(3, &page), CHECKSUM_FLAG | CRC64.checksum(&manual));
        assert_ne!(page_checksum(3, &page), page_checksum(4, &page));
    }

    #[test]
    fn empty_database_checksum_is_flag_only() {
        assert_eq!(database_checksum(&[][..], 512).unwrap(), CHECKSUM_FLAG);
    }

    #[test]
    fn database_checksum_folds_pages_in_order() {
        let image: Vec<u8> = (0..3u8).flat_map(|b| [b; 512]).collect();
        let mut expected = CHECKSUM_FLAG;
        for (i, page) in image.chunks(512).enumerate() {
            expected = CHECKSUM_FLAG | (expected ^ page_checksum(i as u32 + 1, page));
        }
        assert_eq!(database_checksum(&image[..], 512).unwrap(), expected);
    }

    #[test]
    fn replace_matches_recomputation() {
        let (a, b, b2) = ([1u8; 512], [2u8; 512], [9u8; 512]);
        let mut rolling = DbChecksum::new();
        rolling.add_page(1, &a);
        rolling.add_page(2, &b);
        rolling.replace(page_checksum(2, &b), page_checksum(2, &b2));

        let mut fresh = DbChecksum::new();
        fresh.add_page(1, &a);
        fresh.add_page(2, &b2);
        assert_eq!(rolling, fresh);
    }

    #[test]
    fn partial_trailing_page_is_rejected() {
        let err = database_checksum(&[0u8; 700][..], 512).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn zero_page_size_is_rejected() {
        let err = database_checksum(&[][..], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn real_database_checksum_is_stable_and_tracks_row_changes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        sqlite(
            dir.path(),
            "PRAGMA page_size=4096; CREATE TABLE t(x); INSERT INTO t VALUES('a');",
        );
        let first = database_checksum_path(&db, 4096).unwrap();
        assert_eq!(database_checksum_path(&db, 4096).unwrap(), first);

        sqlite(dir.path(), "UPDATE t SET x = 'b';");
        let second = database_checksum_path(&db, 4096).unwrap();
        assert_ne!(second, first);
        assert_eq!(second & CHECKSUM_FLAG, CHECKSUM_FLAG);
    }
}
