"""The one registry type, lazy references and lazy package exports."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hescape.lazy import Ref, lazy_exports
from hescape.registry import Registry


@dataclass(frozen=True, kw_only=True)
class Spec:
    name: str
    size: int = 1


def test_specs_register_once_by_name_and_unknown_names_suggest():
    reg: Registry[Spec] = Registry("widget")
    a = reg.add(Spec(name="alpha"))
    reg.add(Spec(name="beta", size=2))
    assert reg.get("alpha") is a and reg.names() == ["alpha", "beta"] and len(reg) == 2
    assert [s.size for s in reg.entries()] == [1, 2] and "beta" in reg
    with pytest.raises(ValueError, match="widget 'alpha' registered twice"):
        reg.add(Spec(name="alpha"))
    with pytest.raises(KeyError, match="unknown widget 'alpah'. Did you mean 'alpha'"):
        reg.get("alpah")
    assert reg.problem("alpha") is None and "Known: alpha, beta" in reg.problem("gamma")
    with pytest.raises(ValueError, match="has no name"):
        reg.add(object())


def test_remove_and_temporarily_leave_the_registry_as_it_was():
    reg: Registry[Spec] = Registry("widget")
    reg.add(Spec(name="kept"))
    with reg.temporarily(Spec(name="tmp")) as spec:
        assert reg.get("tmp") is spec
    assert reg.names() == ["kept"]
    with pytest.raises(RuntimeError), reg.temporarily(Spec(name="tmp")):
        raise RuntimeError("cleaned up even on error")
    assert reg.names() == ["kept"]
    assert reg.remove("kept").name == "kept" and not len(reg)
    with pytest.raises(KeyError, match="unknown widget"):
        reg.remove("kept")


def test_ref_loads_lazily_and_refuses_a_malformed_target():
    assert Ref("os.path:join").load()("a", "b") == "a/b"
    assert Ref("collections:OrderedDict.fromkeys").load()(["x"]) == {"x": None}
    for bad in ("os.path.join", ":join", "os.path:"):
        with pytest.raises(ValueError, match="expected 'package.module:attr'"):
            Ref(bad)


def test_lazy_exports_import_on_access():
    names, getattr_ = lazy_exports("hescape", {"write_json": "atomic", "Registry": "registry"})
    assert names == ["Registry", "write_json"]
    assert getattr_("Registry") is Registry
    with pytest.raises(AttributeError, match="'hescape' has no attribute 'nope'"):
        getattr_("nope")
