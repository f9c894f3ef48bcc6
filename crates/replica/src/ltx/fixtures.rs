//! Headers and pages shared by the LTX unit tests.

use super::{Header, FLAG_NO_CHECKSUM};

/// The header of the reference's annotated 197-byte L0 file
/// `0000000000000002-0000000000000002.ltx`.
pub(crate) fn reference_l0_header() -> Header {
    Header {
        flags: FLAG_NO_CHECKSUM,
        page_size: 4096,
        commit: 4,
        min_txid: 2,
        max_txid: 2,
        timestamp_ms: 1_795_847_680_330,
        pre_apply_checksum: 0,
        wal_offset: 16512,
        wal_size: 4120,
        wal_salt1: 0xb4a4_b925,
        wal_salt2: 0x2105_6d27,
        node_id: 0,
    }
}

/// A snapshot header (min TXID 1) as litestream writes it.
pub(crate) fn snapshot_header(page_size: u32, commit: u32, max_txid: u64) -> Header {
    Header {
        flags: FLAG_NO_CHECKSUM,
        page_size,
        commit,
        min_txid: 1,
        max_txid,
        timestamp_ms: 1_700_000_000_000,
        ..Header::default()
    }
}

/// An incremental (L0-style) header covering one transaction.
pub(crate) fn l0_header(page_size: u32, commit: u32, txid: u64) -> Header {
    Header {
        min_txid: txid,
        max_txid: txid,
        wal_offset: 32,
        wal_size: i64::from(page_size) + 24,
        wal_salt1: 0x1234_5678,
        wal_salt2: 0x9abc_def0,
        ..snapshot_header(page_size, commit, txid)
    }
}

/// Page content that is distinct per `pgno` and compresses somewhat, like a
/// real b-tree page: a short varying prefix, then zeros.
pub(crate) fn page(pgno: u32, page_size: u32) -> Vec<u8> {
    let mut data = vec![0u8; page_size as usize];
    for (i, byte) in data.iter_mut().take(64).enumerate() {
        *byte = (pgno as usize * 31 + i * 7) as u8;
    }
    data
}
