#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the integration tests (tests/it), the DynamoDB
# store tests and the chaos suite (tests/chaos, CHAOS_SEEDS seeds per class, default 4: one
# per reading of the API's unconfirmed details, {count per page, per list} × {cap 50,
# cap 100}), against moto's server started on a free loopback port. Extra arguments go to
# `cargo test` (with none, the fan-out scale test and the phishing stream's reading matrix
# then run on their own).
set -euo pipefail
cd "$(dirname "$0")/.."
export CHAOS_SEEDS="${CHAOS_SEEDS:-4}"
started=$SECONDS
step() { printf '[test.sh %4ss] %s\n' "$((SECONDS - started))" "$*" >&2; }
step "Unit, integration, DynamoDB store and chaos tests ($CHAOS_SEEDS seeds per class); the first build takes minutes."
scripts/with-moto.sh cargo test --all-targets "$@"
if [ $# -eq 0 ]; then
  step "Fan-out at scale: 300 sources, 30 accounts, 4 workers (alone: it loads moto for minutes)."
  scripts/with-moto.sh cargo test --test it -- --ignored --exact \
    fanout::dispatch_and_four_workers_collect_every_source_once_within_each_accounts_rate
  step "The phishing stream under every reading of the Reporting API (alone: twelve simulators at once)."
  scripts/with-moto.sh cargo test --test it -- --ignored --exact --nocapture \
    phishing_readings::every_reading_delivers_every_record_in_its_latest_state_once
fi
step "Doc tests."
scripts/with-moto.sh cargo test --doc
step "All tests passed."
