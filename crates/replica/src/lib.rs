//! `keycast-replica`: continuous replication of a SQLite database to an object store, in
//! Litestream 0.5's on-storage format, so the stock `litestream restore` restores what
//! keycast writes and keycast restores what Litestream writes.
//!
//! Knows SQLite files and object stores; nothing of Nostr, HTTP or keycast's tables.
//!
//! # Layout
//! - [`capture`]: the WAL hook on application connections that wakes the replicator.
//! - [`replicator`]: the background loop that ships segments and owns checkpoints.
//! - [`segment`]: builds LTX segments from WAL frames or the whole database.
//! - [`snapshot`]: the read snapshot that keeps foreign checkpoints from losing frames.
//! - [`spill`]: bodies kept in memory while small and in a temporary file beyond that.
//! - [`store`]: one replica location (file, S3, GCS, Azure) in Litestream's layout.
//! - [`crypt`]: optional client-side AES-256-GCM of replica objects.
//! - [`faults`]: a fault-injecting store wrapper (lost answers, delays, pauses) for tests.
//! - [`restore`]: restore planning and verified restore into a new file.
//! - [`apply`]: fetching LTX files ahead and applying them in order to a page file.
//! - [`verify`]: proving the replica restores to exactly the live database.
//! - [`compactor`]: compaction levels, snapshots, retention.
//! - [`lease`]: the single-writer lease (compare-and-swap on a small object) and hand-over.
//! - [`bootstrap`]: what to do at start-up given the local file and the replica.
//! - [`local_state`]: the local record of what was shipped.
//! - [`ltx`], [`wal`], [`checksum`]: the file formats.

pub mod apply;
pub mod bootstrap;
pub mod capture;
pub mod checksum;
pub mod compactor;
pub mod crypt;
pub mod db_file;
pub mod faults;
mod file_lock;
pub mod lease;
pub mod local_state;
pub mod ltx;
pub mod mark;
pub mod replicator;
pub mod restore;
pub mod segment;
pub mod snapshot;
pub mod spill;
pub mod store;
pub mod verify;
pub mod wal;

#[cfg(test)]
mod test_support;

pub use capture::CommitSignal;
pub use checksum::{database_checksum, lock_page, page_checksum, DbChecksum};
pub use ltx::{Decoded, Encoder, Header, LtxError};
pub use replicator::{BeforeHandover, ReplicaError, ReplicaOptions, Replicator, Status, BEFORE_HANDOVER_LIMIT};
pub use restore::{restore, RestoreError, Restored, Target};
pub use store::Store;
pub use wal::{Committed, CommittedIndex, Frame, FrameRef, WalError, WalHeader, WalPosition};
