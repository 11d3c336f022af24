"""Where distillkit's own files are: the Hydra config root. Kept apart from the CLI so that any
module (model loading, evaluation, scripts) can find the configs without importing the CLI."""
from __future__ import annotations

from pathlib import Path


def find_conf_dir() -> str:
    """The Hydra config root: ``distillkit/conf`` inside an installed wheel, else the
    repository's top-level ``conf/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise RuntimeError(f"distillkit's config folder is missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


CONF_DIR = find_conf_dir()
