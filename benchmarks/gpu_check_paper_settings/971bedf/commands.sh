#!/bin/bash
# device wrapper (not committed): the CIFAR-10 teacher's CLI update, eager then trainer.compile=default
[ -d /tmp/site/hydra ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
D=/tmp/ce/data; R=/tmp/ce/runs
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -lms 500 > $OUT/gpu.csv &
python3 scripts/fake_paper_data.py $D --images 1 > $OUT/data.log 2>&1 || exit 2
W="experiment=cifar10_diffusion_teacher dataset.data_dir=$D callbacks.progress=plain runs_dir=$R trainer.test_after_fit=false trainer.check_val_every_n_epoch=1000 dataset.num_workers=8 trainer.log_every_n_steps=25"
timeout 45 python3 -m distillkit.cli $W name=eager trainer.max_steps=127 > $OUT/cifar10_teacher_eager.log 2>&1; echo "eager exit $?"
timeout 135 python3 -m distillkit.cli $W name=compiled trainer.compile=default trainer.max_steps=1002 > $OUT/cifar10_teacher_compiled.log 2>&1; echo "compiled exit $?"
kill %1
grep -h -E "step [0-9]+ |results|Error" $OUT/cifar10_teacher_*.log | tail -30
