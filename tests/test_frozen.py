"""agent.frozen.fast_init: the same constructor as the dataclass's own, faster, still frozen."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

import pytest

from agent.energy import EnergySlice
from agent.frozen import fast_init
from agent.snapshot import GpuState
from agent.sources.gpu import GpuReading


@dataclass(frozen=True)
class Plain:
    a: int
    b: float = 1.5
    c: dict = field(default_factory=dict)


@fast_init
@dataclass(frozen=True)
class Fast:
    a: int
    b: float = 1.5
    c: dict = field(default_factory=dict)


def test_same_signature_values_equality_and_frozen():
    assert list(inspect.signature(Fast).parameters) == ["a", "b", "c"]
    assert inspect.signature(Fast).parameters["b"].default == 1.5
    for args, kw in [((1,), {}), ((1, 2.0), {}), ((), {"a": 3, "c": {"k": 1}})]:
        assert dataclasses.astuple(Fast(*args, **kw)) == dataclasses.astuple(Plain(*args, **kw))
    x = Fast(1)
    assert x == Fast(1) and x != Fast(2) and x.c == {} and x.c is not Fast(1).c  # a new default each time
    assert dataclasses.replace(x, b=4.0) == Fast(1, 4.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        x.a = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Fast()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Fast(1, d=2)  # type: ignore[call-arg]


def test_refused_where_it_would_be_wrong():
    with pytest.raises(TypeError):
        fast_init(dataclass(type("Mutable", (), {"__annotations__": {"a": int}})))
    with pytest.raises(TypeError):
        fast_init(dataclass(frozen=True, slots=True)(type("Slotted", (), {"__annotations__": {"a": int}})))


@pytest.mark.parametrize("cls", [GpuReading, EnergySlice, GpuState])
def test_the_per_tick_classes_keep_their_fields_and_defaults(cls):
    sig = inspect.signature(cls)
    assert list(sig.parameters) == [f.name for f in dataclasses.fields(cls)]
    for f in dataclasses.fields(cls):
        p = sig.parameters[f.name]
        if f.default is not dataclasses.MISSING:
            assert p.default == f.default
        elif f.default_factory is dataclasses.MISSING:
            assert p.default is inspect.Parameter.empty
