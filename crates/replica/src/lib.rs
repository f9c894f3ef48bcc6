//! `keycast-replica`: continuous replication of a SQLite database to an
//! object store, in Litestream 0.5.17's on-storage format, so that stock
//! `litestream restore` can restore what keycast writes.
//!
//! # Layout
//!
//! - [`checksum`]: CRC-64/GO-ISO page and database checksums.
//! - [`ltx`]: the LTX v3 file format: header, encoder, decoder, file names.
//! - [`wal`]: reading complete transactions out of a SQLite WAL file.
//!
//! These modules are pure format code over bytes and readers; syncing,
//! object stores and restore build on them.

pub mod checksum;
pub mod ltx;
pub mod wal;

#[cfg(test)]
mod test_support;

pub use checksum::{database_checksum, lock_page, page_checksum, DbChecksum};
pub use ltx::{Decoded, Encoder, Header, LtxError};
pub use wal::{Committed, Frame, WalError, WalHeader, WalPosition};
