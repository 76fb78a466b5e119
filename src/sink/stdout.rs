//! Standard output: the events as NDJSON lines, for local runs and piping into other tools.
//!
//! Writes go through one locked, buffered handle per `send` and are flushed before `send`
//! returns, so a successful `send` means the lines reached the process's stdout.

use std::io::{BufWriter, Write};

use super::{SendReport, ndjson};
use crate::error::Error;
use crate::event::RawEvent;

/// Writes every event to stdout and flushes.
pub(crate) fn send(events: &[RawEvent]) -> Result<SendReport, Error> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(64 * 1024, stdout.lock());
    let bytes = write_events(&mut out, events)
        .and_then(|bytes| out.flush().map(|()| bytes))
        .map_err(|err| Error::Destination {
            message: format!("writing to stdout failed ({:?})", err.kind()),
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
