#!/usr/bin/env bash
# The GPU measurements of docs/speed.md ("On a GPU") in one call, from the repository root, on a machine with a CUDA
# GPU and torch but none of the scripts' other dependencies: they come as wheels in .whl/ (shared/FACTS.md lists
# them; pip download them for the machine's Python). It runs the CUDA tests, makes a small PointMaze dataset,
# times the updates eager and as CUDA graphs (bench_speed.py, bench_online_sac.py, six processes side by side),
# profiles the CQL update, and runs opal_vae.py, opal_cql.py (both modes, and --compile) and opal_online_sac.py
# end to end at their CUDA defaults. The benchmarks' output goes to $OUT (default /tmp/opal_gpu), the runs' logs to
# $OUT/runs_logs.tar.gz. About 8 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/opal_gpu}
LOGS=/tmp/opal_logs
mkdir -p "$OUT" "$LOGS"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export MINARI_DATASETS_PATH=/tmp/opal_minari TMPDIR=/tmp/opal_tmp WANDB_MODE=disabled HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
unset MUJOCO_GL  # no EGL there; nothing below renders
mkdir -p "$TMPDIR"
step() { echo; echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
echo "$(nproc) CPU cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())"

step the CUDA tests
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tail -n 25

step a PointMaze dataset of 200,000 steps
timeout 120 python3 collect_data.py --env pointmaze-large --steps 200000 > "$LOGS/collect.log" 2>&1
tail -n 1 "$LOGS/collect.log"

step the updates, eager and as CUDA graphs
timeout 420 python3 benchmarks/bench_speed.py --device cuda --seconds 2 --vae-batch-sizes 256 \
    --vae-grus written-out cudnn --no-evaluation 2>&1 | tee "$OUT/bench_speed.log"
timeout 120 python3 benchmarks/bench_online_sac.py --device cuda --no-collection --seconds 2 2>&1 \
    | tee "$OUT/bench_online_sac.log"

step six processes side by side, each timing the CQL update at our pointmaze size, eager then as a CUDA graph
for graphed in False True; do
    for i in 1 2 3 4 5 6; do
        python3 -c "
import sys; sys.path.insert(0, 'benchmarks'); import bench_speed as b
step = b.cql_update(4, 8, 128, 3, 3, False, graphed=$graphed, device='cuda')
print('graphed=$graphed process $i:', round(b.rate(step, 6, device='cuda'), 1), 'updates/s')" &
    done
    wait
done 2>&1 | grep -v Warning | tee "$OUT/side_by_side.log"

step where the time goes
timeout 120 python3 benchmarks/profile_cql.py --device cuda 2>&1 | tee "$OUT/profile_cql.log"
timeout 120 python3 benchmarks/profile_cql.py --device cuda --no-graphed --top 5 2>&1 | tee -a "$OUT/profile_cql.log"

step end to end at the CUDA defaults
runs=/tmp/opal_runs
timeout 200 python3 opal_vae.py --env pointmaze-large --num-steps 3000 --bc-steps 300 --device cuda \
    --runs-dir $runs > "$LOGS/opal_vae.log" 2>&1; echo "opal_vae.py exit $?"
grep -E "bf16|summary|checkpoint:" "$LOGS/opal_vae.log"
vae=$(ls -d $runs/opal_vae__*/ | tail -n 1)
timeout 200 python3 opal_cql.py --algorithm cql --env pointmaze-large --vae-ckpt "$vae" --total-steps 6000 --eval-every 2000 \
    --eval-episodes 20 --device cuda --runs-dir $runs > "$LOGS/opal_cql.log" 2>&1; echo "opal_cql.py exit $?"
grep -E "bf16|step [0-9]+:|summary" "$LOGS/opal_cql.log" | cut -c 1-220
timeout 150 python3 opal_cql.py --algorithm cql --env pointmaze-large --primitives none --total-steps 3000 --eval-every 3000 \
    --eval-episodes 10 --device cuda --runs-dir $runs > "$LOGS/cql_raw.log" 2>&1; echo "opal_cql.py --primitives none exit $?"
grep -E "bf16|summary" "$LOGS/cql_raw.log" | cut -c 1-220
timeout 150 python3 opal_online_sac.py --env pointmaze-large --vae-ckpt "$vae" --total-steps 20000 --eval-every 20000 \
    --eval-episodes 10 --device cuda --runs-dir $runs > "$LOGS/online_sac.log" 2>&1; echo "opal_online_sac.py exit $?"
grep -E "bf16|summary" "$LOGS/online_sac.log" | cut -c 1-220
timeout 200 python3 opal_cql.py --algorithm cql --env pointmaze-large --vae-ckpt "$vae" --total-steps 1500 --eval-every 1500 \
    --eval-episodes 10 --device cuda --compile --runs-dir $runs > "$LOGS/cql_compile.log" 2>&1
echo "opal_cql.py --compile exit $?"
grep -E "bf16|summary" "$LOGS/cql_compile.log" | cut -c 1-220
tail -n 3 "$LOGS/cql_compile.log" | cut -c 1-300
tar -czf "$OUT/runs_logs.tar.gz" -C "$LOGS" .
step done
