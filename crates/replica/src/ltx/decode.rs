//! Reading and verifying one LTX file, from memory or piece by piece as it arrives.
//!
//! Decoding is strict: it accepts what litestream 0.5.17 (and, for page
//! data, 0.5.0–0.5.15) writes and rejects anything our own [`Encoder`]
//! would refuse to write, plus any file whose checksum does not match.
//!
//! [`StreamDecoder`] is the one implementation; [`decode`] feeds it a whole
//! file. It holds at most one page frame of input, the page index and the
//! trailer, so a file as large as the database never has to be in memory —
//! but pages are reported *before* the file checksum at the end has been
//! checked: a caller must be able to undo what it did with them (restores
//! write into a temporary file that only a complete, verified run renames
//! into place).
//!
//! [`Encoder`]: super::Encoder

use super::cursor::Cursor;
use super::{
    check_page_order, check_post_apply, check_snapshot_complete, legacy, Header, IndexEntry, LtxError, HEADER_SIZE,
    PAGE_FLAG_SIZE, PAGE_HEADER_SIZE, TRAILER_SIZE,
};
use crate::checksum::{Crc64Digest, CHECKSUM_FLAG, CRC64};

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
    let mut decoder = StreamDecoder::new();
    let mut pages = Vec::new();
    decoder.feed(bytes, |event| {
        if let Event::Page(pgno, page) = event {
            pages.push((pgno, page.to_vec()));
        }
        Ok::<(), LtxError>(())
    })?;
    let end = decoder.finish()?;
    Ok(Decoded {
        header: end.header,
        pages,
        post_apply_checksum: end.post_apply_checksum,
        file_checksum: end.file_checksum,
    })
}

/// What a [`StreamDecoder`] reports as it reads.
#[derive(Debug)]
pub enum Event<'a> {
    /// The validated header; reported once, before any page.
    Header(&'a Header),
    /// One page, inflated, in file order (ascending page numbers).
    Page(u32, &'a [u8]),
}

/// What a completely read and verified file ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// The file's header.
    pub header: Header,
    /// Database checksum after applying the file; 0 with no-checksum.
    pub post_apply_checksum: u64,
    /// The verified file checksum.
    pub file_checksum: u64,
}

/// Where the decoder is in the file.
#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    FrameHeader,
    /// A block-form frame's be32 length is next.
    Length {
        pgno: u32,
        start: u64,
    },
    /// A block-form frame's LZ4 block of `len` bytes is next.
    Block {
        pgno: u32,
        start: u64,
        len: usize,
    },
    /// A legacy frame (a whole LZ4 frame, length unknown until parsed) is next.
    Legacy {
        pgno: u32,
        start: u64,
    },
    /// After the end marker: the page index and the trailer.
    Tail,
}

/// Decodes one LTX file fed in pieces of any size; see the module docs.
pub struct StreamDecoder {
    state: State,
    /// Input not consumed yet: part of one frame, or the tail.
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    pos: u64,
    header: Option<Header>,
    digest: Crc64Digest,
    frames: Vec<IndexEntry>,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    /// A decoder at the start of a file.
    pub fn new() -> StreamDecoder {
        StreamDecoder {
            state: State::Header,
            buf: Vec::new(),
            pos: 0,
            header: None,
            digest: CRC64.digest(),
            frames: Vec::new(),
        }
    }

    /// The header, once read.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// Reads the next piece of the file, reporting the header and every page completed by it.
    ///
    /// # Errors
    /// The first problem found in the file, or the first error `on` returns; the decoder is
    /// then unusable.
    pub fn feed<E: From<LtxError>>(
        &mut self,
        piece: &[u8],
        mut on: impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.buf.extend_from_slice(piece);
        let mut used = 0;
        let result = loop {
            match self.step(used, &mut on) {
                Ok(Some(n)) => used += n,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.buf.drain(..used);
        self.pos += used as u64;
        result
    }

    /// Consumes one part of the file from `buf[at..]` if it is all there; returns how many
    /// bytes it used, or `None` when more input is needed.
    fn step<E: From<LtxError>>(
        &mut self,
        at: usize,
        on: &mut impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<Option<usize>, E> {
        let input = &self.buf[at..];
        let offset = self.pos + at as u64;
        match self.state {
            State::Header => {
                let Some(bytes) = input.get(..HEADER_SIZE) else {
                    return Ok(None);
                };
                let header = Header::from_bytes(bytes)?;
                self.digest.update(bytes);
                self.header = Some(header);
                self.state = State::FrameHeader;
                on(Event::Header(&header))?;
                Ok(Some(HEADER_SIZE))
            }
            State::FrameHeader => {
                let Some(bytes) = input.get(..PAGE_HEADER_SIZE) else {
                    return Ok(None);
                };
                self.digest.update(bytes);
                let pgno = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
                let flags = u16::from_be_bytes(bytes[4..6].try_into().expect("2 bytes"));
                if pgno == 0 && flags == 0 {
                    self.state = State::Tail;
                    return Ok(Some(PAGE_HEADER_SIZE));
                }
                let header = self.header.expect("read before any frame");
                let prev = self.frames.last().map_or(0, |f| f.pgno);
                check_page_order(&header, prev, pgno)?;
                self.state = match flags {
                    PAGE_FLAG_SIZE => State::Length { pgno, start: offset },
                    0 => State::Legacy { pgno, start: offset },
                    _ => return Err(LtxError::InvalidPageFlags { pgno, flags }.into()),
                };
                Ok(Some(PAGE_HEADER_SIZE))
            }
            State::Length { pgno, start } => {
                let Some(bytes) = input.get(..4) else { return Ok(None) };
                self.digest.update(bytes);
                let len = u32::from_be_bytes(bytes.try_into().expect("4 bytes")) as usize;
                let page_size = self.page_size();
                if len > max_block_len(page_size) {
                    let reason = format!("a block of {len} bytes cannot hold one {page_size}-byte page");
                    return Err(LtxError::Lz4 { pgno, reason }.into());
                }
                self.state = State::Block { pgno, start, len };
                Ok(Some(4))
            }
            State::Block { pgno, start, len } => {
                let Some(block) = input.get(..len) else { return Ok(None) };
                let page = inflate_block(block, self.page_size(), pgno)?;
                self.page_done(pgno, start, offset + len as u64, &page, on)?;
                Ok(Some(len))
            }
            State::Legacy { pgno, start } => {
                let Some(len) = legacy::frame_len(input) else {
                    if input.len() > max_legacy_frame_len(self.page_size()) {
                        return Err(malformed_legacy(pgno).into());
                    }
                    return Ok(None);
                };
                let page = legacy::inflate_page(&input[..len], self.page_size())
                    .map_err(|reason| LtxError::Lz4 { pgno, reason })?;
                self.page_done(pgno, start, offset + len as u64, &page, on)?;
                Ok(Some(len))
            }
            State::Tail => {
                // The index holds at most three 10-byte uvarints per page, a terminator and
                // its length; anything longer cannot be a valid tail.
                let limit = self.frames.len() * 30 + 1 + 10 + 8 + TRAILER_SIZE;
                if input.len() > limit {
                    return Err(LtxError::TrailingData(input.len() - limit).into());
                }
                Ok(None)
            }
        }
    }

    fn page_size(&self) -> u32 {
        self.header.map_or(0, |h| h.page_size)
    }

    fn page_done<E: From<LtxError>>(
        &mut self,
        pgno: u32,
        start: u64,
        end: u64,
        page: &[u8],
        on: &mut impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.digest.update(page);
        self.frames.push(IndexEntry {
            pgno,
            offset: start,
            size: end - start,
        });
        self.state = State::FrameHeader;
        on(Event::Page(pgno, page))
    }

    /// Checks the end of the file: snapshot completeness, the page index against the frames
    /// read, the trailer and the file checksum, and that nothing follows.
    ///
    /// # Errors
    /// [`LtxError::Truncated`] if the input stopped early; otherwise the first problem found.
    pub fn finish(self) -> Result<Trailer, LtxError> {
        let what = match self.state {
            State::Tail => None,
            State::Header => Some("header"),
            State::FrameHeader => Some("page header"),
            State::Length { .. } => Some("page length"),
            State::Block { .. } => Some("page data"),
            State::Legacy { pgno, .. } if !self.buf.is_empty() => return Err(malformed_legacy(pgno)),
            State::Legacy { .. } => Some("page data"),
        };
        if let Some(what) = what {
            return Err(LtxError::Truncated(what));
        }
        let header = self.header.expect("the tail comes after the header");
        let last = self.frames.last().map_or(0, |f| f.pgno);
        check_snapshot_complete(&header, last)?;
        let mut digest = self.digest;
        let mut cur = Cursor::new(&self.buf);
        let index = decode_index(&mut cur)?;
        digest.update(cur.since(0));
        if index != self.frames {
            return Err(LtxError::InvalidIndex("entries do not match page frames"));
        }
        let (post_apply_checksum, file_checksum) = decode_trailer(&mut cur, digest)?;
        check_post_apply(&header, post_apply_checksum)?;
        Ok(Trailer {
            header,
            post_apply_checksum,
            file_checksum,
        })
    }
}

/// The largest LZ4 block one page can compress to (LZ4's worst case for incompressible data).
fn max_block_len(page_size: u32) -> usize {
    let page_size = page_size as usize;
    page_size + page_size / 255 + 16
}

/// The most input a legacy LZ4 frame holding one page may take, headers and checksums
/// included; beyond it the frame is malformed, not merely incomplete.
fn max_legacy_frame_len(page_size: u32) -> usize {
    2 * max_block_len(page_size) + 1024
}

fn malformed_legacy(pgno: u32) -> LtxError {
    LtxError::Lz4 {
        pgno,
        reason: "malformed or truncated lz4 frame".to_owned(),
    }
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
fn decode_trailer(cur: &mut Cursor<'_>, mut digest: Crc64Digest) -> Result<(u64, u64), LtxError> {
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

    /// Decodes `file` fed in pieces of `piece` bytes, as [`decode`] would have.
    fn decode_in_pieces(file: &[u8], piece: usize) -> Result<Decoded, LtxError> {
        let mut decoder = StreamDecoder::new();
        let mut pages = Vec::new();
        let mut seen_header = false;
        for chunk in file.chunks(piece) {
            decoder.feed(chunk, |event| {
                match event {
                    Event::Header(_) => seen_header = true,
                    Event::Page(pgno, page) => {
                        assert!(seen_header, "the header comes before every page");
                        pages.push((pgno, page.to_vec()));
                    }
                }
                Ok::<(), LtxError>(())
            })?;
        }
        let end = decoder.finish()?;
        Ok(Decoded {
            header: end.header,
            pages,
            post_apply_checksum: end.post_apply_checksum,
            file_checksum: end.file_checksum,
        })
    }

    #[test]
    fn decoding_in_pieces_of_any_size_gives_what_decoding_at_once_does() {
        let (file, _) = encode(snapshot_header(512, 6, 1), &[1, 2, 3, 4, 5, 6]);
        let whole = decode(&file).unwrap();
        for piece in [1, 2, 5, 6, 7, 99, 100, 101, 512, file.len()] {
            assert_eq!(decode_in_pieces(&file, piece).unwrap(), whole, "pieces of {piece}");
        }
        // And it fails on the same inputs: every truncation, a flipped checksum.
        for len in 0..file.len() {
            for piece in [1, 7, 64] {
                assert!(
                    decode_in_pieces(&file[..len], piece).is_err(),
                    "len {len} in pieces of {piece}"
                );
            }
        }
        let mut bad = file.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            decode_in_pieces(&bad, 3),
            Err(LtxError::ChecksumMismatch { .. })
        ));
        let legacy = legacy_file(l0_header(4096, 2, 5), 2, &page(2, 4096), FrameInfo::new());
        for piece in [1, 3, 50, 4096] {
            assert_eq!(decode_in_pieces(&legacy, piece).unwrap(), decode(&legacy).unwrap());
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
