#!/usr/bin/env bash
# Instructions per request on loopback for each loadbench scenario, counted by callgrind: the
# whole process (load, proxy, upstreams) is counted for a short and a long run, and the
# difference is divided by the difference in requests served, so start-up and warm-up cancel out.
# Unlike requests per second, the counts barely move on a busy machine. Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p tower-model-fallback-gateway --example loadbench
bin=target/release/examples/loadbench
run() { # scenario seconds -> "instructions requests"
  out=$(LOADBENCH_ONLY="$1" valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "$bin" throughput 8 "$2" 2>&1)
  ir=$(echo "$out" | sed -n 's/.*Collected : \([0-9]*\).*/\1/p')
  rps=$(echo "$out" | awk -v s="($1)" '$1 == s { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) { print $i; exit } }')
  echo "$ir $((rps * $2))"
}
printf '%-38s %14s %8s\n' scenario instructions ratio
base=0
for s in a b c d; do
  read -r i1 r1 <<<"$(run "$s" 2)"
  read -r i2 r2 <<<"$(run "$s" 6)"
  per=$(( (i2 - i1) / (r2 - r1) ))
  [ "$s" = a ] && base=$per
  name=$(grep -o "\"(${s}) [^\"]*" gateway/examples/loadbench.rs | head -n 1 | tr -d '"')
  printf '%-38s %14s %8s\n' "$name" "$per" "$(awk "BEGIN{printf \"%.2f\", $per/$base}")"
done
