#!/usr/bin/env bash
# Instructions per substitution for each candidate and body size, counted by callgrind
# (repeatable on a shared machine, unlike wall-clock time). Prints a table and the ratios to the
# serde_json Value round trip. Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench substitute --no-run 2>/dev/null
bin=$(ls -t target/release/deps/substitute-* | grep -v '\.d$' | head -n 1)
count() { # candidate bytes iterations -> total instructions
  SUBSTITUTE_ONLY="$1:$2:$3" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" 2>&1 \
    | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
printf '%-8s %18s %18s %24s %10s %10s\n' size serde_raw_value scanner serde_value_round_trip raw/value scan/value
for size in 1024 65536 1048576 8388608; do
  n=5; [ "$size" -ge 1048576 ] && n=2
  row=()
  for c in serde_raw_value scanner serde_value_round_trip; do
    base=$(count "$c" "$size" 0); total=$(count "$c" "$size" "$n")
    row+=($(( (total - base) / n )))
  done
  printf '%-8s %18s %18s %24s %10s %10s\n' "$size" "${row[0]}" "${row[1]}" "${row[2]}" \
    "$(awk "BEGIN{printf \"%.3f\", ${row[0]}/${row[2]}}")" "$(awk "BEGIN{printf \"%.3f\", ${row[1]}/${row[2]}}")"
done
