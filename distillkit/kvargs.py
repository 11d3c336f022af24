"""``key=value`` command-line arguments for the small commands (``distill-sample``,
``distill-export``), in the same style as ``distill``'s Hydra overrides.

    args = parse_kv(sys.argv[1:], "distill-sample", [Arg("checkpoint", str), Arg("seed", int, 0), ...])

Unknown keys (with a close match suggested), missing required keys and values of the wrong
type print one line ``<prog>: error: ...`` naming the key and exit with status 2; ``-h`` /
``--help`` prints the usage and exits 0.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

REQUIRED = object()
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass
class Arg:
    name: str
    type: Callable[[str], Any] = str
    default: Any = REQUIRED
    help: str = ""
    choices: Optional[Sequence[str]] = None


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError("expected true or false")


def _type_name(tp: Callable) -> str:
    return {int: "an integer", float: "a number", parse_bool: "true or false"}.get(tp, "a string")


def usage(prog: str, spec: Sequence[Arg]) -> str:
    req = " ".join(f"{a.name}=..." for a in spec if a.default is REQUIRED)
    lines = [f"usage: {prog} {req} [key=value ...]", ""]
    for a in spec:
        d = "required" if a.default is REQUIRED else "optional" if a.default is None else f"default: {a.default}"
        ch = f"; one of {', '.join(a.choices)}" if a.choices else ""
        lines.append(f"  {a.name:<12} {a.help} ({d}{ch})")
    return "\n".join(lines)


def fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_kv(argv: Sequence[str], prog: str, spec: Sequence[Arg]) -> SimpleNamespace:
    by_name = {a.name: a for a in spec}
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage(prog, spec))
        sys.exit(0)
    values: dict[str, Any] = {}
    for item in argv:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            fail(prog, f"arguments are key=value pairs, got {item!r} (see {prog} --help)")
        if key not in by_name:
            close = difflib.get_close_matches(key, list(by_name), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            fail(prog, f"unknown key '{key}'.{hint} Keys: {', '.join(by_name)}.")
        a = by_name[key]
        if text.lower() in ("null", "none") and a.default is None:
            values[key] = None
            continue
        try:
            v = a.type(text)
        except (TypeError, ValueError):
            fail(prog, f"{key}={text}: expected {_type_name(a.type)}")
        if a.choices and v not in a.choices:
            fail(prog, f"{key}={text}: allowed values are {', '.join(a.choices)}")
        values[key] = v
    missing = [a.name for a in spec if a.default is REQUIRED and a.name not in values]
    if missing:
        fail(prog, f"missing required key{'s' if len(missing) > 1 else ''} "
                   f"{', '.join(m + '=...' for m in missing)} (see {prog} --help)")
    return SimpleNamespace(**{a.name: values.get(a.name, a.default) for a in spec})


def command_main(prog: str, run: Callable[[Sequence[str]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of a ``key=value`` command: user errors print one line and exit 2."""
    from distillkit.errors import DistillError

    try:
        run(sys.argv[1:] if argv is None else argv)
    except DistillError as e:
        fail(prog, str(e))
