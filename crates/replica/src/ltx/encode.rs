//! Building one LTX file, page by page, into any writer: a buffer for small files, a
//! [`crate::spill::SpillWriter`] for files as large as the database.

use std::io::Write;

use super::cursor::put_uvarint;
use super::{
    check_page_order, check_post_apply, check_snapshot_complete, Header, IndexEntry, LtxError, PAGE_FLAG_SIZE,
    PAGE_HEADER_SIZE,
};
use crate::checksum::{Crc64Digest, CHECKSUM_FLAG, CRC64};

/// Writes an LTX file: header first, pages in ascending order, then index and trailer on
/// [`Encoder::finish`]. Only the page index (a few bytes per page) is kept in memory.
///
/// The file checksum is kept as a running CRC while pages are added; it
/// covers the *uncompressed* page data, as the format requires.
pub struct Encoder<W: Write = Vec<u8>> {
    header: Header,
    out: W,
    /// Bytes written to `out`.
    written: u64,
    digest: Crc64Digest,
    index: Vec<IndexEntry>,
    /// Last page written, 0 before the first.
    prev_pgno: u32,
}

impl Encoder<Vec<u8>> {
    /// Starts a file with `header`, in memory.
    ///
    /// # Errors
    /// Any [`Header::validate`] error.
    pub fn new(header: Header) -> Result<Self, LtxError> {
        Encoder::with_writer(header, Vec::new())
    }
}

impl<W: Write> Encoder<W> {
    /// Starts a file with `header`, written to `out`.
    ///
    /// # Errors
    /// Any [`Header::validate`] error; [`LtxError::Write`] if `out` fails.
    pub fn with_writer(header: Header, out: W) -> Result<Self, LtxError> {
        header.validate()?;
        let mut encoder = Encoder {
            header,
            out,
            written: 0,
            digest: CRC64.digest(),
            index: Vec::new(),
            prev_pgno: 0,
        };
        encoder.write_hashed(&header.to_bytes())?;
        Ok(encoder)
    }

    /// The header this file was started with.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Appends page `pgno`, compressed as one raw LZ4 block.
    ///
    /// # Errors
    /// - [`LtxError::PageLength`] if `page` is not exactly one page;
    /// - [`LtxError::ZeroPgno`], [`LtxError::PageOutOfBounds`] (beyond
    ///   commit) or [`LtxError::LockPage`];
    /// - [`LtxError::PageOrder`] if not above the previous page, or for a
    ///   snapshot [`LtxError::SnapshotGap`] if not the next page;
    /// - [`LtxError::Write`] if the writer fails (the file is then unusable).
    ///
    /// On any other error nothing is written and the encoder can still be used.
    pub fn encode_page(&mut self, pgno: u32, page: &[u8]) -> Result<(), LtxError> {
        let page_size = self.header.page_size;
        if page.len() != page_size as usize {
            let len = page.len();
            return Err(LtxError::PageLength { pgno, len, page_size });
        }
        check_page_order(&self.header, self.prev_pgno, pgno)?;

        let offset = self.written;
        let block = lz4_flex::block::compress(page);
        let block_len = u32::try_from(block.len()).map_err(|_| LtxError::Lz4 {
            pgno,
            reason: "compressed block too large".to_owned(),
        })?;
        let mut frame_header = [0u8; PAGE_HEADER_SIZE + 4];
        frame_header[..4].copy_from_slice(&pgno.to_be_bytes());
        frame_header[4..6].copy_from_slice(&PAGE_FLAG_SIZE.to_be_bytes());
        frame_header[6..].copy_from_slice(&block_len.to_be_bytes());
        self.write_hashed(&frame_header)?;
        // The checksum covers the page as stored in the database, not the
        // compressed form, so hash and write diverge here.
        self.digest.update(page);
        self.write(&block)?;

        self.index.push(IndexEntry {
            pgno,
            offset,
            size: self.written - offset,
        });
        self.prev_pgno = pgno;
        Ok(())
    }

    /// Writes end marker, page index and trailer, and returns the writer.
    ///
    /// Pass 0 for `post_apply_checksum` with the no-checksum flag (what
    /// litestream 0.5.17 always does).
    ///
    /// # Errors
    /// [`LtxError::SnapshotIncomplete`] if a snapshot lacks pages up to its
    /// commit size, [`LtxError::InvalidPostApplyChecksum`] if the checksum
    /// does not suit the header's mode, [`LtxError::Write`] if the writer fails.
    pub fn finish(mut self, post_apply_checksum: u64) -> Result<W, LtxError> {
        check_snapshot_complete(&self.header, self.prev_pgno)?;
        check_post_apply(&self.header, post_apply_checksum)?;

        self.write_hashed(&[0u8; PAGE_HEADER_SIZE])?;
        let index = encode_index(&self.index);
        self.write_hashed(&index)?;
        self.write_hashed(&post_apply_checksum.to_be_bytes())?;

        let digest = std::mem::replace(&mut self.digest, CRC64.digest());
        let file_checksum = CHECKSUM_FLAG | digest.finalize();
        self.write(&file_checksum.to_be_bytes())?;
        self.out.flush().map_err(write_error)?;
        Ok(self.out)
    }

    fn write_hashed(&mut self, bytes: &[u8]) -> Result<(), LtxError> {
        self.digest.update(bytes);
        self.write(bytes)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), LtxError> {
        self.out.write_all(bytes).map_err(write_error)?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

fn write_error(e: std::io::Error) -> LtxError {
    LtxError::Write(e.to_string())
}

/// Encodes the page index: entries, a zero terminator, then the be64 length
/// of entries plus terminator.
fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 6 + 9);
    for entry in entries {
        put_uvarint(&mut out, u64::from(entry.pgno));
        put_uvarint(&mut out, entry.offset);
        put_uvarint(&mut out, entry.size);
    }
    put_uvarint(&mut out, 0);
    let len = out.len() as u64;
    out.extend_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::fixtures::{l0_header, page, reference_l0_header, snapshot_header};
    use crate::ltx::{HEADER_SIZE, TRAILER_SIZE};

    #[test]
    fn layout_matches_reference_l0_dump() {
        let mut enc = Encoder::new(reference_l0_header()).unwrap();
        enc.encode_page(2, &page(2, 4096)).unwrap();
        let file = enc.finish(0).unwrap();

        let block_len = u32::from_be_bytes(file[106..110].try_into().unwrap()) as usize;
        let frame_end = 110 + block_len;
        assert_eq!(file.len(), 144 + block_len, "197 bytes for a 53-byte block");
        assert_eq!(&file[..HEADER_SIZE], reference_l0_header().to_bytes());
        assert_eq!(&file[100..106], [0, 0, 0, 2, 0, 1]);
        assert_eq!(&file[frame_end..frame_end + 6], [0; 6]);
        let index = &file[frame_end + 6..frame_end + 10];
        assert_eq!(index, [2, 100, 10 + block_len as u8, 0]);
        assert_eq!(&file[frame_end + 10..frame_end + 18], 4u64.to_be_bytes());
        assert_eq!(&file[file.len() - TRAILER_SIZE..][..8], [0; 8]);
    }

    #[test]
    fn file_checksum_covers_logical_stream_with_uncompressed_pages() {
        let header = l0_header(512, 3, 7);
        let pages = [(1, page(1, 512)), (3, page(3, 512))];
        let mut enc = Encoder::new(header).unwrap();
        for (pgno, data) in &pages {
            enc.encode_page(*pgno, data).unwrap();
        }
        let file = enc.finish(0).unwrap();

        // Rebuild the logical stream from the reference's description.
        let mut stream = header.to_bytes().to_vec();
        let mut pos = HEADER_SIZE;
        for (pgno, data) in &pages {
            let len = u32::from_be_bytes(file[pos + 6..pos + 10].try_into().unwrap());
            stream.extend_from_slice(&pgno.to_be_bytes());
            stream.extend_from_slice(&[0, 1]);
            stream.extend_from_slice(&len.to_be_bytes());
            stream.extend_from_slice(data);
            pos += 10 + len as usize;
        }
        // End marker, index and post-apply checksum are hashed as stored.
        stream.extend_from_slice(&file[pos..file.len() - 8]);
        let expected = CHECKSUM_FLAG | CRC64.checksum(&stream);
        assert_eq!(file[file.len() - 8..], expected.to_be_bytes());
    }

    #[test]
    fn pages_are_raw_lz4_blocks() {
        let mut enc = Encoder::new(l0_header(1024, 1, 2)).unwrap();
        enc.encode_page(1, &page(1, 1024)).unwrap();
        let file = enc.finish(0).unwrap();
        let len = u32::from_be_bytes(file[106..110].try_into().unwrap()) as usize;
        let inflated = lz4_flex::block::decompress(&file[110..110 + len], 1024).unwrap();
        assert_eq!(inflated, page(1, 1024));
    }

    #[test]
    fn rejects_out_of_order_and_duplicate_pages() {
        let mut enc = Encoder::new(l0_header(512, 10, 2)).unwrap();
        enc.encode_page(5, &page(5, 512)).unwrap();
        let err = LtxError::PageOrder { pgno: 5, prev: 5 };
        assert_eq!(enc.encode_page(5, &page(5, 512)), Err(err));
        let err = LtxError::PageOrder { pgno: 3, prev: 5 };
        assert_eq!(enc.encode_page(3, &page(3, 512)), Err(err));
        enc.encode_page(6, &page(6, 512)).unwrap();
    }

    #[test]
    fn rejects_lock_page_zero_page_and_pages_beyond_commit() {
        let lock = crate::checksum::lock_page(65536);
        let mut enc = Encoder::new(l0_header(65536, lock + 1, 2)).unwrap();
        let data = vec![0u8; 65536];
        assert_eq!(enc.encode_page(0, &data), Err(LtxError::ZeroPgno));
        assert_eq!(enc.encode_page(lock, &data), Err(LtxError::LockPage { pgno: lock }));
        assert_eq!(
            enc.encode_page(lock + 2, &data),
            Err(LtxError::PageOutOfBounds {
                pgno: lock + 2,
                commit: lock + 1
            })
        );
        enc.encode_page(lock + 1, &data).unwrap();
    }

    #[test]
    fn rejects_wrong_page_length() {
        let mut enc = Encoder::new(l0_header(512, 2, 2)).unwrap();
        for len in [0, 511, 513, 1024] {
            assert_eq!(
                enc.encode_page(1, &vec![0; len]),
                Err(LtxError::PageLength {
                    pgno: 1,
                    len,
                    page_size: 512
                })
            );
        }
    }

    #[test]
    fn snapshot_must_be_sequential_and_complete() {
        let mut enc = Encoder::new(snapshot_header(512, 3, 4)).unwrap();
        let err = LtxError::SnapshotGap { pgno: 2, expected: 1 };
        assert_eq!(enc.encode_page(2, &page(2, 512)), Err(err));
        enc.encode_page(1, &page(1, 512)).unwrap();
        let err = LtxError::SnapshotGap { pgno: 3, expected: 2 };
        assert_eq!(enc.encode_page(3, &page(3, 512)), Err(err));
        enc.encode_page(2, &page(2, 512)).unwrap();
        let err = LtxError::SnapshotIncomplete { last: 2, commit: 3 };
        assert_eq!(enc.finish(0), Err(err));
    }

    #[test]
    fn no_checksum_file_refuses_post_apply_checksum() {
        let mut enc = Encoder::new(l0_header(512, 1, 2)).unwrap();
        enc.encode_page(1, &page(1, 512)).unwrap();
        assert!(matches!(
            enc.finish(CHECKSUM_FLAG | 1),
            Err(LtxError::InvalidPostApplyChecksum(_))
        ));
    }

    #[test]
    fn invalid_header_is_refused_up_front() {
        let header = Header {
            commit: 0,
            ..l0_header(512, 1, 2)
        };
        assert!(matches!(Encoder::new(header), Err(LtxError::ZeroCommit)));
    }
}
