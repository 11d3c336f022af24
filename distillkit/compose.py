"""Composing distillkit's Hydra config, shared by every command that composes it (``distill``,
``distill-eval``, scripts, tests): the resolvers conf/config.yaml uses, ``distill --help``'s text,
and the one-paragraph message for a composition error (a misspelt key, a wrong type, an unknown
option). It sits below :mod:`distillkit.cli`, which imports it, so that no module has to import the
CLI for them.
"""
from __future__ import annotations

import difflib
import textwrap
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from distillkit.config import SCHEMAS, field_names
from distillkit.errors import root_cause
from distillkit.paths import CONF_DIR
from distillkit.runs import run_name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dk_run_name"):
        OmegaConf.register_new_resolver("dk_run_name", run_name)
    if not OmegaConf.has_resolver("dk_help"):
        OmegaConf.register_new_resolver("dk_help", help_template)


def help_template() -> str:
    """``distill --help`` (Hydra's ``hydra.help.template``): what to type, the config groups and
    their options as the yaml files under conf/ name them (Hydra's own list would also show the
    schema groups, which are not for the command line), then the composed config."""
    root = Path(CONF_DIR)
    groups = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.yaml")))
    width = max(len(g) for g in groups)
    listing = "\n".join(textwrap.fill(", ".join(sorted(f.stem for f in (root / g).glob("*.yaml"))), width=100,
                                       initial_indent=f"  {g:<{width}}  ", subsequent_indent=" " * (width + 4))
                         for g in groups)
    return f"""distill: distil neural networks (distillkit). The same command resumes the same run.

Usage:
  distill experiment=digits_teacher                  # an experiment: an overlay of the groups below
  distill experiment=digits_kd method.temperature=2  # any key of the config below, as key=value
  distill method=dkd model=resnet8x4 teacher=resnet32x4 teacher.checkpoint=PATH \\
          dataset=cifar100 dataset.data_dir=DIR optim=sgd
  distill -m experiment=digits_kd seed=0,1,2         # a sweep: one run per combination
  distill experiment=digits_kd --cfg job             # print the composed config and exit
  distill experiment=digits_kd --help                # this help with that experiment's config

Config groups (group=option):
{listing}

Sampling, export and scoring: distill-sample, distill-export, distill-eval (each with --help).
Hydra's own options (launchers, sweepers, logging): distill --hydra-help.
Exit status: 0 done; 2 bad setting; 3 non-finite loss or gradient (callbacks.nonfinite);
128+N stopped by signal N (run the same command again to resume).

Config (with the overrides given):
$CONFIG"""


# --------------------------------------------------------------------------- composition errors
def _schema_by_name(type_name: str) -> Optional[type]:
    for options in SCHEMAS.values():
        for schema in options.values():
            if schema.__name__ == type_name:
                return schema
    from distillkit import config as c

    return getattr(c, type_name, None)


def explain_compose_error(e: BaseException) -> str:
    """One paragraph that names the key and what is allowed."""
    cause = root_cause(e)
    full_key = getattr(cause, "full_key", None)
    obj_type = getattr(cause, "object_type", None)
    text = str(cause).split("\n")[0]
    if full_key and obj_type is not None and ("not in" in text or "not a" in text.lower()):
        schema = obj_type if isinstance(obj_type, type) else _schema_by_name(str(obj_type))
        if full_key.startswith("teacher.") and getattr(schema, "__name__", "") in ("NoTeacherConfig", "SelfTeacherConfig"):
            which = "none" if schema.__name__ == "NoTeacherConfig" else "self"
            return (f"unknown key '{full_key}': teacher={which} has no {full_key.split('.', 1)[1]}. Choose the "
                    f"teacher's architecture first, then its weights, e.g. teacher=cnn_digits {full_key}=PATH "
                    "(options: the model names, e.g. unet_digits, resnet32x4, sd15)")
        allowed = [f for f in field_names(schema) if not f.startswith("_")] if schema else []
        leaf = full_key.split(".")[-1]
        close = difflib.get_close_matches(leaf, allowed, n=1)
        parent = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
        msg = f"unknown key '{full_key}'."
        if close:
            msg += f" Did you mean '{full_key.rsplit('.', 1)[0] + '.' if '.' in full_key else ''}{close[0]}'?"
        if allowed:
            msg += f" Keys allowed in {parent}: {', '.join(allowed)}."
        return msg
    msg = str(e) if not str(cause) else str(cause)
    if "Could not find" in str(e) or "Available options" in str(e):
        msg = str(e)
    # Hydra appends its search path, which says nothing to a user who mistyped an option.
    msg = msg.split("\nConfig search path:")[0].strip()
    return msg
