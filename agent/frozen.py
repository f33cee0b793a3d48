"""A faster ``__init__`` for the frozen dataclasses made on every tick for every GPU.

A frozen dataclass's generated ``__init__`` sets each field through ``object.__setattr__``
(it must get past the class's own ``__setattr__``, which refuses): ~1.5 µs for the ten fields
of a :class:`~agent.sources.gpu.GpuReading`, several of which are made per GPU per tick.
:func:`fast_init` replaces it by one that fills the instance's ``__dict__`` directly:
the same signature, defaults and default factories, still frozen afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Give the frozen dataclass ``cls`` (with a ``__dict__``, no ``__post_init__``) a faster ``__init__``."""
    params = dataclasses.fields(cls)  # type: ignore[arg-type]
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}: fast_init is for frozen dataclasses")
    if "__slots__" in cls.__dict__ or hasattr(cls, "__post_init__") or any(not f.init for f in params):
        raise TypeError(f"{cls.__name__}: fast_init needs a __dict__, every field in __init__, no __post_init__")
    env: dict[str, Any] = {"_MISSING": dataclasses.MISSING}
    args, fill = [], []
    for f in params:
        if f.default is not dataclasses.MISSING:
            env[f"_d_{f.name}"] = f.default
            args.append(f"{f.name}=_d_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            env[f"_f_{f.name}"] = f.default_factory
            args.append(f"{f.name}=_MISSING")
            fill.append(f"    if {f.name} is _MISSING:\n        {f.name} = _f_{f.name}()\n")
        else:
            args.append(f.name)
    body = "".join(f"    d[{f.name!r}] = {f.name}\n" for f in params)
    src = f"def __init__(self, {', '.join(args)}):\n" + "".join(fill) + "    d = self.__dict__\n" + body
    exec(src, env)  # noqa: S102 - source built above from the class's own field names
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[misc]
    return cls
