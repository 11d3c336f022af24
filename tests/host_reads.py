"""Run the CLI and record every read of a tensor's value into Python made during a training
batch (``python tests/host_reads.py OUT.json <CLI overrides>``; used by test_host_reads.py).

On a GPU each such read (``.item()``, ``float(t)``, ``if t:``, ``.tolist()``, ``.numpy()``), each
tensor built from Python numbers on the device and each boolean-mask index (``x[mask]``: the
size of its result is the number of True entries, which the host must read) waits for all the
work queued before it, so the GPU idles while the CPU catches up. CPU runs cannot see the wait,
but they can see the calls. With CUDA, the batches also run under
``torch.cuda.set_sync_debug_mode("warn")`` and every synchronising CUDA call is recorded too (e.g.
a copy from pageable host memory), and a tensor built from Python data counts only when it lands
on the GPU (torch's multi-tensor Adam builds a CPU scalar per update, which waits for nothing).
The JSON gives each site's count (``reads``) and the training batches it occurred in
(``batches``, 0-based), so that work done once per round can be told from work done per update.
Left out: reads that stay on the CPU in a GPU run too (torch's optimizers keep their step
counts on the CPU; the timestep range check in ``diffusion/schedules.py`` runs for CPU
timesteps only; DMD's ``host_randint`` draws a multi-step generator's step index from a CPU
generator), and Lightning's accumulator of a logged value, built once per key and epoch.
"""
from __future__ import annotations

import collections
import json
import sys
import traceback
import warnings

import torch

LEFT_OUT = (("torch/optim/optimizer.py", "_get_value"), ("torch/optim/", "_init_group"),
            ("distillkit/diffusion/schedules.py", "_ac"), ("distillkit/methods/dmd.py", "host_randint"),
            ("lightning/pytorch/trainer/connectors/logger_connector/result.py", "__init__"))
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")
BUILDS = ("tensor", "as_tensor")

reads: collections.Counter = collections.Counter()
batches: dict = collections.defaultdict(set)
in_batch = [False]
updates = [0]
cuda = [False]


def _site() -> str | None:
    frames = [f for f in traceback.extract_stack()[:-2] if f.filename not in (__file__, warnings.__file__)]
    inner = frames[-1]
    path = inner.filename.replace("\\", "/")
    for where, func in LEFT_OUT:
        if where in path and (func is None or inner.name == func):
            return None
    own = [f for f in frames if "/distillkit/" in f.filename.replace("\\", "/")]
    via = f" (from {own[-1].filename.split('/distillkit/')[-1]}:{own[-1].lineno})" if own else ""
    return f"{path.split('site-packages/')[-1].split('/work/')[-1]}:{inner.lineno} {inner.name}{via}"


def _record(kind: str) -> None:
    if in_batch[0]:
        site = _site()
        if site is not None:
            reads[f"{kind} at {site}"] += 1
            batches[f"{kind} at {site}"].add(updates[0])


def _wrap_read(name: str) -> None:
    orig = getattr(torch.Tensor, name)

    def read(self, *a, **k):
        _record(name)
        return orig(self, *a, **k)

    setattr(torch.Tensor, name, read)


def _wrap_build(name: str) -> None:
    orig = getattr(torch, name)

    def build(data, *a, **k):
        out = orig(data, *a, **k)
        if not isinstance(data, torch.Tensor) and (out.is_cuda or not cuda[0]):
            _record(f"torch.{name}(python data)")
        return out

    setattr(torch, name, build)


def _has_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _wrap_mask_index(name: str) -> None:
    orig = getattr(torch.Tensor, name)

    def index(self, key, *a):
        if _has_mask(key):
            _record("boolean-mask index")
        return orig(self, key, *a)

    setattr(torch.Tensor, name, index)


def _record_cuda_syncs() -> None:
    warnings.filterwarnings("always", message=".*synchroniz")
    show = warnings.showwarning

    def record(message, category, *a, **k):
        if "synchroniz" in str(message):
            _record("CUDA sync")
        else:
            show(message, category, *a, **k)

    warnings.showwarning = record


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    for n in READS:
        _wrap_read(n)
    for n in BUILDS:
        _wrap_build(n)
    for n in ("__getitem__", "__setitem__"):
        _wrap_mask_index(n)
    cuda[0] = torch.cuda.is_available()
    if cuda[0]:
        _record_cuda_syncs()

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class Watch(Callback):
        # the window opens after the debug mode is on and closes before it is off: switching it
        # is not the batch's work
        def on_train_batch_start(self, *a):
            if cuda[0]:
                torch.cuda.set_sync_debug_mode("warn")
            in_batch[0] = True

        def on_train_batch_end(self, *a):
            in_batch[0] = False
            if cuda[0]:
                torch.cuda.set_sync_debug_mode("default")
            updates[0] += 1

    fit = L.Trainer.fit

    def watched_fit(self, *a, **k):
        # first, so that its on_train_batch_end ends the window before other callbacks run
        self.callbacks.insert(0, Watch())
        return fit(self, *a, **k)

    L.Trainer.fit = watched_fit
    from distillkit import cli

    sys.argv = ["distill", *args]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = int(e.code or 0)
    with open(out, "w") as f:
        json.dump({"exit_code": code, "updates": updates[0], "cuda": cuda[0], "reads": dict(reads),
                   "batches": {k: sorted(v) for k, v in batches.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
