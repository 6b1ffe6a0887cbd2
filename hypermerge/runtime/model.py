"""``hm.OnnxModel``: the runtime for exported directories (used by verify, serve and users), on
numpy, onnxruntime and tokenizers only: serving an export needs neither torch nor transformers.

    model = hm.OnnxModel.load("export-dir")             # provider="auto": TensorRT EP > CUDA EP > CPU
    model.embed(["a sentence", ...])                     # feature-extraction: mean-pooled, L2-normalised
    model.classify(["great film"])                       # sequence-classification: label + score
    model.generate(["Once upon a time"], max_new_tokens=32)   # causal-lm: KV cache between steps

An export made with ``--adapter-inputs`` takes HyperAdapt adapters per call:
``model.embed(texts, adapter="adapters/legal")`` (loaded once, then cached by path).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from hypermerge._fs import require_dir
from hypermerge.errors import BackendUnavailableError, ConfigError, ExportError
from hypermerge.runtime.adapter_scales import AdapterScalesCache, read_layout
from hypermerge.runtime.contract import (
    CAUSAL_LM,
    FEATURE_EXTRACTION,
    SEQUENCE_CLASSIFICATION,
    IOContract,
)
from hypermerge.runtime.files import MODEL_FILE
from hypermerge.runtime.ort import open_session, session_contract, session_provider
from hypermerge.runtime.textstream import TextStream, needs_word_holdback
from hypermerge.runtime.tokenizer import TOKENIZER_FILE, TextTokenizer
from hypermerge.runtime.weights_map import read_weights_map

# feeds (contract input name -> array) -> outputs in the contract's order
Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def positions(mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Position ids of the last ``new_tokens`` columns counting valid tokens only (HF generate's rule)."""
    pos = np.cumsum(mask, axis=-1, dtype=np.int64) - 1
    pos[mask == 0] = 1
    return pos[:, -new_tokens:]


def mean_pool(hidden: np.ndarray, mask: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Mean over valid tokens, then L2 normalisation: sentence-transformers' pooling for MiniLM."""
    weights = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
    if normalize:
        pooled = pooled / np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12, None)
    return pooled


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """Next token per row: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    picks = np.empty(len(probs), dtype=np.int64)
    for row, p in enumerate(probs):
        order = np.argsort(-p)
        cumulative = np.cumsum(p[order])
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
        kept = p[keep] / p[keep].sum()
        picks[row] = keep[rng.choice(len(keep), p=kept)]
    return picks


def decode_steps(run: Runner, contract: IOContract, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                 max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
                 pad_token_id: int = 0, seed: int | None = None) -> Iterator[np.ndarray]:
    """:func:`decode` one step at a time: each ``next()`` runs exactly one forward pass (the prefill
    first, then one decode step) and yields that step's token per row, shape (batch,).

    A server schedules the steps of concurrent streams one by one on its inference thread, which
    is why this is a generator rather than a loop.
    """
    batch = input_ids.shape[0]
    rng = np.random.default_rng(seed)
    mask = attention_mask.astype(np.int64)
    empty = np.zeros((batch, contract.kv_heads, 0, contract.head_dim), dtype=np.float32)
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": mask,
             "position_ids": positions(mask, input_ids.shape[1]), **{name: empty for name in contract.past_names}}
    finished = np.zeros(batch, dtype=bool)
    for step in range(max_new_tokens):
        outputs = run(feeds)
        token = _pick(outputs[0][:, -1, :], temperature, top_p, rng)
        if eos_token_id is not None:
            token = np.where(finished, pad_token_id, token)
            finished |= token == eos_token_id
        yield token
        if step == max_new_tokens - 1 or finished.all():
            return
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        feeds = {"input_ids": token[:, None].astype(np.int64), "attention_mask": mask,
                 "position_ids": feeds["position_ids"][:, -1:] + 1,
                 **dict(zip(contract.past_names, outputs[1:], strict=True))}


def decode(run: Runner, contract: IOContract, input_ids: np.ndarray, attention_mask: np.ndarray, *,
           max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
           pad_token_id: int = 0, seed: int | None = None) -> np.ndarray:
    """Generate with the KV cache: one prefill over the (left-padded) prompts, then one step per token.

    Rows that produced ``eos_token_id`` get ``pad_token_id`` afterwards and decoding stops when all
    rows are done (as transformers' ``generate``). Returns the new tokens, (batch, n ≤ max_new_tokens).
    """
    tokens = list(decode_steps(run, contract, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, seed=seed))
    return np.stack(tokens, axis=1)


@dataclasses.dataclass(frozen=True)
class StreamStep:
    """One step of :meth:`OnnxModel.stream`.

    ``text`` is the new text since the previous step ("" while a word or a multi-byte character is
    still incomplete); ``tokens`` counts the tokens generated so far; ``finish_reason`` is None until
    the last step, then "stop" (end-of-sequence token or a stop string) or "length".
    """

    text: str
    tokens: int
    finish_reason: str | None = None


def _load_tokenizer(path: Path):
    """The export's tokenizer: ``tokenizer.json`` through the tokenizers library; None without
    tokenizer files.

    An export whose tokenizer has only a slow (vocabulary file) form falls back to transformers,
    which is then needed.

    Raises:
        ExportError: a damaged tokenizer file.
        BackendUnavailableError: only slow tokenizer files, and transformers is not installed.
    """
    if (path / TOKENIZER_FILE).is_file():
        return TextTokenizer.load(path)
    if not any((path / name).exists() for name in ("tokenizer_config.json", "vocab.txt")):
        return None
    try:
        # an optional dependency (the [export] extra), for exports made without tokenizer.json
        from transformers import AutoTokenizer
    except ImportError:
        raise BackendUnavailableError(f"the export has no {TOKENIZER_FILE}, and reading its other tokenizer files "
                                      "needs transformers, which is not installed", path=path,
                                      hint="pip install 'hypermerge[export]', or re-export with a fast tokenizer "
                                           "(one that saves tokenizer.json)") from None
    return AutoTokenizer.from_pretrained(path)


class OnnxModel:
    """An exported directory loaded for inference on ONNX Runtime.

    Use :meth:`load`; then :meth:`embed`, :meth:`classify` or :meth:`generate` depending on the task.
    On an export made with ``--adapter-inputs`` each of them takes ``adapter=DIR`` (a HyperAdapt
    adapter, or an IA³ one that is a pure scaling), chosen per call; ``None`` is the base model.
    """

    # adapters kept resolved per model (a SmolLM2 vector is 1.2 MB): least recently used dropped beyond this
    ADAPTER_CACHE_SIZE = 64

    def __init__(self, path: Path, session, contract: IOContract, tokenizer=None, config: dict | None = None):
        self.path, self.session, self.contract = path, session, contract
        self.tokenizer, self.config = tokenizer, config or {}
        layout = read_layout(path)
        self.adapter_scales = None if layout is None else AdapterScalesCache(
            layout, self.ADAPTER_CACHE_SIZE, weights_map=read_weights_map(path))
        self._word_holdback: bool | None = None  # found on the first stream() call

    @classmethod
    def load(cls, path: str | Path, provider: str = "auto", *, threads: int | None = None,
             model_file: str = MODEL_FILE, session_config: dict[str, str] | None = None) -> OnnxModel:
        """Open an exported directory.

        Args:
            path: a directory written by ``hypermerge export``.
            provider: auto (TensorRT EP, then CUDA EP, then CPU: whichever onnxruntime offers), cpu,
                cuda or tensorrt.
            threads: intra-op threads (None: one per core).
            model_file: ``model.onnx``, or ``model.int8.onnx`` / ``model.int4.onnx`` / ``model.fp16.onnx``
                where the export kept one.
            session_config: onnxruntime session config entries, e.g.
                ``{"session.intra_op.allow_spinning": "0"}`` (what ``hypermerge serve`` sets).

        Raises:
            CheckpointError: the directory does not exist.
            ExportError: no loadable ONNX model in it, or a damaged config.json.
        """
        path = require_dir(path, "exported model directory").absolute()
        session = open_session(path / model_file, provider, threads, session_config=session_config)
        contract = session_contract(session)
        config = {}
        if (path / "config.json").exists():
            try:
                config = json.loads((path / "config.json").read_text())
            except ValueError as exc:  # UnicodeDecodeError included
                raise ExportError(f"config.json is not valid JSON ({exc})", path=path / "config.json",
                                  hint="the file is damaged; copy it again from the exported model") from None
            if not isinstance(config, dict):
                raise ExportError("config.json must hold a JSON object", path=path / "config.json",
                                  hint="the file is damaged; copy it again from the exported model")
        tokenizer = _load_tokenizer(path)
        if isinstance(tokenizer, TextTokenizer):
            # the graph's inputs say whether segment ids are wanted, whatever the tokenizer's class
            tokenizer.model_input_names = [name for name in ("input_ids", "token_type_ids", "attention_mask")
                                           if name != "token_type_ids" or name in contract.inputs]
        if tokenizer is not None and contract.task == CAUSAL_LM:
            tokenizer.padding_side = "left"  # new tokens go right after each prompt's last token
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        return cls(path, session, contract, tokenizer, config)

    @property
    def task(self) -> str:
        return self.contract.task

    @property
    def provider(self) -> str:
        return session_provider(self.session)

    @property
    def accepts_adapters(self) -> bool:
        """Whether this export takes adapters per call (exported with ``--adapter-inputs``)."""
        return self.adapter_scales is not None

    def _scales(self, adapter: str | Path | None) -> dict[str, np.ndarray]:
        """The extra feed for ``adapter`` (the cached packed vector), {} for exports without inputs."""
        if self.adapter_scales is None:
            if adapter is None:
                return {}
            raise ConfigError("this export takes no adapters per call (it was exported without --adapter-inputs)",
                              path=self.path, hint="export with --adapter-inputs (HyperAdapt adapters), or fold "
                              "the adapter into a copy with hypermerge patch")
        return {self.adapter_scales.layout.input: self.adapter_scales.get(adapter)}

    def run(self, feeds: dict[str, np.ndarray], *, adapter: str | Path | None = None) -> list[np.ndarray]:
        """One forward pass; ``feeds`` by contract name, outputs in the contract's order.

        Args:
            adapter: an adapter directory (exports with ``--adapter-inputs`` only); None for the base.

        Raises:
            ConfigError: an adapter for an export without adapter inputs, or of a method they
                cannot carry (LoRA...: use hypermerge patch).
            AdapterMismatchError: the adapter was made for another base model.
            CheckpointError: the adapter directory is missing or damaged.
        """
        extra = self._scales(adapter)
        return self.session.run(list(self.contract.outputs), {**{k: v for k, v in feeds.items()
                                                                  if k in self.contract.inputs}, **extra})

    def _run(self, feeds: dict[str, np.ndarray], extra: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(self.contract.outputs), {**feeds, **extra})

    def _require(self, task: str, method: str) -> None:
        if self.task != task:
            raise ConfigError(f"{method}() needs a {task} export; this one is {self.task}", path=self.path,
                              hint=f"export with --task {task}")
        if self.tokenizer is None:
            raise ExportError("the export has no tokenizer files", path=self.path,
                              hint="export from a model directory that has its tokenizer")

    def _encode(self, texts: Sequence[str], max_length: int | None) -> dict[str, np.ndarray]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = {"input_ids": batch["input_ids"].astype(np.int64),
                 "attention_mask": batch["attention_mask"].astype(np.int64)}
        if "token_type_ids" in self.contract.inputs:
            feeds["token_type_ids"] = batch.get("token_type_ids", np.zeros_like(feeds["input_ids"])).astype(np.int64)
        return feeds

    def pad_batch(self, encoded: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, np.ndarray]:
        """Feeds for pre-tokenised texts, padded as the tokenizer pads (its side, its pad id).

        Args:
            encoded: one ``{"input_ids": [...], "token_type_ids": [...] (optional)}`` per text, as
                ``tokenizer(text)`` returns them unpadded.

        Returns:
            ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the graph takes them),
            int64 (len(encoded), longest).
        """
        longest = max((len(e["input_ids"]) for e in encoded), default=0)
        ids = np.full((len(encoded), longest), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros((len(encoded), longest), dtype=np.int64)
        types = np.zeros((len(encoded), longest), dtype=np.int64)
        left = self.tokenizer.padding_side == "left"
        for row, item in enumerate(encoded):
            n = len(item["input_ids"])
            cols = slice(longest - n, longest) if left else slice(0, n)
            ids[row, cols] = item["input_ids"]
            mask[row, cols] = 1
            if item.get("token_type_ids") is not None:
                types[row, cols] = item["token_type_ids"]
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.contract.inputs:
            feeds["token_type_ids"] = types
        return feeds

    def embed_feeds(self, feeds: dict[str, np.ndarray], *, normalize: bool = True,
                    adapter: str | Path | None = None) -> np.ndarray:
        """:meth:`embed` on already tokenised, padded inputs (one forward pass): (batch, hidden) float32."""
        return mean_pool(self.run(feeds, adapter=adapter)[0], feeds["attention_mask"], normalize)

    def classify_feeds(self, feeds: dict[str, np.ndarray], *, adapter: str | Path | None = None) -> list[dict]:
        """:meth:`classify` on already tokenised, padded inputs (one forward pass)."""
        id2label = {int(k): v for k, v in self.config.get("id2label", {}).items()}
        logits = self.run(feeds, adapter=adapter)[0].astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        results = []
        for row in probs:
            labels = [id2label.get(i, f"LABEL_{i}") for i in range(len(row))]
            best = int(row.argmax())
            results.append({"label": labels[best], "score": float(row[best]),
                            "scores": dict(zip(labels, map(float, row), strict=True))})
        return results

    def embed(self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = True,
              max_length: int | None = 512, adapter: str | Path | None = None) -> np.ndarray:
        """Sentence embeddings: mean over valid tokens of ``last_hidden_state``, L2-normalised.

        Args:
            adapter: an adapter directory to apply (exports with ``--adapter-inputs``); None for the base.

        Returns:
            float32 array (len(texts), hidden).
        """
        self._require(FEATURE_EXTRACTION, "embed")
        chunks = [self.embed_feeds(self._encode(texts[start:start + batch_size], max_length), normalize=normalize,
                                   adapter=adapter)
                  for start in range(0, len(texts), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)

    def classify(self, texts: Sequence[str], *, batch_size: int = 32, max_length: int | None = 512,
                 adapter: str | Path | None = None) -> list[dict]:
        """Labels with softmax scores, like transformers' text-classification pipeline.

        Args:
            adapter: an adapter directory to apply (exports with ``--adapter-inputs``); None for the base.

        Returns:
            One ``{"label", "score", "scores": {label: probability}}`` per text.
        """
        self._require(SEQUENCE_CLASSIFICATION, "classify")
        results = []
        for start in range(0, len(texts), batch_size):
            results.extend(self.classify_feeds(self._encode(texts[start:start + batch_size], max_length),
                                               adapter=adapter))
        return results

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, *, seed: int | None = None, stop_at_eos: bool = True,
                 adapter: str | Path | None = None) -> list[str]:
        """Continue each prompt (batched, left-padded), keeping the KV cache between steps.

        Args:
            temperature: 0 for greedy decoding, else sampling at this temperature.
            top_p: nucleus sampling mass (with temperature > 0).
            seed: for reproducible sampling.
            stop_at_eos: a row stops at the tokenizer's end-of-sequence token.
            adapter: an adapter directory to apply (exports with ``--adapter-inputs``); None for the base.

        Returns:
            The generated continuation of each prompt (without the prompt).
        """
        self._require(CAUSAL_LM, "generate")
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        extra = self._scales(adapter)  # resolved once, fed at every step
        feeds = self._encode(prompts, None)
        eos = self.tokenizer.eos_token_id if stop_at_eos else None
        tokens = decode(lambda f: self._run(f, extra), self.contract, feeds["input_ids"], feeds["attention_mask"],
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_token_id=eos,
                        pad_token_id=self.tokenizer.pad_token_id or 0, seed=seed)
        return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 32, temperature: float = 0.0,
               top_p: float = 1.0, *, seed: int | None = None, stop_at_eos: bool = True,
               stop: Sequence[str] = (), adapter: str | Path | None = None) -> Iterator[StreamStep]:
        """Continue one prompt, yielding text as it is generated.

        Each ``next()`` runs one forward pass (the prefill, then one token). Without stop strings the
        texts joined equal ``generate([prompt], ...)[0]`` with the same arguments; with them, that text
        cut before the first stop string.

        Args:
            prompt: the text, or its token ids (as ``tokenizer(text)["input_ids"]``).
            max_new_tokens, temperature, top_p, seed, stop_at_eos: as in :meth:`generate`.
            stop: strings that end the generation (not included in the text).
            adapter: an adapter directory to apply (exports with ``--adapter-inputs``); None for the base.

        Yields:
            :class:`StreamStep` per token; the last one has a ``finish_reason``.

        Raises:
            ConfigError: not a causal-lm export, or max_new_tokens < 1.
        """
        self._require(CAUSAL_LM, "stream")
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        extra = self._scales(adapter)  # resolved once, fed at every step
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        input_ids = np.asarray([ids], dtype=np.int64)
        eos = self.tokenizer.eos_token_id if stop_at_eos else None
        if self._word_holdback is None:
            self._word_holdback = needs_word_holdback(self.tokenizer)
        text = TextStream(self.tokenizer, stop, word_holdback=self._word_holdback)
        steps = decode_steps(lambda f: self._run(f, extra), self.contract, input_ids, np.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_token_id=eos,
                             pad_token_id=self.tokenizer.pad_token_id or 0, seed=seed)
        for count, token in enumerate(steps, start=1):
            delta = text.push(int(token[0]))
            if text.stopped or (eos is not None and int(token[0]) == eos):
                yield StreamStep(delta + text.finish(), count, "stop")
                return
            if count == max_new_tokens:
                yield StreamStep(delta + text.finish(), count, "length")
                return
            yield StreamStep(delta, count)
