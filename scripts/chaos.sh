#!/usr/bin/env bash
# Runs the chaos suite with more seeds and writes docs/reliability.md from its results.
# Usage: scripts/chaos.sh [seeds per class, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-10}"
rm -rf target/chaos
status=0
CHAOS_SEEDS="$seeds" scripts/with-moto.sh cargo test --test chaos || status=$?
python3 - "$seeds" <<'PY'
import datetime, glob, json, platform, subprocess, sys
rows = [json.load(open(p)) for p in sorted(glob.glob("target/chaos/*.json"))]
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
out = ["# Reliability", "",
       "Produced by `scripts/chaos.sh %s` (the chaos suite in `tests/chaos/`, against moto," % sys.argv[1],
       "the KnowBe4 simulator and a recording destination) on %s, %s, %s." % (
           datetime.date.today().isoformat(), platform.machine(), rustc), "",
       "Every scenario ends with clean runs, then the oracle compares KnowBe4 (the simulator)",
       "with what the destination received. *Lost* must be zero. *Duplicates* are allowed only",
       "after a fault that hits between forwarding and saving the checkpoint (a kill, a lost",
       "state write, a destination failing after accepting part of a flush), at most one flush",
       "(1,000 events) per such fault. *Max/s* is the most KnowBe4 requests seen in any one-second",
       "window (the limit is 4); every request was reserved in the quota ledger before it was sent.", "",
       "| scenario class | what is injected | seeded runs passed | events at the end | faults injected | lost | duplicates | max/s | KnowBe4 requests |",
       "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    out.append("| %s | %s | %d / %d | %d | %d | %d | %d | %d | %d |" % (
        r["class"], r["description"], r["passed"], r["seeds"], r["events"], r["faults"],
        r["lost"], r["duplicates"], r["max_per_second"], r["requests"]))
out += ["", "Per-seed verdicts are in `target/chaos/<class>.json` after a run."]
open("docs/reliability.md", "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
exit "$status"
