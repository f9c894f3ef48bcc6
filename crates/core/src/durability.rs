//! Waiting for a commit to be durable beyond the local disk (the replica). The binary
//! implements [`Durability`] over the replicator; each transport calls it after writes
//! that must never be lost (who may sign), before it answers.

/// Makes commits durable beyond the local disk (the replica).
pub trait Durability: Send + Sync {
    /// Resolves once every commit made before the call is in the replica.
    /// `Err(reason)` on timeout, store failure or fencing: the write must be reported as not durable.
    fn wait_durable(&self) -> BoxFuture<'_, Result<(), String>>;

    /// Resolves `Ok` if this instance may accept a write now; `Err(reason)` when it must not
    /// (fenced: another instance owns the replica).
    fn check_writable(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// A boxed future, as the object-safe traits here return.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
