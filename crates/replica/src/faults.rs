//! A fault-injecting wrapper around any object store, for tests and drills.
//!
//! Real stores fail in ways a happy-path test never sees: a request that never arrives, an
//! answer that is lost *after* the store applied the request (a timeout, a dropped
//! connection), a store that answers seconds late, a request that sits in a paused process
//! between a check and the write it guards. [`Faults`] is a shared handle holding rules; a
//! [`Store`](crate::Store) wrapped with [`Store::with_faults`](crate::Store::with_faults)
//! consults them before (and after) every request it forwards to the real backend, so the
//! replicator and the lease meet these faults on any backend — memory, file, S3 — through
//! the very code paths production uses.
//!
//! Rules match an operation and, optionally, a substring of the object key; each fires a
//! given number of times (or forever) and then retires.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};
use tokio::sync::watch;

/// The kind of request a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    List,
    Delete,
}

/// What happens to a matching request.
#[derive(Debug, Clone)]
pub enum Action {
    /// It fails before reaching the store: nothing is applied.
    Fail,
    /// It reaches the store and is applied, then the answer is lost: the caller sees an
    /// error although the write happened.
    LoseResponse,
    /// It reaches the store only after this delay.
    Delay(Duration),
    /// It waits at the gate until the gate is opened (a paused process, a stuck socket).
    Hold(Gate),
    /// It reaches the store and is applied at once; its answer waits at the gate until the
    /// gate is opened (a process paused right after the store answered: what it read, or
    /// heard, may be stale by the time it acts on it). Uploads, reads and listings by
    /// directory; a streamed listing or a deletion is answered at once.
    HoldAnswer(Gate),
    /// An upload that reaches the store after this delay, in a task of its own: a caller
    /// that gives up meanwhile does not stop it landing, as object_store's local filesystem
    /// writes from a blocking task, and a cloud store applies a request whose caller timed
    /// out. (Other requests are only delayed.)
    Detached(Duration),
    /// An upload that reaches the store twice, its caller seeing the second answer: a client
    /// that sent it again after an answer it never got (object_store retries a 5xx, even a
    /// conditional write, which then meets its own first attempt). (Other requests are
    /// forwarded once.)
    Twice,
}

/// One fault: which requests, what happens, how many times.
#[derive(Debug, Clone)]
pub struct Rule {
    op: Op,
    key: Option<String>,
    body: Option<Vec<u8>>,
    action: Action,
    remaining: Option<usize>,
}

impl Rule {
    /// A rule for every request of kind `op`, failing it, forever (narrow it with the
    /// builder methods).
    pub fn new(op: Op, action: Action) -> Rule {
        Rule {
            op,
            key: None,
            body: None,
            action,
            remaining: None,
        }
    }

    /// Only requests whose object key (or listing prefix) contains `part`.
    pub fn key(mut self, part: &str) -> Rule {
        self.key = Some(part.to_owned());
        self
    }

    /// Only uploads whose body contains `part`: one kind of write of an object, when the
    /// same object is written for several reasons (a lease released, not renewed).
    pub fn body(mut self, part: &str) -> Rule {
        self.body = Some(part.as_bytes().to_vec());
        self
    }

    /// Fires this many times, then retires.
    pub fn times(mut self, n: usize) -> Rule {
        self.remaining = Some(n);
        self
    }

    fn matches(&self, op: Op, key: &str, body: Option<&[u8]>) -> bool {
        self.op == op
            && self.key.as_deref().is_none_or(|part| key.contains(part))
            && self.body.as_deref().is_none_or(|part| {
                body.is_some_and(|body| body.windows(part.len().max(1)).any(|window| window == part))
            })
    }
}

/// A gate requests can be held at; see [`Action::Hold`].
#[derive(Clone)]
pub struct Gate {
    open: watch::Sender<bool>,
    waiting: watch::Sender<usize>,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate").field("open", &*self.open.borrow()).finish()
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Gate {
        Gate {
            open: watch::channel(false).0,
            waiting: watch::channel(0).0,
        }
    }

    /// Lets every held request (and every later one) through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Waits until at least one request is held at the gate.
    pub async fn reached(&self) {
        let mut waiting = self.waiting.subscribe();
        let _ = waiting.wait_for(|n| *n > 0).await;
    }

    /// How many requests are held at the gate now.
    pub fn held(&self) -> usize {
        *self.waiting.borrow()
    }

    async fn pass(&self) {
        let mut open = self.open.subscribe();
        if *open.borrow() {
            return;
        }
        self.waiting.send_modify(|n| *n += 1);
        let _ = open.wait_for(|o| *o).await;
        self.waiting.send_modify(|n| *n -= 1);
    }
}

/// The shared set of rules. Cheap to clone; clones share the rules.
#[derive(Clone, Default)]
pub struct Faults {
    rules: Arc<Mutex<Vec<Rule>>>,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Faults")
            .field(&self.rules.lock().expect("rules").len())
            .finish()
    }
}

impl Faults {
    /// No rules: every request goes through untouched.
    pub fn new() -> Faults {
        Faults::default()
    }

    /// Adds a rule; the first matching rule decides a request's fate.
    pub fn add(&self, rule: Rule) {
        self.rules.lock().expect("rules").push(rule);
    }

    /// Removes every rule (held requests stay held until their gate opens).
    pub fn clear(&self) {
        self.rules.lock().expect("rules").clear();
    }

    /// Whether every rule has fired as many times as it was told to (none is left).
    pub fn spent(&self) -> bool {
        self.rules.lock().expect("rules").is_empty()
    }

    /// Whether a rule looks at bodies (only then are they gathered to be looked at).
    fn wants_bodies(&self) -> bool {
        self.rules.lock().expect("rules").iter().any(|r| r.body.is_some())
    }

    /// Takes the action of the first rule matching the request, counting it down.
    fn take(&self, op: Op, key: &str, body: Option<&[u8]>) -> Option<Action> {
        let mut rules = self.rules.lock().expect("rules");
        let index = rules.iter().position(|r| r.matches(op, key, body))?;
        let rule = &mut rules[index];
        let action = rule.action.clone();
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                rules.remove(index);
            }
        }
        Some(action)
    }

    /// The action of the first rule matching an upload when it is one only uploads take
    /// ([`Action::Detached`], [`Action::Twice`]), counted down; other actions are left for
    /// [`Faults::before`].
    fn upload_only(&self, op: Op, key: &str, body: Option<&[u8]>) -> Option<Action> {
        {
            let rules = self.rules.lock().expect("rules");
            let rule = rules.iter().find(|r| r.matches(op, key, body))?;
            if !matches!(rule.action, Action::Detached(_) | Action::Twice) {
                return None;
            }
        }
        self.take(op, key, body)
    }

    /// Runs the part of the action that comes before forwarding, and says what comes after.
    async fn before(&self, op: Op, key: &str, body: Option<&[u8]>) -> Result<After> {
        match self.take(op, key, body) {
            None | Some(Action::Twice) => Ok(After::Answer),
            Some(Action::Fail) => Err(injected(op, key, "failed before reaching the store")),
            Some(Action::LoseResponse) => Ok(After::Lose),
            Some(Action::Delay(delay) | Action::Detached(delay)) => {
                tokio::time::sleep(delay).await;
                Ok(After::Answer)
            }
            Some(Action::Hold(gate)) => {
                gate.pass().await;
                Ok(After::Answer)
            }
            Some(Action::HoldAnswer(gate)) => Ok(After::Hold(gate)),
        }
    }
}

/// What happens to a forwarded request's answer.
enum After {
    Answer,
    Lose,
    Hold(Gate),
}

fn injected(op: Op, key: &str, what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faults",
        source: format!("injected fault: {op:?} {key} {what}").into(),
    }
}

/// An object store that applies [`Faults`] to the requests it forwards to `inner`.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Faults,
}

impl FaultyStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Faults) -> FaultyStore {
        FaultyStore { inner, faults }
    }

    async fn around<T>(&self, op: Op, key: &str, request: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.around_body(op, key, None, request).await
    }

    async fn around_body<T>(
        &self,
        op: Op,
        key: &str,
        body: Option<&[u8]>,
        request: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let after = self.faults.before(op, key, body).await?;
        let result = request.await;
        match after {
            After::Lose if result.is_ok() => Err(injected(op, key, "was applied, but its answer was lost")),
            After::Hold(gate) => {
                gate.pass().await;
                result
            }
            _ => result,
        }
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        let body: Option<Vec<u8>> = self
            .faults
            .wants_bodies()
            .then(|| payload.iter().flat_map(|chunk| chunk.iter().copied()).collect());
        match self.faults.upload_only(Op::Put, location.as_ref(), body.as_deref()) {
            Some(Action::Detached(delay)) => {
                let (inner, at) = (self.inner.clone(), location.clone());
                let landing = tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    inner.put_opts(&at, payload, opts).await
                });
                return landing
                    .await
                    .unwrap_or_else(|e| Err(injected(Op::Put, location.as_ref(), &e.to_string())));
            }
            Some(Action::Twice) => {
                let _ = self.inner.put_opts(location, payload.clone(), opts.clone()).await;
                return self.inner.put_opts(location, payload, opts).await;
            }
            _ => {}
        }
        self.around_body(
            Op::Put,
            location.as_ref(),
            body.as_deref(),
            self.inner.put_opts(location, payload, opts),
        )
        .await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.around(
            Op::Put,
            location.as_ref(),
            self.inner.put_multipart_opts(location, opts),
        )
        .await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.around(Op::Get, location.as_ref(), self.inner.get_opts(location, options))
            .await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.around(Op::Get, location.as_ref(), self.inner.get_ranges(location, ranges))
            .await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        let faults = self.faults.clone();
        let lost: Arc<Mutex<HashSet<Path>>> = Arc::default();
        let marked = lost.clone();
        let checked = locations
            .then(move |location| {
                let (faults, marked) = (faults.clone(), marked.clone());
                async move {
                    let location = location?;
                    // (An answer held is answered at once: deletions are not held after.)
                    if let After::Lose = faults.before(Op::Delete, location.as_ref(), None).await? {
                        marked.lock().expect("lost").insert(location.clone());
                    }
                    Ok(location)
                }
            })
            .boxed();
        self.inner
            .delete_stream(checked)
            .map(move |result| match result {
                Ok(location) if lost.lock().expect("lost").remove(&location) => Err(injected(
                    Op::Delete,
                    location.as_ref(),
                    "was applied, but its answer was lost",
                )),
                other => other,
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let (faults, inner) = (self.faults.clone(), self.inner.clone());
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            let key = prefix.as_ref().map(|p| p.to_string()).unwrap_or_default();
            faults.before(Op::List, &key, None).await.map(|_| prefix)
        })
        .flat_map(move |checked| match checked {
            Ok(prefix) => inner.list(prefix.as_ref()),
            Err(e) => futures::stream::iter([Err(e)]).boxed(),
        })
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let key = prefix.map(|p| p.to_string()).unwrap_or_default();
        self.around(Op::List, &key, self.inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.around(Op::Put, to.as_ref(), self.inner.copy_opts(from, to, options))
            .await
    }
}
