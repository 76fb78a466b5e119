//! Standard output: the events as NDJSON lines, for local runs and piping into other tools.
//!
//! Writes go through one locked, buffered handle per `send` and are flushed before `send`
//! returns, so a successful `send` means the lines reached the process's stdout.
//!
//! When the command line gives stdout to a JSON report (`collect --json`), it first
//! [`redirect`]s the events elsewhere (stderr or a file), so stdout holds one JSON document.

use std::io::{BufWriter, Write};
use std::sync::{Mutex, OnceLock};

use super::{SendReport, ndjson};
use crate::domain::event::RawEvent;
use crate::error::Error;

/// Where the events go instead of stdout, once redirected (for the whole process).
static REDIRECT: OnceLock<Mutex<Box<dyn Write + Send>>> = OnceLock::new();

/// Sends the events of the `stdout` destination to `out` instead of stdout, for the rest
/// of the process. Only the first call has an effect; returns whether it did.
pub fn redirect(out: Box<dyn Write + Send>) -> bool {
    REDIRECT.set(Mutex::new(out)).is_ok()
}

/// Writes every event to stdout (or where it was [`redirect`]ed) and flushes.
pub(crate) fn send(events: &[RawEvent]) -> Result<SendReport, Error> {
    let written = match REDIRECT.get() {
        Some(target) => {
            let mut target = target.lock().unwrap_or_else(|e| e.into_inner());
            let mut out = BufWriter::with_capacity(64 * 1024, &mut **target);
            write_events(&mut out, events).and_then(|bytes| out.flush().map(|()| bytes))
        }
        None => {
            let stdout = std::io::stdout();
            let mut out = BufWriter::with_capacity(64 * 1024, stdout.lock());
            write_events(&mut out, events).and_then(|bytes| out.flush().map(|()| bytes))
        }
    };
    let bytes = written.map_err(|err| Error::Destination {
        message: format!("writing the events failed ({:?})", err.kind()),
        status: None,
    })?;
    Ok(SendReport {
        events: events.len(),
        requests: 0,
        bytes,
        retries: 0,
    })
}

/// Writes the events as NDJSON lines to `out`; returns the number of bytes written.
fn write_events(out: &mut impl Write, events: &[RawEvent]) -> std::io::Result<usize> {
    // One line buffer reused for every event keeps the CR/LF rule in one place.
    let mut line = Vec::with_capacity(4096);
    let mut bytes = 0;
    for event in events {
        line.clear();
        ndjson::write_line(event, &mut line);
        out.write_all(&line)?;
        bytes += line.len();
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::tests::events;

    #[test]
    fn writes_one_line_per_event() {
        let batch = events(3, 10);
        let mut out = Vec::new();
        let bytes = write_events(&mut out, &batch).unwrap();
        let expected: String = batch.iter().map(|e| format!("{}\n", e.as_json())).collect();
        assert_eq!(out, expected.as_bytes());
        assert_eq!(bytes, expected.len());
    }
}
