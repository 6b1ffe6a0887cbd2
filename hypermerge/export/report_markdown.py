"""report.md: report.json as a short markdown page (what the CLI prints after export / verify),
one function per section."""

from __future__ import annotations

from hypermerge.export.weights_map_report import weights_map_markdown


def _g(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


def _case(case: dict) -> str:
    text = f"{case['batch']}×{case['seq']}"
    if case.get("past"):
        text += f" past {case['past']}"
    if case.get("pad"):
        text += f" pad {case['pad']}"
    return text


def parity_table(parity: dict) -> list[str]:
    """Per-output rows; a causal LM's present_* outputs are folded into one row (their worst)."""
    lines = ["| output | max abs | mean abs | p99 abs | max rel | atol needed | atol allowed | ok |",
             "|---|---|---|---|---|---|---|---|"]
    outputs = parity["outputs"]
    present = {name: s for name, s in outputs.items() if name.startswith("present_")}
    rows = [(name, s) for name, s in outputs.items() if not name.startswith("present_")]
    if present:
        worst = max(present, key=lambda name: present[name]["max_abs"])
        s = dict(present[worst])
        s["passed"] = all(v["passed"] for v in present.values())
        s["mean_abs"] = sum(v["mean_abs"] * v["elements"] for v in present.values()) / max(
            sum(v["elements"] for v in present.values()), 1)
        rows.append((f"present_* ({len(present)}, worst {worst})", s))
    for name, s in rows:
        lines.append(f"| {name} | {_g(s['max_abs'])} | {_g(s['mean_abs'])} | {_g(s['p99_abs'])} | {_g(s['max_rel'])} "
                     f"| {_g(s['needed_atol'])} | {_g(s.get('atol_used'))} | {'yes' if s['passed'] else '**NO**'} |")
    return lines


def latency_table(latency: dict) -> list[str]:
    backends = [key for key in latency if isinstance(latency[key], dict) and "p50_ms" in latency[key]]
    lines = ["| backend | p50 ms | p90 ms | p99 ms | p50 vs torch |", "|---|---|---|---|---|"]
    for name in backends:
        s = latency[name]
        ratio = "1.00×" if name == "torch" else f"{latency.get('ratio', {}).get(name, float('nan')):.2f}×"
        label = "torch eager" if name == "torch" else name
        lines.append(f"| {label} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} | {ratio} |")
    return lines


def to_markdown(report: dict) -> str:
    """The report as a short markdown page (what the CLI prints after export / verify)."""
    lines = header_lines(report)
    parity = report.get("parity")
    for title, section in (("onnxruntime", parity), ("TensorRT", (report.get("tensorrt") or {}).get("parity"))):
        if section:
            lines += parity_lines(title, section)
    if parity is None:
        lines += ["", "## Parity: not checked (--no-verify); run `hypermerge verify` on this directory."]
    lines += latency_lines(report.get("latency"))
    lines += optimize_lines(report.get("optimize"))
    quant = report.get("quantized")
    if quant and quant.get("kind") == "weight-only":
        lines += weight_only_lines(quant)
    elif quant and quant.get("kind") == "fp16":
        lines += fp16_lines(quant)
    elif quant:
        lines += int8_lines(quant)
    lines += tensorrt_lines(report.get("tensorrt"))
    lines += _patch_lines(report)
    lines += certificate_lines(report.get("certificate"))
    return "\n".join(lines) + "\n"


def header_lines(report: dict) -> list[str]:
    """The title and what was exported: source, model file, profile, inputs and outputs."""
    lines = [f"# hypermerge export report: {report.get('task')}", ""]
    lines.append(f"- source: `{report.get('source', {}).get('path')}`")
    lines.append(f"- model: `{report.get('model_file')}` (opset {report.get('opset')}, {report.get('exporter')})")
    if report.get("profile"):
        profile = report["profile"]
        lines.append(f"- profile: `{profile.get('name') or 'given as options'}` ({profile.get('description') or '—'})")
    for key in ("inputs", "outputs"):
        names = [entry["name"] for entry in report.get(key, [])]
        shown = names if len(names) <= 7 else [*names[:5], f"… {len(names)} in all"]
        lines.append(f"- {key}: {', '.join(shown)}")
    if report.get("verified_at"):
        lines.append(f"- verified: {report['verified_at']} with hypermerge {report.get('hypermerge')}")
    return lines


def parity_lines(title: str, section: dict) -> list[str]:
    """One backend's parity: verdict, tolerance, the per-output table and the greedy decode."""
    verdict = "PASSED" if section["passed"] else "FAILED"
    tol = section["tolerance"]
    lines = ["", f"## Parity, {title} ({section['backend']}): {verdict}", "",
             f"Tolerance |a − e| ≤ {tol['atol']:g}·max(1, max|e|) + {tol['rtol']:g}·|e| at valid positions; shapes "
             + ", ".join(_case(c) for c in section["shapes"]) + ".", ""]
    lines += parity_table(section)
    greedy = section.get("greedy_decode")
    if greedy:
        lines += ["", f"Greedy decode, {greedy['batch']} left-padded prompts (lengths "
                  f"{greedy['prompt_lengths']}), {greedy['new_tokens']} tokens with the KV cache: "
                  + ("identical to PyTorch generate." if greedy["match"] else
                     f"**differs** from PyTorch generate at {greedy.get('first_mismatch')}.")]
    return lines


def latency_lines(latency: dict | None) -> list[str]:
    """The latency tables (a causal LM's decode step too); none where nothing was measured."""
    if not latency:
        return []
    lines = ["", f"## Latency: batch {latency['batch']} × seq {latency['seq']}, {latency['threads']} threads, "
             f"{latency['iterations']} interleaved runs", ""]
    lines += latency_table(latency)
    if "decode_step" in latency:
        lines += ["", f"One decode step (1 new token on a cache of {latency['seq']}):", ""]
        lines += latency_table(latency["decode_step"])
    return lines


def optimize_lines(optimize: dict | None) -> list[str]:
    """``--optimize``: the fusions, both latencies and the re-checked parity."""
    if not optimize:
        return []
    fused = ", ".join(f"{op} ×{n}" for op, n in optimize["fused_ops"].items()) or "none"
    return ["", f"## --optimize ({optimize['model_type']} fusions): {fused}",
            f"p50 {optimize['plain_p50_ms']:.2f} ms before, {optimize['optimized_p50_ms']:.2f} ms after; "
            "parity re-checked: " + {True: "passed.", False: "FAILED.", None: "not checked (--no-verify)."}[
                optimize.get("parity_passed")]]


def int8_lines(quant: dict) -> list[str]:
    """An encoder's int8 section: accuracy against its bound, speed against fp32, kept or not."""
    metric, bound = quant["bound"]["metric"], quant["bound"]["min"]
    return ["", f"## int8 ({quant['method']}): {'kept as ' + quant['file'] if quant['kept'] else 'not kept'}",
            f"{metric} {quant['accuracy'][metric]:.4f} (bound ≥ {bound}) on {quant['accuracy']['samples']} "
            f"{quant['accuracy']['inputs']}; p50 {quant['p50_ms']:.2f} ms vs fp32 "
            f"{quant['fp32_p50_ms']:.2f} ms ({quant['ratio_to_fp32']:.2f}×). {quant['reason']}"]


def fp16_lines(quant: dict) -> list[str]:
    """``--quantize fp16``: accuracy against its bound, error against PyTorch, time against fp32, kept or not."""
    metric, bound, parity = quant["bound"]["metric"], quant["bound"]["min"], quant["parity"]
    greedy = quant.get("greedy")
    decode = (f" Greedy decode, tokens until the first divergence from PyTorch (of {greedy['new_tokens']}): "
              f"{', '.join(map(str, greedy['lengths']))}.") if greedy else ""
    step = "one decode step" if quant["timed"] == "decode_step" else "forward"
    return ["", f"## fp16 ({quant['method']}): {'kept as ' + quant['file'] if quant['kept'] else 'not kept'}",
            f"{metric} {quant['accuracy'][metric]:.4f} (bound ≥ {bound}) on {quant['accuracy']['samples']} "
            f"{quant['accuracy']['inputs']}; max abs err vs PyTorch {parity['max_abs_err']:.2e} "
            f"({'within' if parity['passed'] else 'outside'} fp16's tolerance).{decode} On {quant['backend']}, "
            f"{step} p50 {quant['p50_ms']:.2f} ms vs fp32 {quant['fp32_p50_ms']:.2f} ms "
            f"({quant['ratio_to_fp32']:.2f}×). {quant['reason']}"]


def tensorrt_lines(trt: dict | None) -> list[str]:
    """The engine's build: TensorRT version, precision, files and flags."""
    if not trt:
        return []
    return ["", f"## TensorRT {trt.get('version')} ({trt.get('precision')}): `{trt.get('engine')}`, "
            f"timing cache `{trt.get('timing_cache')}`, flags {', '.join(trt.get('flags', []))}"]


def weight_only_lines(section: dict) -> list[str]:
    """The weight-only quantization section of a causal LM (``--quantize int4`` / ``int8``)."""
    top1, greedy, speed = section["accuracy"], section["greedy"], section["decode_tokens_per_s"]
    title = f"kept as {section['file']}" if section["kept"] else "not kept"
    lines = ["", f"## {section['scheme']} ({section['method']}): {title}",
             f"Next-token top-1 agreement with PyTorch fp32: {top1['top1_agreement']:.4f} (bound ≥ "
             f"{section['bound']['min']}) over {top1.get('positions', '?')} positions of {top1['samples']} "
             f"{top1['inputs']}. Greedy decode, tokens until the first divergence from PyTorch "
             f"(of {greedy['new_tokens']}): {', '.join(map(str, greedy['lengths']))}.", "",
             f"| decode ({speed['new_tokens']} new tokens, greedy) | fp32 ONNX tokens/s | {section['scheme']} "
             "tokens/s | ratio |", "|---|---|---|---|"]
    for key, row in speed.items():
        if key.startswith("batch_"):
            lines.append(f"| batch {key.removeprefix('batch_')} | {row['fp32']:.1f} | {row['quantized']:.1f} | "
                         f"{row['quantized'] / row['fp32']:.2f}× |")
    lines += ["", section["reason"]]
    return lines


def _patch_lines(report: dict) -> list[str]:
    """The sections ``hypermerge patch`` and ``--adapter-inputs`` add (weights map, inputs, patch)."""
    lines: list[str] = []
    scales = report.get("adapter_inputs")
    if scales:
        parity = scales.get("parity_random_scales")
        check = ("not checked (--no-verify)" if parity is None else
                 f"parity with random scales: {'passed' if parity['passed'] else 'FAILED'} "
                 f"(max abs err {parity['max_abs_err']:.2e})")
        lines += ["", f"## Adapter inputs: `{scales['input']}` ({scales['size']} float32 values, {scales['matrices']} "
                  f"matrices, layout in `{scales['file']}`); default ones = the base model; {check}."]
    patch = report.get("patch")
    if patch:
        lines += ["", f"## Patched with `{patch['adapter']}` ({patch['method']}, {patch['format']})", "",
                  f"{patch['tensors_changed']} tensors changed in {patch['initializers_rewritten']} initializers, "
                  f"graph unchanged; base checked {patch['base_check']}."]
        if patch.get("dropped"):
            lines.append("Not carried over: " + "; ".join(patch["dropped"]) + ".")
        if report.get("latency"):
            lines.append("Latency above: measured on the export before the patch (same graph, same shapes).")
    if report.get("weights_map"):
        lines += weights_map_markdown(report["weights_map"])
    return lines


def certificate_lines(certificate: dict | None) -> list[str]:
    """The certificate as report.md lines."""
    if not certificate:
        return []
    adapter, base = certificate["adapter"], certificate["base"]
    folded, engine = certificate.get("folded"), certificate.get("engine") or {}
    e2e = certificate.get("end_to_end") or {}
    verdict = {True: "PASSED", False: "FAILED", None: "NOT CHECKED (--no-verify)"}[certificate.get("passed")]
    lines = ["", f"## Certificate, {certificate['chain']}: {verdict}", "",
             f"1. adapter `{adapter['path']}` ({adapter.get('method')}, {adapter.get('format')}), "
             f"sha256 `{str(adapter.get('sha256'))[:16]}`",
             f"2. base `{base['path']}`, weights sha256 `{str(base.get('weights_sha256'))[:16]}`; "
             f"{(base.get('content_check') or {}).get('detail', 'not checked')}"]
    if folded:
        check = folded.get("fold_check")
        check_text = check if isinstance(check, str) else (
            f"fold --verify {'passed' if check.get('passed', True) else 'FAILED'} (max rel {check.get('max_rel', 0):.2g})")
        lines.append(f"3. folded weights `{folded['path']}` ({folded.get('dtype')}), sha256 "
                     f"`{str(folded.get('weights_sha256'))[:16]}`; {check_text}")
    else:
        lines.append("3. folded weights: none (patched straight into the engine)")
    parity = engine.get("parity_vs_folded")
    lines.append(f"4. engine sha256 `{str(engine.get('sha256'))[:16]}`; parity vs the folded model: "
                 + {True: "passed", False: "FAILED", None: "not checked"}[parity])
    if e2e.get("passed") is None:
        lines.append(f"5. end to end (base + adapter unfolded in PyTorch vs the engine): not checked, {e2e.get('why')}")
    else:
        greedy = e2e.get("greedy_decode_match")
        lines.append(f"5. end to end (base + adapter unfolded in PyTorch vs the engine): "
                     f"{'passed' if e2e['passed'] else 'FAILED'}, max abs err {e2e['max_abs_err']:.2e}, "
                     f"max rel err {e2e['max_rel_err']:.2e}"
                     + ("" if greedy is None else f", greedy decode {'identical' if greedy else 'DIFFERS'}"))
    return lines
