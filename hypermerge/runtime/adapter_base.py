"""Whether an adapter was trained on the base an export holds, by content where the adapter's
recorded base is on disk: the check ``hypermerge patch`` and a per-call adapter both pass through.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from hypermerge.errors import AdapterMismatchError, CheckpointError
from hypermerge.runtime.weights_map import WeightsMap, digest_of


def check_adapter_base(checkpoint, weights_map: WeightsMap, names: list[str]) -> str:
    """Refuse an adapter trained on another base than the export's, by content where it can.

    An adapter records its base model's path and the shapes of the weights it targets. Shapes
    tell architectures apart, not two checkpoints of one architecture; so where the recorded base
    is a local directory, the weights the adapter changes are read from it and compared with the
    digests the map recorded at export (a few hundred MB for SmolLM2: well under a second).

    Args:
        checkpoint: the adapter (an ``AdapterCheckpoint``).
        weights_map: the export's map.
        names: the map's names of the tensors the adapter changes.

    Returns:
        How the base was checked, one sentence for the report.

    Raises:
        AdapterMismatchError: the adapter's base holds other values than the export's.
    """
    # an adapter checkpoint is only ever read with torch (the [export] extra) installed; these
    # need it, so they are imported here: the runtime package imports no torch when it loads
    import torch
    from safetensors import safe_open

    from hypermerge.adapters.targets import match_suffix
    from hypermerge.fold.hfdir import open_base

    base = checkpoint.base_model
    if not base or not Path(base).is_dir():
        return f"by names and shapes only (the adapter's base model {base!r} is not a local directory)"
    try:
        base_checkpoint = open_base(base)
    except CheckpointError:
        return f"by names and shapes only (the adapter's base model {base} has no readable safetensors weights)"
    available = list(base_checkpoint.shapes)
    checked = 0
    handles: dict[Path, object] = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            recorded = weights_map.sha256.get(name)
            match = match_suffix(name, available)
            if recorded is None or match is None:
                continue
            shard = base_checkpoint.shard_of[match]
            if shard not in handles:
                handles[shard] = stack.enter_context(safe_open(str(shard), framework="pt"))
            tensor = handles[shard].get_tensor(match)
            if not tensor.is_floating_point() or digest_of(tensor.to(torch.float32).numpy()) != recorded:
                already = weights_map.patches[-1]["adapter"] if weights_map.patches else None
                raise AdapterMismatchError(
                    f"the adapter's base model ({base}) differs from the model this export holds"
                    + (f" (it already has the adapter {already} folded in)" if already else
                       f" ({weights_map.source.get('path')})") + f": {name} has other values",
                    path=checkpoint.path,
                    hint="use an export of the adapter's own base model" + (", not a patched one" if already else ""))
            checked += 1
    return f"by content: the {checked} weights it changes equal those of its base model {base}"
