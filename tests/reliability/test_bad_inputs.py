"""Bad inputs to every command, through the real command line (``python -m hypermerge`` in a
subprocess): each gives a non-zero exit and at most a few lines on stderr, with no traceback,
naming the file or key concerned and what to do, and leaves no output (nor a temporary) behind;
an output that already exists is left byte for byte as it was.

Each case is a function ``(world, tmp) -> Case``: it damages a copy of a tiny artifact and says
which command to run and what the message must hold.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import io
import json
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hypermerge.training.data as data
from tests.helpers.reliability import World, copy_tree, edit_json, run_cli, temporaries, tree_digest
from tests.helpers.training import write_recipe

RANDOM = bytes(range(256)) * 40  # 10 KiB that is no known format


@dataclasses.dataclass
class Case:
    args: list[str]
    fragments: tuple[str, ...]  # each must appear in the error (file names, keys, hints)
    out: Path | None = None  # must not exist afterwards (or, if it existed, be unchanged)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    ulimit_f: int | None = None
    max_lines: int = 2
    after: Callable[[], bool] | None = None  # a further check of the state left behind


CASES: dict[str, Callable[[World, Path], Case]] = {}


def case(name: str):
    def register(func):
        CASES[name] = func
        return func
    return register


def _broken_adapter(world: World, tmp: Path, weights: bytes | None = None, config: dict | None = None,
                    name: str = "adapter") -> Path:
    directory = copy_tree(world.lora, tmp / name)
    if weights is not None:
        (directory / "adapter_model.safetensors").write_bytes(weights)
    if config is not None:
        edit_json(directory / "adapter_config.json", **config)
    return directory


def _adapter_with(world: World, tmp: Path, value: float) -> Path:
    directory = copy_tree(world.lora, tmp / "adapter")
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    key = sorted(tensors)[3]
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def _base_with(world: World, tmp: Path, value: float, name: str = "model.layers.0.mlp.up_proj.weight") -> Path:
    directory = copy_tree(world.llama, tmp / "base")
    tensors = load_file(str(directory / "model.safetensors"))
    tensors[name].view(-1)[5] = value
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _truncated(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _pickle_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer)  # a real torch pickle checkpoint (zip)
    return buffer.getvalue()


# -- fold ------------------------------------------------------------------------------------
@case("fold: missing adapter directory")
def _(world, tmp):
    return Case(["fold", "--adapter", tmp / "nowhere", "--out", tmp / "out"], ("not found", "nowhere", "--adapter"),
                tmp / "out")


@case("fold: truncated adapter weights")
def _(world, tmp):
    adapter = _broken_adapter(world, tmp)
    _truncated(adapter / "adapter_model.safetensors")
    return Case(["fold", "--adapter", adapter, "--out", tmp / "out"], ("adapter_model.safetensors",), tmp / "out")


@case("fold: random bytes as adapter weights")
def _(world, tmp):
    adapter = _broken_adapter(world, tmp, weights=RANDOM)
    return Case(["fold", "--adapter", adapter, "--out", tmp / "out"], ("adapter_model.safetensors",), tmp / "out")


@case("fold: pickle adapter")
def _(world, tmp):
    adapter = _broken_adapter(world, tmp)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(_pickle_bytes())
    return Case(["fold", "--adapter", adapter, "--out", tmp / "out"], ("pickle", "adapter_model.bin", "safetensors"),
                tmp / "out")


@case("fold: pickle base")
def _(world, tmp):
    base = tmp / "base"
    base.mkdir()
    (base / "config.json").write_text((world.llama / "config.json").read_text())
    (base / "pytorch_model.bin").write_bytes(_pickle_bytes())
    return Case(["fold", "--adapter", world.lora, "--base", base, "--out", tmp / "out"],
                ("pickle", "pytorch_model.bin", "safe_serialization"), tmp / "out")


@case("fold: adapter for another base (names)")
def _(world, tmp):
    return Case(["fold", "--adapter", world.lora, "--base", world.gpt2, "--out", tmp / "out"],
                ("not in the base checkpoint",), tmp / "out")


@case("fold: adapter for another base (shapes)")
def _(world, tmp):
    return Case(["fold", "--adapter", world.lora, "--base", world.wider, "--out", tmp / "out"],
                ("shape", "adapter was made for"), tmp / "out")


@case("fold: NaN in the adapter")
def _(world, tmp):
    adapter = _adapter_with(world, tmp, float("nan"))
    return Case(["fold", "--adapter", adapter, "--base", world.llama, "--out", tmp / "out"],
                ("NaN or Inf", "adapter_model.safetensors"), tmp / "out")


@case("fold: Inf in the base")
def _(world, tmp):
    base = _base_with(world, tmp, float("inf"), "model.layers.0.self_attn.q_proj.weight")
    return Case(["fold", "--adapter", world.lora, "--base", base, "--out", tmp / "out"],
                ("NaN or Inf", "q_proj", "model.safetensors", "re-download"), tmp / "out")


@case("fold: unknown method")
def _(world, tmp):
    adapter = _broken_adapter(world, tmp, config={"method": "magic"})
    return Case(["fold", "--adapter", adapter, "--out", tmp / "out"], ("unknown adapter method 'magic'", "lora"),
                tmp / "out")


@case("fold: adapter_config.json is random bytes")
def _(world, tmp):
    adapter = _broken_adapter(world, tmp)
    (adapter / "adapter_config.json").write_bytes(RANDOM)
    return Case(["fold", "--adapter", adapter, "--out", tmp / "out"], ("adapter_config.json",), tmp / "out")


@case("fold: output exists")
def _(world, tmp):
    out = copy_tree(world.llama, tmp / "out")
    return Case(["fold", "--adapter", world.lora, "--out", out], ("already exists", "--overwrite"), out)


@case("fold: output location is not a directory")
def _(world, tmp):
    (tmp / "file").write_text("a file, not a directory")
    return Case(["fold", "--adapter", world.lora, "--out", tmp / "file" / "out"], ("file", "writable"),
                tmp / "file" / "out")


@case("fold: file size limit (ulimit -f)")
def _(world, tmp):
    return Case(["fold", "--adapter", world.lora, "--out", tmp / "out"], ("model.safetensors", "--max-shard-size"),
                tmp / "out", ulimit_f=40)


# -- export ----------------------------------------------------------------------------------
@case("export: missing model directory")
def _(world, tmp):
    return Case(["export", tmp / "nowhere", "--out", tmp / "out"], ("not found", "nowhere"), tmp / "out")


@case("export: truncated weights")
def _(world, tmp):
    base = copy_tree(world.llama, tmp / "base")
    _truncated(base / "model.safetensors")
    return Case(["export", base, "--out", tmp / "out", "--no-verify"], ("model.safetensors",), tmp / "out")


@case("export: random bytes as weights")
def _(world, tmp):
    base = copy_tree(world.llama, tmp / "base")
    (base / "model.safetensors").write_bytes(RANDOM)
    return Case(["export", base, "--out", tmp / "out", "--no-verify"], ("model.safetensors",), tmp / "out")


@case("export: pickle weights")
def _(world, tmp):
    base = tmp / "base"
    base.mkdir()
    (base / "config.json").write_text((world.llama / "config.json").read_text())
    (base / "pytorch_model.bin").write_bytes(_pickle_bytes())
    return Case(["export", base, "--out", tmp / "out", "--no-verify"], ("pickle", "pytorch_model.bin"), tmp / "out")


@case("export: config.json is random bytes")
def _(world, tmp):
    base = copy_tree(world.llama, tmp / "base")
    (base / "config.json").write_bytes(RANDOM)
    return Case(["export", base, "--out", tmp / "out", "--no-verify"], ("config.json",), tmp / "out")


@case("export: NaN in the base")
def _(world, tmp):
    base = _base_with(world, tmp, float("nan"))
    return Case(["export", base, "--out", tmp / "out", "--no-verify"], ("NaN or Inf", "up_proj", "model.safetensors"),
                tmp / "out")


@case("export: unknown task")
def _(world, tmp):
    return Case(["export", world.llama, "--out", tmp / "out", "--task", "summarization"],
                ("summarization", "causal-lm"), tmp / "out")


@case("export: output exists")
def _(world, tmp):
    out = copy_tree(world.onnx, tmp / "out")
    return Case(["export", world.llama, "--out", out, "--no-verify"], ("already exists", "--overwrite"), out)


@case("patch: file size limit (ulimit -f)")
def _(world, tmp):
    return Case(["patch", world.onnx, "--adapter", world.lora, "--out", tmp / "out", "--no-verify"],
                ("largest file allowed", "ulimit -f"), tmp / "out", ulimit_f=60)


# -- verify ----------------------------------------------------------------------------------
@case("verify: missing export directory")
def _(world, tmp):
    return Case(["verify", tmp / "nowhere", "--iters", "1"], ("not found", "nowhere"))


@case("verify: truncated model.onnx")
def _(world, tmp):
    export = copy_tree(world.onnx, tmp / "export")
    _truncated(export / "model.onnx")
    return Case(["verify", export, "--iters", "1"], ("model.onnx", "export"))


@case("verify: random bytes as model.onnx")
def _(world, tmp):
    export = copy_tree(world.onnx, tmp / "export")
    (export / "model.onnx").write_bytes(RANDOM)
    return Case(["verify", export, "--iters", "1"], ("model.onnx", "export"))


@case("verify: report.json is broken")
def _(world, tmp):
    export = copy_tree(world.onnx, tmp / "export")
    (export / "report.json").write_text("{broken")
    return Case(["verify", export, "--iters", "1"], ("report.json",))


# -- patch -----------------------------------------------------------------------------------
@case("patch: adapter for another base")
def _(world, tmp):
    return Case(["patch", world.onnx, "--adapter", world.gpt2_lora, "--out", tmp / "out"], ("not in the exported model", "gpt2-lora", "base model"), tmp / "out")


@case("patch: Inf in the adapter")
def _(world, tmp):
    adapter = _adapter_with(world, tmp, float("inf"))
    return Case(["patch", world.onnx, "--adapter", adapter, "--out", tmp / "out"],
                ("NaN or Inf", "adapter_model.safetensors"), tmp / "out")


@case("patch: pickle adapter")
def _(world, tmp):
    adapter = _broken_adapter(world, tmp)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(_pickle_bytes())
    return Case(["patch", world.onnx, "--adapter", adapter, "--out", tmp / "out"], ("pickle", "adapter_model.bin"),
                tmp / "out")


@case("patch: truncated model.onnx")
def _(world, tmp):
    export = copy_tree(world.onnx, tmp / "export")
    _truncated(export / "model.onnx")
    return Case(["patch", export, "--adapter", world.lora, "--out", tmp / "out", "--no-verify"], ("model.onnx",),
                tmp / "out")


@case("patch: output exists")
def _(world, tmp):
    out = copy_tree(world.onnx, tmp / "out")
    return Case(["patch", world.onnx, "--adapter", world.lora, "--out", out], ("already exists", "--overwrite"), out)


# -- serve -----------------------------------------------------------------------------------
@case("serve: missing export directory")
def _(world, tmp):
    return Case(["serve", tmp / "nowhere", "--port", "0"], ("nowhere",))


@case("serve: random bytes as model.onnx")
def _(world, tmp):
    export = copy_tree(world.onnx, tmp / "export")
    (export / "model.onnx").write_bytes(RANDOM)
    return Case(["serve", export, "--port", "0"], ("model.onnx",))


# -- train -----------------------------------------------------------------------------------
@case("train: broken YAML")
def _(world, tmp):
    recipe = tmp / "recipe.yaml"
    recipe.write_text("model:\n  path: [unclosed\ntask: sequence-classification\n")
    return Case(["train", recipe, "--output-dir", tmp / "out"], ("not valid YAML", "line", "recipe.yaml"), tmp / "out")


@case("train: unknown key")
def _(world, tmp):
    raw = json.loads(json.dumps(world.recipe))
    raw["training"]["learning_rte"] = 1e-3
    recipe = write_recipe(tmp / "recipe.yaml", raw)
    return Case(["train", recipe, "--output-dir", tmp / "out"], ("learning_rte", "learning_rate", "recipe.yaml"),
                tmp / "out")


@case("train: unknown method")
def _(world, tmp):
    raw = json.loads(json.dumps(world.recipe))
    raw["adapter"]["method"] = "magic"
    recipe = write_recipe(tmp / "recipe.yaml", raw)
    return Case(["train", recipe, "--output-dir", tmp / "out"], ("magic", "hyperadapt"), tmp / "out")


@case("train: unknown task")
def _(world, tmp):
    raw = json.loads(json.dumps(world.recipe))
    raw["task"] = "summarization"
    recipe = write_recipe(tmp / "recipe.yaml", raw)
    return Case(["train", recipe, "--output-dir", tmp / "out"], ("summarization", "sequence-classification"),
                tmp / "out")


@case("train: random bytes as data")
def _(world, tmp):
    raw = json.loads(json.dumps(world.recipe))
    (tmp / "data.jsonl").write_bytes(RANDOM)
    raw["data"]["train"] = str(tmp / "data.jsonl")
    recipe = write_recipe(tmp / "recipe.yaml", raw)
    return Case(["train", recipe, "--output-dir", tmp / "out"], ("data.jsonl",), tmp / "out")


@case("train: pickle base")
def _(world, tmp):
    base = copy_tree(world.bert, tmp / "base")
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(_pickle_bytes())
    raw = json.loads(json.dumps(world.recipe))
    raw["model"]["path"] = str(base)
    recipe = write_recipe(tmp / "recipe.yaml", raw)
    return Case(["train", recipe, "--output-dir", tmp / "out"], ("pickle", "pytorch_model.bin"), tmp / "out")


@case("train: NaN in the base")
def _(world, tmp):
    base = copy_tree(world.bert, tmp / "base")
    tensors = load_file(str(base / "model.safetensors"))
    name = next(n for n in sorted(tensors) if n.endswith("query.weight"))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads(json.dumps(world.recipe))
    raw["model"]["path"] = str(base)
    recipe = write_recipe(tmp / "recipe.yaml", raw)
    return Case(["train", recipe, "--output-dir", tmp / "out"], ("NaN or Inf", "query.weight", "model.safetensors"),
                tmp / "out")


@case("train: output location is not a directory")
def _(world, tmp):
    (tmp / "file").write_text("a file, not a directory")
    recipe = write_recipe(tmp / "recipe.yaml", world.recipe)
    return Case(["train", recipe, "--output-dir", tmp / "file" / "run"], ("file",), tmp / "file" / "run")


@case("train: output directory holds a run")
def _(world, tmp):
    run = tmp / "run"
    for name in ("adapter", "checkpoints"):
        (run / name).mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "metrics.json").write_text("{}")
    recipe = write_recipe(tmp / "recipe.yaml", world.recipe)
    return Case(["train", recipe, "--output-dir", run], ("already holds a run", "--resume", "--overwrite"), run)


@case("train: file size limit (ulimit -f)")
def _(world, tmp):
    recipe = write_recipe(tmp / "recipe.yaml", world.recipe)
    return Case(["train", recipe, "--output-dir", tmp / "run"], ("largest file allowed", "ulimit -f", "run"), None,
                ulimit_f=8)


@case("train: interrupted download of the sentiment data")
def _(world, tmp):
    # A half-written sdist in the cache (a download cut short): detected by its SHA-256 and
    # fetched again, here from an index that is not there, so the error says what to do.
    cache = tmp / "cache"
    (cache / "data").mkdir(parents=True)
    (cache / "data" / data.VADER_SDIST).write_bytes(gzip.compress(b"half a download")[:20])
    raw = json.loads(json.dumps(world.recipe))
    raw["data"] = {"name": "sentiment", "max_length": 32, "train_examples": 16}
    recipe = write_recipe(tmp / "recipe.yaml", raw)
    return Case(["train", recipe, "--output-dir", tmp / "out"], ("vaderSentiment", "PyPI", data.VADER_SDIST),
                tmp / "out", env={"HYPERMERGE_CACHE": str(cache), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
                                  "PIP_INDEX_URL": "http://127.0.0.1:9/simple"},
                after=lambda: not (cache / "data" / data.VADER_SDIST).exists())  # the damaged file is gone


@pytest.fixture(scope="module")
def outcomes(world, tmp_path_factory, request):
    """name -> (case, digest of its existing output, finished process) for every selected case.

    The cases are prepared one by one, then run a few at a time: each is one process that spends
    most of its time importing, and they share nothing but the (read-only) world.
    """
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.originalname == "test_bad_input" and hasattr(item, "callspec")]
    prepared = {}
    for name in selected:
        spec = CASES[name](world, tmp_path_factory.mktemp("case"))
        prepared[name] = spec, tree_digest(spec.out) if spec.out is not None and spec.out.exists() else None
    workers = max(2, min(4, len(os.sched_getaffinity(0))))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        # -q: no progress bars on stderr
        futures = {name: pool.submit(run_cli, *spec.args, "-q", env=spec.env, ulimit_f=spec.ulimit_f)
                   for name, (spec, _) in prepared.items()}
        return {name: (*prepared[name], future.result()) for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, outcomes):
    spec, before, done = outcomes[name]
    assert done.returncode not in (0, None), f"exit 0:\n{done.stdout}\n{done.stderr}"
    assert done.returncode > 0, f"killed by signal {-done.returncode}:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= spec.max_lines, done.stderr
    error = lines[-1]
    assert error.startswith("hypermerge: error:"), done.stderr
    for fragment in spec.fragments:
        assert fragment in error, f"{fragment!r} not in {error!r}"
    if spec.out is not None:
        if before is None:
            assert not spec.out.exists(), f"{spec.out} was left behind"
        else:
            assert tree_digest(spec.out) == before, "the existing output was changed"
        assert not temporaries(spec.out.parent), temporaries(spec.out.parent)
    if spec.after is not None:
        assert spec.after(), "the state left behind"


def test_there_are_at_least_25_cases_across_every_command():
    assert len(CASES) >= 25
    commands = {name.split(":")[0] for name in CASES}
    assert commands == {"fold", "export", "verify", "patch", "serve", "train"}


def test_a_corrupt_cached_archive_is_deleted_and_reported(tmp_path, monkeypatch):
    # The right hash but a damaged inner archive cannot come from pip; a cached file replaced by
    # hand can. Either way: one clear error, and the file is gone so the next run fetches it again.
    monkeypatch.setenv("HYPERMERGE_CACHE", str(tmp_path))
    target = data.cache_dir() / data.VADER_SDIST
    target.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/README.md")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"hello"))
    target.write_bytes(buffer.getvalue())
    monkeypatch.setattr(data, "_sha256", lambda path: data.VADER_SHA256)
    with pytest.raises(data.DataError, match="archive is damaged") as caught:
        data.read_rated_sentences()
    assert "run again" in str(caught.value) and not target.exists()


def test_a_corrupt_parsed_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERMERGE_CACHE", str(tmp_path))
    cached = data.cache_dir() / "sentiment-v1.json"
    cached.parent.mkdir(parents=True)
    cached.write_text('{"train": [["half a wri')
    monkeypatch.setattr(data, "read_rated_sentences", lambda corpus="movie": [(2.0, "good"), (-2.0, "bad")] * 10)
    splits = data.sentiment_splits()
    assert sum(len(rows) for rows in splits.values()) == 20
    assert json.loads(cached.read_text())["train"]


def test_serve_error_is_one_line_and_the_process_exits(world, tmp_path):
    # serve must not hang on a broken directory: the process ends by itself.
    export = copy_tree(world.onnx, tmp_path / "export")
    (export / "config.json").write_bytes(RANDOM)
    start = time.monotonic()
    done = run_cli("serve", export, "--port", "0", timeout=120)
    assert done.returncode != 0 and time.monotonic() - start < 120
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hypermerge: error:") and "config.json" in lines[0], done.stderr

