#!/usr/bin/env bash
# Preemption and requeue on a real SLURM cluster (e.g. the single-node one of the local-slurm
# recipe: slurmctld + slurmd on this machine, SLURM_CONF exported). Three runs of the same
# short job (the digits diffusion teacher, 1,000 updates, one thread):
#   1. without SLURM, uninterrupted: the reference;
#   2. through hydra-submitit-launcher (distill -m hydra/launcher=submitit_slurm), sent SIGUSR2
#      after step 200 (what SLURM sends under submitit before a time limit or a preemption);
#   3. an sbatch script running `srun distill ...`, sent SIGUSR1 after step 200;
#   4. DDP over two SLURM tasks through submitit (gloo on CPU), sent SIGUSR2 after step 200,
#      against the same DDP run without SLURM (two local processes);
#   5. DMD2 (two roles, 5 critic updates per generator update, sampling EMA) from run 1's teacher,
#      through submitit, sent SIGUSR2 after generator update 40: 4 of its 5 batches are critic
#      updates, so it most likely stops mid-cycle; against the same run without SLURM.
# Each interrupted job must write last.ckpt, be requeued (by submitit, or by the run's own
# `scontrol requeue`), resume, and end with weights bit-identical to its reference.
# Usage: bash scripts/check_slurm_requeue.sh [OUT]   (needs distillkit[slurm] and 2 CPUs; ~15
# minutes on 2 cores, most of it SLURM's delay before a requeued job starts again)
set -euo pipefail
OUT=${1:-/tmp/distillkit_slurm_check}
PARTITION=${PARTITION:-debug}
BIN=$(cd "$(dirname "${PY:-.venv/bin/python}")" && pwd)
ARGS=(experiment=digits_diffusion_teacher trainer.max_steps=1000 eval.enabled=false callbacks.progress=plain
      trainer.cpu_threads=1)
rm -rf "$OUT" && mkdir -p "$OUT"

wait_for() {  # wait_for FILE_GLOB PATTERN SECONDS
    local deadline=$((SECONDS + $3))
    until grep -qs -- "$2" $1; do
        [ $SECONDS -lt $deadline ] || { echo "timed out waiting for '$2' in $1" >&2; exit 1; }
        sleep 2
    done
}

# submitit_stopped NAME EXPERIMENT STEP ARGS...: the run of ARGS through submitit into $OUT/NAME, sent
# SIGUSR2 (what SLURM sends under submitit before a time limit or a preemption) once its log shows
# STEP; returns when the sweep ends (after submitit's requeue and the resumed run)
submitit_stopped() {
    local name=$1 experiment=$2 step=$3; shift 3
    "$BIN/distill" -m hydra/launcher=submitit_slurm hydra.launcher.partition="$PARTITION" hydra.launcher.timeout_min=30 \
        hydra.launcher.cpus_per_task=1 "$@" runs_dir="$OUT/$name" > "$OUT/$name.log" 2>&1 &
    local sweep=$!
    wait_for "$OUT/$name/$experiment/*/cli.log" " step $step[/ ]" 300
    scancel --signal=USR2 "$(basename "$(ls -d "$OUT/$name/$experiment/.submitit"/*/ | head -1)")"
    wait "$sweep"
}

echo "1. reference (no SLURM)"
"$BIN/distill" "${ARGS[@]}" runs_dir="$OUT/reference" > "$OUT/reference.log" 2>&1

echo "2. submitit: SIGUSR2 after step 200"
submitit_stopped submitit digits_diffusion_teacher 200 "${ARGS[@]}"

echo "3. sbatch + srun: SIGUSR1 after step 200"
cat > "$OUT/job.sh" <<EOF
#!/bin/bash
#SBATCH --job-name=distillkit-check
#SBATCH --output=$OUT/sbatch-%j.out
#SBATCH --requeue
#SBATCH --cpus-per-task=1
srun "$BIN/distill" ${ARGS[*]} runs_dir="$OUT/sbatch"
EOF
job=$(sbatch --parsable --partition="$PARTITION" "$OUT/job.sh")
wait_for "$OUT/sbatch/digits_diffusion_teacher/*/cli.log" " step 200[/ ]" 300
scancel --signal=USR1 "$job"
wait_for "$OUT/sbatch/digits_diffusion_teacher/*/cli.log" "results:" 600

echo "4. DDP, 2 SLURM tasks through submitit: SIGUSR2 after step 200"
DDP=(trainer.devices=2 trainer.strategy=ddp trainer.accelerator=cpu trainer.max_steps=600)
"$BIN/distill" "${ARGS[@]}" "${DDP[@]}" runs_dir="$OUT/ddp_reference" > "$OUT/ddp_reference.log" 2>&1
submitit_stopped ddp digits_diffusion_teacher 200 hydra.launcher.tasks_per_node=2 "${ARGS[@]}" "${DDP[@]}"

echo "5. DMD2 through submitit: SIGUSR2 after generator update 40"
TEACHER=$(ls "$OUT"/reference/digits_diffusion_teacher/*/last.ckpt | head -1)
DMD2=(experiment=digits_dmd2 teacher.checkpoint="$TEACHER" trainer.max_steps=120 eval=none callbacks.progress=plain
      trainer.cpu_threads=1 trainer.log_every_n_steps=20)
"$BIN/distill" "${DMD2[@]}" runs_dir="$OUT/dmd2_reference" > "$OUT/dmd2_reference.log" 2>&1
submitit_stopped dmd2 digits_dmd2 40 "${DMD2[@]}"

"$BIN/python" - "$OUT" <<'EOF'
import glob, sys
import torch
from safetensors.torch import load_file

out = sys.argv[1]
ok = True
for how, reference in (("submitit", "reference"), ("sbatch", "reference"), ("ddp", "ddp_reference"),
                       ("dmd2", "dmd2_reference")):
    ref = load_file(glob.glob(f"{out}/{reference}/*/*/student.safetensors")[0])
    log = open(glob.glob(f"{out}/{how}/*/*/cli.log")[0]).read()
    stopped = [l for l in log.splitlines() if "stopped by signal" in l]
    resumed = "resuming from" in log
    same = all(torch.equal(ref[k], v) for k, v in load_file(glob.glob(f"{out}/{how}/*/*/student.safetensors")[0]).items())
    print(f"{how}: {stopped[0].split(' - ')[-1][:100] if stopped else 'never stopped'}; resumed: {resumed}; "
          f"weights bit-identical to the reference: {same}")
    ok &= bool(stopped) and resumed and same
sys.exit(0 if ok else 1)
EOF
