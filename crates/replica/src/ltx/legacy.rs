//! Legacy page data: one complete LZ4 *frame* per page.
//!
//! Litestream 0.5.0–0.5.15 stored pages this way (page flags 0, no length
//! field), and 0.5.17 still restores such files, so we must read them. A
//! frame carries no overall length, so its extent is found by walking its
//! block headers ([LZ4 frame format]) before handing it to `lz4_flex`.
//!
//! [LZ4 frame format]: https://github.com/lz4/lz4/blob/dev/doc/lz4_Frame_format.md

use std::io::Read;

const FRAME_MAGIC: u32 = 0x184d_2204;
const FLG_VERSION_MASK: u8 = 0b1100_0000;
const FLG_VERSION_01: u8 = 0b0100_0000;
const FLG_BLOCK_CHECKSUM: u8 = 0b0001_0000;
const FLG_CONTENT_SIZE: u8 = 0b0000_1000;
const FLG_CONTENT_CHECKSUM: u8 = 0b0000_0100;
const FLG_DICT_ID: u8 = 0b0000_0001;
/// High bit of a block size: the block is stored uncompressed.
const BLOCK_UNCOMPRESSED: u32 = 0x8000_0000;

/// Returns the length of the LZ4 frame at the start of `bytes`, or `None`
/// if `bytes` does not start with a complete, well-formed frame.
pub(super) fn frame_len(bytes: &[u8]) -> Option<usize> {
    let mut pos = 0;
    if le_u32(bytes, &mut pos)? != FRAME_MAGIC {
        return None;
    }
    let flg = *bytes.get(pos)?;
    if flg & FLG_VERSION_MASK != FLG_VERSION_01 {
        return None;
    }
    // FLG, BD, optional content size and dictionary id, header checksum.
    let mut header_len = 3;
    if flg & FLG_CONTENT_SIZE != 0 {
        header_len += 8;
    }
    if flg & FLG_DICT_ID != 0 {
        header_len += 4;
    }
    pos += header_len;
    pos = skip_blocks(bytes, pos, flg & FLG_BLOCK_CHECKSUM != 0)?;
    if flg & FLG_CONTENT_CHECKSUM != 0 {
        pos += 4;
    }
    (pos <= bytes.len()).then_some(pos)
}

/// Walks data blocks from `pos` up to and including the zero end mark.
fn skip_blocks(bytes: &[u8], mut pos: usize, block_checksums: bool) -> Option<usize> {
    loop {
        let size = le_u32(bytes, &mut pos)?;
        if size == 0 {
            return Some(pos);
        }
        let data_len = (size & !BLOCK_UNCOMPRESSED) as usize;
        let checksum_len = if block_checksums { 4 } else { 0 };
        pos = pos.checked_add(data_len)?.checked_add(checksum_len)?;
        if pos > bytes.len() {
            return None;
        }
    }
}

fn le_u32(bytes: &[u8], pos: &mut usize) -> Option<u32> {
    let end = pos.checked_add(4)?;
    let word: [u8; 4] = bytes.get(*pos..end)?.try_into().ok()?;
    *pos = end;
    Some(u32::from_le_bytes(word))
}

/// Inflates one complete frame that must hold exactly `page_size` bytes.
///
/// # Errors
/// A description of why the frame is unusable (bad data, checksum, size).
pub(super) fn inflate_page(frame: &[u8], page_size: u32) -> Result<Vec<u8>, String> {
    let mut page = Vec::with_capacity(page_size as usize);
    // Read one byte past a page so an oversized frame is noticed without
    // inflating all of it.
    lz4_flex::frame::FrameDecoder::new(frame)
        .take(u64::from(page_size) + 1)
        .read_to_end(&mut page)
        .map_err(|e| e.to_string())?;
    if page.len() != page_size as usize {
        let len = page.len();
        return Err(format!("frame holds {len} bytes, expected {page_size}"));
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lz4_flex::frame::{FrameEncoder, FrameInfo};
    use std::io::Write;

    fn legacy_frame(data: &[u8], info: FrameInfo) -> Vec<u8> {
        let mut enc = FrameEncoder::with_frame_info(info, Vec::new());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn all_frame_options() -> Vec<FrameInfo> {
        vec![
            FrameInfo::new(),
            FrameInfo::new().content_checksum(true),
            FrameInfo::new().block_checksums(true).content_checksum(true),
            FrameInfo::new().content_size(Some(4096)),
        ]
    }

    #[test]
    fn frame_len_finds_end_of_each_frame_variant() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        for info in all_frame_options() {
            let frame = legacy_frame(&data, info);
            let mut padded = frame.clone();
            padded.extend_from_slice(&[0, 0, 0, 9, 0, 1]);
            assert_eq!(frame_len(&padded), Some(frame.len()));
            assert_eq!(inflate_page(&frame, 4096).unwrap(), data);
        }
    }

    #[test]
    fn frame_len_rejects_truncated_or_foreign_data() {
        let frame = legacy_frame(&[5u8; 512], FrameInfo::new().content_checksum(true));
        for len in 0..frame.len() {
            assert_eq!(frame_len(&frame[..len]), None, "len {len}");
        }
        assert_eq!(frame_len(&[0, 0, 0, 2, 0, 1, 0, 0]), None);
    }

    #[test]
    fn inflate_rejects_wrong_size() {
        let frame = legacy_frame(&[5u8; 512], FrameInfo::new());
        assert!(inflate_page(&frame, 1024).is_err());
        let frame = legacy_frame(&[5u8; 2048], FrameInfo::new());
        assert!(inflate_page(&frame, 1024).is_err());
    }
}
