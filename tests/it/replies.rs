//! Issue 10, finding 2: a destination's reply is read as sent (no decompression) and
//! at most 64 KiB of it: a gzip bomb or an endless body costs neither memory nor time.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::HeaderValue;
use axum::response::Response;
use futures::StreamExt;

use crate::helpers::canary;
use crate::loopback::*;

/// One gzip member (reqwest refuses extra members) that inflates to `mib` MiB of zeros,
/// about a thousandth of that on the wire: 1 MiB of zeros deflated once, ending in a
/// full flush (byte-aligned, no back-references across it), repeated, then the final
/// block and the trailer.
fn gzip_bomb(mib: usize) -> Vec<u8> {
    use flate2::{Compress, Compression, Crc, FlushCompress};
    let zeros = vec![0u8; 1 << 20];
    let mut deflate = Compress::new(Compression::best(), false);
    let mut chunk = Vec::with_capacity(8 << 10);
    deflate
        .compress_vec(&zeros, &mut chunk, FlushCompress::Full)
        .unwrap();
    assert_eq!(deflate.total_in(), zeros.len() as u64, "one pass");
    let mut last = Vec::with_capacity(64);
    Compress::new(Compression::best(), false)
        .compress_vec(&[], &mut last, FlushCompress::Finish)
        .unwrap();
    let mut crc = Crc::new();
    for _ in 0..mib {
        crc.update(&zeros);
    }
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    for _ in 0..mib {
        out.extend_from_slice(&chunk);
    }
    out.extend_from_slice(&last);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&((mib as u32) << 20).to_le_bytes());
    out
}

/// Runs `command` to its end; returns its exit code and its peak resident set size in
/// KiB: the high-water mark (`VmHWM`) of the binary's own address space, polled every
/// 10 ms. (`wait4`'s `ru_maxrss` would also count the test process's memory, which the
/// child shares between spawning and `exec`.)
fn run_measuring_peak_rss(mut command: std::process::Command, log: &Path) -> (i32, i64) {
    let out = std::fs::File::create(log).unwrap();
    command
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(std::process::Stdio::null());
    let mut child = command.spawn().expect("the binary starts");
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            let hwm = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok());
            peak_kib = peak_kib.max(hwm.unwrap_or(0));
        }
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            return (status.code().unwrap_or(-1), peak_kib);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A destination answering each batch with a 1 GiB gzip bomb (about 1 MB on the wire):
/// the collector neither decompresses it nor reads more than 64 KiB, so its memory stays
/// small and the run quick, and the events still count as delivered (the status said
/// so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_reply_does_not_inflate_the_collector() {
    let key = canary("key");
    let sim = sim(&key, 60).await;
    let bomb = Arc::new(gzip_bomb(1024));
    let destination = Server::spawn(move || {
        let mut response = Response::new(Body::from(bomb.as_ref().clone()));
        response
            .headers_mut()
            .insert("content-encoding", HeaderValue::from_static("gzip"));
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        response
    })
    .await;
    let url = format!("{}/receiver", destination.base);
    let cli = Cli::new(true, &[("FORWARD_FORMAT", "ndjson"), ("FORWARD_URL", &url)]);
    cli.create_ok("b", &sim.base_url(), &key, serde_json::json!({}))
        .await;
    let command = cli.command(&["collect", "--source", "b"]);
    let log = cli.dir.path().join("collect.log");
    let started = std::time::Instant::now();
    let (code, peak_kib) =
        tokio::task::spawn_blocking(move || run_measuring_peak_rss(command, &log))
            .await
            .unwrap();
    let took = started.elapsed();
    let log = std::fs::read_to_string(cli.dir.path().join("collect.log")).unwrap();
    assert_eq!(code, 0, "{log}");
    assert!(
        peak_kib < 200 * 1024,
        "peak RSS {} MiB while reading the destination's replies",
        peak_kib / 1024
    );
    // A build too slow to inflate the bomb within the request timeout (an unoptimised
    // test build) spends that timeout on it instead of the memory: both are the harm.
    assert!(
        took < std::time::Duration::from_secs(15),
        "the collect took {took:?}: the reply was read (and inflated) on"
    );
    assert_eq!(cli.status("b").await["forwarded_total"], 60);
}

/// A destination whose reply never ends: the collector stops reading after 64 KiB instead
/// of reading (and buffering) until the request times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_reply_is_cut_at_64_kib() {
    let key = canary("key");
    let sim = sim(&key, 30).await;
    let destination = Server::spawn(|| {
        let chunk = axum::body::Bytes::from(vec![b'x'; 16 * 1024]);
        let endless = futures::stream::repeat(chunk).map(Ok::<_, std::io::Error>);
        Response::new(Body::from_stream(endless))
    })
    .await;
    let url = format!("{}/receiver", destination.base);
    let cli = Cli::new(
        true,
        &[
            ("FORWARD_FORMAT", "ndjson"),
            ("FORWARD_URL", &url),
            ("RUN_TIMEOUT_SECS", "60"),
        ],
    );
    cli.create_ok("d", &sim.base_url(), &key, serde_json::json!({}))
        .await;
    let started = std::time::Instant::now();
    let ran = cli.run(&["collect", "--source", "d"]).await;
    let took = started.elapsed();
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        took < std::time::Duration::from_secs(15),
        "the collect took {took:?}: the endless reply was read on"
    );
    assert_eq!(cli.status("d").await["forwarded_total"], 30);
}
