//! A bounds-checked reader over a byte slice, so that decoding arbitrary
//! input can fail but never index out of bounds.

use super::LtxError;

/// Reads big-endian integers and uvarints from a slice, front to back.
pub(super) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }

    /// Current offset from the start of the slice.
    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes not yet consumed.
    pub(super) fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    /// The bytes consumed since offset `start`.
    pub(super) fn since(&self, start: usize) -> &'a [u8] {
        self.bytes.get(start..self.pos).unwrap_or_default()
    }

    /// Consumes `n` bytes; `what` names the field for the error.
    pub(super) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], LtxError> {
        let end = self.pos.checked_add(n).ok_or(LtxError::Truncated(what))?;
        let slice = self.bytes.get(self.pos..end).ok_or(LtxError::Truncated(what))?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], LtxError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    #[cfg(test)]
    pub(super) fn u16(&mut self, what: &'static str) -> Result<u16, LtxError> {
        self.array(what).map(u16::from_be_bytes)
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, LtxError> {
        self.array(what).map(u32::from_be_bytes)
    }

    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64, LtxError> {
        self.array(what).map(u64::from_be_bytes)
    }

    pub(super) fn i64(&mut self, what: &'static str) -> Result<i64, LtxError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// Reads an unsigned LEB128 value as Go's `binary.ReadUvarint` does:
    /// at most 10 bytes, rejecting values that overflow 64 bits.
    pub(super) fn uvarint(&mut self, what: &'static str) -> Result<u64, LtxError> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.take(1, what)?[0];
            if i == 9 && byte > 1 {
                return Err(LtxError::InvalidIndex("uvarint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(LtxError::InvalidIndex("uvarint overflows 64 bits"))
    }
}

/// Appends `value` as an unsigned LEB128 uvarint (Go's `AppendUvarint`).
pub(super) fn put_uvarint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uvarint_round_trips_edge_values() {
        for value in [0, 1, 127, 128, 260, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut buf = Vec::new();
            put_uvarint(&mut buf, value);
            let mut cur = Cursor::new(&buf);
            assert_eq!(cur.uvarint("test").unwrap(), value);
            assert!(cur.rest().is_empty());
        }
    }

    #[test]
    fn uvarint_matches_reference_encoding() {
        // From the reference: (1, 100, 260) encodes as 01 64 84 02.
        let mut buf = Vec::new();
        for value in [1, 100, 260] {
            put_uvarint(&mut buf, value);
        }
        assert_eq!(buf, [0x01, 0x64, 0x84, 0x02]);
    }

    #[test]
    fn uvarint_rejects_overflow_and_truncation() {
        let overflow = [0xff; 10];
        assert!(matches!(
            Cursor::new(&overflow).uvarint("x"),
            Err(LtxError::InvalidIndex(_))
        ));
        assert_eq!(Cursor::new(&[0x80]).uvarint("x"), Err(LtxError::Truncated("x")));
    }

    #[test]
    fn take_past_end_is_truncated_not_panic() {
        let mut cur = Cursor::new(&[1, 2, 3]);
        assert_eq!(cur.take(4, "f"), Err(LtxError::Truncated("f")));
        assert_eq!(cur.take(usize::MAX, "f"), Err(LtxError::Truncated("f")));
        assert_eq!(cur.u16("f").unwrap(), 0x0102);
        assert_eq!(cur.u16("f"), Err(LtxError::Truncated("f")));
    }
}
