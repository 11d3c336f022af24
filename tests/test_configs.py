"""Every experiment and group option composes against its schema; the CIFAR-100 KD recipe
runs end to end on a tiny fake CIFAR folder with a RepDistiller-format teacher file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distillkit.cli import CONF_DIR, missing_values, register_resolvers
from distillkit.config import register_configs
from test_data_cifar import write_cifar100

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
REQUIRED = {"dataset.data_dir": "/data", "teacher.checkpoint": "/t.pth",
            "method.student_layer": "layer1", "method.teacher_layer": "layer1",
            "model.pretrained": "/models/m", "dataset.captions_file": "/data/captions.json"}


def _compose(overrides):
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    fill = [f"{k}={v}" for k, v in REQUIRED.items() if k in missing_values(cfg)]
    cfg = _compose([f"experiment={experiment}", *fill])
    assert not missing_values(cfg)
    assert cfg.experiment_name == experiment
    OmegaConf.to_container(cfg.method, resolve=False)
    # debug=smoke is a seconds-long check of the whole path (scripts/bench_smoke.py times each
    # experiment: under 20 s on 2 cores): no experiment may override its small budget, and the
    # evaluation runs on 64 samples at the experiment's own step counts
    smoke = _compose([f"experiment={experiment}", *fill, "debug=smoke"])
    assert smoke.trainer.max_steps == 6 and smoke.trainer.limit_val_batches == smoke.trainer.limit_test_batches == 2
    assert smoke.dataset.batch_size == 16
    if cfg.eval.enabled:
        assert smoke.eval.enabled and smoke.eval.num_samples == smoke.eval.batch_size == 64
        assert list(smoke.eval.steps) == list(cfg.eval.steps)


@pytest.mark.parametrize("paper", sorted(p.stem for p in (Path(CONF_DIR) / "paper").glob("*.yaml")))
def test_choosing_method_and_model_puts_in_the_papers_settings(paper):
    """``method=dmd2 model=sdxl`` (the README's headline command) trains with what experiment=dmd2_sdxl
    trains with: conf/paper/dmd2_sdxl.yaml, which config.yaml selects as ``paper: ${method}_${model}``
    (likewise dmd2 / lcm with sd15 / sdxl); a key given on the command line still wins."""
    method, model = paper.split("_", 1)
    fill = ["model.pretrained=/models/m", "dataset.captions_file=/data/captions.json"]
    chosen = _compose([f"method={method}", f"model={model}", f"teacher={model}", "dataset=coco_captions", *fill])
    experiment = _compose([f"experiment={paper}", *fill])
    for cfg in (chosen, experiment):  # the run name resolves only inside a Hydra run
        cfg.name = "n"
    assert {**OmegaConf.to_container(chosen, resolve=True), "experiment_name": paper} == \
        OmegaConf.to_container(experiment, resolve=True)
    assert chosen.optim.optimizer._target_ == "torch.optim.AdamW" and chosen.teacher.pretrained == "/models/m"
    given = _compose([f"method={method}", f"model={model}", f"teacher={model}", "dataset=coco_captions", *fill,
                      "trainer.max_steps=7", "optim.optimizer.lr=0.5"])
    assert given.trainer.max_steps == 7 and given.optim.optimizer.lr == 0.5
    plain = _compose([f"method={method}", "model=unet_digits", "teacher=unet_digits"])  # no paper for this pair
    assert plain.optim.optimizer._target_ == "torch.optim.Adam"


@pytest.mark.parametrize("group", ["model", "method", "dataset", "optim", "schedule", "logger", "teacher"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")):
        _compose([f"{group}={option}"])


def test_cifar100_kd_recipe_runs_on_fake_cifar(cli, runs_dir, tmp_path):
    from distillkit.models.cifar_resnet import resnet32x4

    data = write_cifar100(tmp_path / "data", n_train=16, n_test=8)
    teacher = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": resnet32x4(num_classes=100).state_dict(), "epoch": 240}, teacher)
    r = cli("experiment=cifar100_kd", f"dataset.data_dir={data}", f"teacher.checkpoint={teacher}",
            f"runs_dir={runs_dir}", "dataset.batch_size=4", "dataset.eval_batch_size=8", "dataset.num_workers=0",
            "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "trainer.accelerator=cpu", "callbacks.progress=none")
    assert r.returncode == 0, r.output
    res = json.loads(next((runs_dir / "cifar100_kd").iterdir()).joinpath("results.json").read_text())
    assert res["global_step"] == 2 and "test/acc" in res


# The recipe the benchmark measured as progressive_annealed / dsdi_annealed, written as overrides.
ANNEALED = ["optim.optimizer.lr=1e-3", "optim.scheduler.name=linear", "method.fresh_optimizer=true",
            "callbacks.ema.enabled=false"]


@pytest.mark.parametrize("base,key,updates", [("digits_progressive", "updates_per_round", 1000),
                                              ("digits_dsdi", "updates_per_level", 1008)])
def test_annealed_experiments_are_the_measured_recipe(base, key, updates):
    """experiment=<base>_annealed composes to exactly <base> plus the annealed overrides the
    benchmark's rows were trained with, and its anneal follows a changed round length."""
    def resolved(overrides):
        cfg = OmegaConf.to_container(_compose(overrides), resolve=False)
        cfg.pop("experiment_name"), cfg.pop("name")  # the run's directory: ${hydra:...} resolves in a run only
        return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)

    overlay = resolved([f"experiment={base}_annealed"])
    assert overlay == resolved([f"experiment={base}", *ANNEALED, f"optim.scheduler.cycle_steps={updates}"])
    assert overlay != resolved([f"experiment={base}"])
    longer = resolved([f"experiment={base}_annealed", f"method.{key}=8000"])
    assert longer["optim"]["scheduler"]["cycle_steps"] == 8000


def test_limit_batches_int_is_a_count_float_a_fraction(cli, runs_dir):
    """Lightning's meaning: trainer.limit_train_batches=1 is one batch an epoch (the schema once made it
    1.0, all of them), 0.5 half of them."""
    r = cli("experiment=digits_teacher", f"runs_dir={runs_dir}", "trainer.max_epochs=2", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "trainer.test_after_fit=false", "callbacks.progress=none", "name=one")
    assert r.returncode == 0, r.output
    assert json.loads((runs_dir / "digits_teacher" / "one" / "results.json").read_text())["global_step"] == 2
    r = cli("experiment=digits_teacher", f"runs_dir={runs_dir}", "trainer.max_epochs=1", "trainer.limit_train_batches=0.5",
            "trainer.limit_val_batches=1", "trainer.test_after_fit=false", "callbacks.progress=none", "name=half")
    assert r.returncode == 0, r.output
    # 1,078 training digits in batches of 64 (the last incomplete batch dropped): 16, half of it 8
    assert json.loads((runs_dir / "digits_teacher" / "half" / "results.json").read_text())["global_step"] == 8
