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

    /// Resolves `false` once this instance is known not to be the one that writes: it
    /// handed the replica over, stepped aside (its lease lapsed while idle and another
    /// instance took it, which a lease due for renewal is renewed to find out), or was
    /// fenced. `true` otherwise, a lease that cannot be confirmed right now included (the
    /// store is out: signing goes on). During a deploy both instances hear every NIP-46
    /// request on the relays, and the one that handed over knows nothing of what changed
    /// since (a revocation, signatures counted against a limit): only the writer answers.
    fn is_writer(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

/// A boxed future, as the object-safe traits here return.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
