//! Per-event CPU cost of the collector's hot path, measured with criterion:
//! - `parse_page`: one realistic 100-event `GET /events` body, as the simulator serves it
//!   (the simulator's event JSON: user, risk, metadata, escaped and non-ASCII text);
//! - the `Walker` on a first run of 10 and of 100 such pages, with the snapshot the
//!   collector saves after each flush of 1,000 events (the longer walk shows whether the
//!   cost per event grows with the length of a walk);
//! - the destination path: NDJSON encoding and gzip exactly as `sink::http` builds a batch
//!   (the encoder is crate-private, so it is mirrored here: each event's raw JSON plus
//!   `\n`, gzip at `Compression::fast()`), the same at the default level for comparison,
//!   and end to end through `Destination::send` (format `sumo`) to a loopback HTTP
//!   endpoint that discards the body. `RecordingSink` is not used there because it keeps
//!   and decodes every event, which would grow without bound across criterion's
//!   iterations and bill the sink's own gunzip and JSON decoding to the collector.
//!
//! Throughput is reported in events. `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use flate2::Compression;
use flate2::write::GzEncoder;
use knowbe4_source::domain::checkpoint::{Checkpoint, Page, Step, Walker};
use knowbe4_source::knowbe4::parse_page;
use knowbe4_source::sink::{Destination, DestinationConfig, Format, SourceMeta};
use knowbe4_source::testkit::sim::{SimConfig, Simulator};
use knowbe4_source::{EventTime, RawEvent};
use secrecy::SecretString;
use time::OffsetDateTime;

/// Pages per collector flush (`FLUSH_EVENTS` = 1,000 events).
const WALK_PAGES: u32 = 10;
/// Pages of the long first-run walk.
const LONG_WALK_PAGES: u32 = 100;
/// The simulator's key.
const KEY: &str = "bench-key";
/// Hours the simulator spreads its events over.
const SPAN_HOURS: u64 = 24;

/// Bodies of pages 1..=`pages` as the simulator serves them (100 events each: the
/// reading where `per_page=100` is honoured, so per-event costs compare with earlier
/// runs; the walker's cost per event does not depend on the page size).
fn page_bodies(rt: &tokio::runtime::Runtime, pages: u32) -> Vec<Vec<u8>> {
    rt.block_on(async {
        let sim = Simulator::spawn(SimConfig {
            api_key: KEY.into(),
            events: pages as usize * 100,
            span_hours: SPAN_HOURS,
            enforce_rate_limit: false,
            reading: knowbe4_source::testkit::sim::Reading {
                max_per_page: 100,
                ..Default::default()
            },
            ..SimConfig::default()
        })
        .await
        .expect("simulator starts");
        let http = reqwest::Client::new();
        let mut bodies = Vec::new();
        for page in 1..=pages {
            let body = http
                .get(format!("{}/events", sim.base_url()))
                .query(&[("page", page.to_string()), ("per_page", "100".to_string())])
                .bearer_auth(KEY)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .expect("simulator answers")
                .bytes()
                .await
                .expect("body");
            bodies.push(body.to_vec());
        }
        sim.shutdown().await;
        bodies
    })
}

/// A first run over `pages` (the whole list: the last page ends the walk), with a
/// snapshot after every `WALK_PAGES` pages as the collector's flushes take one.
fn walk(pages: Vec<Vec<RawEvent>>, now: EventTime, total: usize) -> Checkpoint {
    let mut walker = Walker::new(Checkpoint::default(), now, (SPAN_HOURS + 1) * 3600, 3600);
    let count = Some(total as u64);
    let last_page = pages.len() as u32;
    let mut delivered = 0;
    let mut snapshot = Checkpoint::default();
    for (i, events) in pages.into_iter().enumerate() {
        let page_no = i as u32 + 1;
        assert_eq!(walker.next_step(), Step::Fetch(page_no));
        let last = page_no == last_page;
        delivered += walker
            .on_page(
                page_no,
                Page {
                    events,
                    count,
                    more: Some(!last),
                    ..Page::default()
                },
            )
            .expect("well formed")
            .len();
        if page_no.is_multiple_of(WALK_PAGES) || last {
            snapshot = walker.snapshot();
        }
    }
    assert_eq!(delivered, total);
    black_box(snapshot)
}

/// The NDJSON body `sink::http` builds for a batch: raw JSON, `\n` after each event.
fn ndjson(events: &[RawEvent], out: &mut Vec<u8>) {
    for event in events {
        out.extend_from_slice(event.as_json().as_bytes());
        out.push(b'\n');
    }
}

/// Gzip as `sink::http::gzip` does it, at `level`.
fn gzip(body: &[u8], level: Compression) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 4 + 64), level);
    encoder.write_all(body).expect("in memory");
    encoder.finish().expect("in memory")
}

/// A loopback HTTP endpoint that reads each body and answers 200; returns its URL.
async fn discard_sink() -> String {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("address");
    let app = axum::Router::new()
        .fallback(|body: axum::body::Bytes| async move {
            black_box(body.len());
            "ok"
        })
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/receiver/v1/http/bench-token")
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bodies = page_bodies(&rt, 1);
    let first = &bodies[0];
    let sample = parse_page(first, 1).expect("the simulator's page parses");
    assert_eq!(sample.events.len(), 100);
    println!(
        "page body: {} bytes for {} events ({} bytes/event)",
        first.len(),
        sample.events.len(),
        first.len() / sample.events.len()
    );

    let mut group = c.benchmark_group("knowbe4");
    group.throughput(Throughput::Elements(100));
    group.bench_function("parse_page_100_events", |b| {
        b.iter(|| parse_page(black_box(first), 1).expect("parses"))
    });
    group.finish();

    // The walker: pages in order with the snapshot the collector saves after each flush
    // (every 1,000 events): one flush (10 pages), and a 10,000-event first run (100 pages,
    // ten flushes), to show how the cost per event grows with the length of a head walk.
    let now = EventTime::from_datetime(OffsetDateTime::now_utc());
    let long: Vec<Vec<RawEvent>> = page_bodies(&rt, LONG_WALK_PAGES)
        .iter()
        .zip(1..)
        .map(|(body, page_no)| parse_page(body, page_no).expect("parses").events)
        .collect();
    let mut group = c.benchmark_group("walker");
    for (name, pages) in [
        (
            "first_run_10_pages_1_snapshot",
            &long[..WALK_PAGES as usize],
        ),
        ("first_run_100_pages_10_snapshots", &long[..]),
    ] {
        let events: usize = pages.iter().map(Vec::len).sum();
        group.throughput(Throughput::Elements(events as u64));
        group.bench_function(name, |b| {
            b.iter_batched(
                || pages.to_vec(),
                |pages| walk(pages, now, events),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
    let pages: Vec<Vec<RawEvent>> = long[..WALK_PAGES as usize].to_vec();

    // The destination: encode, gzip, send.
    let batch: Vec<RawEvent> = pages.concat();
    let mut body = Vec::new();
    ndjson(&batch, &mut body);
    let fast = gzip(&body, Compression::fast());
    let default = gzip(&body, Compression::default());
    println!(
        "batch of {} events: NDJSON {} bytes, gzip fast {} bytes ({:.1}x), gzip default {} bytes ({:.1}x)",
        batch.len(),
        body.len(),
        fast.len(),
        body.len() as f64 / fast.len() as f64,
        default.len(),
        body.len() as f64 / default.len() as f64
    );
    let mut group = c.benchmark_group("sink");
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("ndjson_encode_1000_events", |b| {
        let mut out = Vec::with_capacity(body.len());
        b.iter(|| {
            out.clear();
            ndjson(black_box(&batch), &mut out);
            out.len()
        })
    });
    group.bench_function("ndjson_encode_and_gzip_fast_1000_events", |b| {
        let mut out = Vec::with_capacity(body.len());
        b.iter(|| {
            out.clear();
            ndjson(black_box(&batch), &mut out);
            gzip(&out, Compression::fast()).len()
        })
    });
    group.bench_function("ndjson_encode_and_gzip_default_1000_events", |b| {
        let mut out = Vec::with_capacity(body.len());
        b.iter(|| {
            out.clear();
            ndjson(black_box(&batch), &mut out);
            gzip(&out, Compression::default()).len()
        })
    });
    let url = rt.block_on(discard_sink());
    let destination = Destination::new(
        DestinationConfig {
            format: Format::Sumo,
            url: Some(SecretString::from(url)),
            token: None,
        },
        reqwest::Client::new(),
    )
    .expect("valid destination");
    let meta = SourceMeta {
        name: "bench".into(),
        category: Some("security/knowbe4".into()),
        siem_forward: true,
        ..SourceMeta::default()
    };
    group.bench_function("destination_send_sumo_loopback_1000_events", |b| {
        b.iter(|| {
            rt.block_on(async {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                destination
                    .send(&meta, black_box(&batch), deadline)
                    .await
                    .expect("accepted")
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = hot_path;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(hot_path);
