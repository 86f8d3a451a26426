"""The full configuration schema as a commented YAML file, generated from the config models.

``experiments/schema.yaml`` is this module's output (``python -m hescape.config_schema >
experiments/schema.yaml``; ``tests/test_config_schema.py`` keeps the file in sync): every
key a study YAML may set, with its default, its type or choices, its bounds and its
description. The unknown-key error of ``hescape.config`` points there.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from hescape.config import StudyConfig, SweepParam

SCHEMA_PATH = "experiments/schema.yaml"
HEADER = f"""\
# The full schema of a study YAML: every key, its default, type and meaning.
# GENERATED from hescape/config.py (and each preprocessing method's options) by
#   python -m hescape.config_schema > {SCHEMA_PATH}
# (tests/test_config_schema.py fails when it is out of date). Do not edit by hand.
# A study starts with `base: base.yaml` and sets only what it changes; any key not listed
# here is refused. `--set key=value` overrides on the command line.
"""


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + " | ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " | ".join(_type_text(a) for a in inner)
        return f"{text} | null" if len(inner) < len(args) else text
    if origin is typing.Annotated:
        return _type_text(args[0])
    if origin in (list, tuple):
        return f"list of {_type_text(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(info: FieldInfo) -> str:
    out = []
    for meta in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return ", ".join(out)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        plain = value and all(c.isalnum() or c in "_./-" for c in value) and \
            value.lower() not in ("null", "true", "false", "yes", "no", "on", "off")
        return value if plain else json.dumps(value)
    return json.dumps(value, default=str)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Optional[Model]
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _lines(model: type[BaseModel], default: Any, indent: int) -> list[str]:
    pad = "  " * indent
    out = []
    for name, info in model.model_fields.items():
        value = getattr(default, name, None) if default is not None else info.get_default(
            call_default_factory=True)
        sub = _model_of(info.annotation)
        notes = [n for n in (_type_text(info.annotation) if sub is None else "",
                             _bounds(info), info.description or "") if n]
        comment = f"  # {'; '.join(notes)}" if notes else ""
        if sub is not None and (value is not None or sub is not StudyConfig):
            shown = value if value is not None else sub()
            extra = "  # null/absent = none (below: the section's keys and defaults)" \
                if value is None else ""
            out.append(f"{pad}{name}:{extra or (comment if info.description else '')}")
            out += _lines(sub, shown, indent + 1)
        elif isinstance(value, dict):
            out.append(f"{pad}{name}: {_scalar(value) if not value else ''}{comment}")
            out += [f"{pad}  {k}: {_scalar(v)}" for k, v in value.items()]
        elif isinstance(value, list):
            dumped = [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
            out.append(f"{pad}{name}: {json.dumps(dumped, default=str)}{comment}")
        else:
            out.append(f"{pad}{name}: {_scalar(value)}{comment}")
    return out


def schema_yaml() -> str:
    """The generated schema file's text."""
    body = _lines(StudyConfig, StudyConfig(), 0)
    params = ["# sweep.params maps a dotted config key to one search dimension:"]
    for name, info in SweepParam.model_fields.items():
        params.append(f"#   {name}: {_type_text(info.annotation)}"
                      + (f" ({info.description})" if info.description else ""))
    params.append("# e.g.  params: {train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}")
    return HEADER + "\n".join(body) + "\n" + "\n".join(params) + "\n"


if __name__ == "__main__":
    sys.stdout.write(schema_yaml())
