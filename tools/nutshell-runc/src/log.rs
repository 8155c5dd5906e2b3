//! `--log` and `--log-format`, as runc's callers read them.
//!
//! containerd's runc shim passes `--log <bundle>/log.json --log-format
//! json` and, when a verb fails, reports the `msg` of the last line whose
//! `level` is `error`, decoding every line as JSON. So each line here is
//! logrus's shape (`{"level","msg","time"}`, level in lower case), not
//! tracing-subscriber's JSON, which names the fields differently and would
//! hide our errors from `docker run`. Text lines follow logrus's text form
//! (`time=… level=… msg="…"`).

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::state::now_rfc3339;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

struct Sink {
    file: Option<Mutex<File>>,
    format: Format,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Opens the log (appending, as runc does) and routes tracing into it;
/// without `--log`, logs go to stderr. `NUTSHELL_LOG` overrides the level
/// (`warn` and ttrpc's `error`, or `debug` with `--debug`).
pub fn init(path: Option<&Path>, format: Format, debug: bool) -> std::io::Result<()> {
    let file = path
        .map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
        })
        .transpose()?;
    let filter = std::env::var("NUTSHELL_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        // ttrpc's client warns "Failed to terminate pending RPC: the
        // request has returned" when a reply wins a benign race. Without
        // `--log`, Podman prints a verb's stderr on the user's terminal.
        .unwrap_or_else(|| EnvFilter::new(if debug { "debug" } else { "warn,ttrpc=error" }));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .event_format(Line { format });
    let installed = match &file {
        Some(f) => builder.with_writer(Mutex::new(f.try_clone()?)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    if installed.is_err() {
        // Only a second init in one process; the first stays.
        return Ok(());
    }
    let _ = SINK.set(Sink {
        file: file.map(Mutex::new),
        format,
    });
    Ok(())
}

/// Reports the error that ends a verb: on stderr, and as an `error` line in
/// the log, where containerd looks for it.
pub fn fatal(message: &str) {
    eprintln!("nutshell-runc: {message}");
    let Some(sink) = SINK.get() else {
        return;
    };
    if let Some(f) = &sink.file {
        let line = render(sink.format, Level::ERROR, message);
        let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
        let _ = f.write_all(line.as_bytes());
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

fn render(format: Format, level: Level, msg: &str) -> String {
    let (time, level) = (now_rfc3339(), level_name(level));
    match format {
        Format::Json => format!(
            "{}\n",
            serde_json::json!({ "level": level, "msg": msg, "time": time })
        ),
        Format::Text => format!("time={time:?} level={level} msg={msg:?}\n"),
    }
}

/// One event as one logrus-shaped line: the message, then `key=value`.
struct Line {
    format: Format,
}

#[derive(Default)]
struct Message(String, String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.1, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.1, " {}={value}", field.name());
        }
    }
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut m = Message::default();
        event.record(&mut m);
        let msg = format!("{}{}", m.0, m.1);
        writer.write_str(&render(self.format, *event.metadata().level(), &msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_logrus_keys() {
        let j: serde_json::Value =
            serde_json::from_str(&render(Format::Json, Level::ERROR, "bad \"x\"")).unwrap();
        assert_eq!(j["level"], "error");
        assert_eq!(j["msg"], "bad \"x\"");
        assert!(j["time"].as_str().unwrap().ends_with('Z'));
        let t = render(Format::Text, Level::WARN, "a b");
        assert!(t.contains("level=warning msg=\"a b\""), "{t}");
    }
}
