//! Signs of life during long collections.
//!
//! On a terminal (the command line with stderr a terminal), one line on stderr that is
//! redrawn after every page and erased when the run ends. Everywhere else (pipes, files,
//! Lambda), a structured log record, `Collection in progress.`, after every
//! `PROGRESS_EVERY_PAGES` pages a run reads (default [`DEFAULT_EVERY_PAGES`]; `0` turns
//! the records off): pages, events fetched and forwarded, KnowBe4 requests sent, pages
//! per second (requests are paced at 4 per second at most) and the requests left today.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::time::Instant;

/// Pages between two progress records off a terminal, unless `PROGRESS_EVERY_PAGES` says.
pub const DEFAULT_EVERY_PAGES: u64 = 20;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A line on stderr, redrawn in place and erased at the end (a terminal).
    Line,
    /// A structured log record every so many pages (`0`: never).
    Records {
        /// Pages between two records.
        every_pages: u64,
    },
}

static MODE: OnceLock<Mode> = OnceLock::new();
/// Whether a progress line is on screen (the log writer erases it before a log line).
static LINE_SHOWN: AtomicBool = AtomicBool::new(false);

impl Mode {
    /// A line when stderr is a terminal and logs are for people; records otherwise.
    pub fn detect(json_logs: bool) -> Mode {
        if std::io::stderr().is_terminal() && !json_logs {
            Mode::Line
        } else {
            Mode::records_from_env()
        }
    }

    /// Records, every `PROGRESS_EVERY_PAGES` pages.
    pub fn records_from_env() -> Mode {
        let every_pages = std::env::var("PROGRESS_EVERY_PAGES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_EVERY_PAGES);
        Mode::Records { every_pages }
    }
}

/// Sets the process's progress mode (once, from the entry point); Lambda and library
/// users get records.
pub fn set_mode(mode: Mode) {
    let _ = MODE.set(mode);
}

fn mode() -> Mode {
    *MODE.get_or_init(Mode::records_from_env)
}

/// Erases the progress line if one is shown, so a log line can take its place.
pub fn erase_line(out: &mut impl Write) {
    if LINE_SHOWN.swap(false, Ordering::SeqCst) {
        let _ = out.write_all(b"\r\x1b[2K");
    }
}

/// One run's progress. Dropping it erases the line.
pub struct Progress {
    /// The source, named in every record.
    source_id: String,
    /// How to show it (fixed for the run).
    mode: Mode,
    /// For the request rate.
    started: Instant,
    /// Requests left today when the run started; the run's own requests come off it.
    quota_left_at_start: u32,
}

/// What a run has done so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// Pages read.
    pub pages: u64,
    /// Events received that were not duplicates.
    pub fetched: u64,
    /// Events the destination accepted.
    pub forwarded: u64,
    /// KnowBe4 requests sent.
    pub requests: u32,
}

impl Progress {
    /// Starts reporting a run of `source_id` with `quota_left` requests left today.
    pub fn new(source_id: &str, quota_left: u32) -> Progress {
        Progress {
            source_id: source_id.to_string(),
            mode: mode(),
            started: Instant::now(),
            quota_left_at_start: quota_left,
        }
    }

    /// Called after every page the run reads.
    pub fn page(&mut self, counts: Counts) {
        let secs = self.started.elapsed().as_secs_f64();
        // Pages answered, not requests issued: requests are reserved ahead of the pacer.
        let rate = if secs > 0.0 {
            counts.pages as f64 / secs
        } else {
            0.0
        };
        let left = self.quota_left_at_start.saturating_sub(counts.requests);
        match self.mode {
            Mode::Line => {
                let line = format!(
                    "\r\x1b[2K{}: {} pages ({rate:.1}/s, paced at 4 requests/s at most), {} events fetched, {} forwarded, {} requests, {left} left today",
                    self.source_id, counts.pages, counts.fetched, counts.forwarded, counts.requests
                );
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(line.as_bytes());
                let _ = err.flush();
                LINE_SHOWN.store(true, Ordering::SeqCst);
            }
            Mode::Records { every_pages } => {
                if every_pages > 0 && counts.pages.is_multiple_of(every_pages) {
                    tracing::info!(
                        source_id = %self.source_id,
                        pages = counts.pages,
                        fetched = counts.fetched,
                        forwarded = counts.forwarded,
                        requests = counts.requests,
                        pages_per_second = (rate * 10.0).round() / 10.0,
                        quota_left = left,
                        elapsed_ms = self.started.elapsed().as_millis() as u64,
                        "Collection in progress."
                    );
                }
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.mode == Mode::Line {
            let mut err = std::io::stderr().lock();
            erase_line(&mut err);
            let _ = err.flush();
        }
    }
}
