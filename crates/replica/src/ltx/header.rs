//! The 100-byte LTX header: fields, byte layout and validation rules.

use super::cursor::Cursor;
use super::{LtxError, FLAG_NO_CHECKSUM, HEADER_SIZE, MAX_PAGE_SIZE, MIN_PAGE_SIZE};
use crate::checksum::{lock_page, CHECKSUM_FLAG};

const MAGIC: &[u8; 4] = b"LTX1";

/// The LTX file header. Offsets are those of the encoded form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Header {
    /// Offset 4. Only [`FLAG_NO_CHECKSUM`] is valid; litestream always sets it.
    pub flags: u32,
    /// Offset 8. Power of two in 512..=65536.
    pub page_size: u32,
    /// Offset 12. Database size in pages after applying this file, lock page
    /// included. Never zero.
    pub commit: u32,
    /// Offset 16. First transaction covered; 1 makes the file a snapshot.
    pub min_txid: u64,
    /// Offset 24. Last transaction covered; `>= min_txid`.
    pub max_txid: u64,
    /// Offset 32. Creation time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Offset 40. Database checksum before applying; 0 with no-checksum.
    pub pre_apply_checksum: u64,
    /// Offset 48. WAL offset the file was read from; 0 if not from a WAL.
    pub wal_offset: i64,
    /// Offset 56. WAL bytes consumed; 0 when `wal_offset` is 0.
    pub wal_size: i64,
    /// Offset 64. WAL header salt-1; requires a non-zero `wal_offset`.
    pub wal_salt1: u32,
    /// Offset 68. WAL header salt-2; requires a non-zero `wal_offset`.
    pub wal_salt2: u32,
    /// Offset 72. Writer node id; 0 in litestream 0.5.17.
    pub node_id: u64,
}

impl Header {
    /// Whether this file is a snapshot (min TXID 1): it must hold every page.
    pub fn is_snapshot(&self) -> bool {
        self.min_txid == 1
    }

    /// Whether the no-checksum flag is set.
    pub fn no_checksum(&self) -> bool {
        self.flags & FLAG_NO_CHECKSUM != 0
    }

    /// The SQLite lock page for this file's page size.
    pub fn lock_page(&self) -> u32 {
        lock_page(self.page_size)
    }

    /// Checks every rule litestream applies to a header.
    ///
    /// # Errors
    /// The first rule broken, as the matching [`LtxError`] variant.
    pub fn validate(&self) -> Result<(), LtxError> {
        if self.flags & !FLAG_NO_CHECKSUM != 0 {
            return Err(LtxError::InvalidFlags(self.flags));
        }
        if !is_valid_page_size(self.page_size) {
            return Err(LtxError::InvalidPageSize(self.page_size));
        }
        if self.commit == 0 {
            return Err(LtxError::ZeroCommit);
        }
        self.validate_txids()?;
        self.validate_wal_fields()?;
        self.validate_pre_apply()
    }

    fn validate_txids(&self) -> Result<(), LtxError> {
        let (min, max) = (self.min_txid, self.max_txid);
        if min == 0 || max == 0 || min > max {
            return Err(LtxError::InvalidTxid { min, max });
        }
        Ok(())
    }

    fn validate_wal_fields(&self) -> Result<(), LtxError> {
        if self.wal_offset < 0 {
            return Err(LtxError::InvalidWalFields("negative wal offset"));
        }
        if self.wal_size < 0 {
            return Err(LtxError::InvalidWalFields("negative wal size"));
        }
        let has_salt = self.wal_salt1 != 0 || self.wal_salt2 != 0;
        if has_salt && self.wal_offset == 0 {
            return Err(LtxError::InvalidWalFields("salts require a wal offset"));
        }
        if self.wal_offset == 0 && self.wal_size != 0 {
            return Err(LtxError::InvalidWalFields("wal size requires a wal offset"));
        }
        Ok(())
    }

    fn validate_pre_apply(&self) -> Result<(), LtxError> {
        let sum = self.pre_apply_checksum;
        if self.is_snapshot() && sum != 0 {
            return Err(LtxError::InvalidPreApplyChecksum("must be zero on snapshots"));
        }
        if self.no_checksum() && sum != 0 {
            return Err(LtxError::InvalidPreApplyChecksum(
                "not allowed with the no-checksum flag",
            ));
        }
        if !self.is_snapshot() && !self.no_checksum() && sum & CHECKSUM_FLAG == 0 {
            return Err(LtxError::InvalidPreApplyChecksum("required, with bit 63 set"));
        }
        Ok(())
    }

    /// Encodes the header; the 20 reserved bytes are zero.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        let fields: [&[u8]; 13] = [
            MAGIC,
            &self.flags.to_be_bytes(),
            &self.page_size.to_be_bytes(),
            &self.commit.to_be_bytes(),
            &self.min_txid.to_be_bytes(),
            &self.max_txid.to_be_bytes(),
            &self.timestamp_ms.to_be_bytes(),
            &self.pre_apply_checksum.to_be_bytes(),
            &self.wal_offset.to_be_bytes(),
            &self.wal_size.to_be_bytes(),
            &self.wal_salt1.to_be_bytes(),
            &self.wal_salt2.to_be_bytes(),
            &self.node_id.to_be_bytes(),
        ];
        let mut pos = 0;
        for field in fields {
            out[pos..pos + field.len()].copy_from_slice(field);
            pos += field.len();
        }
        out
    }

    /// Decodes and validates the header at the start of `bytes`.
    ///
    /// Only the first [`HEADER_SIZE`] bytes are read; reserved bytes are not
    /// checked, as litestream does not check them.
    ///
    /// # Errors
    /// [`LtxError::Truncated`] if `bytes` is shorter than a header,
    /// [`LtxError::BadMagic`], or any [`Header::validate`] error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Header, LtxError> {
        let mut cur = Cursor::new(bytes);
        let header_bytes = cur.take(HEADER_SIZE, "header")?;
        let mut cur = Cursor::new(header_bytes);
        if cur.take(MAGIC.len(), "header")? != MAGIC {
            return Err(LtxError::BadMagic);
        }
        let header = read_fields(&mut cur)?;
        header.validate()?;
        Ok(header)
    }
}

/// Reads the fields after the magic, in layout order.
fn read_fields(cur: &mut Cursor<'_>) -> Result<Header, LtxError> {
    const WHAT: &str = "header";
    Ok(Header {
        flags: cur.u32(WHAT)?,
        page_size: cur.u32(WHAT)?,
        commit: cur.u32(WHAT)?,
        min_txid: cur.u64(WHAT)?,
        max_txid: cur.u64(WHAT)?,
        timestamp_ms: cur.i64(WHAT)?,
        pre_apply_checksum: cur.u64(WHAT)?,
        wal_offset: cur.i64(WHAT)?,
        wal_size: cur.i64(WHAT)?,
        wal_salt1: cur.u32(WHAT)?,
        wal_salt2: cur.u32(WHAT)?,
        node_id: cur.u64(WHAT)?,
    })
}

fn is_valid_page_size(size: u32) -> bool {
    size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::fixtures::reference_l0_header;

    #[test]
    fn encodes_reference_header_byte_for_byte() {
        let mut expected = Vec::new();
        expected.extend_from_slice(b"LTX1");
        expected.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0x10, 0, 0, 0, 0, 4]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2]);
        expected.extend_from_slice(&[0x00, 0x00, 0x01, 0xa2, 0x20, 0xdc, 0xf1, 0x4a]);
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x40, 0x80]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0x18]);
        expected.extend_from_slice(&[0xb4, 0xa4, 0xb9, 0x25, 0x21, 0x05, 0x6d, 0x27]);
        expected.extend_from_slice(&[0; 28]);
        assert_eq!(reference_l0_header().to_bytes().as_slice(), expected);
    }

    #[test]
    fn header_round_trips_and_ignores_reserved_bytes() {
        let mut bytes = reference_l0_header().to_bytes();
        bytes[HEADER_SIZE - 1] = 0xff;
        assert_eq!(Header::from_bytes(&bytes), Ok(reference_l0_header()));
    }

    #[test]
    fn short_input_is_truncated() {
        let bytes = reference_l0_header().to_bytes();
        assert_eq!(
            Header::from_bytes(&bytes[..HEADER_SIZE - 1]),
            Err(LtxError::Truncated("header"))
        );
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let mut bytes = reference_l0_header().to_bytes();
        bytes[3] = b'2';
        assert_eq!(Header::from_bytes(&bytes), Err(LtxError::BadMagic));
    }

    fn rejects(edit: impl FnOnce(&mut Header)) -> LtxError {
        let mut header = reference_l0_header();
        edit(&mut header);
        let err = header.validate().unwrap_err();
        assert_eq!(Header::from_bytes(&header.to_bytes()), Err(err.clone()));
        err
    }

    #[test]
    fn only_the_no_checksum_flag_is_valid() {
        assert_eq!(rejects(|h| h.flags = 0x1), LtxError::InvalidFlags(1));
        assert_eq!(rejects(|h| h.flags = 0x6), LtxError::InvalidFlags(6));
    }

    #[test]
    fn page_size_must_be_power_of_two_in_range() {
        for bad in [0, 256, 1000, 131_072] {
            assert_eq!(rejects(|h| h.page_size = bad), LtxError::InvalidPageSize(bad));
        }
        for good in [512, 1024, 65536] {
            let header = Header {
                page_size: good,
                ..reference_l0_header()
            };
            assert_eq!(header.validate(), Ok(()));
        }
    }

    #[test]
    fn txids_and_commit_are_checked() {
        assert!(matches!(rejects(|h| h.min_txid = 0), LtxError::InvalidTxid { .. }));
        assert!(matches!(rejects(|h| h.max_txid = 0), LtxError::InvalidTxid { .. }));
        assert!(matches!(rejects(|h| h.min_txid = 3), LtxError::InvalidTxid { .. }));
        assert_eq!(rejects(|h| h.commit = 0), LtxError::ZeroCommit);
    }

    #[test]
    fn wal_fields_follow_reference_rules() {
        let wal = |e: LtxError| matches!(e, LtxError::InvalidWalFields(_));
        assert!(wal(rejects(|h| h.wal_offset = -1)));
        assert!(wal(rejects(|h| h.wal_size = -1)));
        assert!(wal(rejects(|h| h.wal_offset = 0)));
        assert!(wal(rejects(|h| {
            (h.wal_offset, h.wal_salt1, h.wal_salt2) = (0, 0, 0);
        })));
        let no_wal = Header {
            wal_offset: 0,
            wal_size: 0,
            wal_salt1: 0,
            wal_salt2: 0,
            ..reference_l0_header()
        };
        assert_eq!(no_wal.validate(), Ok(()));
    }

    #[test]
    fn pre_apply_checksum_rules_depend_on_mode() {
        let pre = |e: LtxError| matches!(e, LtxError::InvalidPreApplyChecksum(_));
        assert!(pre(rejects(|h| h.pre_apply_checksum = CHECKSUM_FLAG | 5)));
        assert!(pre(rejects(|h| h.flags = 0)));
        assert!(pre(rejects(|h| (h.flags, h.pre_apply_checksum) = (0, 5))));
        assert!(pre(rejects(|h| {
            (h.flags, h.min_txid, h.pre_apply_checksum) = (0, 1, CHECKSUM_FLAG);
        })));
        let checksummed = Header {
            flags: 0,
            pre_apply_checksum: CHECKSUM_FLAG | 5,
            ..reference_l0_header()
        };
        assert_eq!(checksummed.validate(), Ok(()));
    }
}
