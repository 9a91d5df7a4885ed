"""Typed configuration: one dataclass per stage, the single place where defaults live.

Each stage (importance, prune, distill, ...) has a dataclass whose fields are declared
with :func:`option`: a default, a help text and, where needed, bounds. From that one
declaration come

- the command's flags (:func:`add_flags`): ``seq_len`` becomes ``--seq-len`` with its
  default and help; a ``Literal[...]`` type becomes ``choices=``;
- the Python API's keyword arguments (:func:`build`): unknown names are a TypeError;
- the recipe's keys (the pipeline nests the same dataclasses in its OmegaConf schema).

Values are validated once, at the edge (:func:`validate`), and errors name the flag
(``--seq-len``) or the recipe key (``rounds.0.importance.seq_len``) the user wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import typing
from typing import Any, Callable, Literal, Optional, Sequence, TypeVar, get_args, get_origin

from nemo_minitron.errors import UsageError, require

C = TypeVar("C")

#: The random seed every command and recipe starts from unless told otherwise.
DEFAULT_SEED = 1234
#: Tokens per sample of every stage (calibration, training, evaluation) unless told otherwise.
DEFAULT_SEQ_LEN = 4096
DTYPE_NAMES = ("float32", "bfloat16", "float16")
Dtype = Literal["float32", "bfloat16", "float16"]
#: a compute dtype: one of the above, or ``auto`` (see runtime/precision.py)
ComputeDtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def option(default: Any = dataclasses.MISSING, help: str = "", *, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None, parse: Callable[[str], Any] | None = None,
           flag: str | None = None, cli: bool = True, resume_safe: bool = False, default_text: str | None = None,
           metavar: str | None = None, repeat: bool = False, required: bool = False) -> Any:
    """A config field. ``ge``/``gt``/``le``/``lt``: bounds checked by :func:`validate`; ``parse``: how
    the command line's string becomes the value (lists, mappings); ``flag``: the flag's name
    when it is not ``--field-name``; ``cli=False``: recipe/API only; ``resume_safe``: may
    change when a run resumes (logging and checkpoint cadence); ``default_text``: what a
    ``None`` default means, for --help; ``metavar``: the value's placeholder in --help (N
    for whole numbers, X for numbers otherwise); ``repeat``: a list field whose flag is
    given once per item (``parse`` reads one item); ``required``: the flag must be given
    (the field's ``check`` says so to the API and recipes)."""
    meta = dict(help=help, ge=ge, gt=gt, le=le, lt=lt, parse=parse, flag=flag, cli=cli, resume_safe=resume_safe,
                default_text=default_text, metavar=metavar, repeat=repeat, required=required)
    if isinstance(default, (list, dict)):
        frozen = json.loads(json.dumps(default))
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(frozen)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------- types
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) is typing.Union or type(tp).__name__ == "UnionType":
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choices_of(cls, name: str) -> tuple[Any, ...] | None:
    tp, _ = _unwrap_optional(field_types(cls)[name])
    return get_args(tp) if get_origin(tp) is Literal else None


def _scalar(tp: Any) -> type | None:
    if get_origin(tp) is Literal:
        return type(get_args(tp)[0])
    return tp if tp in (int, float, str, bool) else None


# ---------------------------------------------------------------------- naming
class Names:
    """How errors name a field: as a flag (``--seq-len``) or as a recipe key."""

    def __init__(self, cls=None, prefix: str | None = None):
        self.cls, self.prefix = cls, prefix

    def __call__(self, name: str) -> str:
        if self.prefix is not None:
            return f"recipe key '{self.prefix}{name}'"
        return flag_of(self.cls, name) if self.cls is not None else f"--{name.replace('_', '-')}"


def flag_of(cls, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("flag") or "--" + name.replace("_", "-")
    return "--" + name.replace("_", "-")


def cli_names(cls) -> Names:
    return Names(cls)


def recipe_names(prefix: str) -> Names:
    return Names(prefix=prefix.rstrip(".") + ".")


# ---------------------------------------------------------------------- validation
def validate(cfg: Any, names: Names | None = None) -> Any:
    """Check every field's type, choices and bounds, then the dataclass's own ``check``
    (cross-field rules); raises UsageError naming the flag or key. Returns ``cfg``."""
    names = names or Names(type(cfg))
    types = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        tp, optional = _unwrap_optional(types[f.name])
        if value is None:
            require(optional, f"{names(f.name)} must be set")
            continue
        if get_origin(tp) is Literal:
            allowed = get_args(tp)
            require(value in allowed, f"{names(f.name)} must be one of {', '.join(map(str, allowed))} "
                                      f"(got '{value}')")
        elif tp is bool:
            require(isinstance(value, bool), f"{names(f.name)} must be true or false (got {value!r})")
        elif tp is int:
            require(isinstance(value, int) and not isinstance(value, bool),
                    f"{names(f.name)} must be a whole number (got {value!r})")
        elif tp is float:
            require(isinstance(value, (int, float)) and not isinstance(value, bool),
                    f"{names(f.name)} must be a number (got {value!r})")
            object.__setattr__(cfg, f.name, float(value))
        meta = f.metadata
        for bound, ok, words in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                 ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            b = meta.get(bound)
            if b is not None and isinstance(value, (int, float)):
                require(ok(value, b), f"{names(f.name)} must be {words} {b:g} (got {value})")
    check = getattr(cfg, "check", None)
    if check is not None:
        check(names)
    return cfg


def build(cls: type[C], base: C | None = None, names: Names | None = None, **overrides: Any) -> C:
    """``cls`` from ``base`` (or the defaults) with keyword overrides, validated; the Python
    API's entry point. Unknown keywords are a TypeError, as for any function."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {', '.join(unknown)} (options: {', '.join(sorted(known))})")
    cfg = dataclasses.replace(base, **overrides) if base is not None else cls(**overrides)
    return validate(cfg, names)


def default_of(cls, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``cls`` (where it is defined, once)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__} has no field {name}")


def split_overrides(overrides: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Distribute keyword arguments over several config classes by field name."""
    parts: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in overrides.items():
        for i, cls in enumerate(classes):
            if key in {f.name for f in dataclasses.fields(cls)}:
                parts[i][key] = value
                break
        else:
            options = sorted({f.name for cls in classes for f in dataclasses.fields(cls)})
            close = difflib.get_close_matches(key, options, n=1)
            raise TypeError(f"unexpected option '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return parts


# ---------------------------------------------------------------------- command line
def _help_text(f: dataclasses.Field, choices: Sequence[Any] | None) -> str:
    text = f.metadata.get("help", "")  # argparse lists the choices of a Literal itself
    if f.default is not dataclasses.MISSING:
        shown = f.metadata.get("default_text") or (f.default if f.default is not None else None)
        if isinstance(f.default, bool):
            shown = "on" if f.default else "off"  # of the --x / --no-x pair
        if f.metadata.get("required"):
            shown = None  # add_flags marks it required
        if shown is not None and shown != "":
            text += f" [default: {shown}]"
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if isinstance(value, list) and value and all(isinstance(v, (str, int)) for v in value):
            value = ",".join(map(str, value))  # as the flag takes it
        shown = value or f.metadata.get("default_text")
        if shown:
            text += f" [default: {shown}]"
    return text.replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser | Any, cls, *, skip: Sequence[str] = (), title: str | None = None):
    """One flag per field of ``cls``; the parsed value lands in ``args.<field>``."""
    group = parser.add_argument_group(title) if title else parser
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        tp, optional = _unwrap_optional(types[f.name])
        choices = choices_of(cls, f.name)
        kwargs: dict[str, Any] = dict(dest=f.name, help=_help_text(f, choices))
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            kwargs["default"] = f.default_factory()  # type: ignore[misc]
        else:
            kwargs["required"] = True
        if f.metadata.get("required"):
            kwargs["required"] = True
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if f.metadata.get("parse") is not None:
            kwargs["type"] = _argparse_type(f.metadata["parse"])
            if f.metadata.get("repeat"):
                kwargs["action"] = "append"  # argparse copies the default list before appending
                kwargs["help"] += " (repeat the flag for more)"
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            scalar = _scalar(tp)
            if scalar is None:
                raise TypeError(f"{cls.__name__}.{f.name}: give option(parse=...) for type {tp}")
            kwargs["type"] = scalar
            if choices:
                kwargs["choices"] = choices
            elif scalar in (int, float):
                kwargs.setdefault("metavar", "N" if scalar is int else "X")
        group.add_argument(flag_of(cls, f.name), **kwargs)
    return group


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse reports ArgumentTypeError as ``argument --flag: message``."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (UsageError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e).splitlines()[0] if str(e) else f"invalid value '{text}'") from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config a parsed command line asks for, validated (errors name the flags)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return build(cls, names=cli_names(cls), **values)


# ---------------------------------------------------------------------- resolved config
def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(resolved: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): tree}


def differing_keys(saved: dict[str, Any], current: dict[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (``ignore``: key
    suffixes that may change, e.g. ``save_every``)."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k, "<unset>") != b.get(k, "<unset>")
            and not any(k == s or k.endswith("." + s) for s in ignore)]


def describe_differences(saved: dict[str, Any], current: dict[str, Any], keys: Sequence[str], limit: int = 4) -> str:
    a, b = flatten(saved), flatten(current)
    parts = [f"{k} {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in keys[:limit]]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def resume_safe_fields(*classes: type) -> list[str]:
    return sorted({f.name for cls in classes for f in dataclasses.fields(cls) if f.metadata.get("resume_safe")})


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], *, what: str, force: bool,
                 force_hint: str, ignore: Sequence[str] = ()) -> list[str]:
    """Refuse to continue ``what`` under another config than the one it started with.

    Returns the differing keys (empty when equal or nothing was saved); with ``force`` the
    difference is accepted and returned for the record."""
    if saved is None:
        return []
    keys = differing_keys(saved, current, ignore)
    if keys and not force:
        raise UsageError(f"{what} was started with another configuration ({describe_differences(saved, current, keys)}); "
                         f"start a new output, or pass {force_hint} to continue with the new values")
    return keys


def yaml_text(resolved: dict[str, Any]) -> str:
    import yaml  # deferred: start-up time of --help, which reads this module

    return yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False)


#: Set to debug to see every command's whole resolved configuration in its log.
LOG_LEVEL_ENV = "NEMO_MINITRON_LOG_LEVEL"


def log_settings(logger: logging.Logger, summary: str, resolved: dict[str, Any], where: str | None) -> None:
    """A command's resolved settings: ``summary`` (what runs on what, the key settings) and
    where all of them are written (``where``) as one line at info; the whole YAML at debug."""
    shown = where or f"the debug log ({LOG_LEVEL_ENV}=debug)"
    logger.info("%s; all settings: %s", summary, shown)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("resolved settings:\n%s", yaml_text(resolved).rstrip())


def nearest_key(key: str, known: Sequence[str]) -> str | None:
    """The known dotted key closest to ``key``: an exact suffix match first (``distill.steps``
    -> ``rounds.0.distill.steps``), else the closest spelling."""
    suffix = [k for k in known if k.endswith("." + key)]
    if suffix:
        return min(suffix, key=len)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return close[0] if close else None


__all__ = ["option", "validate", "build", "add_flags", "from_args", "Names", "cli_names", "recipe_names",
           "to_dict", "config_hash", "differing_keys", "check_resume", "yaml_text", "nearest_key", "DEFAULT_SEED",
           "Dtype", "ComputeDtypeName", "Optional", "split_overrides", "default_of", "DEFAULT_SEQ_LEN", "resume_safe_fields"]
