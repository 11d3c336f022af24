"""Every classifier method through the real CLI on tiny configs, and the frozen teacher."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SMOKE = ("debug=smoke", "callbacks.progress=none")


@pytest.mark.parametrize("method", ["supervised", "kd", "dkd", "fitnet"])
def test_method_smoke_through_cli(cli, runs_dir, digits_teacher_ckpt, method):
    args = [f"experiment=digits_{'student' if method == 'supervised' else method}", f"runs_dir={runs_dir}", *SMOKE]
    if method != "supervised":
        args.append(f"teacher.checkpoint={digits_teacher_ckpt}")
    r = cli(*args)
    assert r.returncode == 0, r.output
    exp = "digits_student" if method == "supervised" else f"digits_{method}"
    run = next((runs_dir / exp).iterdir())
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 6 and 0.0 <= res["test/acc"] <= 1.0
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)  # plain types only
    cls = {"supervised": "Supervised", "kd": "KD", "dkd": "DKD", "fitnet": "FitNet"}[method]
    assert ckpt["distillkit"]["config"]["method"]["_target_"] == f"distillkit.methods.{method}.{cls}"
    # network evaluations: the student's forward, plus the frozen teacher's for a distillation
    per_update = 1 if method == "supervised" else 2
    assert ckpt["distillkit"]["nfe"] == 6 * per_update
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("student.") for k in keys)
    assert not any(k.startswith("teacher") for k in keys), "the teacher must not be saved with the student"
    if method != "supervised":
        assert ckpt["distillkit"]["config"]["teacher"]["checkpoint"] == str(digits_teacher_ckpt)
    assert set(load_file(str(run / "student.safetensors"))) == {k[len("student."):] for k in keys if k.startswith("student.")}


def test_plain_state_dict_teacher(cli, runs_dir, tmp_path):
    """A teacher given as a plain state dict ({"model": sd}, RepDistiller's format) loads."""
    from distillkit.models.cnn import DigitsCNN

    path = tmp_path / "teacher.pth"
    torch.save({"model": DigitsCNN(64).state_dict()}, path)
    r = cli("experiment=digits_kd", f"runs_dir={runs_dir}", f"teacher.checkpoint={path}", *SMOKE)
    assert r.returncode == 0, r.output


def _fit_in_process(method_cls, teacher, steps=8, **kw):
    import lightning as L

    from distillkit.data.digits import DigitsDataModule
    from distillkit.models.cnn import DigitsCNN

    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, seed=0)
    method = method_cls(DigitsCNN(4), teacher=teacher,
                        optim_cfg={"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}},
                        input_shape=(1, 8, 8), **kw)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=1)
    trainer.fit(method, datamodule=dm)
    return method, trainer


@pytest.mark.parametrize("name", ["kd", "dkd", "fitnet"])
def test_teacher_is_frozen(name):
    """Teacher weights and BatchNorm buffers are bit-identical after training, the teacher is
    in eval mode, has no gradients, and is not in the optimizer."""
    from distillkit.methods.dkd import DKD
    from distillkit.methods.fitnet import FitNet
    from distillkit.methods.kd import KD
    from distillkit.models.cnn import DigitsCNN

    cls, kw = {"kd": (KD, {}), "dkd": (DKD, {"warmup_epochs": 1}),
               "fitnet": (FitNet, {"student_layer": "block2", "teacher_layer": "block2"})}[name]
    torch.manual_seed(1)
    teacher = DigitsCNN(16)
    # non-trivial BN statistics, so a change would show
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method, trainer = _fit_in_process(cls, teacher, **kw)
    after = teacher.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), f"teacher {k} changed"
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    assert opt_params >= {id(p) for p in method.student.parameters()}
    assert not any(k.startswith("teacher") for k in method.state_dict())


def test_training_runs_with_the_heap_frozen_and_unfrozen_after_even_on_error():
    """cli.heap_frozen: what was built before training is out of the cyclic collector's full
    passes while training runs, and back in them afterwards, also when training raises."""
    import gc

    from distillkit.cli import heap_frozen

    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        with heap_frozen():
            assert gc.get_freeze_count() > 1000
            raise RuntimeError("a failed fit")
    assert gc.get_freeze_count() == 0
