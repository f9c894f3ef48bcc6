//! Reading and verifying one LTX file from memory.
//!
//! Decoding is strict: it accepts what litestream 0.5.17 (and, for page
//! data, 0.5.0–0.5.15) writes and rejects anything our own [`Encoder`]
//! would refuse to write, plus any file whose checksum does not match.
//!
//! [`Encoder`]: super::Encoder

use crc::Digest;

use super::cursor::Cursor;
use super::{
    check_page_order, check_post_apply, check_snapshot_complete, legacy, Header, IndexEntry, LtxError, HEADER_SIZE,
    PAGE_FLAG_SIZE, TRAILER_SIZE,
};
use crate::checksum::{CHECKSUM_FLAG, CRC64};

/// Everything in a decoded LTX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The validated header.
    pub header: Header,
    /// `(pgno, uncompressed page)` in ascending page order.
    pub pages: Vec<(u32, Vec<u8>)>,
    /// Database checksum after applying the file; 0 with no-checksum.
    pub post_apply_checksum: u64,
    /// The verified file checksum from the trailer.
    pub file_checksum: u64,
}

/// Decodes and validates only the header at the start of `bytes`.
///
/// Cheap: reads the first [`HEADER_SIZE`] bytes and verifies nothing else,
/// so it suits listing and planning, not restoring.
///
/// # Errors
/// As [`Header::from_bytes`].
pub fn decode_header(bytes: &[u8]) -> Result<Header, LtxError> {
    Header::from_bytes(bytes)
}

/// Decodes a complete LTX file and verifies it end to end.
///
/// Checks the header, every page frame (order, bounds, lock page, exact
/// inflated size), snapshot completeness, the page index against the
/// frames, the trailer, the file checksum, and that nothing follows.
///
/// # Errors
/// The first problem found, as an [`LtxError`]. Never panics, whatever
/// `bytes` holds.
pub fn decode(bytes: &[u8]) -> Result<Decoded, LtxError> {
    let mut cur = Cursor::new(bytes);
    let header = Header::from_bytes(cur.take(HEADER_SIZE, "header")?)?;
    let mut digest = CRC64.digest();
    digest.update(cur.since(0));

    let (pages, frames) = decode_pages(&mut cur, &header, &mut digest)?;
    let last = frames.last().map_or(0, |f| f.pgno);
    check_snapshot_complete(&header, last)?;

    let index_start = cur.pos();
    let index = decode_index(&mut cur)?;
    digest.update(cur.since(index_start));
    if index != frames {
        return Err(LtxError::InvalidIndex("entries do not match page frames"));
    }

    let (post_apply_checksum, file_checksum) = decode_trailer(&mut cur, digest)?;
    check_post_apply(&header, post_apply_checksum)?;
    Ok(Decoded {
        header,
        pages,
        post_apply_checksum,
        file_checksum,
    })
}

type Pages = Vec<(u32, Vec<u8>)>;

/// Reads page frames up to and including the end marker.
fn decode_pages(
    cur: &mut Cursor<'_>,
    header: &Header,
    digest: &mut Digest<'static, u64>,
) -> Result<(Pages, Vec<IndexEntry>), LtxError> {
    let mut pages = Vec::new();
    let mut frames: Vec<IndexEntry> = Vec::new();
    loop {
        let start = cur.pos();
        let pgno = cur.u32("page header")?;
        let flags = cur.u16("page header")?;
        digest.update(cur.since(start));
        if pgno == 0 && flags == 0 {
            return Ok((pages, frames));
        }
        let prev = frames.last().map_or(0, |f| f.pgno);
        check_page_order(header, prev, pgno)?;
        let page = decode_page_data(cur, header.page_size, pgno, flags, digest)?;
        digest.update(&page);
        frames.push(IndexEntry {
            pgno,
            offset: start as u64,
            size: (cur.pos() - start) as u64,
        });
        pages.push((pgno, page));
    }
}

/// Reads one page's data after its page header, in either storage form.
/// Hashes the length field (block form only); the caller hashes the page.
fn decode_page_data(
    cur: &mut Cursor<'_>,
    page_size: u32,
    pgno: u32,
    flags: u16,
    digest: &mut Digest<'static, u64>,
) -> Result<Vec<u8>, LtxError> {
    if flags & !PAGE_FLAG_SIZE != 0 {
        return Err(LtxError::InvalidPageFlags { pgno, flags });
    }
    if flags == 0 {
        return decode_legacy_frame(cur, page_size, pgno);
    }
    let len_start = cur.pos();
    let len = cur.u32("page length")?;
    digest.update(cur.since(len_start));
    let block = cur.take(len as usize, "page data")?;
    inflate_block(block, page_size, pgno)
}

/// Inflates a raw LZ4 block that must yield exactly one page. Go's decoder
/// ignores the inflated length, leaving stale bytes on a short block; we
/// refuse it instead.
fn inflate_block(block: &[u8], page_size: u32, pgno: u32) -> Result<Vec<u8>, LtxError> {
    let mut page = vec![0u8; page_size as usize];
    let n = lz4_flex::block::decompress_into(block, &mut page).map_err(|e| LtxError::Lz4 {
        pgno,
        reason: e.to_string(),
    })?;
    if n != page.len() {
        let reason = format!("block inflates to {n} bytes, expected {page_size}");
        return Err(LtxError::Lz4 { pgno, reason });
    }
    Ok(page)
}

fn decode_legacy_frame(cur: &mut Cursor<'_>, page_size: u32, pgno: u32) -> Result<Vec<u8>, LtxError> {
    let len = legacy::frame_len(cur.rest()).ok_or_else(|| LtxError::Lz4 {
        pgno,
        reason: "malformed or truncated lz4 frame".to_owned(),
    })?;
    let frame = cur.take(len, "page data")?;
    legacy::inflate_page(frame, page_size).map_err(|reason| LtxError::Lz4 { pgno, reason })
}

/// Reads the page index: entries, zero terminator, be64 length.
fn decode_index(cur: &mut Cursor<'_>) -> Result<Vec<IndexEntry>, LtxError> {
    const WHAT: &str = "page index";
    let start = cur.pos();
    let mut entries = Vec::new();
    loop {
        let pgno = cur.uvarint(WHAT)?;
        if pgno == 0 {
            break;
        }
        let pgno = u32::try_from(pgno).map_err(|_| LtxError::InvalidIndex("pgno too large"))?;
        let offset = cur.uvarint(WHAT)?;
        let size = cur.uvarint(WHAT)?;
        entries.push(IndexEntry { pgno, offset, size });
    }
    let entries_len = (cur.pos() - start) as u64;
    if cur.u64(WHAT)? != entries_len {
        return Err(LtxError::InvalidIndex("length field does not match entries"));
    }
    Ok(entries)
}

/// Reads the trailer, which must end the input, and verifies the file
/// checksum. Returns `(post_apply_checksum, file_checksum)`.
fn decode_trailer(cur: &mut Cursor<'_>, mut digest: Digest<'static, u64>) -> Result<(u64, u64), LtxError> {
    let extra = cur.rest().len().saturating_sub(TRAILER_SIZE);
    if extra > 0 {
        return Err(LtxError::TrailingData(extra));
    }
    let post_start = cur.pos();
    let post_apply = cur.u64("trailer")?;
    digest.update(cur.since(post_start));
    let expected = cur.u64("trailer")?;
    let actual = CHECKSUM_FLAG | digest.finalize();
    if expected != actual {
        return Err(LtxError::ChecksumMismatch { expected, actual });
    }
    Ok((post_apply, expected))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use lz4_flex::frame::{FrameEncoder, FrameInfo};

    use super::*;
    use crate::ltx::cursor::put_uvarint;
    use crate::ltx::fixtures::{l0_header, page, reference_l0_header, snapshot_header};
    use crate::ltx::{Encoder, PAGE_HEADER_SIZE};

    fn encode(header: Header, pgnos: &[u32]) -> (Vec<u8>, Vec<(u32, Vec<u8>)>) {
        let pages: Vec<_> = pgnos.iter().map(|&p| (p, page(p, header.page_size))).collect();
        let mut enc = Encoder::new(header).unwrap();
        for (pgno, data) in &pages {
            enc.encode_page(*pgno, data).unwrap();
        }
        (enc.finish(0).unwrap(), pages)
    }

    #[test]
    fn snapshot_round_trips() {
        let header = snapshot_header(4096, 5, 9);
        let (file, pages) = encode(header, &[1, 2, 3, 4, 5]);
        let decoded = decode(&file).unwrap();
        assert_eq!(decoded.header, header);
        assert_eq!(decoded.pages, pages);
        assert_eq!(decoded.post_apply_checksum, 0);
        let tail: [u8; 8] = file[file.len() - 8..].try_into().unwrap();
        assert_eq!(decoded.file_checksum, u64::from_be_bytes(tail));
    }

    #[test]
    fn incremental_file_round_trips() {
        let header = l0_header(512, 40, 17);
        let (file, pages) = encode(header, &[2, 3, 17, 39]);
        let decoded = decode(&file).unwrap();
        assert_eq!(decoded.header, header);
        assert_eq!(decoded.pages, pages);
    }

    #[test]
    fn file_without_pages_round_trips() {
        let header = l0_header(1024, 3, 2);
        let (file, _) = encode(header, &[]);
        assert_eq!(decode(&file).unwrap().pages, vec![]);
    }

    #[test]
    fn reference_sized_file_decodes() {
        let (file, pages) = encode(reference_l0_header(), &[2]);
        assert_eq!(decode(&file).unwrap().pages, pages);
        assert_eq!(decode_header(&file), Ok(reference_l0_header()));
    }

    /// Byte ranges holding compressed page data in an encoded file.
    fn block_ranges(file: &[u8]) -> Vec<std::ops::Range<usize>> {
        let mut ranges = Vec::new();
        let mut pos = HEADER_SIZE;
        while file[pos..pos + 6] != [0; 6] {
            let len = u32::from_be_bytes(file[pos + 6..pos + 10].try_into().unwrap());
            ranges.push(pos + 10..pos + 10 + len as usize);
            pos += 10 + len as usize;
        }
        ranges
    }

    #[test]
    fn every_single_bit_flip_is_detected_or_harmless() {
        let (file, _) = encode(l0_header(512, 4, 3), &[1, 4]);
        let original = decode(&file).unwrap();
        let blocks = block_ranges(&file);
        for byte in 0..file.len() {
            for bit in 0..8 {
                let mut bad = file.clone();
                bad[byte] ^= 1 << bit;
                let Ok(decoded) = decode(&bad) else { continue };
                // The checksum covers uncompressed pages, so a flip is only
                // missed where LZ4 ignores the bit (e.g. the match length of
                // the final literal-only sequence): the pages must be intact.
                let in_block = blocks.iter().any(|r| r.contains(&byte));
                assert!(in_block, "undetected flip at byte {byte} bit {bit}");
                assert_eq!(decoded, original, "flip at byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (file, _) = encode(snapshot_header(512, 3, 1), &[1, 2, 3]);
        for len in 0..file.len() {
            assert!(decode(&file[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let (mut file, _) = encode(l0_header(512, 1, 2), &[1]);
        file.push(0);
        assert_eq!(decode(&file), Err(LtxError::TrailingData(1)));
    }

    #[test]
    fn arbitrary_garbage_never_panics() {
        // Cheap deterministic fuzzing: a valid header followed by noise, and
        // noise spliced into a valid file at every page-frame position.
        let (file, _) = encode(l0_header(512, 4, 3), &[1, 4]);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let cut = HEADER_SIZE + (state % (file.len() - HEADER_SIZE) as u64) as usize;
            let mut bad = file[..cut].to_vec();
            bad.extend((0..(state >> 48) % 64).map(|i| (state >> (i % 56)) as u8));
            let _ = decode(&bad);
        }
    }

    /// Builds a file by hand whose single page uses the legacy frame form:
    /// flags 0, no length field, and the length absent from the checksum.
    fn legacy_file(header: Header, pgno: u32, data: &[u8], info: FrameInfo) -> Vec<u8> {
        let mut frame = FrameEncoder::with_frame_info(info, Vec::new());
        frame.write_all(data).unwrap();
        let frame = frame.finish().unwrap();

        let mut out = header.to_bytes().to_vec();
        let mut stream = out.clone();
        let page_header = [&pgno.to_be_bytes()[..], &[0, 0]].concat();
        out.extend_from_slice(&page_header);
        out.extend_from_slice(&frame);
        stream.extend_from_slice(&page_header);
        stream.extend_from_slice(data);

        let mut tail = vec![0u8; PAGE_HEADER_SIZE];
        let mut index = Vec::new();
        put_uvarint(&mut index, u64::from(pgno));
        put_uvarint(&mut index, HEADER_SIZE as u64);
        put_uvarint(&mut index, (PAGE_HEADER_SIZE + frame.len()) as u64);
        put_uvarint(&mut index, 0);
        tail.extend_from_slice(&index);
        tail.extend_from_slice(&(index.len() as u64).to_be_bytes());
        tail.extend_from_slice(&0u64.to_be_bytes());
        out.extend_from_slice(&tail);
        stream.extend_from_slice(&tail);
        let checksum = CHECKSUM_FLAG | CRC64.checksum(&stream);
        out.extend_from_slice(&checksum.to_be_bytes());
        out
    }

    #[test]
    fn legacy_lz4_frame_page_decodes() {
        let header = l0_header(4096, 2, 5);
        let data = page(2, 4096);
        for info in [FrameInfo::new(), FrameInfo::new().content_checksum(true)] {
            let file = legacy_file(header, 2, &data, info);
            let decoded = decode(&file).unwrap();
            assert_eq!(decoded.pages, vec![(2, data.clone())]);
        }
    }

    #[test]
    fn legacy_frame_of_wrong_size_is_rejected() {
        let header = l0_header(4096, 2, 5);
        let file = legacy_file(header, 2, &[1u8; 2048], FrameInfo::new());
        assert!(matches!(decode(&file), Err(LtxError::Lz4 { pgno: 2, .. })));
    }

    #[test]
    fn short_lz4_block_is_rejected() {
        // Go ignores the inflated length and would keep stale bytes for the
        // rest of the page; we refuse the block outright.
        let header = l0_header(1024, 1, 2);
        let half = lz4_flex::block::compress(&[0u8; 512]);
        let mut file = header.to_bytes().to_vec();
        file.extend_from_slice(&[0, 0, 0, 1, 0, 1]);
        file.extend_from_slice(&(half.len() as u32).to_be_bytes());
        file.extend_from_slice(&half);
        file.extend_from_slice(&[0; 6 + 4 + 8 + 16]);
        assert!(matches!(decode(&file), Err(LtxError::Lz4 { pgno: 1, .. })));
    }

    /// Offset of the frame header of `pgno` in an encoded file.
    fn frame_offset(file: &[u8], pgno: u32) -> usize {
        let needle = [&pgno.to_be_bytes()[..], &[0, 1]].concat();
        (HEADER_SIZE..file.len() - 6)
            .find(|&i| file[i..i + 6] == needle[..])
            .expect("frame present")
    }

    #[test]
    fn unordered_pages_are_rejected() {
        let (mut file, _) = encode(l0_header(512, 4, 3), &[1, 4]);
        let at = frame_offset(&file, 4);
        file[at..at + 4].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(decode(&file), Err(LtxError::PageOrder { pgno: 1, prev: 1 }));
    }

    #[test]
    fn stored_lock_page_is_rejected() {
        let lock = crate::checksum::lock_page(65536);
        let (mut file, _) = encode(l0_header(65536, lock + 1, 3), &[lock + 1]);
        let at = frame_offset(&file, lock + 1);
        file[at..at + 4].copy_from_slice(&lock.to_be_bytes());
        assert_eq!(decode(&file), Err(LtxError::LockPage { pgno: lock }));
    }

    #[test]
    fn incomplete_snapshot_is_rejected() {
        let (file, _) = encode(l0_header(512, 3, 2), &[1, 2]);
        // Same bytes, but claim to be a snapshot of 3 pages.
        let mut file = file;
        let header = snapshot_header(512, 3, 1);
        file[..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        let err = LtxError::SnapshotIncomplete { last: 2, commit: 3 };
        assert_eq!(decode(&file), Err(err));
    }
}
