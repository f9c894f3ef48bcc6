//! The `keycast` binary's library half: configuration, logging, and the `serve` lifecycle.
//! `main.rs` only parses the command line and calls in here.
//!
//! # Layout
//! - [`config`]: defaults → TOML → environment → flags, validated into [`config::Config`].
//! - [`logging`]: text or Cloud Logging JSON.
//! - [`serve`]: start-up order, the HTTP server, and graceful shutdown.

pub mod config;
pub mod logging;
pub mod serve;

pub use serve::run;
