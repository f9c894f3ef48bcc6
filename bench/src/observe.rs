//! The replica observer: notices new level-0 LTX files as soon as they are visible and
//! records, for each, when it was first seen and its header (which WAL range it covers).
//!
//! Both tools name L0 files by consecutive TXIDs (`<txid>-<txid>.ltx`), so the observer
//! probes for the next expected name every poll (one `open` on a directory, one ranged GET on
//! S3) instead of listing a directory that grows by hundreds of files a second; a full listing
//! every so often catches any gap in the numbering.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use keycast_replica::ltx::{self, decode_header, Header};
use keycast_replica::Store;
use object_store::{GetOptions, ObjectStore};

/// One L0 file, when the observer first saw it complete.
#[derive(Debug, Clone)]
pub struct Obs {
    pub t: Instant,
    pub txid: u64,
    pub header: Header,
}

/// What to watch.
pub enum Target {
    /// A file replica's root directory (files under `ltx/0/`).
    File(PathBuf),
    /// An S3 replica (files under `<prefix>/0000/`).
    S3(Store),
}

/// A running observer thread.
pub struct Observer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Obs>>>,
    errors: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// How often a full listing looks for gaps in the TXID sequence.
const RESCAN: Duration = Duration::from_millis(250);

impl Observer {
    /// Starts watching; files already present are not reported.
    pub fn start(target: Target, poll: Duration) -> anyhow::Result<Observer> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(AtomicU64::new(0));
        let (s, v, e) = (stop.clone(), seen.clone(), errors.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("replica-observer".into())
            .spawn(move || match target {
                Target::File(root) => watch_file(root, poll, &s, &v, &e, ready_tx),
                Target::S3(store) => watch_s3(store, poll, &s, &v, &e, ready_tx),
            })?;
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow::anyhow!("the observer did not start"))?;
        Ok(Observer {
            stop,
            seen,
            errors,
            thread: Some(thread),
        })
    }

    /// A copy of what was seen so far, in the order seen.
    pub fn snapshot(&self) -> Vec<Obs> {
        self.seen.lock().expect("observer lock").clone()
    }

    /// Stops the thread and returns everything seen and the count of failed probes.
    pub fn stop(mut self) -> (Vec<Obs>, u64) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let seen = std::mem::take(&mut *self.seen.lock().expect("observer lock"));
        (seen, self.errors.load(Ordering::SeqCst))
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn watch_file(
    root: PathBuf,
    poll: Duration,
    stop: &AtomicBool,
    seen: &Mutex<Vec<Obs>>,
    errors: &AtomicU64,
    ready: std::sync::mpsc::Sender<()>,
) {
    let dir = root.join("ltx").join("0");
    let scan = || -> Vec<u64> {
        let mut txids: Vec<u64> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| ltx::parse_file_name(e.file_name().to_str()?))
                    .map(|(_, max)| max)
                    .collect()
            })
            .unwrap_or_default();
        txids.sort_unstable();
        txids
    };
    let read = |txid: u64| -> Option<Header> {
        let mut f = File::open(dir.join(ltx::file_name(txid, txid))).ok()?;
        let mut buf = [0u8; ltx::HEADER_SIZE];
        f.read_exact(&mut buf).ok()?;
        match decode_header(&buf) {
            Ok(h) => Some(h),
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    };
    let mut next = scan().last().map_or(1, |m| m + 1);
    let _ = ready.send(());
    let mut last_scan = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        while let Some(header) = read(next) {
            push(seen, next, header);
            next += 1;
        }
        if last_scan.elapsed() >= RESCAN {
            let from = next;
            for txid in scan().into_iter().filter(|t| *t >= from) {
                if let Some(header) = read(txid) {
                    push(seen, txid, header);
                    next = txid + 1;
                }
            }
            last_scan = Instant::now();
        }
        std::thread::sleep(poll);
    }
}

fn watch_s3(
    store: Store,
    poll: Duration,
    stop: &AtomicBool,
    seen: &Mutex<Vec<Obs>>,
    errors: &AtomicU64,
    ready: std::sync::mpsc::Sender<()>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("observer runtime");
    runtime.block_on(async {
        let objects = store.object_store();
        let dir = store.level_dir(0);
        let read = |txid: u64| {
            let objects = objects.clone();
            let key = store.ltx_key(0, txid, txid);
            async move {
                let options = GetOptions {
                    range: Some((0..ltx::HEADER_SIZE as u64).into()),
                    ..GetOptions::default()
                };
                match objects.get_opts(&key, options).await {
                    Ok(r) => match r.bytes().await.map(|b| decode_header(&b)) {
                        Ok(Ok(h)) => Some(h),
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            None
                        }
                    },
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }
        };
        let mut next = match store.list_level(0).await {
            Ok(files) => files.iter().map(|f| f.max_txid).max().map_or(1, |m| m + 1),
            Err(_) => 1,
        };
        let _ = ready.send(());
        let mut last_scan = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            while let Some(header) = read(next).await {
                push(seen, next, header);
                next += 1;
            }
            if last_scan.elapsed() >= RESCAN * 4 {
                let offset = store.ltx_key(0, next - 1, next - 1);
                let listed: Vec<_> = objects
                    .list_with_offset(Some(&dir), &offset)
                    .try_collect()
                    .await
                    .unwrap_or_default();
                let mut txids: Vec<u64> = listed
                    .iter()
                    .filter_map(|m| ltx::parse_file_name(m.location.filename()?))
                    .map(|(_, max)| max)
                    .filter(|t| *t >= next)
                    .collect();
                txids.sort_unstable();
                for txid in txids {
                    if let Some(header) = read(txid).await {
                        push(seen, txid, header);
                        next = txid + 1;
                    }
                }
                last_scan = Instant::now();
            }
            tokio::time::sleep(poll).await;
        }
    });
}

fn push(seen: &Mutex<Vec<Obs>>, txid: u64, header: Header) {
    seen.lock().expect("observer lock").push(Obs {
        t: Instant::now(),
        txid,
        header,
    });
}
