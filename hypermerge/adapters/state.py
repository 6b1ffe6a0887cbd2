"""What ``inject`` leaves on a model (:class:`AdapterState`), and how every module finds it.

A module of its own, below the methods: a method's model-level hooks read the state, and
:mod:`hypermerge.adapters.model` (which injects) imports the method registry, so the methods
cannot import it.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from hypermerge.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod
from hypermerge.errors import ConfigError

STATE_ATTR = "_hypermerge_state"


@dataclasses.dataclass
class AdapterState:
    """What inject leaves on the model: the config, the wrapped layers, the frozen flags to restore."""

    method: type[AdapterMethod]
    config: AdapterConfig
    layers: dict[str, AdapterLayer]  # base weight name -> layer
    saved_modules: list[str]  # names of modules trained in full (modules_to_save)
    requires_grad_before: dict[str, bool]


def adapter_state(model: nn.Module, *, required: bool = True) -> AdapterState | None:
    """The adapter state ``inject`` left on ``model`` (None if there is none and not ``required``).

    Raises:
        ConfigError: ``model`` has no adapter and ``required``.
    """
    state = getattr(model, STATE_ATTR, None)
    if state is None and required:
        raise ConfigError(f"{type(model).__name__} has no hypermerge adapter",
                          hint="call hm.inject(model, config) or hm.load_adapter(model, path) first")
    return state
