"""One source for each default (docs/architecture.md, "Defaults").

A key's type, bounds and default live in its schema (distillkit/config.py); a group option's yaml
under conf/ repeats the values for readability, and a method's ``__init__`` has keyword defaults
for use outside the CLI. These tests hold the three equal:

(a) every key a yaml sets that its schema also defines has the schema's default, unless the schema
    default is MISSING / None (the yaml chooses) or the key is allowed below, with its reason;
(b) every schema key of a method that is also a keyword parameter of the ``_target_`` class's
    ``__init__`` (the nearest ``__init__`` in the MRO that declares it: the others get it through
    ``**kw`` or not at all) has the schema's default there, or no default / None ("the schema's").

Read from the files themselves: the yamls with OmegaConf.load, the schemas as dataclasses, the
methods' ``__init__`` signatures from their source (ast, so nothing imports torch or Lightning).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import pytest
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from distillkit import config as schemas
from distillkit.paths import CONF_DIR

CONF = Path(CONF_DIR)
PACKAGE = Path(schemas.__file__).resolve().parent
# Overlays of the whole config (``# @package _global_``): they set values on purpose, no schema of their own.
OVERLAY_GROUPS = ("experiment", "debug", "paper")

# Options that are presets of a schema shared with other options: (yaml, key) -> why it differs.
ALLOWED: dict[str, dict[str, str]] = {
    "dataset/cifar10.yaml": {"num_classes": "CIFAR-10 preset of the CIFAR schema (CIFAR-100's 100 classes)"},
    "model/unet.yaml": {
        "dropout": "DDPM's CIFAR-10 UNet (Ho et al. 2020, App. B: dropout 0.1); unet_digits keeps the schema's 0",
        "down_block_types": "DDPM's CIFAR-10 layout, attention at 16x16; the schema's default is plain ResNet blocks",
        "up_block_types": "DDPM's CIFAR-10 layout, attention at 16x16; the schema's default is plain ResNet blocks",
    },
    **{"model/unet_digits.yaml": dict.fromkeys(
        ("sample_size", "in_channels", "block_out_channels", "layers_per_block", "down_block_types",
         "up_block_types", "norm_num_groups"), "the small digits UNet (1x8x8), a preset of the UNet schema")},
    "model/sdxl.yaml": {"variant": "the SDXL preset of the Stable Diffusion schema (sd15 is the default)"},
    "teacher/cnn_digits.yaml": {"width": "the digits teacher is wider (64) than the student model=cnn_digits (32)"},
    "schedule/cosine.yaml": {"name": "the VP schema's options are told apart by name"},
    "schedule/linear.yaml": {"name": "the VP schema's options are told apart by name"},
    "schedule/scaled_linear.yaml": {"name": "the VP schema's options are told apart by name"},
    "optim/sgd.yaml": {"scheduler.name": "the CIFAR KD recipe's step decay (mdistiller)",
                       "scheduler.milestones": "the CIFAR KD recipe's step decay (mdistiller)"},
    "trainer/cpu.yaml": {"accelerator": "the option's whole point"},
    "trainer/ddp.yaml": {"strategy": "the option's whole point", "devices": "DDP over every visible device"},
    "logger/none.yaml": {"csv": "the option's whole point"},
    "logger/tensorboard.yaml": {"tensorboard": "the option's whole point"},
    "logger/wandb.yaml": {"wandb": "the option's whole point"},
    "eval/digits.yaml": {
        "enabled": "eval=digits turns evaluation on (the schema's default is eval=none's)",
        "every_n_steps": "digits runs are short: every 500 updates",
        "batch_size": "all 700 digits samples in one batch",
    },
    "eval/coco.yaml": {
        "enabled": "eval=coco turns evaluation on (the schema's default is eval=none's)",
        "every_n_steps": "30k samples: only at the end of training",
        "steps": "DMD2's SD1.5 generator samples in 1 step",
        "num_samples": "COCO-30k",
        "feature_net": "the COCO protocol scores with Inception",
        "batch_size": "SD-sized images per batch",
        "clip_prefix": "DMD2's CLIP-score prompt prefix",
    },
}


def _yamls() -> list[Path]:
    """conf/config.yaml and every group option but the overlays."""
    return sorted(p for p in CONF.rglob("*.yaml") if p.relative_to(CONF).parts[0] not in OVERLAY_GROUPS)


def _rel(path: Path) -> str:
    return path.relative_to(CONF).as_posix()


# --------------------------------------------------------------------------- (a) yaml vs schema
def _group_schema(group: str) -> Optional[type]:
    """The dataclass of a top-level field of Config (trainer, logger, callbacks), which types the
    options of the group of that name."""
    hint = typing.get_type_hints(schemas.Config).get(group)
    return hint if dataclasses.is_dataclass(hint) else None


def schemas_of(path: Path) -> dict[str, type]:
    """Package path ('' for the option's own node) -> the schema dataclass merged there, from the
    yaml's defaults list (``/schema/<group>/<name>@<package>``, other options it extends,
    ``base_config``) or, for groups typed by Config's fields, that field's dataclass."""
    out: dict[str, type] = {}
    group = path.relative_to(CONF).parts[0]
    for entry in OmegaConf.load(path).get("defaults", []):
        if not isinstance(entry, str) or entry == "_self_":
            continue
        name, _, package = entry.partition("@")
        package = "" if package in ("", "_here_") else package
        if name == "base_config":  # conf/config.yaml: the top-level schema
            out[package] = schemas.Config
        elif name.startswith("/schema/"):
            *group_path, option = name[len("/schema/"):].split("/")
            out[package] = schemas.SCHEMAS["/".join(group_path)][option]
        else:  # another option: /model/cnn_digits (a teacher), or one of the same group (trainer/cpu: default)
            other = CONF / f"{name.lstrip('/')}.yaml" if name.startswith("/") else path.parent / f"{name}.yaml"
            for sub, cls in schemas_of(other).items():
                out[".".join(p for p in (package, sub) if p)] = cls
    if not out and _group_schema(group) is not None:
        out[""] = _group_schema(group)
    return out


@functools.lru_cache(maxsize=None)
def _structured(cls: type) -> DictConfig:
    return OmegaConf.structured(cls)


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value)
    return value


def drifts(path: Path) -> list[str]:
    """``key: yaml <value> != schema <default>`` for each key of the yaml whose schema default
    differs (not MISSING or None there, not allowed in ALLOWED)."""
    found = schemas_of(path)
    allowed = ALLOWED.get(_rel(path), {})
    values = OmegaConf.load(path)
    out: list[str] = []

    def walk(node: DictConfig, key_path: str) -> None:
        for key in node.keys():
            if key == "defaults" and not key_path:
                continue
            full = f"{key_path}.{key}" if key_path else str(key)
            if OmegaConf.is_interpolation(node, key):
                continue
            sub = node._get_node(key)
            if isinstance(sub, DictConfig) and not sub._is_none():
                walk(sub, full)
                continue
            package = max((p for p in found if p == "" or full == p or full.startswith(p + ".")), key=len, default=None)
            if package is None:
                continue
            rest = full[len(package) + 1:] if package else full
            schema = _structured(found[package])
            *parents, leaf = rest.split(".")
            for p in parents:
                schema = schema.get(p) if isinstance(schema, DictConfig) and p in schema else None
            if not isinstance(schema, DictConfig) or leaf not in schema or OmegaConf.is_missing(schema, leaf):
                continue
            default = schema[leaf]
            if default is None:
                continue
            # the yaml's value as the schema types it (int -> float, str -> Enum)
            typed = OmegaConf.merge(schema, {leaf: node[key]})[leaf]
            if _plain(typed) != _plain(default) and full not in allowed:
                out.append(f"{full}: yaml {_plain(typed)!r} != schema {found[package].__name__} {_plain(default)!r}")

    walk(values, "")
    return out


def test_every_group_option_has_a_schema():
    assert [_rel(p) for p in _yamls() if not schemas_of(p)] == []


@pytest.mark.parametrize("path", _yamls(), ids=_rel)
def test_yaml_values_equal_schema_defaults(path):
    assert drifts(path) == [], f"conf/{_rel(path)} and its schema disagree (docs/architecture.md, Defaults)"


def test_allow_list_names_real_differences():
    """An allowed key that no longer differs (or is gone) is dropped from ALLOWED."""
    stale = []
    for rel, keys in ALLOWED.items():
        path = CONF / rel
        if not path.is_file():
            stale.append(rel)
            continue
        saved = dict(keys)
        ALLOWED[rel] = {}
        try:
            differing = {d.split(":")[0] for d in drifts(path)}
        finally:
            ALLOWED[rel] = saved
        stale += [f"{rel}: {k}" for k in keys if k not in differing]
    assert stale == []


# --------------------------------------------------------------------------- (b) schema vs __init__
class _Class:
    """A class of distillkit's source: its module's tree, its ClassDef and its bases."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        self.tree = _module_tree(module)
        self.node = next((n for n in self.tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
        if self.node is None:
            raise LookupError(f"{module}.{name}")

    def bases(self) -> list["_Class"]:
        out = []
        for b in self.node.bases:
            if isinstance(b, ast.Name):
                found = _resolve(self.tree, self.module, b.id)
                if found is not None:
                    out.append(found)
        return out

    def init_defaults(self) -> Optional[dict[str, Any]]:
        """Keyword parameter -> default (``inspect.Parameter.empty`` as ``_NO_DEFAULT``) of this
        class's own ``__init__``; None when it defines none."""
        init = next((n for n in self.node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            return None
        a = init.args
        positional = a.posonlyargs + a.args
        out: dict[str, Any] = {p.arg: _NO_DEFAULT for p in positional}
        for p, d in zip(positional[len(positional) - len(a.defaults):], a.defaults):
            out[p.arg] = self.literal(d)
        for p, d in zip(a.kwonlyargs, a.kw_defaults):
            out[p.arg] = _NO_DEFAULT if d is None else self.literal(d)
        return out

    def literal(self, node: ast.expr) -> Any:
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise AssertionError(f"{self.module}.{self.name}.__init__: cannot read the default "
                                 f"{ast.unparse(node)!r}; use a literal") from None


_NO_DEFAULT = object()
_TREES: dict[str, ast.Module] = {}


def _module_tree(module: str) -> ast.Module:
    if module not in _TREES:
        rel = Path(*module.split(".")[1:])
        path = PACKAGE / rel.with_suffix(".py") if (PACKAGE / rel.with_suffix(".py")).is_file() else PACKAGE / rel / "__init__.py"
        _TREES[module] = ast.parse(path.read_text())
    return _TREES[module]


def _resolve(tree: ast.Module, module: str, name: str) -> Optional[_Class]:
    """The distillkit class ``name`` refers to in ``module`` (None: from outside distillkit)."""
    if any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body):
        return _Class(module, name)
    for n in tree.body:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("distillkit"):
            for alias in n.names:
                if (alias.asname or alias.name) == name:
                    return _Class(n.module, alias.name)
    return None


def mro(cls: _Class) -> list[_Class]:
    """C3 linearisation, as Python computes ``__mro__``, over the distillkit classes."""
    seqs = [mro(b) for b in cls.bases()] + [cls.bases()]
    out = [cls]
    while any(seqs):
        seqs = [s for s in seqs if s]
        for s in seqs:
            head = s[0]
            if not any(head.name == t.name and head.module == t.module for other in seqs for t in other[1:]):
                break
        else:
            raise AssertionError(f"inconsistent MRO for {cls.name}")
        out.append(head)
        seqs = [[c for c in s if not (c.name == head.name and c.module == head.module)] for s in seqs]
    return out


def init_default(cls: _Class, key: str) -> tuple[Any, str]:
    """The default the method gets for ``key`` when the caller does not pass it: that of the
    nearest ``__init__`` in the MRO that declares it (``_NO_DEFAULT`` where none does)."""
    for c in mro(cls):
        params = c.init_defaults()
        if params is not None and key in params:
            return params[key], f"{c.module}.{c.name}.__init__"
    return _NO_DEFAULT, ""


METHOD_YAMLS = sorted((CONF / "method").glob("*.yaml"))


@pytest.mark.parametrize("path", METHOD_YAMLS, ids=_rel)
def test_method_init_defaults_equal_schema(path):
    target = str(OmegaConf.load(path)["_target_"])
    module, _, name = target.rpartition(".")
    cls = _Class(module, name)
    schema = schemas_of(path)[""]
    out = []
    for f in dataclasses.fields(schema):
        if f.name.startswith("_"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is MISSING or default is None:
            continue
        got, where = init_default(cls, f.name)
        if got is _NO_DEFAULT or got is None:
            continue
        if _plain(got) != _plain(default):
            out.append(f"{f.name}: {where} {got!r} != schema {schema.__name__} {_plain(default)!r}")
    assert out == [], f"conf/{_rel(path)}: {target}'s keyword defaults and its schema disagree"
