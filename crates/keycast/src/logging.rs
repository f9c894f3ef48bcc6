//! Log output: human-readable text on a terminal, or JSON lines that Google Cloud Logging
//! parses into structured entries (`severity`, `message`, `timestamp`), chosen by
//! `KEYCAST_LOG_FORMAT`. Logs go to stderr; stdout carries only the "listening on" line.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Libraries whose lines carry what remote relays and clients send, whole and unescaped: the
/// relay pool logs at ERROR each message a relay sends that it cannot handle, message and all,
/// and a close frame's reason at INFO; the embedded relay logs each broken connection. Any
/// relay an app names could write lines of its choosing into the log (a forged alert, terminal
/// escapes) and as many bytes as it sends. Off unless `KEYCAST_LOG` names them; keycast says
/// what matters itself (reconnects, relays cut off, refusals), escaped and rate-bounded.
const QUIETED: [&str; 2] = ["nostr_relay_pool", "nostr_relay_builder"];

/// Installs the global subscriber. `filter` uses `tracing`'s directive syntax (`info`,
/// `keycast=debug,sqlx=warn`).
pub fn init(format: LogFormat, filter: &str) {
    let mut directives = filter.to_owned();
    for target in QUIETED.iter().filter(|target| !filter.contains(*target)) {
        directives.push_str(&format!(",{target}=off"));
    }
    let filter = EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| EnvFilter::new(format!("info{}", &directives[filter.len()..])));
    // Colours only on a terminal: escape codes in a log file or a pipe are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.event_format(CloudJson).try_init(),
    };
}

/// One JSON object per event, with Cloud Logging's field names.
struct CloudJson;

impl<S, N> FormatEvent<S, N> for CloudJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut fields = FieldMap::default();
        event.record(&mut fields);
        let mut entry = Map::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        entry.insert(
            "timestamp".into(),
            serde_json::json!({ "seconds": now.as_secs(), "nanos": now.subsec_nanos() }),
        );
        entry.insert("severity".into(), severity(*event.metadata().level()).into());
        entry.insert(
            "message".into(),
            fields.0.remove("message").unwrap_or(Value::String(String::new())),
        );
        entry.insert("target".into(), event.metadata().target().into());
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope.from_root().map(|span| Value::from(span.name())).collect();
            entry.insert("spans".into(), spans.into());
        }
        if !fields.0.is_empty() {
            entry.insert("fields".into(), Value::Object(fields.0));
        }
        writeln!(writer, "{}", Value::Object(entry))
    }
}

/// Cloud Logging's `LogSeverity` names.
fn severity(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

#[derive(Default)]
struct FieldMap(Map<String, Value>);

impl Visit for FieldMap {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}
