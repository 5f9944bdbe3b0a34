#!/usr/bin/env bash
# Instructions per request for each path of benches/overhead.rs, counted by callgrind
# (repeatable on a shared machine). Prints each path and its ratio to `direct` and to `layer`
# (the single-target layer: `group` against it is the balance's price). Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench overhead --no-run 2>/dev/null
bin=$(ls -t target/release/deps/overhead-* | grep -v '\.d$' | head -n 1)
count() { # path iterations -> total instructions
  OVERHEAD_ONLY="$1:$2" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" 2>&1 \
    | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
n=2000
direct=0
layer=0
printf '%-22s %14s %8s %9s\n' path instructions ratio 'vs layer'
for path in direct layer layer_without_stats fallback group; do
  base=$(count "$path" 10); total=$(count "$path" $((n + 10)))
  per=$(( (total - base) / n ))
  [ "$path" = direct ] && direct=$per
  [ "$path" = layer ] && layer=$per
  vs=-; [ "$layer" -gt 0 ] && vs=$(awk "BEGIN{printf \"%.3f\", $per/$layer}")
  printf '%-22s %14s %8s %9s\n' "$path" "$per" "$(awk "BEGIN{printf \"%.2f\", $per/$direct}")" "$vs"
done
