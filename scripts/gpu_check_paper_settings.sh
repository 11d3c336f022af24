#!/usr/bin/env bash
# The GPU check of the paper-setting experiments: each runs a few hundred updates on
# stand-in data of the real shapes (scripts/fake_paper_data.py), and the plain progress lines
# ("step N/T (epoch E), ..." and their time stamps) give the seconds per update; nvidia-smi logs the memory;
# scripts/gpu_check_summary.py writes both to OUT/summary.json. First, since they are shorter and a
# lease may end before the rest, tests/test_host_reads.py runs on the GPU (OUT/host_reads.log) and
# scripts/probe_unet_compile.py times the CIFAR-10 UNet's update (OUT/probe_unet_compile.json).
#   bash scripts/gpu_check_paper_settings.sh [OUT]        # OUT defaults to runs/gpu_check
# S=0 runs the minimum (one or two updates each, at batch 2) to check the script
# itself on any machine. STAGE_S=N stops each step after N seconds (exit 124), so one stuck step
# leaves the lease's time to the rest; 0, the default, never stops them. PROBES=0 skips the
# host-reads test and the compile probe; EXTRA="KEY=VALUE ..." adds overrides to every training run,
# e.g. the compiled check: PROBES=0 EXTRA=trainer.compile=default bash ... OUT_COMPILED, whose
# summary.json compares row by row with an eager check's.
set -uo pipefail
OUT=${1:-runs/gpu_check}; S=${S:-1}; PY=${PY:-python}; STAGE_S=${STAGE_S:-0}; PROBES=${PROBES:-1}; D=$OUT/data; R=$OUT/runs
SMALL=""; [ "$S" = 0 ] && SMALL="dataset.batch_size=2 dataset.eval_batch_size=2"
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then  # its runs would resume, not measure
  echo "gpu_check_paper_settings: $OUT is not empty (an earlier check?); name another OUT or remove it" >&2; exit 2
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -lms 500 > "$OUT/gpu.csv" 2>/dev/null &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT
W="callbacks.progress=plain runs_dir=$R name=check trainer.test_after_fit=false trainer.check_val_every_n_epoch=1000 $SMALL ${EXTRA:-}"
run() {  # log name, then the command's arguments
  local n=$1; shift
  timeout "$STAGE_S" $PY "$@" > "$OUT/$n.log" 2>&1; echo "== $n: exit $?"
  grep -E "step [0-9]+[/ ]|(round|level) [0-9]+ of|results:|Error| passed| failed|\"variant\"" "$OUT/$n.log" | tail -12
}
# training updates free of host reads and synchronising CUDA calls (set_sync_debug_mode), on the GPU;
# its 10 CLI runs in parallel where pytest-xdist is there (the device image has it)
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
[ "$PROBES" = 1 ] && run host_reads -m pytest -q -p no:cacheprovider $XDIST -rf --tb=short tests/test_host_reads.py
# the CIFAR-10 UNet's update eager, channels-last and compiled (OUT/probe_unet_compile.json)
[ "$PROBES" = 1 ] && run probe_unet_compile scripts/probe_unet_compile.py --out "$OUT/probe_unet_compile.json" \
  --updates $((50*S+1)) --warmup $((5*S+1)) $([ "$S" = 0 ] && echo "--batch 2 --variants eager channels_last" \
  || echo "--variants eager channels_last compile")  # one compiled variant: each compiles its graph first
$PY scripts/fake_paper_data.py "$D" || exit 1
run cifar10_teacher -m distillkit.cli experiment=cifar10_diffusion_teacher dataset.data_dir="$D" $W \
  dataset.num_workers=8 trainer.max_steps=$((400*S+2)) trainer.log_every_n_steps=$((100*S+1))
run cifar10_progressive -m distillkit.cli experiment=cifar10_progressive dataset.data_dir="$D" $W \
  teacher.checkpoint="$R/cifar10_diffusion_teacher/check/last.ckpt" method.updates_per_round=$((30*S+1)) \
  trainer.log_every_n_steps=$((10*S+1))
for r in 10 8; do  # 1 and 4 steps
  run sample_round_$r -m distillkit.sample checkpoint="$R/cifar10_progressive/check/round_$r.ckpt" \
    num_samples=$((1000*S+8)) out="$OUT/round_$r.npz"
done
run celebahq_dsdi -m distillkit.cli experiment=celebahq_dsdi model.pretrained="$D/ddpm-celebahq-256" \
  dataset.data_dir="$D/images" $W method.updates_per_level=$((20*S+1)) trainer.log_every_n_steps=$((5*S+1))
run celebahq_progressive -m distillkit.cli experiment=celebahq_progressive teacher.pretrained="$D/ddpm-celebahq-256" \
  dataset.data_dir="$D/images" $W method.updates_per_round=$((20*S+1)) method.convert_updates=$((5*S)) \
  trainer.log_every_n_steps=$((5*S+1))
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
MACHINE="${GPU:-no GPU}, $($PY -c 'import torch; print("torch", torch.__version__)')"
$PY scripts/gpu_check_summary.py --gpu-csv "$OUT/gpu.csv" --machine "$MACHINE" --out "$OUT/summary.json" \
  cifar10_diffusion_teacher="$OUT/cifar10_teacher.log" cifar10_progressive="$OUT/cifar10_progressive.log" \
  celebahq_dsdi="$OUT/celebahq_dsdi.log" celebahq_progressive="$OUT/celebahq_progressive.log"
