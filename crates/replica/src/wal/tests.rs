//! WAL tests against files written by the real `sqlite3` CLI.
//!
//! Capturing a WAL: when the last connection closes, SQLite checkpoints and
//! deletes the `-wal` file, so the copy has to be taken while the CLI is
//! still running. Each script therefore ends its interesting part with
//! `.shell cp x.db-wal <name>.wal`, run by that same sqlite3 process while it
//! holds the database open; `wal_autocheckpoint=0` keeps SQLite from
//! checkpointing (and restarting the WAL) on its own before the copy.

use std::fs;
use std::io::Cursor;
use std::path::Path;

use super::*;
use crate::test_support::sqlite;

const PAGE_SIZE: u32 = 4096;
const SETUP: &str = "PRAGMA page_size=4096;\nPRAGMA journal_mode=WAL;\nPRAGMA wal_autocheckpoint=0;\n";
const PRINT_COMMIT: &str = "SELECT 'commit ' || page_count FROM pragma_page_count();\n";

/// Three transactions: create (2 pages), a one-row insert, and a bulk
/// insert that grows the database by many pages in one transaction.
fn three_transactions(dir: &Path) -> (Vec<u8>, Vec<u32>) {
    let script = [
        SETUP,
        "CREATE TABLE t(x);\n",
        PRINT_COMMIT,
        "INSERT INTO t VALUES ('one row');\n",
        PRINT_COMMIT,
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 20)\n",
        "INSERT INTO t SELECT randomblob(3000) FROM c;\n",
        PRINT_COMMIT,
        ".shell cp x.db base.db\n",
        ".shell cp x.db-wal cap.wal\n",
        "PRAGMA wal_checkpoint(TRUNCATE);\n",
    ]
    .concat();
    let out = sqlite(dir, &script);
    let commits = out
        .lines()
        .filter_map(|l| l.strip_prefix("commit "))
        .map(|n| n.parse().unwrap())
        .collect();
    (fs::read(dir.join("cap.wal")).unwrap(), commits)
}

fn header_of(wal: &[u8]) -> WalHeader {
    WalHeader::parse(wal).unwrap()
}

fn read_all(wal: &[u8], from: Option<WalPosition>) -> Committed {
    let header = header_of(wal);
    let from = from.unwrap_or(WalPosition::start(&header));
    read_committed(&mut Cursor::new(wal), &header, from).unwrap()
}

/// Reads one transaction at a time, as a replicator resuming would.
fn read_each_transaction(wal: &[u8]) -> Vec<Committed> {
    let header = header_of(wal);
    let mut pos = WalPosition::start(&header);
    let mut txns = Vec::new();
    loop {
        let txn = read_committed_limit(&mut Cursor::new(wal), &header, pos, 1).unwrap();
        if txn.commits == 0 {
            return txns;
        }
        pos = txn.end;
        txns.push(txn);
    }
}

#[test]
fn parses_header_written_by_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = three_transactions(dir.path());
    let header = header_of(&wal);
    assert!(header.magic == MAGIC_LE || header.magic == MAGIC_BE);
    assert_eq!(header.version, VERSION);
    assert_eq!(header.page_size, PAGE_SIZE);
    assert_eq!(header.frame_size(), 24 + 4096);
    let from_file = WalHeader::read_from(&mut Cursor::new(&wal)).unwrap();
    assert_eq!(from_file, header);
}

#[test]
fn reads_every_committed_frame_with_commit_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, commit_sizes) = three_transactions(dir.path());
    assert_eq!(commit_sizes.len(), 3, "fixture prints each commit size");

    let all = read_all(&wal, None);
    assert_eq!(all.commits, 3);
    assert_eq!(all.end.offset, wal.len() as u64, "every frame is committed");
    assert_eq!(all.commit, commit_sizes.last().copied());

    let txns = read_each_transaction(&wal);
    let sizes: Vec<u32> = txns.iter().map(|t| t.commit.unwrap()).collect();
    assert_eq!(sizes, commit_sizes);
    let first: Vec<u32> = txns[0].frames.iter().map(|f| f.pgno).collect();
    assert_eq!(first, [1, 2], "CREATE TABLE writes the schema and root pages");
    for txn in &txns {
        let (last, rest) = txn.frames.split_last().unwrap();
        assert_eq!(last.commit, txn.commit.unwrap());
        assert!(rest.iter().all(|f| f.commit == 0));
        assert!(txn.frames.iter().all(|f| f.pgno <= txn.commit.unwrap()));
    }
    assert!(txns[2].frames.len() > 10, "bulk insert spans many pages");
    let concatenated: Vec<Frame> = txns.into_iter().flat_map(|t| t.frames).collect();
    assert_eq!(concatenated, all.frames);
}

#[test]
fn applying_frames_reproduces_checkpointed_database() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = three_transactions(dir.path());
    let all = read_all(&wal, None);

    let mut db = fs::read(dir.path().join("base.db")).unwrap();
    for frame in &all.frames {
        let start = (frame.pgno as usize - 1) * PAGE_SIZE as usize;
        if db.len() < start + PAGE_SIZE as usize {
            db.resize(start + PAGE_SIZE as usize, 0);
        }
        db[start..start + PAGE_SIZE as usize].copy_from_slice(&frame.data);
    }
    db.truncate(all.commit.unwrap() as usize * PAGE_SIZE as usize);
    let checkpointed = fs::read(dir.path().join("x.db")).unwrap();
    assert!(db == checkpointed, "frames applied to the base give the database");
}

#[test]
fn resuming_returns_only_later_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = three_transactions(dir.path());
    let all = read_all(&wal, None);
    let txns = read_each_transaction(&wal);

    let after_first = read_all(&wal, Some(txns[0].end));
    assert_eq!(after_first.commits, 2);
    assert_eq!(after_first.frames, all.frames[txns[0].frames.len()..]);
    assert_eq!(after_first.end, all.end);

    let at_end = read_all(&wal, Some(all.end));
    assert_eq!((at_end.commits, at_end.commit), (0, None));
    assert_eq!(at_end.end, all.end);
    assert!(at_end.frames.is_empty());
}

#[test]
fn corrupt_frame_stops_reading_at_previous_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = three_transactions(dir.path());
    let txns = read_each_transaction(&wal);

    // Flip one byte of page data in the second transaction's frame.
    let mut bad = wal.clone();
    let frame_offset = txns[1].frames[0].offset as usize;
    bad[frame_offset + 24 + 100] ^= 0x01;
    let got = read_all(&bad, None);
    assert_eq!(got.frames, txns[0].frames);
    assert_eq!(got.end, txns[0].end);
    assert_eq!(got.commits, 1);
}

#[test]
fn uncommitted_tail_is_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = three_transactions(dir.path());
    let txns = read_each_transaction(&wal);
    let frame_size = header_of(&wal).frame_size() as usize;

    // Drop the commit frame of the last transaction, leaving its other
    // frames as an uncommitted tail; then also cut a frame in half.
    for cut in [frame_size, frame_size / 2, frame_size + frame_size / 2] {
        let got = read_all(&wal[..wal.len() - cut], None);
        assert_eq!(got.commits, 2, "cut {cut}");
        assert_eq!(got.end, txns[1].end);
        assert_eq!(got.frames.len(), txns[0].frames.len() + txns[1].frames.len());
    }
}

#[test]
fn wal_restart_changes_salts_and_hides_old_frames() {
    let dir = tempfile::tempdir().unwrap();
    let script = [
        SETUP,
        "CREATE TABLE t(x);\n",
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 20)\n",
        "INSERT INTO t SELECT randomblob(3000) FROM c;\n",
        ".shell cp x.db-wal before.wal\n",
        // A full passive checkpoint lets the next writer restart the WAL from
        // the top with new salts, overwriting only the first frames.
        "PRAGMA wal_checkpoint;\n",
        "INSERT INTO t VALUES ('after restart');\n",
        ".shell cp x.db-wal after.wal\n",
    ]
    .concat();
    sqlite(dir.path(), &script);
    let before = fs::read(dir.path().join("before.wal")).unwrap();
    let after = fs::read(dir.path().join("after.wal")).unwrap();
    let (old, new) = (header_of(&before), header_of(&after));
    assert_ne!(old, new);
    assert_ne!(old.salts(), new.salts());

    let got = read_all(&after, None);
    assert_eq!(got.commits, 1, "only the post-restart transaction is live");
    assert!(got.frames.iter().all(|f| f.offset < got.end.offset));
    let stale = got.end.offset + new.frame_size();
    assert!(after.len() as u64 >= stale, "old frames remain in the file");
    let next = got.end.offset as usize;
    let salts = (
        be_u32(&after[next + 8..next + 12]),
        be_u32(&after[next + 12..next + 16]),
    );
    assert_eq!(salts, old.salts(), "the next frame is a leftover");

    // A position saved before the restart points into intact old frames
    // whose checksum chain still verifies; only the salts reveal them.
    let saved = read_committed_limit(&mut Cursor::new(&before), &old, WalPosition::start(&old), 1)
        .unwrap()
        .end;
    assert!(saved.offset >= got.end.offset, "saved position is past the new frames");
    let stale = read_committed(&mut Cursor::new(&after), &new, saved).unwrap();
    assert!(stale.frames.is_empty());
    assert_eq!(stale.end, saved);
}

/// A synthetic WAL with big-endian checksums, which x86 SQLite never writes.
fn synthetic_wal(magic: u32, frames: &[(u32, u32)]) -> Vec<u8> {
    let big_endian = magic & 1 == 1;
    let mut wal = Vec::new();
    for word in [magic, VERSION, 512, 0, 7, 9] {
        wal.extend_from_slice(&word.to_be_bytes());
    }
    let mut sum = wal_checksum(big_endian, &wal, (0, 0));
    wal.extend_from_slice(&sum.0.to_be_bytes());
    wal.extend_from_slice(&sum.1.to_be_bytes());
    for &(pgno, commit) in frames {
        let data = vec![pgno as u8; 512];
        let mut head = Vec::new();
        for word in [pgno, commit, 7, 9] {
            head.extend_from_slice(&word.to_be_bytes());
        }
        sum = wal_checksum(big_endian, &head[..8], sum);
        sum = wal_checksum(big_endian, &data, sum);
        head.extend_from_slice(&sum.0.to_be_bytes());
        head.extend_from_slice(&sum.1.to_be_bytes());
        wal.extend_from_slice(&head);
        wal.extend_from_slice(&data);
    }
    wal
}

#[test]
fn big_endian_checksum_wal_is_read() {
    let wal = synthetic_wal(MAGIC_BE, &[(1, 0), (2, 2), (3, 0)]);
    assert!(header_of(&wal).big_endian_checksums());
    let got = read_all(&wal, None);
    assert_eq!(got.commit, Some(2));
    assert_eq!(got.frames.iter().map(|f| f.pgno).collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn checksum_byte_order_must_match_magic() {
    let mut wal = synthetic_wal(MAGIC_BE, &[(1, 1)]);
    wal[..4].copy_from_slice(&MAGIC_LE.to_be_bytes());
    assert!(matches!(WalHeader::parse(&wal), Err(WalError::HeaderChecksum { .. })));
}

#[test]
fn zero_pgno_frame_stops_reading() {
    let wal = synthetic_wal(MAGIC_LE, &[(1, 1), (0, 1)]);
    assert_eq!(read_all(&wal, None).commits, 1);
}

#[test]
fn header_errors_are_specific() {
    let good = synthetic_wal(MAGIC_LE, &[]);
    let with = |offset: usize, word: u32| {
        let mut wal = good.clone();
        wal[offset..offset + 4].copy_from_slice(&word.to_be_bytes());
        WalHeader::parse(&wal).unwrap_err()
    };
    assert!(matches!(with(0, 0x377f_0684), WalError::BadMagic(0x377f_0684)));
    assert!(matches!(with(4, 3_007_001), WalError::BadVersion(3_007_001)));
    assert!(matches!(with(8, 1000), WalError::BadPageSize(1000)));
    assert!(matches!(with(8, 256), WalError::BadPageSize(256)));
    assert!(matches!(with(16, 8), WalError::HeaderChecksum { .. }));
    assert!(matches!(with(28, 0), WalError::HeaderChecksum { .. }));
    let short = WalHeader::parse(&good[..31]).unwrap_err();
    assert!(matches!(short, WalError::ShortHeader { len: 31 }));
    let empty = WalHeader::read_from(&mut Cursor::new(Vec::new())).unwrap_err();
    assert!(matches!(empty, WalError::ShortHeader { len: 0 }));
}

#[test]
fn position_off_frame_boundary_is_rejected() {
    let wal = synthetic_wal(MAGIC_LE, &[(1, 1)]);
    let header = header_of(&wal);
    for offset in [0, 31, 33, 32 + 536 - 1] {
        let from = WalPosition {
            offset,
            ..WalPosition::start(&header)
        };
        let err = read_committed(&mut Cursor::new(&wal), &header, from).unwrap_err();
        assert!(matches!(err, WalError::InvalidPosition { .. }), "{offset}");
    }
}

#[test]
fn reads_through_a_shared_file_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.wal");
    fs::write(&path, synthetic_wal(MAGIC_LE, &[(1, 0), (2, 2)])).unwrap();
    let file = fs::File::open(&path).unwrap();
    let header = WalHeader::read_from(&mut &file).unwrap();
    let got = read_committed(&mut &file, &header, WalPosition::start(&header)).unwrap();
    assert_eq!(got.commits, 1);
}
