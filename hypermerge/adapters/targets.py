"""Which modules an adapter wraps.

The default is found by module type, not by a per-architecture list of names: every linear
layer (``nn.Linear`` or ``Conv1D``) inside the model's stacks of transformer blocks. A block
stack is an ``nn.ModuleList`` of modules of one class that contain linear layers; the LM head,
embeddings, poolers and classifier heads live outside the stacks and are never targeted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from hypermerge.adapters.base import AdapterLayer, is_linear_like
from hypermerge.errors import ConfigError


def block_stacks(model: nn.Module) -> list[str]:
    """Names of the outermost ModuleLists of repeated blocks that hold linear layers."""
    stacks: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(stack + ".") for stack in stacks):
            continue  # nested (experts inside a block): the outer stack already covers it
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        if all(any(is_linear_like(m) for m in child.modules()) for child in module):
            stacks.append(name)
    return stacks


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            continue
        if is_linear_like(module) and module is not output_embeddings:
            if ".base_layer" in f".{name}":
                continue  # already wrapped by an adapter
            found.append((name, module))
    return found


def select_targets(model: nn.Module, target_modules: Sequence[str] | str | None) -> list[tuple[str, nn.Module]]:
    """Return ``(module name, module)`` for every linear layer to adapt.

    Args:
        target_modules: None for the default (linear layers of the block stacks), a regex string
            matched against the full name, or a sequence of names matched exactly or as a suffix
            at a dot boundary (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).

    Raises:
        ConfigError: nothing matched; the message lists some candidate names.
    """
    candidates = _linear_modules(model)
    if target_modules is None:
        stacks = block_stacks(model)
        chosen = [(n, m) for n, m in candidates if any(n.startswith(s + ".") for s in stacks)]
        description = "the default (linear layers of the transformer blocks)"
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        chosen = [(n, m) for n, m in candidates if pattern.fullmatch(n)]
        description = f"the regex {target_modules!r}"
    else:
        wanted = list(target_modules)
        chosen = [(n, m) for n, m in candidates if any(n == w or n.endswith("." + w) for w in wanted)]
        description = f"target_modules {wanted}"
    if not chosen:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, _ in candidates})
        raise ConfigError(
            f"{description} matched no linear layer of {type(model).__name__}",
            hint=f"linear layers here end in: {', '.join(suffixes[:20]) or 'none'}",
        )
    return chosen


def match_suffix(name: str, candidates: Sequence[str]) -> str | None:
    """Find ``name`` among ``candidates`` allowing one side to carry an extra leading prefix
    (``bert.encoder.x`` vs ``encoder.x``), as happens between a task model and its base
    checkpoint. Returns None when there is no match or more than one."""
    if name in candidates:
        return name
    matches = [c for c in candidates if c.endswith("." + name) or name.endswith("." + c)]
    return matches[0] if len(matches) == 1 else None
