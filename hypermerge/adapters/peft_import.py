"""Reading PEFT adapter directories (``peft_type`` in adapter_config.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypermerge.errors import CheckpointError


def read_peft_adapter(path: Path, raw: dict[str, Any]):
    raise CheckpointError(f"PEFT {raw.get('peft_type')} adapters are not readable by this version", path=path,
                          hint="load it with peft and call merge_and_unload()")
