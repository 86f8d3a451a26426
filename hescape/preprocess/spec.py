"""Preprocessing method specs: each expression preprocessing / batch-correction method
declares itself once, and everything else derives from that declaration.

A method is one module under ``hescape/preprocess/methods/`` that calls :func:`register`
with a :class:`MethodSpec` (keyword-only fields). From the registry come:

- the config schema: ``preprocess.expression.<method>:`` holds the method's own options
  model (``extra="forbid"``), built by :func:`expression_model` for ``hescape.config``;
- the checks run before any fitting (``needs_batches``, the method's ``check_input``);
- the cache key (the method's name, version and options dump: no hand-kept key list);
- the output kind (``expression`` or ``features``) a gene encoder must accept;
- the held-out protocol (inductive / transductive) and the study's mixed-protocol warning;
- the test matrix (tests parametrize over :func:`method_names`).

This module and the method modules are light (pydantic, numpy, scipy.sparse): validating
a config imports them; heavy libraries (scvi-tools, harmonypy, scikit-learn) are imported
inside each method's ``run``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from hescape.registry import Registry

OutputKind = Literal["expression", "features"]
Protocol = Literal["inductive", "transductive"]

KINDS: dict[str, str] = {
    "expression": "non-negative log-normalised expression whose columns are genes",
    "features": "real-valued, possibly signed features (PCs, corrected values, latents)",
}
PROTOCOLS: dict[str, str] = {
    "inductive": "fitted on training donors only; each held-out donor is mapped afterwards",
    "transductive": "fitted on every donor, held-out (val/test) donors included",
}


class MethodOptions(BaseModel):
    """Base of every method's options model (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """What a preprocessing method is, needs and produces.

    ``run(inp: MethodInput, opts) -> MethodOutput`` does the work (see
    ``hescape.preprocess.expression``); every check declared here has passed by then.
    ``protocols`` lists the held-out protocols the method supports; with more than one the
    options model carries a ``mode`` field whose default must be ``inductive``.
    ``heldout`` says in one sentence how rows outside the training mask are handled.
    ``legacy_keys`` maps old flat ``preprocess.expression`` keys to this method's option
    (for the "moved" error). ``version`` is part of the cache key: bump it when the same
    options start producing different output. ``fits`` is False for a method that learns
    nothing from the rows but the gene selection (an unaudited call is not flagged).
    """

    name: str
    summary: str
    run: Callable[..., Any]
    heldout: str
    options: type[MethodOptions] | None = None
    needs_batches: bool = False
    output: OutputKind | Callable[[Any], OutputKind] = "expression"
    protocols: tuple[Protocol, ...] = ("inductive",)
    check_input: Callable[[Any, Any], None] | None = None
    legacy_keys: Mapping[str, str] = field(default_factory=dict)
    version: int = 1
    fits: bool = True

    def __post_init__(self) -> None:
        if self.name in ("method", "n_top_genes") or not self.name.isidentifier():
            raise ValueError(f"preprocessing method name {self.name!r} is not allowed")
        if not self.protocols or set(self.protocols) - set(PROTOCOLS):
            raise ValueError(f"method {self.name!r}: protocols must be a non-empty subset of "
                             f"{sorted(PROTOCOLS)}, got {self.protocols}")
        if len(self.protocols) > 1:
            mode = (self.options.model_fields.get("mode") if self.options else None)
            if mode is None:
                raise ValueError(f"method {self.name!r} supports {self.protocols}: its options "
                                 "need a 'mode' field to choose one")
            if "inductive" in self.protocols and mode.default != "inductive":
                raise ValueError(f"method {self.name!r}: mode must default to 'inductive' "
                                 "(held-out donors unseen by the correction)")

    def default_options(self) -> MethodOptions | None:
        return None if self.options is None else self.options()

    def kind(self, opts: Any) -> OutputKind:
        """The output kind of this method run with ``opts``."""
        return self.output(opts) if callable(self.output) else self.output

    def protocol(self, opts: Any) -> Protocol:
        """The held-out protocol this method follows with ``opts``."""
        return self.protocols[0] if len(self.protocols) == 1 else opts.mode


METHODS: Registry[MethodSpec] = Registry("expression preprocessing method")


def register(spec: MethodSpec) -> MethodSpec:
    """Register ``spec`` under ``spec.name`` (once); returns it."""
    return METHODS.add(spec)


def load_methods() -> None:
    """Import every module of ``hescape.preprocess.methods`` (each registers itself)."""
    package = importlib.import_module("hescape.preprocess.methods")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def method_names() -> list[str]:
    """Names of all registered methods, sorted."""
    load_methods()
    return METHODS.names()


def get_method(name: str) -> MethodSpec:
    """The spec registered as ``name``; ValueError with close matches if unknown."""
    load_methods()
    if name not in METHODS:
        raise ValueError(METHODS.unknown_message(name))
    return METHODS.get(name)


def options_of(cfg: Any) -> MethodOptions | None:
    """The options of ``cfg.method`` in an ``ExpressionPreprocess`` (None if it has none)."""
    return getattr(cfg, cfg.method, None) if get_method(cfg.method).options else None


def section_facts(section: Mapping[str, Any]) -> tuple[OutputKind, Protocol]:
    """(output kind, protocol) of a plain ``preprocess.expression`` dict."""
    spec = get_method(str(section.get("method", "none")))
    opts = None
    if spec.options is not None:
        opts = spec.options.model_validate(section.get(spec.name) or {})
    return spec.kind(opts), spec.protocol(opts)


def moved_key_message(key: str) -> str | None:
    """For an old flat ``preprocess.expression`` key, where it lives now (else None)."""
    targets = [f"preprocess.expression.{spec.name}.{spec.legacy_keys[key]}"
               for spec in (get_method(n) for n in method_names()) if key in spec.legacy_keys]
    if not targets:
        return None
    return (f"preprocess.expression.{key} moved under the method it belongs to: set "
            f"{' / '.join(targets)} (each method's options live under its own name)")


class ExpressionBase(BaseModel):
    """Common part of ``preprocess.expression``; method sections are added from the registry."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key in data:
                msg = moved_key_message(str(key)) if key not in cls.model_fields else None
                if msg:
                    raise ValueError(msg)
        return data


def expression_model() -> type[BaseModel]:
    """The ``ExpressionPreprocess`` pydantic model: method, n_top_genes, one section per method."""
    names = method_names()
    fields: dict[str, Any] = {
        "method": (Literal[tuple(names)], Field("none", description="preprocessing method")),
        "n_top_genes": (Optional[int], Field(  # noqa: UP045 - pydantic field type
            None, ge=2, description="highly variable genes (on training rows); null = all")),
    }
    for name in names:
        spec = get_method(name)
        if spec.options is not None:
            fields[name] = (spec.options, Field(default_factory=spec.options,
                                                description=spec.summary))
    return create_model("ExpressionPreprocess", __base__=ExpressionBase,
                        __module__="hescape.config", **fields)
