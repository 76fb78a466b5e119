#!/usr/bin/env bash
# Runs the chaos suite with more seeds and writes docs/reliability.md from its results.
# Usage: scripts/chaos.sh [seeds per class, default 8]
#        REPORT_ONLY=1 scripts/chaos.sh N   # only write the doc from target/chaos/*.json
# Seed n plays the API reading Reading::core()[n % 4] (src/testkit/sim/mod.rs), so a multiple of
# four seeds covers {count per page, per list} x {cap 50, cap 100} evenly.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-8}"
status=0
if [ -z "${REPORT_ONLY:-}" ]; then
  rm -rf target/chaos
  CHAOS_SEEDS="$seeds" scripts/with-moto.sh cargo test --test chaos || status=$?
fi
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
       "Readings: seed *n* plays the API reading `Reading::core()[n % 4]` of the simulator:",
       "seeds 1, 2, 3, 4 are `count` per list with pages capped at 50, `count` per page with",
       "pages of 100, `count` per list with pages of 100, and `count` per page with pages capped",
       "at 50 (the recorded reading); event counts are not multiples of either page size.", "",
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
