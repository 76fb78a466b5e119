#!/usr/bin/env bash
# Benchmarks of knowbe4-source against the bundled simulator, on loopback only.
#
#   bash bench/run.sh              # everything (~15 minutes on 2 cores)
#   SKIP_CARGO_BENCH=1 bash bench/run.sh   # without the criterion/day benches
#
# Builds the release binaries, then for each scenario starts `knowbe4-sim` on a free
# 127.0.0.1 port (`--port 0`), creates a source in a fresh local state file and runs
# `knowbe4-source collect` against it:
#   1. rate-bound draining: 200 pages (20,000 events) at 800 ms latency, pipelined
#      (default) and one request at a time (KNOWBE4_MAX_IN_FLIGHT=1);
#   2. bounded memory and CPU per event: 200,000 events, no rate limit, 1 ms request
#      spacing, events to stdout (/dev/null), under /usr/bin/time -v;
#   3. cold start: stripped binary size, process start to the first KnowBe4 request;
#   4. `cargo bench --bench day_simulation` and `cargo bench --bench hot_path`.
# Prints one markdown table on stdout (progress on stderr). Every process it starts is
# stopped on exit (trap). Needs bash, curl, python3, /usr/bin/time, strip.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/target/release"
KEY="bench-key"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/knowbe4-bench.XXXXXX")"
PIDS=()

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

# --- helpers -------------------------------------------------------------------------

# start_sim NAME ARGS...: starts the simulator on a free port; sets SIM_PID and BASE.
start_sim() {
    local name="$1"
    shift
    "$BIN/knowbe4-sim" --port 0 --api-key "$KEY" "$@" \
        >"$WORK/$name.sim.out" 2>"$WORK/$name.sim.err" &
    SIM_PID=$!
    PIDS+=("$SIM_PID")
    BASE=""
    local i
    for i in $(seq 1 300); do # up to 30 s (200,000 events take a moment to generate)
        BASE="$(sed -n 's/^knowbe4-sim listening on //p' "$WORK/$name.sim.out")"
        [[ -n "$BASE" ]] && return 0
        kill -0 "$SIM_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "simulator did not start:"
    cat "$WORK/$name.sim.err" >&2
    exit 1
}

stop_sim() {
    kill "$SIM_PID" 2>/dev/null || true
    wait "$SIM_PID" 2>/dev/null || true
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
    "$BIN/knowbe4-source" sources create --file "$WORK/$name.source.json" --id bench >/dev/null
}

# summary NAME FIELD: a field of the run report logged on stderr ("Run finished.").
summary() {
    python3 - "$WORK/$1.collect.err" "$2" <<'EOF'
import json, sys
report = None
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    fields = entry.get("fields", entry)
    if "run_summary" in fields:
        report = json.loads(fields["run_summary"])
print(report.get(sys.argv[2]) if report else "n/a")
EOF
}

# sim_stat FIELD: a counter of the running simulator.
sim_stat() {
    curl -sf "$BASE/_sim/stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"
}

# collect NAME [ENV=VALUE...]: one collect run of source "bench", events to /dev/null,
# the JSON log on $WORK/NAME.collect.err. Sets WALL_MS.
collect() {
    local name="$1"
    shift
    local start end
    start="$(now_ms)"
    env KNOWBE4_ALLOW_CUSTOM_BASE_URL=1 FORWARD_FORMAT=stdout RUN_TIMEOUT_SECS=900 \
        LOG_FORMAT=json RUST_LOG=info "$@" \
        "$BIN/knowbe4-source" collect --source bench --json \
        >/dev/null 2>"$WORK/$name.collect.err" &
    local pid=$!
    PIDS+=("$pid")
    wait "$pid" || log "collect $name exited non-zero"
    end="$(now_ms)"
    WALL_MS=$((end - start))
}

secs() { python3 -c "print(f'{$1/1000:.1f}')"; }

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }

# --- build ---------------------------------------------------------------------------

log "cargo build --release --bins"
cargo build --release --bins >&2

# --- 1. rate-bound draining ----------------------------------------------------------

P=200
EVENTS=$((P * 100))
for mode in pipelined one-at-a-time; do
    log "rate-bound draining: $P pages, 800 ms latency, $mode"
    start_sim "rate-$mode" --events "$EVENTS" --latency-ms 800 --span-hours 48
    create_source "rate-$mode"
    if [[ $mode == pipelined ]]; then
        collect "rate-$mode"
    else
        collect "rate-$mode" KNOWBE4_MAX_IN_FLIGHT=1
    fi
    dur="$(summary "rate-$mode" duration_ms)"
    fwd="$(summary "rate-$mode" forwarded)"
    req="$(summary "rate-$mode" requests)"
    sim_req="$(sim_stat requests)"
    viol="$(sim_stat rate_violations)"
    stop_sim
    if [[ $mode == pipelined ]]; then
        target="≤ 1.1 × P/4 = $(python3 -c "print(1.1*$P/4)") s"
    else
        target="≈ P × 0.8 = $(python3 -c "print($P*0.8)") s (+ pacing)"
    fi
    row "Rate-bound drain, P=$P pages (20,000 events), 800 ms latency, $mode" \
        "$(secs "$dur") s run (duration_ms; wall incl. process $(secs "$WALL_MS") s)" \
        "$target" \
        "$req requests by the run ($sim_req seen by the sim, $viol over 4/s), $fwd events forwarded"
done

# --- 2. bounded memory and CPU per event ---------------------------------------------

BIG=200000
log "memory and CPU: $BIG events, no rate limit, 1 ms spacing"
start_sim mem --events "$BIG" --no-rate-limit --span-hours 720
create_source mem
start="$(now_ms)"
env KNOWBE4_ALLOW_CUSTOM_BASE_URL=1 FORWARD_FORMAT=stdout RUN_TIMEOUT_SECS=900 \
    KNOWBE4_SIM_REQUEST_SPACING_MS=1 LOG_FORMAT=json RUST_LOG=info \
    /usr/bin/time -v -o "$WORK/mem.time" \
    "$BIN/knowbe4-source" collect --source bench --json \
    >/dev/null 2>"$WORK/mem.collect.err" &
pid=$!
PIDS+=("$pid")
wait "$pid" || log "collect mem exited non-zero"
WALL_MS=$(($(now_ms) - start))
stop_sim
read -r rss_kb user sys < <(python3 - "$WORK/mem.time" <<'EOF'
import sys
v = {}
for line in open(sys.argv[1]):
    if ":" in line:
        k, _, val = line.strip().rpartition(": ")
        v[k] = val
print(v["Maximum resident set size (kbytes)"], v["User time (seconds)"], v["System time (seconds)"])
EOF
)
fwd="$(summary mem forwarded)"
req="$(summary mem requests)"
dur="$(summary mem duration_ms)"
detail="$(summary mem detail)"
read -r rss_mb cpu cpu_per_100k us_per_event eps < <(python3 -c "
rss=$rss_kb/1024; cpu=$user+$sys; fwd=max($fwd,1); dur=max($dur,1)/1000
print(f'{rss:.1f} {cpu:.2f} {cpu*100000/fwd:.2f} {cpu*1e6/fwd:.1f} {fwd/dur:,.0f}')")
row "Bounded memory: $BIG events in one run (stdout → /dev/null)" \
    "peak RSS $rss_mb MB" "< 64 MB" \
    "forwarded $fwd of $BIG ($detail), $req requests"
row "CPU per event (same run)" \
    "user+sys $cpu s = $cpu_per_100k CPU-s per 100,000 events ($us_per_event µs/event)" \
    "a few µs per event" \
    "user $user s, sys $sys s; $eps events/s over the run's $(secs "$dur") s (wall incl. process $(secs "$WALL_MS") s)"

# --- 3. cold start -------------------------------------------------------------------

log "cold start"
cp "$BIN/knowbe4-source" "$WORK/knowbe4-source.stripped"
strip "$WORK/knowbe4-source.stripped"
size_mb="$(python3 -c "import os; print(f'{os.path.getsize(\"$WORK/knowbe4-source.stripped\")/1048576:.1f}')")"
unstripped_mb="$(python3 -c "import os; print(f'{os.path.getsize(\"$BIN/knowbe4-source\")/1048576:.1f}')")"
row "Stripped release binary (knowbe4-source)" "$size_mb MB" "—" "unstripped $unstripped_mb MB"

start_sim cold --events 1000 --span-hours 24
# first_request_ms NAME: ms from just before spawning `collect` to the sim's next request.
first_request_ms() {
    local seen before first pid
    seen="$(curl -sf "$BASE/_sim/requests" | python3 -c "import json,sys; print(len(json.load(sys.stdin)))")"
    before="$(now_ms)"
    env KNOWBE4_ALLOW_CUSTOM_BASE_URL=1 FORWARD_FORMAT=stdout RUN_TIMEOUT_SECS=900 \
        "$BIN/knowbe4-source" collect --source bench >/dev/null 2>"$WORK/$1.collect.err" &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || log "collect $1 exited non-zero"
    first="$(curl -sf "$BASE/_sim/requests" | python3 -c "import json,sys; print(json.load(sys.stdin)[$seen]['at_ms'])")"
    echo $((first - before))
}
new_src=()
old_src=()
for i in 1 2 3 4 5; do
    create_source "cold$i"
    new_src+=("$(first_request_ms "cold$i-new")")
    # The same source again: the usual scheduled cold start. Wait out the lease's quiet
    # period (last request + 1.05 s), which the next run would otherwise sleep through.
    sleep 1.2
    old_src+=("$(first_request_ms "cold$i-existing")")
done
stop_sim
stats() { python3 -c "v=sorted([$(IFS=,; echo "$*")]); print(f'median {v[len(v)//2]} ms (min {v[0]}, max {v[-1]}; {len(v)} runs)')"; }
row "Cold start: process start → first KnowBe4 request, existing source" \
    "$(stats "${old_src[@]}")" "—" \
    "timestamp just before spawning collect vs the sim's at_ms of the run's first request"
row "Cold start: process start → first KnowBe4 request, first run of a new source" \
    "$(stats "${new_src[@]}")" "—" \
    "includes the Pending → Started → Initialized state writes (fsync) of a first run"

# --- 4. cargo benches ----------------------------------------------------------------

if [[ -z "${SKIP_CARGO_BENCH:-}" ]]; then
    log "cargo bench --bench day_simulation"
    cargo bench --bench day_simulation >"$WORK/day.out" 2>"$WORK/day.err" ||
        { cat "$WORK/day.err" >&2; exit 1; }
    while IFS= read -r line; do
        IFS='|' read -r _ name quota _ collected used per1000 _ _ med p95 max dups lost _ <<<"$line"
        row "Day simulation:$name(quota$quota/day)" \
            "$(echo "$per1000" | xargs) requests per 1,000 events; lag median$med/ p95$p95/ max$max" \
            "quota never exceeded; lag ≈ schedule interval" \
            "requests day 1:$used; collected by day-1 runs:$collected; duplicates:$dups; lost:$lost"
    done < <(grep '^| [0-9]' "$WORK/day.out")

    log "cargo bench --bench hot_path"
    rm -rf "$ROOT/target/criterion/knowbe4" "$ROOT/target/criterion/walker" "$ROOT/target/criterion/sink"
    cargo bench --bench hot_path >"$WORK/hot.out" 2>"$WORK/hot.err" ||
        { cat "$WORK/hot.err" >&2; exit 1; }
    while IFS=$'\t' read -r name per_event eps; do
        row "Hot path: $name" "$per_event µs/event" "a few µs per event" "$eps events/s (criterion median)"
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
fi

# --- the table -----------------------------------------------------------------------

echo "| scenario | result | target | detail |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
if [[ -n "${SKIP_CARGO_BENCH:-}" ]]; then
    echo
    echo "(cargo benches skipped: run \`cargo bench --bench day_simulation\` and \`cargo bench --bench hot_path\`)"
else
    echo
    echo "Day simulation (cargo bench --bench day_simulation):"
    echo
    grep -v '^$' "$WORK/day.out" | grep -v '^Running\|^Finished' || true
fi
