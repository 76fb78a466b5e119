#!/usr/bin/env bash
# Lambda smoke test: the real binary under `cargo lambda watch` (the Lambda runtime API
# emulator), in local mode (state file, events to stdout), against the KnowBe4 simulator.
# Every payload in events/ is invoked once, in lifecycle order; then the x86-64 release
# bootstrap is built. Needs cargo-lambda on PATH (CI: .venv/bin) and python3.
#
# Everything listens on 127.0.0.1, every wait is bounded, and everything started here is
# stopped on exit (each server runs in its own process group, killed by its id).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

started=$SECONDS
log() { printf '[lambda-smoke %4ss] %s\n' "$((SECONDS - started))" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

command -v cargo-lambda >/dev/null || fail "cargo-lambda is not on PATH (python3 -m venv .venv && .venv/bin/pip install cargo-lambda; PATH=\$PWD/.venv/bin:\$PATH)"
command -v python3 >/dev/null || fail "python3 is needed"

work=$(mktemp -d "${TMPDIR:-/tmp}/lambda-smoke.XXXXXX")
pgids=()
stop_all() {
  local pgid
  for pgid in "${pgids[@]}"; do
    kill -TERM -- "-$pgid" 2>/dev/null || true
  done
  for pgid in "${pgids[@]}"; do
    for _ in $(seq 1 50); do
      kill -0 -- "-$pgid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
  done
  pgids=()
}
cleanup() {
  local rc=$?
  stop_all
  if [ "$rc" -ne 0 ]; then
    for f in "$work"/*.log; do
      [ -f "$f" ] || continue
      echo "----- last lines of $(basename "$f") -----" >&2
      tail -n 40 "$f" >&2
    done
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts "$@" in its own process group (setsid: the pid is the group id), output to $log_file.
start_group() {
  local log_file=$1
  shift
  # Created here, so a reader never races the background process's redirection.
  : >"$log_file"
  setsid "$@" >"$log_file" 2>&1 </dev/null &
  pgids+=("$!")
  last_pid=$!
}

# Build first: `cargo lambda watch` then starts the function at once, and a cold build
# cannot hit the invoke timeout.
log "Building the function and the simulator (debug)."
# The function as `cargo lambda watch` builds it (no features); the simulator needs the
# testkit feature.
timeout 1800 cargo build --bins --quiet || fail "cargo build --bins"
timeout 1800 cargo build --bin knowbe4-sim --features testkit --quiet ||
  fail "cargo build --bin knowbe4-sim --features testkit"

sim_port=$(free_port)
start_group "$work/sim.log" cargo run --quiet --features testkit --bin knowbe4-sim -- \
  --port "$sim_port" --api-key sim-key --events 150
sim_pid=$last_pid
base_url=""
until_time=$((SECONDS + 60))
while [ "$SECONDS" -lt "$until_time" ]; do
  base_url=$(sed -n 's/^knowbe4-sim listening on \(http:\/\/127\.0\.0\.1:[0-9]*\).*/\1/p' "$work/sim.log" | head -n 1)
  [ -n "$base_url" ] && break
  kill -0 "$sim_pid" 2>/dev/null || fail "the simulator exited"
  sleep 0.1
done
[ -n "$base_url" ] || fail "the simulator did not report its address within 60 s"
log "Simulator at $base_url."

lambda_port=$(free_port)
# Local mode: no STATE_TABLE, a fresh state file, events to stdout.
start_group "$work/watch.log" env -u STATE_TABLE -u AWS_ENDPOINT_URL -u FORWARD_URL \
  -u FORWARD_URL_SECRET -u FORWARD_TOKEN -u FORWARD_TOKEN_SECRET \
  KNOWBE4_ALLOW_CUSTOM_BASE_URL=1 STATE_FILE="$work/state.json" FORWARD_FORMAT=stdout \
  cargo lambda watch --ignore-changes -A 127.0.0.1 -P "$lambda_port"
watch_pid=$last_pid
ready=""
until_time=$((SECONDS + 300))
while [ "$SECONDS" -lt "$until_time" ]; do
  if python3 -c "import socket; socket.create_connection(('127.0.0.1', $lambda_port), 0.2)" 2>/dev/null; then
    ready=yes
    break
  fi
  kill -0 "$watch_pid" 2>/dev/null || fail "cargo lambda watch exited"
  sleep 0.25
done
[ -n "$ready" ] || fail "cargo lambda watch did not listen on 127.0.0.1:$lambda_port within 300 s"
log "cargo lambda watch on 127.0.0.1:$lambda_port."

# create.json and update.json name the real US region: point copies at the simulator.
rewrite() {
  python3 - "$1" "$2" "$base_url" <<'PY'
import json, sys
source, target, base_url = sys.argv[1:4]
payload = json.load(open(source))
config = payload["source"]["source"]["config"]
config.pop("region", None)
config["baseURL"] = base_url
if "apiKey" in config:
    config["apiKey"] = "sim-key"
# The simulator's events span 72 hours: collect them all on the first run.
config["firstFetchLookbackHours"] = 100
json.dump(payload, open(target, "w"))
PY
}
rewrite events/create.json "$work/create.json"
rewrite events/update.json "$work/update.json"

order=(create collect scheduled sqs status health list update restart delete)
for file in events/*.json; do
  name=$(basename "$file" .json)
  case " ${order[*]} " in
    *" $name "*) ;;
    *) fail "events/$name.json is not in this script's order: add it" ;;
  esac
done

invoke() {
  local name=$1 data=$2 out="$work/$1.out"
  log "Invoking $name."
  if ! timeout 300 cargo lambda invoke knowbe4-source --data-file "$data" \
    -A 127.0.0.1 -P "$lambda_port" --output-format json >"$out" 2>"$work/$name.err"; then
    cat "$out" "$work/$name.err" >&2
    fail "invoke $name"
  fi
  python3 - "$name" "$out" <<'PY' || fail "the $name response"
import json, sys
name, path = sys.argv[1:3]
text = open(path).read()
try:
    out = json.loads(text)
except ValueError:
    sys.exit(f"{name}: not JSON: {text[:500]}")
def check(ok, what):
    if not ok:
        sys.exit(f"{name}: {what}: {json.dumps(out)[:1000]}")
if name == "create":
    check(out.get("sourceId") == "knowbe4-prod", "expected sourceId knowbe4-prod")
elif name == "collect":
    runs = out.get("runs") or []
    check(len(runs) == 1 and runs[0].get("outcome") == "collected", 'expected "outcome":"collected"')
    run = runs[0]
    print(f"collect: forwarded {run.get('forwarded')} events ({run.get('detail')})", file=sys.stderr)
    # The simulator holds 150 events; the first collection must forward all of them.
    check(run.get("forwarded") == 150, "expected the simulator's 150 events forwarded")
elif name == "scheduled":
    check(isinstance(out.get("runs"), list) and len(out["runs"]) == 1, "expected one run")
elif name == "sqs":
    # Two work messages: the source's run started (deleted), the unknown source's could
    # not start (left for SQS to retry, then the dead-letter queue).
    check(out == {"batchItemFailures": [{"itemIdentifier": "9d0a4ae6-0c1e-4a3c-9d64-5f1b2c3d4e02"}]},
          "expected only the unknown source's record as a batch item failure")
elif name in ("status", "list"):
    check(isinstance(out, list) and len(out) == 1 and out[0].get("id") == "knowbe4-prod", "expected the source")
elif name == "health":
    check(isinstance(out, list), "expected a list of health events")
elif name == "update":
    check(out.get("updated") is True, "expected updated")
elif name == "restart":
    check(out.get("restarted") is True, "expected restarted")
elif name == "delete":
    check(out.get("deleted") is True, "expected deleted")
PY
}

for name in "${order[@]}"; do
  case $name in
    create | update) invoke "$name" "$work/$name.json" ;;
    *) invoke "$name" "events/$name.json" ;;
  esac
done
log "Every payload in events/ ran."

stop_all
log "Building the x86-64 release bootstrap."
# Under cargo's target directory, wherever CARGO_TARGET_DIR (or .cargo/config) puts it;
# named explicitly, since cargo-lambda versions differ in whether they follow it.
target_dir=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bootstrap="$target_dir/lambda/knowbe4-source/bootstrap"
rm -f "$bootstrap"
timeout 3600 cargo lambda build --release --x86-64 --bin knowbe4-source \
  --lambda-dir "$target_dir/lambda" >"$work/build.log" 2>&1 ||
  fail "cargo lambda build --release --x86-64"
[ -x "$bootstrap" ] || fail "$bootstrap is missing"
log "Built $bootstrap ($(du -h "$bootstrap" | cut -f1))."
log "OK."
