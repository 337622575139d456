#!/usr/bin/env bash
# Runs every test (`cargo test --release --workspace`, extra arguments passed on) and ends with a
# summary of the real-model tests that were skipped, and why. The tests fetch SmolLM2 (98 MB)
# themselves when it is missing; where it cannot be fetched they skip, and this says so.
set -uo pipefail
cd "$(dirname "$0")/.."
skips=target/test-skips.log
mkdir -p target
rm -f "$skips"
cargo test --release --workspace "$@"
status=$?
if [[ -s "$skips" ]]; then
    count=$(wc -l < "$skips")
    echo
    echo "summary: $count real-model test(s) SKIPPED (their model is missing and could not be fetched):"
    sed 's/^/  /' "$skips"
else
    echo
    echo "summary: no test skipped"
fi
exit $status
