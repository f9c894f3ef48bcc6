//! The `keycast` binary's library half: configuration, logging, and the `serve` lifecycle.
//! `main.rs` only parses the command line and calls in here.
//!
//! # Layout
//! - [`cli`]: `keycast restore` and `keycast replica {status,ls}`.
//! - [`clients_cmd`]: `keycast clients add|list|remove` (registered apps).
//! - [`config`]: defaults → TOML → environment → flags, validated into [`config::Config`].
//! - [`master_key`]: the master key from env, file or a development key; checked at start.
//! - [`rotation`]: `keycast master-key rotate` and the background rotation of `serve`.
//! - [`logging`]: text or Cloud Logging JSON.
//! - [`local_disk`]: refuses a database on a network or FUSE filesystem.
//! - [`serve`]: start-up order, the HTTP server, and graceful shutdown.
//! - [`http_server`]: the accept loop (hyper with a header-read timeout, graceful drain).
//! - [`replication`]: restore-before-serve, the replicator's start, health and stop.

pub mod cli;
pub mod clients_cmd;
pub mod config;
pub mod http_server;
pub mod last_writes;
pub mod local_disk;
pub mod logging;
pub mod master_key;
pub mod replication;
pub mod rotation;
pub mod serve;

pub use serve::run;
