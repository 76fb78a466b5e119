#!/usr/bin/env bash
# Benchmarks of knowbe4-source against the bundled simulator, on loopback only.
#
#   bash bench/run.sh                      # everything: ~6 minutes once built
#   SKIP_CARGO_BENCH=1 bash bench/run.sh   # without the two `cargo bench` targets
#   DRAIN_ONLY=1 bash bench/run.sh         # only the rate-bound drains (~8 minutes)
#
# Builds the release binaries, then for each scenario starts `knowbe4-sim` on a free
# 127.0.0.1 port (`--port 0`), creates a source in a fresh local state file and runs
# `knowbe4-source collect --source bench` against it:
#   1. rate-bound draining: 200 pages at 800 ms latency, pipelined (default) under every
#      reading of the API's unconfirmed paging details (count per page / per list /
#      absent, cap 50 / 100, total_pages and limit_value sent or not), and one request
#      at a time (KNOWBE4_MAX_IN_FLIGHT=1) under the recorded reading;
#   2. bounded memory and CPU per event: 200,000 events in one run, no rate limit,
#      KNOWBE4_SIM_REQUEST_SPACING_MS=1, under /usr/bin/time -v, events to stdout
#      (/dev/null) and then to a `sumo` destination (a loopback HTTP server in Python
#      that reads and discards each body);
#   3. cold start: stripped binary size, process start to the first KnowBe4 request;
#   4. `cargo bench --bench day_simulation` and `cargo bench --bench hot_path`.
# Prints one markdown table on stdout (progress on stderr). Every process it starts is
# stopped on exit (trap). Needs bash, curl, python3, /usr/bin/time, strip.
#
# The first `cargo bench` after a `cargo build --release` compiles the dependency tree a
# second time (the dev-dependencies change feature unification): ~15-20 minutes on 2
# cores, once. Later runs reuse it.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Cargo's target directory (honours CARGO_TARGET_DIR and .cargo/config).
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
BIN="$TARGET_DIR/release"
KEY="bench-key"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/knowbe4-bench.XXXXXX")"
PIDS=()
# The simulator is on loopback: allow it as the KnowBe4 base URL (create and collect).
export KNOWBE4_ALLOW_CUSTOM_BASE_URL=1
export RUN_TIMEOUT_SECS=900

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now_ms() { date +%s%3N; }
py() { python3 -c "$1"; }
trim() {
    local v="$*"
    v="${v#"${v%%[![:space:]]*}"}"
    printf '%s' "${v%"${v##*[![:space:]]}"}"
}

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }

# --- helpers -------------------------------------------------------------------------

# start_sim NAME ARGS...: starts the simulator on a free port; sets SIM_PID and BASE.
start_sim() {
    local name="$1" i
    shift
    "$BIN/knowbe4-sim" --port 0 --api-key "$KEY" "$@" \
        >"$WORK/$name.sim.out" 2>"$WORK/$name.sim.err" &
    SIM_PID=$!
    PIDS+=("$SIM_PID")
    BASE=""
    for i in $(seq 1 600); do # up to 60 s (200,000 events take a moment to generate)
        BASE="$(sed -n 's/^knowbe4-sim listening on //p' "$WORK/$name.sim.out" 2>/dev/null || true)"
        [[ -n "$BASE" ]] && return 0
        kill -0 "$SIM_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "the simulator did not start:"
    cat "$WORK/$name.sim.err" >&2
    exit 1
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# create_source NAME: a fresh state file with source "bench" on $BASE.
create_source() {
    local name="$1"
    export STATE_FILE="$WORK/$name.state.json"
    cat >"$WORK/$name.source.json" <<EOF
{"api.version":"v1","source":{"config":{"name":"bench","baseURL":"$BASE","apiKey":"$KEY",
 "dailyRequestLimit":1000000,"firstFetchLookbackHours":2000},
 "schemaRef":{"type":"KnowBe4"},"sourceType":"Universal"}}
EOF
    "$BIN/knowbe4-source" sources create --file "$WORK/$name.source.json" --id bench \
        >/dev/null 2>>"$WORK/create.log"
}

# collect NAME [ENV=VALUE...]: one `collect` of source "bench" with events to stdout
# (/dev/null) unless the environment says otherwise, under /usr/bin/time -v; the JSON
# log goes to $WORK/NAME.collect.err. Sets WALL_MS.
collect() {
    local name="$1" start pid
    shift
    start="$(now_ms)"
    env FORWARD_FORMAT=stdout LOG_FORMAT=json RUST_LOG=info "$@" \
        /usr/bin/time -v -o "$WORK/$name.time" \
        "$BIN/knowbe4-source" collect --source bench --json --events-file /dev/null \
        >/dev/null 2>"$WORK/$name.collect.err" &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || log "collect $name exited non-zero"
    WALL_MS=$(($(now_ms) - start))
}

# report NAME FIELD: a field of the run report that `collect` logs ("Run finished.").
report() {
    python3 - "$WORK/$1.collect.err" "$2" <<'EOF'
import json, sys
report = None
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    fields = entry.get("fields", entry) if isinstance(entry, dict) else {}
    if "run_summary" in fields:
        report = json.loads(fields["run_summary"])
print(report.get(sys.argv[2]) if report else "n/a")
EOF
}

# usage NAME: "peak_rss_kb user_s sys_s" from /usr/bin/time -v.
usage() {
    python3 - "$WORK/$1.time" <<'EOF'
import sys
v = {}
for line in open(sys.argv[1]):
    key, sep, val = line.strip().rpartition(": ")
    if sep:
        v[key] = val
print(v["Maximum resident set size (kbytes)"], v["User time (seconds)"], v["System time (seconds)"])
EOF
}

# sim_stat FIELD: a counter of the running simulator.
sim_stat() {
    curl -sf "$BASE/_sim/stats" | py "import json,sys; print(json.load(sys.stdin)['$1'])"
}

secs() { py "print(f'{$1/1000:.1f}')"; }

# --- build ---------------------------------------------------------------------------

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
SCRIPT_START="$(now_ms)"
log "cargo build --release --bins, and knowbe4-sim with the testkit feature"
cargo build --release --bins >&2
cargo build --release --features testkit --bin knowbe4-sim >&2
SPACING_MS="$(sed -n 's/.*REQUEST_SPACING: Duration = Duration::from_millis(\([0-9]*\)).*/\1/p' src/knowbe4/events.rs)"
SPACING_MS="${SPACING_MS:-260}"

# --- 1. rate-bound draining ----------------------------------------------------------

P=200
LATENCY=800
# Every reading of the API's unconfirmed paging details (see src/testkit/sim/mod.rs `Reading`):
# the drain must hold its target under each. P pages of whatever size the reading serves.
READINGS=(
    "count=page cap=50|--count-mode page --max-per-page 50"
    "count=total cap=50|--count-mode total --max-per-page 50"
    "count=page cap=100|--count-mode page --max-per-page 100"
    "count=total cap=100|--count-mode total --max-per-page 100"
    "count=page cap=50, no total_pages|--count-mode page --max-per-page 50 --no-total-pages"
    "no count, cap=100, no total_pages, no limit_value|--count-mode absent --max-per-page 100 --no-total-pages --no-limit-value"
)
DRAINS=()
for reading in "${READINGS[@]}"; do
    DRAINS+=("pipelined|$reading")
done
DRAINS+=("one-at-a-time|${READINGS[0]}")
for drain in "${DRAINS[@]}"; do
    IFS='|' read -r mode label args <<<"$drain"
    cap="$(sed -n 's/.*--max-per-page \([0-9]*\).*/\1/p' <<<"$args")"
    events=$((P * cap))
    name="rate-$mode-$(tr -c 'a-z0-9' '-' <<<"$label")"
    log "rate-bound draining: $P pages ($events events), $LATENCY ms latency, $mode, $label"
    # shellcheck disable=SC2086
    start_sim "$name" --events "$events" --latency-ms "$LATENCY" --span-hours 48 $args
    create_source "$name"
    if [[ $mode == pipelined ]]; then
        collect "$name"
    else
        collect "$name" KNOWBE4_MAX_IN_FLIGHT=1
    fi
    dur="$(report "$name" duration_ms)"
    fwd="$(report "$name" forwarded)"
    req="$(report "$name" requests)"
    sim_req="$(sim_stat requests)"
    viol="$(sim_stat rate_violations)"
    gaps="$(curl -sf "$BASE/_sim/requests" | py "
import json, sys
t = [r['at_ms'] for r in json.load(sys.stdin)]
g = sorted(b - a for a, b in zip(t, t[1:]))
print(f'median gap between requests {g[len(g)//2]} ms, first to last request {(t[-1]-t[0])/1000:.1f} s' if g else 'n/a')")"
    stop_pid "$SIM_PID"
    if [[ $mode == pipelined ]]; then
        target="≤ 1.1 × P/4 = $(py "print(f'{1.1*$P/4:.1f}')") s (floor at ${SPACING_MS} ms spacing, page 1 answered before the pipeline starts: $(py "print(f'{(($P-2)*$SPACING_MS+2*$LATENCY)/1000:.2f}')") s)"
    else
        target="≈ P × 0.8 = $(py "print(f'{$P*$LATENCY/1000:.1f}')") s (+ pacing)"
    fi
    row "Rate-bound drain, P=$P pages ($events events), $LATENCY ms latency, $mode; reading: $label" \
        "**$(secs "$dur") s** (run report duration_ms; process wall $(secs "$WALL_MS") s)" \
        "$target" \
        "$req requests by the run, $sim_req seen by the sim ($viol over 4/s); $fwd events forwarded; $gaps"
done

if [[ -n "${DRAIN_ONLY:-}" ]]; then
    printf '%s\n' "| scenario | result | target | detail |" "|---|---|---|---|" "${ROWS[@]}"
    exit 0
fi

# --- 2. bounded memory and CPU per event ---------------------------------------------

BIG=200000
log "memory and CPU: $BIG events, no rate limit, 1 ms spacing"
start_sim mem --events "$BIG" --no-rate-limit --span-hours 720

# A `sumo` destination on loopback that reads each body and answers 200.
cat >"$WORK/sink.py" <<'EOF'
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(f"http://127.0.0.1:{server.server_address[1]}/receiver/v1/http/bench-token", flush=True)
server.serve_forever()
EOF
python3 "$WORK/sink.py" >"$WORK/sink.out" 2>"$WORK/sink.err" &
SINK_PID=$!
PIDS+=("$SINK_PID")
SINK_URL=""
for i in $(seq 1 100); do
    SINK_URL="$(head -n1 "$WORK/sink.out" 2>/dev/null || true)"
    [[ -n "$SINK_URL" ]] && break
    sleep 0.1
done
[[ -n "$SINK_URL" ]] || { log "the sink did not start"; exit 1; }

for variant in stdout sumo; do
    create_source "mem-$variant"
    if [[ $variant == stdout ]]; then
        collect "mem-$variant" KNOWBE4_SIM_REQUEST_SPACING_MS=1
        label="stdout → /dev/null"
    else
        collect "mem-$variant" KNOWBE4_SIM_REQUEST_SPACING_MS=1 \
            FORWARD_FORMAT=sumo FORWARD_URL="$SINK_URL"
        label="sumo → loopback sink (gzip + HTTP)"
    fi
    read -r rss_kb user sys < <(usage "mem-$variant")
    fwd="$(report "mem-$variant" forwarded)"
    req="$(report "mem-$variant" requests)"
    dur="$(report "mem-$variant" duration_ms)"
    detail="$(report "mem-$variant" detail)"
    read -r rss_mb cpu cpu_100k us_event eps < <(py "
rss = $rss_kb / 1024; cpu = $user + $sys; fwd = max($fwd, 1); dur = max($dur, 1) / 1000
print(f'{rss:.1f} {cpu:.2f} {cpu * 100000 / fwd:.2f} {cpu * 1e6 / fwd:.1f} {fwd / dur:.0f}')")
    row "Memory, $BIG events in one run, $label" \
        "**peak RSS $rss_mb MB**" "< 64 MB" \
        "forwarded $fwd of $BIG ($detail), $req requests"
    row "CPU per event, same run ($label)" \
        "**$cpu_100k CPU-s per 100,000 events** ($us_event µs/event; user+sys $cpu s)" \
        "a few µs per event" \
        "user $user s, sys $sys s; $eps events/s over the run's $(secs "$dur") s (process wall $(secs "$WALL_MS") s)"
done
stop_pid "$SINK_PID"
stop_pid "$SIM_PID"

# --- 3. cold start -------------------------------------------------------------------

log "cold start"
cp "$BIN/knowbe4-source" "$WORK/knowbe4-source.stripped"
strip "$WORK/knowbe4-source.stripped"
size_mb="$(py "import os; print(f'{os.path.getsize(\"$WORK/knowbe4-source.stripped\")/1048576:.1f}')")"
full_mb="$(py "import os; print(f'{os.path.getsize(\"$BIN/knowbe4-source\")/1048576:.1f}')")"
row "Binary size, knowbe4-source (stripped copy)" "**$size_mb MB**" "—" "as built: $full_mb MB"

start_sim cold --events 1000 --span-hours 24
# first_request_ms NAME: ms from just before spawning `collect` to the sim's next request.
first_request_ms() {
    local seen before first pid
    seen="$(curl -sf "$BASE/_sim/requests" | py "import json,sys; print(len(json.load(sys.stdin)))")"
    before="$(now_ms)"
    env FORWARD_FORMAT=stdout "$BIN/knowbe4-source" collect --source bench --events-file /dev/null \
        >/dev/null 2>"$WORK/$1.collect.err" &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || log "collect $1 exited non-zero"
    first="$(curl -sf "$BASE/_sim/requests" | py "import json,sys; print(json.load(sys.stdin)[$seen]['at_ms'])")"
    echo $((first - before))
}
new_src=()
old_src=()
for i in 1 2 3 4 5; do
    create_source "cold$i"
    new_src+=("$(first_request_ms "cold$i-new")")
    # The same source again, the usual scheduled start. Wait out the lease's quiet
    # period (last request + 1.05 s), which the run would otherwise sleep through.
    sleep 1.2
    old_src+=("$(first_request_ms "cold$i-existing")")
done
stop_pid "$SIM_PID"
spread() { py "v = sorted([$(IFS=,; echo "$*")]); print(f'{v[len(v)//2]} ms** (min {v[0]}, max {v[-1]}; {len(v)} runs)')"; }
row "Cold start → first KnowBe4 request, existing source" "**median $(spread "${old_src[@]}")" "—" \
    "ms from just before spawning \`collect\` to the sim's \`at_ms\` of the first request"
row "Cold start → first KnowBe4 request, first run of a new source" "**median $(spread "${new_src[@]}")" "—" \
    "also writes the Pending → Started → Initialized transitions (fsync each)"

# --- 4. cargo benches ----------------------------------------------------------------

if [[ -z "${SKIP_CARGO_BENCH:-}" ]]; then
    log "cargo bench --bench day_simulation"
    cargo bench --bench day_simulation >"$WORK/day.out" 2>"$WORK/day.err" ||
        { cat "$WORK/day.err" >&2; exit 1; }
    while IFS='|' read -r _ name quota _ collected used per1000 nobudget midnight med p95 max dups lost _; do
        row "Day simulation: $(trim "$name") (quota $(trim "$quota")/day)" \
            "**$(trim "$per1000") requests per 1,000 events**; quota used $(trim "$used"); lag median $(trim "$med") / p95 $(trim "$p95") / max $(trim "$max")" \
            "quota never exceeded; lag ≈ schedule interval" \
            "collected by day-1 runs: $(trim "$collected"); runs with no budget: $(trim "$nobudget"); at 24:00: $(trim "$midnight"); duplicates: $(trim "$dups"); lost: $(trim "$lost")"
    done < <(grep '^| [0-9]' "$WORK/day.out")

    log "cargo bench --bench hot_path"
    rm -rf "$ROOT/target/criterion/knowbe4" "$ROOT/target/criterion/walker" "$ROOT/target/criterion/sink"
    cargo bench --bench hot_path >"$WORK/hot.out" 2>"$WORK/hot.err" ||
        { cat "$WORK/hot.err" >&2; exit 1; }
    while IFS=$'\t' read -r name per_event eps; do
        row "Hot path (criterion): $name" "**$per_event µs/event**" "a few µs per event" "$eps events/s (median)"
    done < <(python3 - "$ROOT/target/criterion" <<'EOF'
import json, os, sys
root = sys.argv[1]
for group in ("knowbe4", "walker", "sink"):
    gdir = os.path.join(root, group)
    if not os.path.isdir(gdir):
        continue
    for bench in sorted(os.listdir(gdir)):
        new = os.path.join(gdir, bench, "new")
        try:
            est = json.load(open(os.path.join(new, "estimates.json")))
            meta = json.load(open(os.path.join(new, "benchmark.json")))
        except OSError:
            continue
        elements = (meta.get("throughput") or {}).get("Elements") or 1
        ns = est["median"]["point_estimate"]
        print(f"{group}/{bench}\t{ns / elements / 1000:.3f}\t{elements / ns * 1e9:,.0f}")
EOF
)
    HOT_NOTE="$(grep -E '^(page body|batch of)' "$WORK/hot.out" | tr '\n' ' ' || true)"
fi

# --- the table -----------------------------------------------------------------------

echo "| scenario | result | target | detail |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
if [[ -n "${SKIP_CARGO_BENCH:-}" ]]; then
    echo "(cargo benches skipped: run \`cargo bench --bench day_simulation\` and \`cargo bench --bench hot_path\`)"
else
    echo "Day simulation: $(grep '^Simulated' "$WORK/day.out" || true)"
    echo "Hot path inputs: ${HOT_NOTE:-}"
fi
echo "Script wall time: $((($(now_ms) - SCRIPT_START) / 1000)) s, build step included. Request spacing in src/knowbe4/events.rs: ${SPACING_MS} ms."
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(rustc --version); load average before the run: $LOAD_BEFORE."
