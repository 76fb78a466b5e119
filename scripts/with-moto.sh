#!/usr/bin/env bash
# Runs a command with moto's server (DynamoDB + Secrets Manager) on a free loopback port,
# unless AWS_ENDPOINT_URL already points at one; stops the server afterwards.
# moto is installed into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
unset STATE_TABLE AWS_LAMBDA_RUNTIME_API AWS_PROFILE || true

if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
  venv="${VENV:-.venv}"
  if ! "$venv/bin/python" -c "import moto.server" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "moto[server]"
  fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # Cargo's target directory, wherever CARGO_TARGET_DIR (or .cargo/config) puts it.
  target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  mkdir -p "$target_dir"
  moto_log="$target_dir/moto.log"
  echo "with-moto: moto on 127.0.0.1:$port (log: $moto_log)" >&2
  # One request at a time: moto's conditional writes are not atomic under concurrency.
  "$venv/bin/python" scripts/moto_serial.py 127.0.0.1 "$port" > "$moto_log" 2>&1 &
  moto_pid=$!
  trap 'kill "$moto_pid" 2>/dev/null || true' EXIT
  up=""
  for _ in $(seq 1 150); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then
      up=1
      break
    fi
    sleep 0.2
  done
  [ -n "$up" ] || { echo "moto did not start; see $moto_log" >&2; exit 1; }
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
fi

"$@"
