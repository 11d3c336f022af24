"""``distill`` with events placed at exact optimizer steps, for the resume tests.

Environment:
- ``STOP_AT_STEP=N``: the process sends itself ``STOP_SIGNAL`` (default SIGTERM) at the end of
  step N, as a preemption would (the signal's own timing is left to chance in test_resume's
  other tests);
- ``DIE_AT_STEP=N``: the process dies at the end of step N without writing anything (a node
  lost), so the run resumes from the last checkpoint written before;
- ``LAUNCHER_SIGNAL=USR2``: before the CLI starts, a handler for that signal is installed as a
  cluster launcher does (submitit's requeues the job); it writes the signal and the step of
  ``LAUNCHER_CKPT`` (the run's last.ckpt) to ``LAUNCHER_RECORD`` when it is called and exits with
  status 3, as submitit exits after requeueing;
- ``SAVE_RECORD=path``: every write of ``last.ckpt`` appends a line ``<global_step> <hook>`` to
  path, the hook being the callback method that wrote it (``on_train_batch_end``,
  ``on_train_epoch_end``, ``on_train_end``).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from distillkit.callbacks import checkpoint

stop_at = int(os.environ.get("STOP_AT_STEP", -1))
die_at = int(os.environ.get("DIE_AT_STEP", -1))
stop_signal = getattr(signal, "SIG" + os.environ.get("STOP_SIGNAL", "TERM"))
batch_end = checkpoint.LastCheckpoint.on_train_batch_end


def on_train_batch_end(self, trainer, *args, **kwargs):
    if trainer.global_step == die_at:
        os._exit(9)
    if trainer.global_step == stop_at and not self._stop_signal:
        os.kill(os.getpid(), stop_signal)
    return batch_end(self, trainer, *args, **kwargs)


checkpoint.LastCheckpoint.on_train_batch_end = on_train_batch_end

if os.environ.get("SAVE_RECORD"):
    save = checkpoint.LastCheckpoint.save

    def recording_save(self, trainer, *args, **kwargs):
        hook = sys._getframe(1).f_code.co_name
        before = self.path.stat().st_ino if self.path.exists() else None
        save(self, trainer, *args, **kwargs)
        if trainer.is_global_zero and self.path.stat().st_ino != before:  # a new file renamed over it
            with open(os.environ["SAVE_RECORD"], "a") as f:
                f.write(f"{trainer.global_step} {hook}\n")

    checkpoint.LastCheckpoint.save = recording_save

if os.environ.get("LAUNCHER_SIGNAL"):
    def launcher_handler(signum, frame):
        import torch

        step = torch.load(os.environ["LAUNCHER_CKPT"], map_location="cpu", weights_only=True)["global_step"]
        Path(os.environ["LAUNCHER_RECORD"]).write_text(f"{signum} {step}\n")
        sys.exit(3)

    signal.signal(getattr(signal, "SIG" + os.environ["LAUNCHER_SIGNAL"]), launcher_handler)

if __name__ == "__main__":
    from distillkit.cli import main

    main()
