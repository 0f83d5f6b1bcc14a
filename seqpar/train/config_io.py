"""Read a run YAML into `RunConfig`, strictly; write it back; hash it.

    cfg = load_config("configs/tiny_cpu_demo.yaml", ["train.lr=1e-5", "parallel.sp_size=2"])

Strict means: an unknown key is an error that lists the valid keys and suggests the
closest one, and a value of the wrong type is an error naming the field, the expected
type and the value. Nothing is silently ignored or guessed, because a typo in a
long-context run is otherwise found hours later (or never).

Paths. Relative paths in the YAML (train.deepspeed_config, data.sources, model.config_file,
model.name_or_path, checkpoint.dir, log.dir, ...) are kept as written and resolve against
the CURRENT WORKING DIRECTORY of the process, not against the YAML file's folder, so one
`--set train.deepspeed_config=...` means the same thing as the same text in the YAML. The
launchers in launch/ are meant to be started from the repository root; multi-node jobs
need the same working directory (shared file system) on every node. `~` is not expanded.

Values. YAML is read with PyYAML's safe loader plus one fix: `1e-5` is a float (plain
YAML 1.1 reads it as the string "1e-5"). `--set KEY=VALUE` parses VALUE as YAML
(`train.lr=1e-5`, `parallel.sp_size=4`, `data.sources=[a,b]`, `rope.method=null`), then
converts strings to int/float/bool where the field needs one; str fields take VALUE as
written. Floats with an integral value are accepted for int fields (`steps: 1e3`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing

import yaml

from ..errors import SeqparError, print_error
from .config import RunConfig


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` / `3E8` as floats (YAML 1.1 wants `1.0e-5`)."""


_Loader.add_implicit_resolver(  # appended after the stock resolvers: ints still win
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def parse_yaml(text: str, where: str = "<text>"):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise SeqparError(f"{where} is not valid YAML: {err}") from None


# --- type checking ----------------------------------------------------------------------

def _split_optional(tp):
    """(inner type, allows None) for `X | None`, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _type_name(tp) -> str:
    inner, optional = _split_optional(tp)
    if typing.get_origin(inner) is list:  # list[float]
        name = f"a list of {_type_name(typing.get_args(inner)[0])}"
    elif dataclasses.is_dataclass(inner):
        name = "a mapping"
    else:
        name = {list: "a list", dict: "a mapping", tuple: "a list"}.get(
            inner, getattr(inner, "__name__", str(inner)))
    return f"{name} or null" if optional else name


def _convert(value, tp, key: str, where: str, text: str | None = None):
    """`value` as type `tp` or SeqparError. `text`: the raw --set text (enables coercion)."""
    inner, optional = _split_optional(tp)
    if value is None and optional:
        return None
    out = _coerce(value, inner, text)
    if out is _BAD:
        shown = text if text is not None else value
        hint = " Write a list, e.g. [a, b]." if list in (inner, typing.get_origin(inner)) or inner is tuple else ""
        raise SeqparError(f"{key}: expected {_type_name(tp)}, got {shown!r} "
                          f"({type(value).__name__}) in {where}.{hint}")
    return out


_BAD = object()


def _coerce(value, tp, text):
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.strip().lower() in _TRUE | _FALSE:
            return text.strip().lower() in _TRUE
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if text is not None:
            try:
                return int(text.strip())
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text is not None:
            try:
                return float(text.strip())
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if text is not None:  # --set model.name_or_path=1234: a str field takes the text
            return text
    elif tp is list:
        if isinstance(value, list):
            return list(value)
    elif typing.get_origin(tp) is list:  # list[float]: each item converted, strictly
        if isinstance(value, list):
            items = [_coerce(v, typing.get_args(tp)[0], None) for v in value]
            return _BAD if any(i is _BAD for i in items) else items
    elif tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    return _BAD


# --- dict <-> dataclasses ---------------------------------------------------------------

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # config.py uses `from __future__ import annotations`


def _unknown_key(key, cls, prefix: str, where: str) -> SeqparError:
    names = [f.name for f in dataclasses.fields(cls)]
    full = f"{prefix}{key}"
    hint = ""
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if close:
        hint = f" Did you mean '{prefix}{close[0]}'?"
    elif cls is RunConfig:  # a field written at the top level or in the wrong section
        for section, sub in _hints(RunConfig).items():
            if dataclasses.is_dataclass(sub) and str(key) in {f.name for f in dataclasses.fields(sub)}:
                hint = f" Did you mean '{section}.{key}'?"
                break
    where_keys = f"in section {prefix[:-1]!r}" if prefix else "at the top level"
    return SeqparError(f"unknown config key {full!r} in {where}.{hint} "
                       f"Valid keys {where_keys}: {', '.join(names)}.")


def _build(cls, data, prefix: str, where: str, base=None):
    """A `cls` from the mapping `data`, strictly. Keys that `data` leaves out keep their
    value in `base` (a `cls`: a --set mapping updates the section it names), else their
    default; a nested section's defaults are its field's default (`eval.ppl.data`'s
    sources are stdlib, not DataConfig's empty list)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        what = f"section {prefix[:-1]!r}" if prefix else "the config"
        raise SeqparError(f"{what} in {where} must be a mapping of keys to values, got "
                          f"{data!r} ({type(data).__name__}).")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(key, cls, prefix, where)
        current = getattr(base, key) if base is not None else _field_default(cls, key)
        kwargs[key] = _value(hints[key], value, prefix + key, where, current)
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and _required(f)]
    if missing:
        raise SeqparError(f"section {prefix[:-1]!r} in {where} needs {', '.join(prefix + m for m in missing)} "
                          f"(no default); write it, or leave the section out.")
    return cls(**kwargs)


def _value(tp, value, key: str, where: str, current=None):
    """`value` for a field of type `tp`: a (possibly optional) section is built from a
    mapping on top of `current`, anything else converted."""
    inner, optional = _split_optional(tp)
    if dataclasses.is_dataclass(inner) and not (value is None and optional):
        return _build(inner, value, key + ".", where, current)
    return _convert(value, tp, key, where)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _field_default(cls, key: str):
    """The default of field `key` of `cls` (None when it has none)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def config_from_dict(data, where: str = "<dict>") -> RunConfig:
    """A RunConfig from a plain mapping (e.g. `dump_config` output saved with a checkpoint)."""
    return _build(RunConfig, data, "", where)


def apply_override(cfg: RunConfig, override: str) -> None:
    """Apply one `KEY=VALUE` (`train.lr=1e-5`) to `cfg` in place. A section takes a
    mapping (`eval.ppl={lengths: 1k}`: its keys, the others kept), an optional one also
    null (`eval.ppl=null`: off); a key of an optional section that is off turns it on."""
    where = f"--set {override}"
    key, eq, text = override.partition("=")
    key = key.strip()
    if not eq or not key:
        raise SeqparError(f"{where}: expected KEY=VALUE, e.g. --set train.lr=1e-5.")
    parts = key.split(".")
    obj, prefix = cfg, ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(obj, dict):  # inside a free-form mapping field (rope.extra.beta_fast=32)
            if last:
                obj[part] = parse_yaml(text, where)
            else:
                obj = obj.setdefault(part, {})
                if not isinstance(obj, dict):
                    raise SeqparError(f"{where}: {prefix}{part} is not a mapping.")
            prefix += part + "."
            continue
        hints = _hints(type(obj))
        if part not in hints:
            raise _unknown_key(part, type(obj), prefix, where)
        tp = hints[part]
        inner = _split_optional(tp)[0]
        if dataclasses.is_dataclass(inner):
            if last:
                setattr(obj, part, _section_value(tp, getattr(obj, part), text, prefix + part, where))
                return
            if getattr(obj, part) is None:
                setattr(obj, part, _new_section(inner, parts[i + 1:], text, prefix + part, where))
        elif last:
            setattr(obj, part, _convert(parse_yaml(text, where), tp, prefix + part, where, text))
            return
        elif inner is not dict:
            raise SeqparError(f"{where}: {prefix}{part} is {_type_name(tp)}, not a section; "
                              f"use --set {prefix}{part}=VALUE.")
        elif getattr(obj, part) is None:
            setattr(obj, part, {})
        obj = getattr(obj, part)
        prefix += part + "."


def _section_value(tp, current, text: str, key: str, where: str):
    """`--set SECTION=VALUE`: a mapping updates the section (null turns an optional one off)."""
    inner, optional = _split_optional(tp)
    value = parse_yaml(text, where)
    if not isinstance(value, dict) and not (value is None and optional):
        first = dataclasses.fields(inner)[0].name
        off = f", or --set {key}=null for none" if optional else ""
        raise SeqparError(f"{where}: {key} is a section; set one of its keys, e.g. --set {key}.{first}=..., "
                          f"or give a mapping, e.g. --set {key}={{{first}: ...}}{off}.")
    return _value(tp, value, key, where, current)


def _new_section(cls, rest: list, text: str, key: str, where: str):
    """The optional section `key` (now null) turned on by `--set key.REST=...`: its
    defaults, and the value being set when that is the one key it needs."""
    hints = _hints(cls)
    if rest[0] not in hints:
        raise _unknown_key(rest[0], cls, key + ".", where)
    required = [f.name for f in dataclasses.fields(cls) if _required(f)]
    given = rest[0] if len(rest) == 1 else None
    missing = [name for name in required if name != given]
    if missing:
        needs = ", ".join(f"{key}.{name}" for name in missing)
        raise SeqparError(f"{where}: {key} is not in the config and needs {needs} (no default); set that "
                          f"first (--set {key}.{missing[0]}=...) or write the section in the YAML.")
    return cls(**{name: _convert(parse_yaml(text, where), hints[name], f"{key}.{name}", where, text)
                  for name in required})


def load_config(path, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """Read the run YAML at `path` (relative to the working directory), then apply the
    `--set` overrides in order. Raises SeqparError; does not validate combinations
    (that needs the world size: see `seqpar.train.validate.validate_config`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SeqparError(f"config file {path!r} not found (relative paths resolve against the "
                          f"working directory {os.getcwd()!r}).")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise SeqparError(f"cannot read config file {path!r}: {err}") from None
    cfg = config_from_dict(parse_yaml(text, path), where=path)
    for override in overrides:
        apply_override(cfg, override)
    return cfg


def dump_config(cfg: RunConfig) -> dict:
    """Plain, JSON/YAML-serialisable dict (tuples as lists); `config_from_dict` reads it back."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(dataclasses.asdict(cfg))


def config_hash(cfg: RunConfig) -> str:
    """sha256 hex of the canonical JSON of `dump_config(cfg)`: equal on ranks that agree."""
    blob = json.dumps(dump_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def get_value(cfg: RunConfig, key: str):
    """The value at a dotted key (`parallel.sp_size`)."""
    obj = cfg
    for part in key.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif dataclasses.is_dataclass(obj) and part in _hints(type(obj)):
            obj = getattr(obj, part)
        else:
            raise SeqparError(f"unknown config key {key!r}.")
    return obj


def _main(argv=None) -> int:
    """`python -m seqpar.train.config_io --get KEY CONFIG [--set K=V ...] [other args]`:
    print one value (launchers use it for defaults such as parallel.sp_size). Arguments
    other than --set are ignored, so a launcher can pass its whole command line."""

    parser = argparse.ArgumentParser(prog="python -m seqpar.train.config_io")
    parser.add_argument("--get", required=True, metavar="KEY")
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args, _ = parser.parse_known_args(argv)
    try:
        value = get_value(load_config(args.config, args.set), args.get)
    except SeqparError as err:
        print_error(str(err))
        return 2
    print(json.dumps(value) if isinstance(value, (dict, list)) else value)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
