#!/usr/bin/env bash
# Every CUDA check in one script, on a machine with a CUDA GPU (about 10 minutes). Writes to $OUT
# (default ./gpu_out): the machine; the tests that need CUDA; `python -m bench speed --device cuda`
# against MONAI, which gives the paper preset's training step (batch 8 x 128x128x32, the 16-256
# network) in voxels/s and peak GPU memory, in float32 and under --amp, and the sampler's share of
# that step; and the default SegViz run on the GPU, in float32 and with --amp, with wall times.
# Packages the machine lacks can be put in .whl/ as wheels (nibabel, monai): see docs/speed.md.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } 2>&1 | tee -a "$OUT/summary.txt"

log "CUDA tests (tests that name cuda)"
timeout 120 python3 -m pytest -q -k cuda tests/ 2>&1 | tail -5 | tee -a "$OUT/summary.txt"

log "python -m bench speed --device cuda (MONAI $(python3 -c 'import monai; print(monai.__version__)' 2>/dev/null || echo missing))"
timeout 200 python3 -m bench speed --device cuda --repeats 3 --out "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
echo "exit $?" >> "$OUT/bench.txt"
tail -15 "$OUT/bench.txt" | tee -a "$OUT/summary.txt"

for amp in "" "--amp"; do
  tag=segviz_cuda${amp:+_amp}
  log "python train.py --nodes 4 --mode segviz --device cuda $amp (the default run, on the GPU)"
  start=$(date +%s)
  timeout 200 python3 train.py --nodes 4 --mode segviz --device cuda $amp --overwrite \
    --out "/tmp/$tag" --cache /tmp/segviz-cache > "$OUT/$tag.txt" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/$tag.txt"
  cp "/tmp/$tag/seed-0/metrics.json" "$OUT/${tag}_metrics.json" 2>/dev/null
  grep -v "^round" "$OUT/$tag.txt" | tail -8 | tee -a "$OUT/summary.txt"
done
