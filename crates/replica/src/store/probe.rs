//! Checking, once at a writer's start, that the store really refuses conditional writes.
//!
//! Two writers are kept from corrupting a replica by the backend alone: LTX files are
//! uploaded create-only (`If-None-Match: *`, or `ifGenerationMatch=0` on GCS) and the lease
//! is replaced by compare-and-swap (`If-Match`, or a generation match). Some S3-compatible
//! servers accept those headers and ignore them, silently turning both into overwrites:
//! fencing is then gone and nothing says so. [`Store::check_conditional_writes`] tries
//! both on a probe object of its own and reports a store that lets the second write through.
//! It does not decide what to do about it (the caller refuses to start, unless told not to).

use bytes::Bytes;
use object_store::ObjectStoreExt;

use super::{PutOutcome, Store, StoreError, UpdateOutcome};

/// What a store did with a write it should have refused.
#[derive(Debug, thiserror::Error)]
pub enum ConditionalWriteError {
    /// The probe itself failed (network, permissions): nothing is known yet.
    #[error("checking that the replica store refuses conflicting writes: {0}")]
    Store(#[from] StoreError),
    /// The store accepted a write its precondition should have refused.
    #[error(
        "the replica store {store} ignores {header}: {what} was accepted, so two instances could \
         overwrite each other's replica files and the single-writer lease would not fence anyone off"
    )]
    Ignored {
        /// [`Store::describe`] of the store.
        store: String,
        /// The precondition that was ignored, as the S3 header names it.
        header: &'static str,
        /// The write that should have been refused.
        what: &'static str,
    },
}

impl Store {
    /// Writes a probe object under `keycast/probe/` twice create-only, then updates it from
    /// a stale version, then copies it create-only twice onto a second name (the path large
    /// objects take: uploaded in parts, then copied into place, `store::stream`), and checks
    /// the store refused the second write each time. The probe objects are deleted afterwards
    /// (a failed delete only leaves a small object behind). Costs nine requests, six one after
    /// another.
    ///
    /// # Errors
    /// `Ignored` naming the store and the ignored precondition; `Store` if a request fails.
    pub async fn check_conditional_writes(&self) -> Result<(), ConditionalWriteError> {
        let id = probe_id();
        let (name, copy) = (
            format!("keycast/probe/{id}.json"),
            format!("keycast/probe/{id}-copy.json"),
        );
        let result = self.probe(&name, &copy).await;
        futures::future::join(self.remove_probe(&name), self.remove_probe(&copy)).await;
        result
    }

    async fn remove_probe(&self, name: &str) {
        let Ok(key) = self.object_key(name) else {
            return;
        };
        self.begin(super::Operation::Delete);
        let _ = self.inner.objects.delete(&key).await;
        // The file backend's compare-and-swap left its lock file beside the object.
        if let Some(root) = &self.inner.root {
            let path = key.parts().fold(root.clone(), |path, part| path.join(part.as_ref()));
            let _ = std::fs::remove_file(path.with_extension("lock"));
        }
    }

    async fn probe(&self, name: &str, copy: &str) -> Result<(), ConditionalWriteError> {
        let ignored = |header, what| ConditionalWriteError::Ignored {
            store: self.describe(),
            header,
            what,
        };
        let first = Bytes::from_static(b"{\"probe\":1}");
        // Refused, it may have met itself: a client that sent it again after an answer it
        // never got (object_store retries a 5xx, even this). Reading it back tells.
        if self.put_object_create(name, first.clone()).await? != PutOutcome::Created
            && !self.holds(name, &first).await?
        {
            // A fresh random name cannot exist: a store that says so is not trustworthy either.
            return Err(ignored(
                "If-None-Match",
                "a create-only write of a new object was refused",
            ));
        }
        let second = self
            .put_object_create(name, Bytes::from_static(b"{\"probe\":2}"))
            .await?;
        if second != PutOutcome::AlreadyExists {
            return Err(ignored(
                "If-None-Match",
                "a second create-only write of the same object",
            ));
        }
        // The updates and the copies touch the object independently: side by side, the check
        // takes no longer on a cold start's critical path than the updates alone.
        let (updated, copied) = tokio::join!(self.probe_update(name), self.probe_copy(name, copy));
        updated?;
        copied
    }

    /// Updates `name` from its current version, then again from that stale version.
    async fn probe_update(&self, name: &str) -> Result<(), ConditionalWriteError> {
        let ignored = |header, what| ConditionalWriteError::Ignored {
            store: self.describe(),
            header,
            what,
        };
        let Some((_, first)) = self.get_object(name).await? else {
            return Err(ignored(
                "If-None-Match",
                "the probe object vanished after being written",
            ));
        };
        let update = Bytes::from_static(b"{\"probe\":3}");
        // Refused, it may have met itself, as above.
        if let UpdateOutcome::Conflict = self.put_object_update(name, update.clone(), &first).await? {
            if !self.holds(name, &update).await? {
                return Err(ignored("If-Match", "an update from the current version was refused"));
            }
        }
        let stale = self
            .put_object_update(name, Bytes::from_static(b"{\"probe\":4}"), &first)
            .await?;
        if stale != UpdateOutcome::Conflict {
            return Err(ignored("If-Match", "an update from a stale version"));
        }
        Ok(())
    }

    /// Whether `name` holds exactly `bytes`.
    async fn holds(&self, name: &str, bytes: &Bytes) -> Result<bool, StoreError> {
        Ok(self.get_object(name).await?.is_some_and(|(stored, _)| stored == *bytes))
    }

    /// Copies `name` create-only onto `copy` twice.
    async fn probe_copy(&self, name: &str, copy: &str) -> Result<(), ConditionalWriteError> {
        let ignored = |header, what| ConditionalWriteError::Ignored {
            store: self.describe(),
            header,
            what,
        };
        let (from, to) = (self.object_key(name)?, self.object_key(copy)?);
        let create = || object_store::CopyOptions {
            mode: object_store::CopyMode::Create,
            ..object_store::CopyOptions::default()
        };
        self.begin(super::Operation::Put);
        self.inner
            .objects
            .copy_opts(&from, &to, create())
            .await
            .map_err(|e| self.failed(super::Operation::Put, &to, e))?;
        self.begin(super::Operation::Put);
        match self.inner.objects.copy_opts(&from, &to, create()).await {
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(()),
            Ok(()) => Err(ignored(
                "If-None-Match",
                "a second create-only copy onto the same object (how objects over 8 MiB are written)",
            )),
            Err(e) => Err(self.failed(super::Operation::Put, &to, e).into()),
        }
    }
}

/// 64 random bits, hex: instances starting together never share a probe object.
fn probe_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random number generator is unavailable");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_store_that_honours_preconditions_passes_and_keeps_nothing() {
        let store = Store::in_memory();
        store.check_conditional_writes().await.unwrap();
        let left: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(store.object_store().list(None))
            .await
            .unwrap();
        assert!(left.is_empty(), "the probe object is deleted: {left:?}");
    }

    /// A healthy store whose answer to a probe write was lost (a 5xx after applying it), so
    /// that the client sent it again and met its own first attempt. Before, the probe took
    /// the refusal of its own retry for a store that ignores preconditions, refused to start,
    /// and told the operator to turn the check off.
    #[tokio::test]
    async fn a_probe_write_that_met_its_own_retry_is_no_ignored_precondition() {
        use crate::faults::{Action, Faults, Op, Rule};
        for body in ["{\"probe\":1}", "{\"probe\":3}"] {
            let faults = Faults::new();
            let store = Store::in_memory().with_faults(&faults);
            faults.add(Rule::new(Op::Put, Action::Twice).body(body).times(1));
            let checked = store.check_conditional_writes().await;
            assert!(checked.is_ok(), "the write of {body} sent twice: {checked:?}");
        }
    }

    #[tokio::test]
    async fn a_file_store_passes_and_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = Store::from_url(&url, &|_| None).unwrap().unwrap();
        store.check_conditional_writes().await.unwrap();
        let probe_dir = dir.path().join("keycast/probe");
        let left: Vec<_> = std::fs::read_dir(&probe_dir).map(|d| d.collect()).unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
    }
}
