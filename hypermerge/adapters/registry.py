"""The registry of adapter methods: a plain dict from name to method class.

Adding a method: write ``adapters/<name>.py`` (see docs/adding_an_adapter.md) and list it here.
"""

from __future__ import annotations

from hypermerge.adapters.adalora import AdaLoRA
from hypermerge.adapters.base import AdapterConfig, AdapterMethod
from hypermerge.adapters.dora import DoRA
from hypermerge.adapters.hyperadalora import HyperAdaLoRA
from hypermerge.adapters.hyperadapt import HyperAdapt
from hypermerge.adapters.hyperlora import HyperLoRA
from hypermerge.adapters.ia3 import IA3
from hypermerge.adapters.lora import LoRA
from hypermerge.errors import ConfigError

METHODS: dict[str, type[AdapterMethod]] = {
    method.name: method
    for method in (HyperAdapt, LoRA, DoRA, IA3, AdaLoRA, HyperAdaLoRA, HyperLoRA)
}


def get_method(name: str) -> type[AdapterMethod]:
    """Return the method registered under ``name``, or raise a ConfigError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown adapter method {name!r}", hint=f"known methods: {', '.join(sorted(METHODS))}") from None


def config_from_dict(method: str, values: dict) -> AdapterConfig:
    """Build the config of ``method`` from plain values (JSON, YAML)."""
    return get_method(method).config_cls.from_dict(values)
