//! Outgoing mail (email verification, password reset).
//!
//! There is no SMTP transport yet: every message goes to an in-memory development
//! [`Outbox`]. Each message is logged at info with its recipient and subject only, never
//! its body (which carries a single-use token). Tests read the outbox through
//! `GET /api/test/outbox` (test routes only).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Messages kept; older ones are dropped first.
pub const OUTBOX_CAPACITY: usize = 200;

/// One message.
#[derive(Debug, Clone, Serialize)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    /// Contains the link with the token: never log it.
    pub body: String,
    /// What the mail is for: `verify_email` or `reset_password`.
    pub purpose: &'static str,
    /// The raw token, so tests need not parse the body.
    pub token: String,
}

/// The development outbox. Cheap to share (inside `AppState`).
#[derive(Debug, Default)]
pub struct Outbox {
    messages: Mutex<VecDeque<Mail>>,
}

impl Outbox {
    /// Queues `mail`, logging recipient and subject.
    pub fn send(&self, mail: Mail) {
        tracing::info!(to = %mail.to, subject = %mail.subject, "mail queued in the development outbox (no SMTP configured)");
        let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if messages.len() == OUTBOX_CAPACITY {
            messages.pop_front();
        }
        messages.push_back(mail);
    }

    /// Every queued message, oldest first.
    pub fn messages(&self) -> Vec<Mail> {
        self.messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}
