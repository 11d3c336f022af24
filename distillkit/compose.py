"""Composing distillkit's Hydra config, shared by every command that composes it (``distill``,
``distill-eval``, scripts, tests): the resolvers conf/config.yaml uses, ``distill --help``'s text,
and the one-paragraph message for a composition error (a misspelt key, a wrong type, an unknown
option). It sits below :mod:`distillkit.cli`, which imports it, so that no module has to import the
CLI for them.
"""
from __future__ import annotations

import difflib
import re
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from distillkit.config import SCHEMAS, field_names
from distillkit.errors import root_cause
from distillkit.paths import CONF_DIR


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dk_run_name"):
        OmegaConf.register_new_resolver("dk_run_name", run_name_resolver)
    if not OmegaConf.has_resolver("dk_help"):
        OmegaConf.register_new_resolver("dk_help", help_template)


def help_template() -> str:
    """``distill --help`` (Hydra's ``hydra.help.template``): what to type, the config groups and
    their options as the yaml files under conf/ name them (Hydra's own list would also show the
    schema groups, which are not for the command line), then the composed config."""
    root = Path(CONF_DIR)
    # paper/ is not chosen but follows from method and model (config.yaml: paper: ${method}_${model})
    groups = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.yaml")) and d.name != "paper")
    width = max(len(g) for g in groups)
    listing = "\n".join(textwrap.fill(", ".join(sorted(f.stem for f in (root / g).glob("*.yaml"))), width=100,
                                       initial_indent=f"  {g:<{width}}  ", subsequent_indent=" " * (width + 4))
                         for g in groups)
    pairs = ", ".join("method={} model={}".format(*f.stem.split("_", 1)) for f in sorted((root / "paper").glob("*.yaml")))
    if pairs:
        listing += f"\nA paper's settings come with these pairs (conf/paper/): {pairs}"
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


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _given(full_key: str, overrides: Sequence[str]) -> tuple[str, Optional[str]]:
    """The key and value as typed: OmegaConf names only the first component that does not exist
    (``scheduler`` of ``scheduler.name=cosine``), and the rest says where the user meant."""
    for o in overrides:
        key = _override_key(o)
        if "=" in o and (key == full_key or key.startswith(full_key + ".")):
            return key, o.split("=", 1)[1]
    return full_key, None


def _dotted_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every key of ``cfg``, nodes and leaves, dotted, in the config's order; nothing resolved (the
    run name's resolver needs Hydra's runtime)."""
    out: list[str] = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        out.append(full)
        node = cfg._get_node(key)
        if (isinstance(node, DictConfig) and not node._is_interpolation() and not node._is_none()
                and not node._is_missing()):
            out.extend(_dotted_keys(node, full + "."))
    return out


def config_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys of the config composed with only the group choices among ``overrides``
    (``method=kd`` decides which ``method.*`` keys exist; a key=value override does not, and the
    faulty one would fail again). Called inside Hydra's ``initialize_config_dir``; [] when even
    that does not compose."""
    from hydra import compose

    root = Path(CONF_DIR)
    groups = [o for o in overrides if "=" in o and not _override_key(o).startswith("hydra")
              and (root / _override_key(o)).is_dir()]
    try:
        return _dotted_keys(compose(config_name="config", overrides=groups))
    except Exception:
        return []


def _ranked(found: Sequence[str], lead: Sequence[str]) -> list[str]:
    """``found`` sharing most leading components with ``lead`` (the group the user was in), in the
    config's order; at most three."""
    def shared(k: str) -> int:
        c = 0
        for a, b in zip(k.split("."), lead):
            if a != b:
                break
            c += 1
        return c

    best = max(shared(k) for k in found)
    return [k for k in found if shared(k) == best][:3]


def keys_elsewhere(given: str, keys: Sequence[str]) -> list[str]:
    """Existing keys for one given at the wrong depth (``optim.lr`` -> ``optim.optimizer.lr``,
    ``scheduler.name`` -> ``optim.scheduler.name``): those ending with the most of its last
    components."""
    parts = given.split(".")
    for n in range(len(parts), 0, -1):
        tail = ".".join(parts[-n:])
        found = [k for k in keys if k != given and (k == tail or k.endswith("." + tail))]
        if found:
            return _ranked(found, parts[:-n])
    return []


def keys_close_to(given: str, keys: Sequence[str]) -> list[str]:
    """Existing keys for a misspelt one found nowhere: those whose last component is closest to
    its own (``optim.lrr`` -> ``optim.optimizer.lr``), else the closest full key. Neither its own
    parents nor private keys (``_target_``) are suggestions."""
    parts = given.split(".")
    keys = [k for k in keys if not given.startswith(k + ".") and not any(c.startswith("_") for c in k.split("."))]
    leaf = difflib.get_close_matches(parts[-1], sorted({k.rsplit(".", 1)[-1] for k in keys}), n=1, cutoff=0.75)
    if leaf:
        return _ranked([k for k in keys if k.rsplit(".", 1)[-1] == leaf[0]], parts[:-1])
    return difflib.get_close_matches(given, keys, n=1)


def _unknown_option(e: BaseException) -> Optional[str]:
    """``method=kdd``: the closest option, and the group's options. Hydra's exception carries both
    the option it looked for (``method/kdd``, ``hydra/launcher/foo``) and the group's options."""
    from hydra.errors import MissingConfigException

    while e is not None and not isinstance(e, MissingConfigException):
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    if e is None or not e.options or not e.missing_cfg_file or "/" not in e.missing_cfg_file:
        return None
    group, option = e.missing_cfg_file.rsplit("/", 1)
    options = sorted(e.options)
    close = difflib.get_close_matches(option, options, n=1)
    hint = f" Did you mean {group}={close[0]}?" if close else ""
    return f"unknown option {group}={option}.{hint} Options of {group}: {', '.join(options)}."


def _paper_setting(full_key: str, overrides: Optional[Sequence[str]]) -> Optional[str]:
    """When the key that does not exist was put in by conf/paper/METHOD_MODEL.yaml (the paper's
    settings that ``method=dmd2 model=sdxl`` bring), not typed: which group choice it needs."""
    if not overrides or any(_override_key(o) == full_key for o in overrides):
        return None
    choice = {_override_key(o): o.split("=", 1)[1] for o in overrides if "=" in o}
    method, model = choice.get("method"), choice.get("model")
    path = Path(CONF_DIR) / "paper" / f"{method}_{model}.yaml"
    if not (method and model and path.is_file()):
        return None
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    for part in full_key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return None
    group = full_key.split(".", 1)[0]
    have = f"{group}={choice[group]}" if group in choice else ("teacher=none" if group == "teacher" else f"the default {group}")
    need = {"teacher": f"teacher={model}", "dataset": "an image-text dataset, e.g. dataset=coco_captions"}.get(group, f"another {group}=")
    return (f"method={method} with model={model} puts in the paper's settings (conf/paper/{path.name}), and "
            f"{have} has no {full_key.split('.', 1)[1]}: choose {need}")


def explain_compose_error(e: BaseException, overrides: Optional[Sequence[str]] = None) -> str:
    """One paragraph that names the key and what is allowed. With the command's ``overrides``
    (inside Hydra's ``initialize_config_dir``) a key at the wrong depth is matched to the one that
    exists."""
    option = _unknown_option(e)
    if option:
        return option
    cause = root_cause(e)
    full_key = getattr(cause, "full_key", None)
    obj_type = getattr(cause, "object_type", None)
    text = str(cause).split("\n")[0]
    node = re.search(r"is not a subclass of (\w+)\. value: (.*)$", text)
    if full_key and node:  # a value given to a node of keys: optim.scheduler=cosine
        fields = [f for f in field_names(_schema_by_name(node.group(1))) if not f.startswith("_")]
        value = _given(full_key, overrides or ())[1] or node.group(2)
        first = next((f for f in ("name", "enabled") if f in fields), fields[0] if fields else "KEY")
        return (f"{full_key}={value}: {full_key} holds keys ({', '.join(fields)}), not one value; set one of "
                f"them, e.g. {full_key}.{first}={value}")
    if full_key and obj_type is not None and ("not in" in text or "not a" in text.lower()):
        paper = _paper_setting(full_key, overrides)
        if paper:
            return paper
        schema = obj_type if isinstance(obj_type, type) else _schema_by_name(str(obj_type))
        if full_key.startswith("teacher.") and getattr(schema, "__name__", "") in ("NoTeacherConfig", "SelfTeacherConfig"):
            which = "none" if schema.__name__ == "NoTeacherConfig" else "self"
            return (f"unknown key '{full_key}': teacher={which} has no {full_key.split('.', 1)[1]}. Choose the "
                    f"teacher's architecture first, then its weights, e.g. teacher=cnn_digits {full_key}=PATH "
                    "(options: the model names, e.g. unet_digits, resnet32x4, sd15)")
        allowed = [f for f in field_names(schema) if not f.startswith("_")] if schema else []
        leaf = full_key.split(".")[-1]
        close = [f"{full_key.rsplit('.', 1)[0] + '.' if '.' in full_key else ''}{c}"
                 for c in difflib.get_close_matches(leaf, allowed, n=1)]
        if overrides is not None:  # the key exists elsewhere (wrong depth) before a near spelling here
            given, keys = _given(full_key, overrides)[0], config_keys(overrides)
            close = keys_elsewhere(given, keys) or close or keys_close_to(given, keys)
        parent = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
        msg = f"unknown key '{full_key}'."
        if close:
            msg += f" Did you mean {' or '.join(repr(k) for k in close)}?"
        if allowed:
            msg += f" Keys allowed in {parent}: {', '.join(allowed)}."
        return msg
    msg = str(e) if not str(cause) else str(cause)
    if "Could not find" in str(e) or "Available options" in str(e):
        msg = str(e)
    # Hydra appends its search path, which says nothing to a user who mistyped an option.
    msg = msg.split("\nConfig search path:")[0].strip()
    return msg


# --------------------------------------------------------------------------- run names
def run_name_resolver(task: Sequence[str], exclude_keys: Sequence[str], *, _root_: DictConfig) -> str:
    """``dk_run_name`` (conf/config.yaml ``name``): a job's run dir name from its command-line
    overrides (``hydra.overrides.task``, each job's own in a sweep) and the keys that do not name
    runs (``hydra.job.config.override_dirname.exclude_keys``). Hydra resolves it first in the job's
    whole config (for ``hydra.run.dir``), which then need not be composed again."""
    composed = _root_ if "hydra" in _root_ and "runtime" in _root_.hydra else None
    return run_name_for(list(task or ()), list(exclude_keys or ()), composed)


def run_name_for(overrides: Sequence[str], exclude_keys: Sequence[str], composed: Optional[DictConfig] = None) -> str:
    """The run name of a command line: its overrides, sorted, less the keys that may change on
    resume (``exclude_keys``) and less those that set a key to the value it has without them
    (``seed=0``: the same config as no override, so the same run dir); a path value shortened to
    ``key=<file stem>-<hash>`` (:func:`distillkit.runs.short_path`). ``default`` when none is left.
    The same command line always gives the same name, so it resumes its run. Scripts that predict a
    run dir (scripts/bench_kd_digits.py) call this too."""
    key = (tuple(str(o) for o in overrides), tuple(str(k) for k in exclude_keys))
    if key not in _NAMES:  # resolved many times per run (the run dir, the config, the loggers)
        _NAMES[key] = _run_name(*key, composed)
    return _NAMES[key]


_NAMES: dict = {}
_ABSENT = object()


def _run_name(overrides: tuple[str, ...], exclude: tuple[str, ...], composed: Optional[DictConfig]) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from distillkit.runs import is_path_value, run_name, short_path

    parsed = [(line, o) for line, o in zip(overrides, OverridesParser.create().parse_overrides(list(overrides)))
              if o.key_or_group not in exclude]
    unchanged = _set_to_what_they_have(overrides, [line for line, _ in parsed], composed)
    items = []
    for line, o in parsed:
        if line in unchanged:
            continue
        value = o.value()
        items.append(f"{o.get_key_element()}={short_path(value)}" if is_path_value(value) else o.input_line)
    return run_name(",".join(sorted(items)))


def _set_to_what_they_have(overrides: tuple[str, ...], naming: list[str], full: Optional[DictConfig]) -> set[str]:
    """The overrides among ``naming`` that leave the config as it is without them: the config
    composed without one has the same group option (``model=cnn_digits`` where the experiment
    chooses it) or the same resolved value there (``seed=0``). At most three compositions, however
    many overrides: only experiment overlays choose other groups' options, so a group's option
    without its override is the one chosen with none of them; a key's value without its override is
    the one it has with every other override applied. An override that adds or deletes a key or
    moves a group to another package always names the run, and so does any when the config does
    not compose without it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [(line, o) for line, o in zip(naming, OverridesParser.create().parse_overrides(naming))
                  if not (o.is_delete() or o.is_add() or o.is_force_add() or o.package is not None)]
    if not candidates:
        return set()
    try:
        full = full if full is not None else _compose_for_name(list(overrides))
    except Exception:
        return set()
    choices = full.hydra.runtime.choices
    groups = [(line, o) for line, o in candidates if o.key_or_group in choices]
    values = [(line, o) for line, o in candidates if o.key_or_group not in choices]
    unchanged: set[str] = set()
    if groups:
        try:
            without = _compose_for_name([x for x in overrides if x not in {line for line, _ in groups}])
            unchanged |= {line for line, o in groups
                          if choices.get(o.key_or_group) == without.hydra.runtime.choices.get(o.key_or_group)}
        except Exception:
            pass
    if values:
        try:
            without = _compose_for_name([x for x in overrides if x not in {line for line, _ in values}])
        except Exception:
            return unchanged
        keys = [o.key_or_group for _, o in values]
        for line, o in values:
            if keys.count(o.key_or_group) == 1 and _same_without(full, without, o.key_or_group):
                unchanged.add(line)
    return unchanged


def _same_without(full: DictConfig, without: DictConfig, key: str) -> bool:
    try:
        return _same_value_without(full, without, key)
    except Exception:  # not comparable (a node the update refuses): the override names the run
        return False


def _same_value_without(full: DictConfig, without: DictConfig, key: str) -> bool:
    """Whether ``key`` resolves to the same value in ``full`` and in ``full`` with the key's node put
    back as ``without`` has it (an interpolation there resolves against the other overrides)."""
    import copy

    value = _plain(full, key)
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(without, parent_key, default=None) if parent_key else without
    if value is _ABSENT or not isinstance(parent, DictConfig) or leaf not in parent:
        return False
    node = parent._get_node(leaf)
    raw = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) or OmegaConf.is_list(node) \
        else node._value()
    restored = copy.deepcopy(full)
    OmegaConf.update(restored, key, raw, merge=False)
    return value == _plain(restored, key)


def _plain(cfg: DictConfig, key: str) -> object:
    try:
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) \
            else node
    except Exception:  # does not resolve here (a ${hydra:...} outside a run): not comparable
        return _ABSENT


def _compose_for_name(overrides: list[str]) -> DictConfig:
    """The config of ``overrides`` with Hydra's node (its group choices), composed by the running
    Hydra app (``distill``) or, outside one (a script predicting run dirs), from CONF_DIR."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="distill"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)
