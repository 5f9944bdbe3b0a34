#!/usr/bin/env bash
# Regenerates the figures in BENCHMARKS.md: run it, then paste its output into the file.
# Takes about 11 minutes on 2 cores. Needs valgrind for the instruction counts, redis-server
# for the shared health store's figures, and nginx and wrk (Debian's packages) for the nginx
# comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "## Machine"
echo '```'
echo "$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -m), $(rustc --version)"
grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'
echo '```'
echo
echo "## In-process overhead: instructions per request (scripts/overhead-instructions.sh)"
echo '```'
./scripts/overhead-instructions.sh
echo '```'
echo
echo "## In-process overhead: time and allocations (cargo bench --bench overhead)"
echo '```'
cargo bench --bench overhead -- --measurement-time 3 2>/dev/null | grep -E 'allocations|^  [a-z]|^overhead/|time:' | grep -v -e '^Benchmarking' -e '%'
echo '```'
echo
echo "## Groups: one of three members rate-limited (cargo bench --bench groups)"
echo '```'
cargo bench --bench groups 2>/dev/null | grep -v -e '^$' -e 'Running'
echo '```'
echo
echo "## Model substitution: instructions (scripts/substitute-instructions.sh)"
echo '```'
./scripts/substitute-instructions.sh
echo '```'
echo
echo "## Model substitution: time (cargo bench --bench substitute)"
echo '```'
cargo bench --bench substitute -- --measurement-time 3 2>/dev/null | grep -E '^substitute/|time:' | grep -v -e '^Benchmarking' -e '%'
echo '```'
echo
echo "## Load on loopback: instructions per request (scripts/gateway-instructions.sh)"
echo '```'
./scripts/gateway-instructions.sh
echo '```'
echo
echo "## Load on loopback (cargo run --release -p tower-model-fallback-gateway --example loadbench -- throughput 32 5), 5 runs"
echo '```'
cargo run -q --release -p tower-model-fallback-gateway --example loadbench -- throughput 32 5
for _ in 2 3 4 5; do
  cargo run -q --release -p tower-model-fallback-gateway --example loadbench -- throughput 32 5 | grep '^('
done
echo '```'
echo
if command -v nginx >/dev/null && command -v wrk >/dev/null; then
  echo "## Against nginx (cargo run --release -p tower-model-fallback-gateway --example loadbench -- nginx 5 5)"
  echo '```'
  cargo run -q --release -p tower-model-fallback-gateway --example loadbench -- nginx 5 5
  echo '```'
  echo
fi
if command -v redis-server >/dev/null; then
  echo "## Shared health store (cargo bench --features redis --bench health_store)"
  echo '```'
  cargo bench --features redis --bench health_store 2>/dev/null \
    | grep -E 'propagation|refresh|^health_store/|time:' | grep -v -e '^Benchmarking' -e '%'
  echo '```'
fi
echo
echo "## Memory (cargo run --release -p tower-model-fallback-gateway --example loadbench -- memory 200)"
echo '```'
cargo run -q --release -p tower-model-fallback-gateway --example loadbench -- memory 200
echo '```'
echo
echo "## Time to first chunk (cargo run --release -p tower-model-fallback-gateway --example stream_latency)"
echo '```'
cargo run -q --release -p tower-model-fallback-gateway --example stream_latency
echo '```'
