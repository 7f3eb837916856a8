#!/bin/bash
# The cost of issue 11's checks (docs/benchmarks.md): bench local at 2 MiB, three interleaved
# rounds of: the commit before issue 11 (a worktree at $BASE, e.g. `git worktree add /tmp/base
# 5449748`), this checkout with [store] verify_puts on (the default), and with it off.
set -u
BASE=${BASE:-/tmp/base}
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
D=$(mktemp -d /tmp/abv-XXXX)
cat > $D/mesh.toml <<T
[node]
id = "abv"
data_dir = "$D/data"
socket = "$D/s.sock"
[store]
dram_bytes = "512 MiB"
nvme_bytes = 0
verify_puts = false
[metrics]
enabled = false
T
for i in 1 2 3; do
  for side in base on off; do
    if [ $side = base ]; then
      out=$(cd "$BASE" && PYTHONPATH="$BASE" "$ROOT/.venv/bin/python" -m memkv_mesh bench local --json --sizes 2097152 2>/dev/null | tail -1)
    elif [ $side = on ]; then
      out=$(.venv/bin/python -m memkv_mesh bench local --json --sizes 2097152 2>/dev/null | tail -1)
    else
      .venv/bin/python -m memkv_mesh daemon --config $D/mesh.toml >/dev/null 2>&1 &
      pid=$!
      for t in $(seq 50); do [ -S $D/s.sock ] && break; sleep 0.2; done
      out=$(.venv/bin/python -m memkv_mesh bench local --json --sizes 2097152 --socket $D/s.sock 2>/dev/null | tail -1)
      kill $pid; wait $pid 2>/dev/null
    fi
    echo "$side $i $out"
  done
done
rm -rf $D
