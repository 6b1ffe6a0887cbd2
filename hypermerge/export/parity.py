"""Parity certificate: an exported model against its PyTorch reference.

In the manner of Polygraphy's comparator: every output is compared on several shapes (padding
included), only at valid positions (attention_mask == 1: what padded positions hold is undefined
and differs between kernels), and reported as max / mean / p99 of the absolute and relative error
with the tolerance used and the smallest ``atol`` that would have passed. An element passes when
``|actual - expected| <= atol * R + rtol * |expected|`` with R = max(1, the output's largest
|expected|): numpy's ``allclose`` for outputs within [-1, 1], and for larger ones (LLM logits reach
30) an atol that grows with them, as fp32 rounding does. Relative errors are
divided by the output's largest ``|expected|``: element-wise ratios explode near zero and say
nothing. Causal LMs also decode greedily with the KV cache and must match ``generate`` token for token.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from hypermerge.errors import ParityError
from hypermerge.export.onnx_export import call_wrapper, example_inputs, position_ids_for
from hypermerge.export.report import ParitySection
from hypermerge.export.runtime import Runner, decode
from hypermerge.export.tasks import CAUSAL_LM, IOContract


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Element-wise bound ``|a - e| <= atol * max(1, max|e|) + rtol * |e|`` (max over the output):
    numpy's ``allclose`` for outputs within [-1, 1], an atol that scales with larger outputs."""

    atol: float
    rtol: float


# fp32 kernels differ by reassociation only; reduced-precision engines by their format's epsilon
TOLERANCES = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(2e-2, 2e-2), "bf16": Tolerance(6e-2, 5e-2)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One input shape: ``pad`` padded positions in row 0 (left for causal LMs, right for encoders)."""

    batch: int
    seq: int
    past: int = 0
    pad: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


ENCODER_CASES = (Case(1, 8), Case(2, 16, pad=5), Case(4, 33, pad=12), Case(3, 1))
# prefill (past 0), prefill with left padding, decode (S=1) at batch 4, a chunk on top of a cache
CAUSAL_CASES = (Case(1, 8), Case(3, 7, pad=3), Case(4, 1, past=9, pad=2), Case(2, 4, past=6, pad=3), Case(1, 1))
GREEDY_PROMPT_LENGTHS = (6, 11, 3)  # batch of 3 of different lengths -> left padding


def causal_feeds(wrapper: torch.nn.Module, contract: IOContract, vocab: int, case: Case,
                 seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs for one causal case with a *real* past: the PyTorch model's own cache for a prefix.

    Returns:
        The feeds and the full (past + new) attention mask.
    """
    total = case.past + case.seq
    full = example_inputs(contract, vocab, batch=case.batch, seq=total, past=0, left_pad=case.pad, seed=seed)
    mask = full["attention_mask"]
    if case.past:
        prefix = {"input_ids": full["input_ids"][:, :case.past], "attention_mask": mask[:, :case.past],
                  "position_ids": position_ids_for(mask[:, :case.past], case.past),
                  **{name: full[name] for name in contract.past_names}}
        past = call_wrapper(wrapper, contract, prefix)[1:]
    else:
        past = [full[name] for name in contract.past_names]
    feeds = {"input_ids": full["input_ids"][:, case.past:], "attention_mask": mask,
             "position_ids": position_ids_for(mask, case.seq), **dict(zip(contract.past_names, past, strict=True))}
    return feeds, mask


def _valid(output_name: str, value: np.ndarray, contract: IOContract, mask: np.ndarray, case: Case) -> np.ndarray:
    """The elements of one output at valid positions, flattened."""
    if output_name.startswith("present_"):
        # (batch, heads, past + seq, head_dim): valid where the full mask is 1
        return value.transpose(0, 2, 1, 3)[mask.astype(bool)].ravel()
    if value.ndim >= 2 and contract.task != "sequence-classification":
        new = mask[:, -case.seq:] if contract.task == CAUSAL_LM else mask
        return value[new.astype(bool)].ravel()  # (batch, seq, ...) -> valid tokens
    return value.ravel()


def _stats(actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance) -> dict:
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    if not diff.size:
        return {"max_abs": 0.0, "mean_abs": 0.0, "p99_abs": 0.0, "max_rel": 0.0, "mean_rel": 0.0, "p99_rel": 0.0,
                "needed_atol": 0.0, "passed": True, "elements": 0}
    scale = max(float(np.abs(expected).max()), 1e-12)
    finite = bool(np.isfinite(actual).all())
    needed = float((diff - tolerance.rtol * np.abs(expected)).max())
    # fp32 rounding grows with magnitude: an output whose values reach 30 (LLM logits) gets 30× the
    # atol of one within [-1, 1]; for outputs within [-1, 1] this is exactly numpy's allclose
    atol = tolerance.atol * max(1.0, scale)
    max_abs, mean_abs, p99_abs = float(diff.max()), float(diff.mean()), float(np.quantile(diff, 0.99))
    return {"max_abs": max_abs, "mean_abs": mean_abs, "p99_abs": p99_abs, "max_rel": max_abs / scale,
            "mean_rel": mean_abs / scale, "p99_rel": p99_abs / scale, "needed_atol": max(needed, 0.0),
            "atol_used": atol, "scale": scale, "passed": finite and needed <= atol, "elements": int(diff.size)}


def compare_outputs(run: Runner, wrapper: torch.nn.Module, contract: IOContract, vocab: int,
                    tolerance: Tolerance, cases: tuple[Case, ...] | None = None, seed: int = 0) -> dict:
    """Run every case through the backend and PyTorch; per-output statistics over all cases.

    Returns:
        ``{"shapes": [...], "outputs": {name: stats}, "max_abs_err", "max_rel_err", "passed"}``.
    """
    cases = cases or (CAUSAL_CASES if contract.task == CAUSAL_LM else ENCODER_CASES)
    actual_all: dict[str, list[np.ndarray]] = {name: [] for name in contract.outputs}
    expected_all: dict[str, list[np.ndarray]] = {name: [] for name in contract.outputs}
    for index, case in enumerate(cases):
        if contract.task == CAUSAL_LM:
            feeds, mask = causal_feeds(wrapper, contract, vocab, case, seed + index)
        else:
            feeds = example_inputs(contract, vocab, batch=case.batch, seq=case.seq, left_pad=case.pad, seed=seed + index)
            mask = feeds["attention_mask"]
        expected = call_wrapper(wrapper, contract, feeds)
        actual = run({name: tensor.numpy() for name, tensor in feeds.items()})
        for name, a, e in zip(contract.outputs, actual, expected, strict=True):
            if tuple(a.shape) != tuple(e.shape):
                raise ParityError(f"output {name} has shape {tuple(a.shape)} on the backend but {tuple(e.shape)} "
                                  f"in PyTorch (batch {case.batch}, seq {case.seq}, past {case.past})",
                                  hint="the exported graph does not follow the model; re-export it")
            actual_all[name].append(_valid(name, a, contract, mask.numpy(), case))
            expected_all[name].append(_valid(name, e.numpy(), contract, mask.numpy(), case))
    outputs = {name: _stats(np.concatenate(actual_all[name]), np.concatenate(expected_all[name]), tolerance)
               for name in contract.outputs}
    return {"shapes": [case.as_dict() for case in cases], "outputs": outputs,
            "max_abs_err": max(s["max_abs"] for s in outputs.values()),
            "max_rel_err": max(s["max_rel"] for s in outputs.values()),
            "passed": all(s["passed"] for s in outputs.values())}


def greedy_prompts(vocab: int, tokenizer=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A left-padded batch of 3 prompts of different lengths (real text when there is a tokenizer)."""
    if tokenizer is not None:
        texts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,"]
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(texts, padding=True, return_tensors="np")
        tokenizer.padding_side = side
        return batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    rng = np.random.default_rng(seed)
    width = max(GREEDY_PROMPT_LENGTHS)
    ids = np.zeros((len(GREEDY_PROMPT_LENGTHS), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(GREEDY_PROMPT_LENGTHS):
        ids[row, width - length:] = rng.integers(0, vocab, length)
        mask[row, width - length:] = 1
    return ids, mask


def torch_greedy(model: torch.nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """transformers' ``generate`` (greedy, KV cache, no early stop): the reference tokens."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=None, pad_token_id=0, use_cache=True)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                             generation_config=config)
    return out[:, input_ids.shape[1]:].numpy()


def greedy_match(run: Runner, model: torch.nn.Module, contract: IOContract, vocab: int, new_tokens: int = 16,
                 tokenizer=None, tolerance: Tolerance | None = None) -> dict:
    """Greedy decode on the backend (our KV-cache loop) vs PyTorch ``generate``, token for token.

    Where the two first differ, PyTorch's own logits at that position decide: if its top token
    beats the backend's choice by no more than ``tolerance`` allows for those logits, the two
    tokens are a tie within the checked precision (a fine-tuned model can have them) and the
    decode counts as matching up to there (``tie`` in the result); otherwise it is a mismatch.
    """
    ids, mask = greedy_prompts(vocab, tokenizer)
    expected = torch_greedy(model, ids, mask, new_tokens)
    actual = decode(run, contract, ids, mask, max_new_tokens=new_tokens)
    mismatch = np.argwhere(actual != expected)
    result = {"batch": int(ids.shape[0]), "prompt_lengths": mask.sum(1).tolist(), "new_tokens": new_tokens,
              "left_padding": True, "match": bool(actual.shape == expected.shape and not mismatch.size)}
    if mismatch.size:
        row, step = (int(v) for v in mismatch[0])
        result["first_mismatch"] = {"row": row, "step": step, "expected": int(expected[row, step]),
                                    "actual": int(actual[row, step])}
        if tolerance is not None:
            # Each row is compared up to its first difference (the sequences part there).
            ties = []
            for row in sorted({int(r) for r, _ in mismatch}):
                step = int(np.argmax(actual[row] != expected[row]))
                gap, allowed = _logit_gap(model, ids[row], mask[row], expected[row, :step], int(expected[row, step]),
                                          int(actual[row, step]), tolerance)
                ties.append(gap <= allowed)
                if row == result["first_mismatch"]["row"]:
                    result["first_mismatch"].update(logit_gap=gap, allowed_gap=allowed)
            if all(ties):
                result["match"], result["tie"] = True, True
    return result


def _logit_gap(model: torch.nn.Module, prompt: np.ndarray, prompt_mask: np.ndarray, generated: np.ndarray,
               expected: int, actual: int, tolerance: Tolerance) -> tuple[float, float]:
    """PyTorch's logit of ``expected`` minus that of ``actual`` after ``prompt + generated``, and the
    difference the tolerance allows two such logits to have moved by (each may move by atol·scale)."""
    keep = prompt_mask.astype(bool)
    tokens = np.concatenate([prompt[keep], generated]).astype(np.int64)[None]
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens)).logits[0, -1].double()
    scale = max(1.0, float(logits.abs().max()))
    allowed = 2 * tolerance.atol * scale
    return float(logits[expected] - logits[actual]), allowed


def check_parity(run: Runner, model: torch.nn.Module, wrapper: torch.nn.Module, contract: IOContract, *,
                 backend: str, tolerance: Tolerance, new_tokens: int = 16, tokenizer=None,
                 cases: tuple[Case, ...] | None = None, greedy: bool = True) -> dict:
    """The ``parity`` section of the report.

    Args:
        run: the backend under test (feeds -> outputs in contract order).
        model: the PyTorch model (for ``generate``); ``wrapper`` is its export wrapper (the reference).
        backend: a label for the report, e.g. ``onnxruntime:CPUExecutionProvider``.
        new_tokens: greedy tokens to compare (causal LMs).
        greedy: run the greedy-decode comparison (causal LMs; off where the shapes do not fit a TensorRT profile).

    Returns:
        ``{"passed", "backend", "tolerance", "shapes", "max_abs_err", "max_rel_err", "outputs",
        "greedy_decode_match", "greedy_decode"}``.
    """
    vocab = int(model.config.get_text_config().vocab_size)
    compared = compare_outputs(run, wrapper, contract, vocab, tolerance, cases)
    section = ParitySection(compared["passed"], backend, dataclasses.asdict(tolerance), compared["shapes"],
                            compared["max_abs_err"], compared["max_rel_err"], compared["outputs"])
    if contract.task == CAUSAL_LM and greedy:
        section.greedy_decode = greedy_match(run, model, contract, vocab, new_tokens, tokenizer, tolerance)
        section.greedy_decode_match = section.greedy_decode["match"]
        section.passed = section.passed and section.greedy_decode_match
    return section.to_dict()


def failure_summary(parity: dict) -> str:
    """One line: which outputs failed by how much (for ParityError)."""
    failed = [(name, s) for name, s in parity["outputs"].items() if not s["passed"]]
    parts = [f"{name} max abs err {s['max_abs']:.3g} (needs atol {s['needed_atol']:.3g}, "
             f"allowed {s['atol_used']:.3g} = {parity['tolerance']['atol']:g} × max(1, {s['scale']:.3g}), "
             f"rtol {parity['tolerance']['rtol']:g})"
             for name, s in failed[:3]]
    if len(failed) > 3:
        parts.append(f"and {len(failed) - 3} more outputs")
    greedy = parity.get("greedy_decode") or {}
    if greedy and not greedy.get("match"):
        first = greedy.get("first_mismatch", {})
        gap = (f", PyTorch prefers it by {first['logit_gap']:.3g} logits, beyond the {first['allowed_gap']:.3g} "
               "a tie may differ by" if "logit_gap" in first else "")
        parts.append(f"greedy decode differs from PyTorch at row {first.get('row')} step {first.get('step')} "
                     f"({first.get('actual')} vs {first.get('expected')}{gap})")
    return "; ".join(parts)
