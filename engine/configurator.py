"""Command line -> typed config dataclass, the way nanoGPT's CLI reads, without exec into globals.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Precedence: dataclass defaults < preset files (in command-line order) < --key=value. A preset is a plain Python
file of `key = value` lines, run with runpy into its own dict; every public name in it must be a field.
Values are coerced by the field's type (`--learning_rate=1` is a float, `--compile=false` a bool, `none` sets an
Optional field to None). Unknown keys are errors that suggest the closest field names. `--help` lists every field
with its type, default and the comment written beside it in the dataclass. `--print_config` resolves the config as
a run would (the same errors) and prints it as one line of JSON instead of running:

    python train.py config/train_gpt2.py --batch_size=8 --print_config

resolve_options reads that line back, so a tool that takes train.py's command line (tools/sizing.py, bench/) gets
train.py's options without importing train.py.
"""

import ast
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import runpy
import subprocess
import sys
import types
import typing

from engine.errors import EXIT_USER_ERROR, UserError

PRINT_CONFIG = "--print_config"  # a request every parse_config script answers, like --help; never a field


def parse_config(cls, argv: list[str] | None = None, usage: str = ""):
    """Build a `cls` dataclass instance from preset files and --key=value arguments in argv. With --print_config
    among them, print that instance as one line of JSON and exit 0 instead (resolve_options reads it)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage + "\n\n" + describe_fields(cls))
        raise SystemExit(0)
    print_only = PRINT_CONFIG in argv
    argv = [a for a in argv if a != PRINT_CONFIG]  # not a field: a request, like --help
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    renamed = getattr(cls, "RENAMED", {})  # old key -> its field, so presets and saved configs keep working
    values: dict[str, object] = {}
    presets = [a for a in argv if not a.startswith("--")]
    overrides = [a for a in argv if a.startswith("--")]
    for path in presets:  # presets first, in command-line order, wherever they stand among the --key=value
        for key, value in load_preset(path).items():
            key = renamed.get(key, key)
            _check_known(key, fields, where=path)
            values[key] = coerce(value, hints[key], key)
    for arg in overrides:
        key, sep, raw = arg[2:].partition("=")
        key = renamed.get(key.replace("-", "_"), key.replace("-", "_"))
        if not sep:
            raise UserError(f"argument {arg!r} has no value: write --{key}=VALUE")
        _check_known(key, fields, where=arg)
        values[key] = coerce(raw, hints[key], key)
    try:
        config = cls(**values)
    except (ValueError, TypeError) as e:
        raise UserError(f"bad config: {e}") from None
    config.given = frozenset(values)  # the keys a preset or the command line set (the rest are defaults)
    if print_only:
        print(json.dumps(dataclasses.asdict(config)))
        raise SystemExit(0)
    return config


def resolve_options(script: str, argv: list[str]) -> types.SimpleNamespace:
    """The options `script` resolves from argv (its presets, then --key=value), run as `script argv --print_config`
    in a fresh interpreter (same directory and environment): its own defaults, coercion and validation, without
    importing it. A tool that takes train.py's command line (tools/sizing.py, bench/train_speed.py, prepare/) gets
    exactly what train.py would run with, and nothing imports an entry script (scripts -> support -> model). A bad
    option is a UserError holding the script's own one line; any other failure (a bug) raises with its traceback."""
    done = subprocess.run([sys.executable, script, *argv, PRINT_CONFIG], capture_output=True, text=True)
    if done.returncode == EXIT_USER_ERROR:  # run_cli wrote the UserError as "error: <line>", last on stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise UserError(lines[-1].removeprefix("error: ") if lines else f"{script}: bad options")
    if done.returncode != 0:  # a bug, not a bad option: its traceback, as the script printed it
        raise RuntimeError(f"{script} {PRINT_CONFIG} exited with code {done.returncode}:\n{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        return types.SimpleNamespace(**json.loads(lines[-1]))  # the last line: imports may have printed before it
    except (IndexError, ValueError):
        raise RuntimeError(f"{script} {PRINT_CONFIG} printed no JSON config:\n{done.stdout}") from None


def load_preset(path: str) -> dict:
    """Run a preset file into a fresh dict and return its public plain values (modules and functions are skipped).
    A preset is a .py file: anything else is refused before it runs (runpy would run a directory's or a zip's
    __main__.py, and a run directory is what a user most often names here by mistake)."""
    if os.path.isdir(path):
        raise UserError(
            f"{path!r} is a directory, not a preset file (a .py of key = value lines); to name a run directory, "
            f"write --out_dir={path}"
        )
    if os.path.exists(path) and not path.endswith(".py"):
        raise UserError(f"{path!r} is not a preset file: presets are .py files of key = value lines")
    try:
        namespace = runpy.run_path(path)
    except FileNotFoundError:
        raise UserError(f"preset file {path!r} not found (options are written --key=value)") from None
    except SyntaxError as e:
        raise UserError(f"preset file {path!r} line {e.lineno}: {e.msg}") from None
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))
    }


def _check_known(key: str, fields: dict, where: str):
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else "; see --help"
        raise UserError(f"unknown config key {key!r} in {where}{hint}")


def coerce(value, tp, key: str):
    """Convert a command-line string (or a preset's Python value) to the field type `tp`."""
    optional_inner = _optional_inner(tp)
    if optional_inner is not None:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        tp = optional_inner
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = ast.literal_eval(value.replace("_", ""))  # accepts 5000, 1e4, 2**10 is not accepted
                if isinstance(number, (int, float)) and not isinstance(number, bool) and float(number).is_integer():
                    return int(number)
            except (ValueError, SyntaxError):
                pass
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # nan and inf pass every < and >= check downstream: refuse them here
                raise UserError(f"{key}={value!r} is not a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key} has unsupported type {tp}")
    raise UserError(f"{key}={value!r} is not a valid {_type_name(tp)}")


def _optional_inner(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0]
    return None


def _type_name(tp) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{inner.__name__} or none"
    return tp.__name__


def field_comments(cls) -> dict[str, str]:
    """The `# comment` written after each field in the dataclass source: the --help text."""
    comments = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def describe_fields(cls) -> str:
    """One line per field: name, type, default, comment."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    lines = ["options (--key=value; preset files first, in order):"]
    for f in dataclasses.fields(cls):
        head = f"  --{f.name}={f.default!r}"
        lines.append(f"{head:<40} {_type_name(hints[f.name]):<13} {comments.get(f.name, '')}".rstrip())
    lines.append(f"{'  ' + PRINT_CONFIG:<54} print the resolved options as one line of JSON and exit")
    return "\n".join(lines)


def format_config(options: dict) -> str:
    """Resolved options (dataclasses.asdict of a config), one `key = value` per line: valid as a preset file (the
    run log writes train.py's to out_dir/train_config.py)."""
    return "\n".join(f"{k} = {v!r}" for k, v in options.items())


def format_overrides(config) -> str:
    """What differs from the defaults, one `key = value` per line (what nanoGPT prints at start-up)."""
    default = dataclasses.asdict(type(config)())
    changed = {k: v for k, v in dataclasses.asdict(config).items() if v != default[k]}
    return "\n".join(f"{k} = {v!r}" for k, v in changed.items()) or "(all defaults)"
