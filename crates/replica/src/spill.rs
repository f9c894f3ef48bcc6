//! Bytes that can be as large as the database — a segment, a full image, a compacted file —
//! kept in memory while they are small and in an unnamed temporary file beyond a limit, so
//! the replicator's resident memory stays bounded whatever the database size.
//!
//! A [`Body`] never changes once written and is cheap to clone: an upload retried after an
//! unknown outcome sends exactly the same bytes (see the replicator's module docs), whether
//! they sit in memory or on disk. The temporary file has no name (`O_TMPFILE` where the
//! platform has it), so a crash leaves nothing behind.

use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

/// Bodies up to this size stay in memory (8 MiB); larger ones go to a temporary file.
pub const DEFAULT_SPILL_LIMIT: usize = 8 << 20;

/// Immutable bytes, in memory or in an unnamed temporary file.
#[derive(Clone)]
pub struct Body {
    repr: Repr,
}

#[derive(Clone)]
enum Repr {
    Memory(Bytes),
    File { file: Arc<File>, len: u64 },
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Memory(bytes) => write!(f, "Body(memory, {} bytes)", bytes.len()),
            Repr::File { len, .. } => write!(f, "Body(temporary file, {len} bytes)"),
        }
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Body {
        Body {
            repr: Repr::Memory(bytes),
        }
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Body {
        Body::from(Bytes::from(bytes))
    }
}

impl Body {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match &self.repr {
            Repr::Memory(bytes) => bytes.len() as u64,
            Repr::File { len, .. } => *len,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, if they are in memory.
    pub fn in_memory(&self) -> Option<&Bytes> {
        match &self.repr {
            Repr::Memory(bytes) => Some(bytes),
            Repr::File { .. } => None,
        }
    }

    /// Up to `max` bytes from `offset` (fewer only at the end). Blocking for a spilled body.
    ///
    /// # Errors
    /// Reading the temporary file failed.
    pub fn read_chunk(&self, offset: u64, max: usize) -> io::Result<Bytes> {
        let end = self.len().min(offset.saturating_add(max as u64));
        let len = end.saturating_sub(offset) as usize;
        match &self.repr {
            Repr::Memory(bytes) => Ok(bytes.slice(offset.min(end) as usize..end as usize)),
            Repr::File { file, .. } => {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset)?;
                Ok(Bytes::from(buf))
            }
        }
    }

    /// All of it in memory: for bodies known to be small, and tests.
    ///
    /// # Errors
    /// Reading the temporary file failed.
    pub fn to_bytes(&self) -> io::Result<Bytes> {
        match &self.repr {
            Repr::Memory(bytes) => Ok(bytes.clone()),
            Repr::File { .. } => self.read_chunk(0, self.len() as usize),
        }
    }

    /// Reads it front to back, `chunk` bytes at a time.
    pub fn chunks(&self, chunk: usize) -> Chunks {
        Chunks {
            body: self.clone(),
            offset: 0,
            chunk: chunk.max(1),
        }
    }
}

/// See [`Body::chunks`].
pub struct Chunks {
    body: Body,
    offset: u64,
    chunk: usize,
}

impl Iterator for Chunks {
    type Item = io::Result<Bytes>;

    fn next(&mut self) -> Option<io::Result<Bytes>> {
        if self.offset >= self.body.len() {
            return None;
        }
        let chunk = self.body.read_chunk(self.offset, self.chunk);
        if let Ok(bytes) = &chunk {
            self.offset += bytes.len() as u64;
        }
        Some(chunk)
    }
}

/// Writes a [`Body`]: in memory up to the limit, then into a temporary file in `dir`.
pub struct SpillWriter {
    dir: PathBuf,
    limit: usize,
    memory: Vec<u8>,
    file: Option<BufWriter<File>>,
    len: u64,
}

impl SpillWriter {
    /// A writer that keeps up to `limit` bytes in memory and spills into `dir` beyond it.
    pub fn new(dir: &Path, limit: usize) -> SpillWriter {
        SpillWriter {
            dir: dir.to_owned(),
            limit,
            memory: Vec::new(),
            file: None,
            len: 0,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The finished body.
    ///
    /// # Errors
    /// Flushing the temporary file failed.
    pub fn finish(self) -> io::Result<Body> {
        let repr = match self.file {
            None => Repr::Memory(Bytes::from(self.memory)),
            Some(file) => Repr::File {
                file: Arc::new(file.into_inner().map_err(|e| e.into_error())?),
                len: self.len,
            },
        };
        Ok(Body { repr })
    }

    fn spill(&mut self) -> io::Result<&mut BufWriter<File>> {
        if self.file.is_none() {
            let file = tempfile::tempfile_in(&self.dir).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot create a temporary file in {}: {e}", self.dir.display()),
                )
            })?;
            let mut file = BufWriter::with_capacity(1 << 20, file);
            file.write_all(&self.memory)?;
            self.memory = Vec::new();
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("just set"))
    }
}

impl Write for SpillWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.file.is_none() && self.memory.len() + buf.len() <= self.limit {
            self.memory.extend_from_slice(buf);
        } else {
            self.spill()?.write_all(buf)?;
        }
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(limit: usize, pieces: &[&[u8]]) -> Body {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SpillWriter::new(dir.path(), limit);
        for piece in pieces {
            writer.write_all(piece).unwrap();
        }
        let body = writer.finish().unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the temporary file has no name"
        );
        body
    }

    #[test]
    fn small_bodies_stay_in_memory_and_large_ones_spill_with_the_same_bytes() {
        let small = write(10, &[b"abc", b"defgh"]);
        assert_eq!(small.in_memory().map(|b| &b[..]), Some(&b"abcdefgh"[..]));
        let large = write(10, &[b"abcdefgh", b"ijklmnop", b"q"]);
        assert!(large.in_memory().is_none());
        assert_eq!(large.len(), 17);
        assert_eq!(&large.to_bytes().unwrap()[..], b"abcdefghijklmnopq");
        assert_eq!(&large.read_chunk(15, 10).unwrap()[..], b"pq");
        assert_eq!(&large.read_chunk(20, 10).unwrap()[..], b"");
        let pieces: Vec<Bytes> = large.chunks(5).map(Result::unwrap).collect();
        assert_eq!(pieces.iter().map(Bytes::len).collect::<Vec<_>>(), vec![5, 5, 5, 2]);
        assert_eq!(pieces.concat(), b"abcdefghijklmnopq");
    }

    #[test]
    fn a_clone_reads_the_same_bytes_after_the_original_is_gone() {
        let body = write(0, &[b"kept"]);
        let clone = body.clone();
        drop(body);
        assert_eq!(&clone.to_bytes().unwrap()[..], b"kept");
    }
}
