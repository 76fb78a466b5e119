#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the integration tests (tests/it), the DynamoDB
# store tests and the chaos suite (tests/chaos, CHAOS_SEEDS seeds per class, default 4: one
# per reading of the API's unconfirmed details, {count per page, per list} × {cap 50,
# cap 100}), against moto's server started on a free loopback port. Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CHAOS_SEEDS="${CHAOS_SEEDS:-4}"
started=$SECONDS
step() { printf '[test.sh %4ss] %s\n' "$((SECONDS - started))" "$*" >&2; }
step "Unit, integration, DynamoDB store and chaos tests ($CHAOS_SEEDS seeds per class); the first build takes minutes."
scripts/with-moto.sh cargo test --all-targets "$@"
step "Doc tests."
scripts/with-moto.sh cargo test --doc
step "All tests passed."
