"""The attention hypernetwork that generates every adapted matrix's low-rank factors.

HyperAdaLoRA (arXiv 2510.02630, section 3) replaces AdaLoRA's trainable P, Λ, Q by the outputs of
an attention-based hypernetwork. The paper publishes no code; this is our design (docs/training.md, "HyperAdaLoRA"):

    token[m, i] = t[m, i] + E_layer[layer(m)] + E_type[type(m)] + E_rank[i]      (d,) per (matrix m, component i)
    H = LN(Encoder(tokens))                     depth x pre-LN blocks: multi-head self-attention over ALL
                                                n·r tokens at once, then a GELU MLP (d -> 2d -> d)
    P[:, i] = Head_P[type](H[m, i]) + U_m V_m H[m, i] / sqrt(k)    (out,)  one linear head per module type,
    Q[i, :] = Head_Q[type](H[m, i]) + U'_m V'_m H[m, i] / sqrt(k)  (in,)   plus a rank-k correction per matrix
    λ_i     = Head_λ[type](H[m, i]) − offset[m, i]                 scalar (HyperAdaLoRA only)

* ``type`` is the module's place in its block (``self_attn.q_proj``, ``mlp.down_proj``) plus its
  shape; ``layer`` is the block index. Attention lets rank components, matrices and layers share
  information, and the heads are shared by every layer, which is what the paper credits for the
  faster convergence; the parameter count barely grows with depth.
* Parameters: ``n·r·d`` tokens + ``(L + K + r)·d`` embeddings + ``depth·(8d² + 11d) + 2d`` encoder
  + ``d · Σ_kinds (out + in + 1)`` heads (n matrices, K module kinds, L layers; heads have no bias).
  For all-MiniLM-L6-v2 (n = 36, K = 6, r = 12, d = 64, depth 2): 27,648 + 1,536 + 67,072 + 442,752
  = 539,008 values, against AdaLoRA's 498,096 at init_r = 12. The heads dominate and do not grow
  with the number of layers: for a 32-layer model the count grows by the tokens only.
* Per-matrix capacity (``matrix_rank`` k, HyperAdaLoRA's ``hyper_matrix_rank``): a shared linear
  head puts every P column of every matrix of a kind into one subspace of at most d directions
  (MiniLM needs 6 x 12 = 72 per kind at init_r 12, SmolLM2 360). The correction U_m V_m (U_m out x k,
  starting at zero, V_m k x d) lets each matrix add k directions of its own while the heads,
  the encoder and the tokens stay shared: k·(2d + out + in) values per matrix.
* Identity at init: the column head (HyperLoRA, where it makes B) starts at zero; HyperAdaLoRA's λ
  head either starts at zero ("zero") or starts like the other heads with its initial output
  subtracted as a fixed offset ("offset", the default): λ = 0 either way, but only with the offset
  does the task gradient on λ reach the encoder and the tokens at step 1 (with a zero head they
  get only the regulariser's gradient until the head has moved). The offset also implements
  AdaLoRA's pruning: see ``HyperAdaLoRA.allocate_ranks``.
* Readout 1/sqrt(d): the heads' outputs are multiplied by 1/sqrt(d) (weights start at 0.02), so
  one Adam step moves a generated value by up to ~sqrt(d)·lr, shared by every matrix of a kind.
  Measured variants (benchmarks/RESULTS.md): 1/d (steps of ~lr, like AdaLoRA's parameters) stayed
  on the initial loss plateau for all 300 steps; no multiplier (~d·lr) was unstable in a small
  trial (tiny Llama, lr 1e-2).

Cost: one batched forward per training step, not per layer call. The first adapted layer to run
generates every matrix's factors; the rest read the cache. The cache is kept while the
hypernetwork's parameters are unchanged (their version counters) and, when gradients are being
recorded, until a backward pass has gone through it (a hook on the encoder output); in eval it
lasts until the parameters change. Gradient accumulation is handled: when a backward consumed the
cache but the parameters did not change, the gradients of the generated tensors are carried over,
so the rank allocator sees the whole batch's gradient as PEFT's does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
from torch import nn

INIT_STD = 0.02
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
    """One adapted matrix as the hypernetwork sees it."""

    name: str  # base weight name
    out_features: int
    in_features: int
    layer: str  # block index as text ("" outside block stacks)
    kind: str  # position inside the block + shape: "self_attn.q_proj:32x32"


def matrix_spec(name: str, out_features: int, in_features: int) -> MatrixSpec:
    """Split ``model.layers.3.self_attn.q_proj.weight`` into layer "3" and kind "self_attn.q_proj:OUTxIN"."""
    module = name.removesuffix(".weight")
    match = _LAYER_INDEX.search(module + ".")
    if match is None:
        layer, position = "", module
    else:
        layer, position = match.group(1), module[match.end():]
    return MatrixSpec(name, out_features, in_features, layer, f"{position}:{out_features}x{in_features}")


class _Block(nn.Module):
    """Pre-LN transformer encoder block (no dropout: the generated weights must be deterministic)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (tokens, dim)
        tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(tokens, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)
        # a batch axis of 1: with 3-D inputs torch takes its unfused path on CPU, which materialises
        # the (heads, tokens, tokens) scores (SmolLM2: 4 x 2,520^2) and was 5x slower with grad, 50x without
        attended = nn.functional.scaled_dot_product_attention(q[None], k[None], v[None])[0]  # (heads, tokens, dim/heads)
        x = x + self.proj(attended.transpose(0, 1).reshape(tokens, dim))
        return x + self.mlp(self.norm2(x))


@dataclasses.dataclass
class Generated:
    """One generation: per module kind, the stacked factors of its matrices' components."""

    cols: list[torch.Tensor]  # per kind (R_k, out): row j is a P column / B column
    rows: list[torch.Tensor]  # per kind (R_k, in): row j is a Q row / A row
    scalars: list[torch.Tensor] | None  # per kind (R_k,): λ as used (mask applied)
    raw_scalars: list[torch.Tensor] | None  # per kind (R_k,): λ before the mask
    slices: list[tuple[int, int, int]]  # per matrix: (kind, start, stop) into the kind's rows
    versions: tuple
    grad: bool
    consumed: bool = False
    carried: list[torch.Tensor] | None = None  # gradients carried over from consumed generations

    def tracked(self) -> list[torch.Tensor]:
        """The tensors whose gradients the rank allocator reads, grouped (P, λ, Q) per kind."""
        out = []
        for kind in range(len(self.cols)):
            out += [self.cols[kind], self.scalars[kind], self.rows[kind]]
        return out


class ComponentHypernetwork(nn.Module):
    """Generates ``rank`` components (a column, a row, optionally a scalar) for each matrix.

    Args:
        specs: the adapted matrices, in the order of the model's adapter layers.
        rank: components per matrix (AdaLoRA's init_r, LoRA's r).
        dim, depth, heads: width, number of encoder blocks, attention heads.
        scalar: generate a scalar per component (HyperAdaLoRA's λ).
        zero_head: "scalar" or "cols": which head starts at zero (so the adapter starts as the identity).
        matrix_rank: k > 0 adds a per-matrix low-rank correction to the column and row heads
            (``U_m V_m h``, U_m out x k starting at zero, V_m k x d), so each matrix's factors can
            leave the d-dimensional subspace its kind's shared head spans.
        lambda_init: "zero" (the scalar head starts at zero) or "offset" (the scalar head starts
            like the others and its initial output is subtracted as a fixed offset: λ is still 0
            at init, but the task gradient on λ reaches the encoder and the tokens at step 1).
    """

    def __init__(self, specs: list[MatrixSpec], rank: int, *, dim: int, depth: int, heads: int, scalar: bool,
                 zero_head: str, matrix_rank: int = 0, lambda_init: str = "zero"):
        super().__init__()
        # The stages below create parameters in a fixed order: it fixes both the random draws
        # (same seed, same network) and the state dict's order (checkpoints, resume).
        self._index_tokens(specs, rank)
        self._build_encoder(dim, depth, heads)
        self._build_heads(dim, scalar, matrix_rank)
        offset_lambda = scalar and zero_head == "scalar" and lambda_init == "offset"
        self._init_heads(zero_head, offset_lambda)
        # Keep-mask over tokens (rank allocation); True = kept. ``shrunk`` once allocation is final:
        # heads then run on kept tokens only and matrices get only their kept components.
        self.register_buffer("mask", torch.ones(len(self.specs) * rank, dtype=torch.bool))
        self.shrunk = False
        self._shrunk_slices: list[tuple[int, int, int]] | None = None
        self.track_grads = False  # retain gradients of generated tensors (the allocator reads them)
        self._cache: Generated | None = None
        if scalar:
            # λ = Head_λ(h)·readout − offset. The offset is the initial output ("offset" init) and
            # is moved when a component is pruned so that its λ restarts at 0, as AdaLoRA zeroes
            # a pruned λ (see HyperAdaLoRA.allocate_ranks).
            self.register_buffer("lambda_offset", torch.zeros(len(self.specs) * rank))
            if offset_lambda:
                with torch.no_grad():
                    self.lambda_offset.copy_(self._raw_lambda(self.encode()))

    def _index_tokens(self, specs: list[MatrixSpec], rank: int) -> None:
        """Number the n·r tokens: each token's matrix, layer, kind and component, and each kind's slice."""
        self.specs = list(specs)
        self.rank = rank
        self.kinds = list(dict.fromkeys(spec.kind for spec in specs))
        self.layer_names = list(dict.fromkeys(spec.layer for spec in specs))
        kind_index = {k: i for i, k in enumerate(self.kinds)}
        layer_index = {k: i for i, k in enumerate(self.layer_names)}
        # Tokens are ordered kind by kind, so each kind's heads read one contiguous slice.
        order = sorted(range(len(specs)), key=lambda m: kind_index[specs[m].kind])
        token_matrix, self.kind_bounds, self.matrix_slot = [], [], [None] * len(specs)
        for kind in range(len(self.kinds)):
            start = len(token_matrix) * rank
            members = [m for m in order if kind_index[specs[m].kind] == kind]
            for position, m in enumerate(members):
                self.matrix_slot[m] = (kind, position * rank, (position + 1) * rank)
            token_matrix += members
            self.kind_bounds.append((start, len(token_matrix) * rank))
        matrix_of_token = torch.tensor(token_matrix).repeat_interleave(rank)
        self.register_buffer("token_layer", torch.tensor([layer_index[specs[m].layer] for m in token_matrix])
                             .repeat_interleave(rank), persistent=False)
        self.register_buffer("token_kind", torch.tensor([kind_index[specs[m].kind] for m in token_matrix])
                             .repeat_interleave(rank), persistent=False)
        self.register_buffer("token_rank", torch.arange(rank).repeat(len(specs)), persistent=False)
        self.register_buffer("token_matrix", matrix_of_token, persistent=False)

    def _build_encoder(self, dim: int, depth: int, heads: int) -> None:
        """The tokens, the layer/kind/rank embeddings and the encoder blocks."""
        # Unit-scale tokens and embeddings: an Adam step (~lr per value) then turns the normalised
        # hidden states by ~lr, not by lr / 0.02 as with small initial values.
        self.tokens = nn.Parameter(torch.randn(len(self.specs) * self.rank, dim))
        self.layer_embed = nn.Parameter(torch.randn(len(self.layer_names), dim))
        self.kind_embed = nn.Parameter(torch.randn(len(self.kinds), dim))
        self.rank_embed = nn.Parameter(torch.randn(self.rank, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def _build_heads(self, dim: int, scalar: bool, matrix_rank: int) -> None:
        """The column, row and scalar heads per module kind, and the per-matrix corrections."""
        specs = self.specs
        out_dims = [next(s.out_features for s in specs if s.kind == k) for k in self.kinds]
        in_dims = [next(s.in_features for s in specs if s.kind == k) for k in self.kinds]
        # Heads have no bias (it would be one offset shared by every matrix of a kind) and their
        # output is multiplied by 1/sqrt(d), weights starting at 0.02 so the generated entries start
        # at std 0.02 (AdaLoRA's initialisation). One Adam step (~lr on every head weight) then
        # moves a generated value by up to ~sqrt(d)·lr, coherently for every matrix of a kind.
        # Measured on MiniLM (benchmarks/RESULTS.md): a 1/d readout (steps of ~lr, AdaLoRA's)
        # never left the initial plateau in 300 steps; no readout (~d·lr) diverged at lr 1e-2 on a
        # tiny Llama where AdaLoRA did not.
        self.readout = 1.0 / math.sqrt(dim)
        self.col_heads = nn.ModuleList(nn.Linear(dim, d, bias=False) for d in out_dims)
        self.row_heads = nn.ModuleList(nn.Linear(dim, d, bias=False) for d in in_dims)
        self.scalar_heads = nn.ModuleList(nn.Linear(dim, 1, bias=False) for _ in self.kinds) if scalar else None
        self.matrix_rank = matrix_rank
        kind_sizes = [sum(1 for s in specs if s.kind == k) for k in self.kinds]
        if matrix_rank:
            # (M_k, k, d) down and (M_k, out|in, k) up per kind; up starts at zero (nothing changes at init)
            self.col_down = nn.ParameterList(nn.Parameter(torch.randn(m, matrix_rank, dim) / math.sqrt(dim))
                                             for m in kind_sizes)
            self.col_up = nn.ParameterList(nn.Parameter(torch.zeros(m, d, matrix_rank))
                                           for m, d in zip(kind_sizes, out_dims, strict=True))
            self.row_down = nn.ParameterList(nn.Parameter(torch.randn(m, matrix_rank, dim) / math.sqrt(dim))
                                             for m in kind_sizes)
            self.row_up = nn.ParameterList(nn.Parameter(torch.zeros(m, d, matrix_rank))
                                           for m, d in zip(kind_sizes, in_dims, strict=True))

    def _init_heads(self, zero_head: str, offset_lambda: bool) -> None:
        """Head weights at std 0.02, and the zero head that makes the adapter start as the identity
        (none with an offset λ: the offset does it)."""
        with torch.no_grad():
            for head in [*self.col_heads, *self.row_heads, *(self.scalar_heads or [])]:
                nn.init.normal_(head.weight, std=INIT_STD)
            if not offset_lambda:
                for head in self.scalar_heads if zero_head == "scalar" else self.col_heads:
                    nn.init.zeros_(head.weight)

    def __getstate__(self) -> dict:
        # The cache may hold tensors of a live autograd graph, which can be neither pickled nor
        # deep-copied; it is rebuilt on first use.
        state = dict(super().__getstate__())
        state["_cache"] = None
        return state

    # -- generation --------------------------------------------------------------------------
    def _versions(self) -> tuple:
        return tuple((p._version, p.data_ptr()) for p in self.parameters()) + (self.shrunk,)

    def encode(self) -> torch.Tensor:
        x = (self.tokens + self.layer_embed[self.token_layer] + self.kind_embed[self.token_kind]
             + self.rank_embed[self.token_rank])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (n·r, d)

    def generated(self) -> Generated:
        """The factors for the current parameters, generated at most once per step (see module doc)."""
        grad = torch.is_grad_enabled() and self.tokens.requires_grad
        versions = self._versions()
        cache = self._cache
        if cache is not None and cache.versions == versions and cache.grad == grad and not cache.consumed:
            return cache
        carried = None
        if (cache is not None and cache.consumed and cache.versions == versions and cache.grad and grad
                and self.tokens.grad is not None and bool(self.tokens.grad.any())):
            # A second micro-batch before the optimizer step (parameter gradients not zeroed):
            # keep the generated tensors' gradients so far, as parameter gradients accumulate.
            carried = generated_gradients(cache)
        self._cache = self._generate(grad, versions)
        self._cache.carried = carried
        return self._cache

    @property
    def last_generated(self) -> Generated | None:
        """The latest generation, without generating (None before the first): what the rank
        allocator reads the generated tensors' gradients from after a backward pass."""
        return self._cache

    def _raw_lambda(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every token's λ head output (before the offset), all kinds concatenated: (n·r,)."""
        return torch.cat([self.scalar_heads[kind](hidden[start:stop]).squeeze(-1) * self.readout
                          for kind, (start, stop) in enumerate(self.kind_bounds)])

    def _correction(self, kind: int, hidden: torch.Tensor, down: nn.ParameterList,
                    up: nn.ParameterList) -> torch.Tensor:
        """The per-matrix low-rank term U_m V_m h for every token of a kind: (R_k, out|in)."""
        count = down[kind].shape[0]
        h = hidden.view(count, self.rank, -1)  # tokens of a kind are stored matrix by matrix
        z = h @ down[kind].transpose(1, 2)  # (M_k, r, k)
        return (z @ up[kind].transpose(1, 2)).reshape(count * self.rank, -1) / math.sqrt(self.matrix_rank)

    def _generate(self, grad: bool, versions: tuple) -> Generated:
        hidden = self.encode()
        cols, rows, scalars, raw_scalars = [], [], [], []
        for kind, (start, stop) in enumerate(self.kind_bounds):
            h_all = hidden[start:stop]
            keep = self.mask[start:stop]
            h = h_all[keep] if self.shrunk else h_all
            col, row = self.col_heads[kind](h), self.row_heads[kind](h)
            if self.matrix_rank:
                col_fix = self._correction(kind, h_all, self.col_down, self.col_up)
                row_fix = self._correction(kind, h_all, self.row_down, self.row_up)
                col = col + (col_fix[keep] if self.shrunk else col_fix)
                row = row + (row_fix[keep] if self.shrunk else row_fix)
            cols.append(col * self.readout)
            rows.append(row * self.readout)
            if self.scalar_heads is not None:
                offset = self.lambda_offset[start:stop]
                raw = self.scalar_heads[kind](h).squeeze(-1) * self.readout - (offset[keep] if self.shrunk else offset)
                raw_scalars.append(raw)
                scalars.append(raw if self.shrunk else raw * keep)
        slices = self._shrunk_slices if self.shrunk else self.matrix_slot
        result = Generated(cols, rows, scalars if self.scalar_heads is not None else None,
                           raw_scalars if self.scalar_heads is not None else None, slices, versions, grad)
        if grad:
            hidden.register_hook(_mark_consumed(result))
            if self.track_grads:
                for tensor in result.tracked():
                    tensor.retain_grad()
        return result

    def factors(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(column factor (out, r_m), row factor (r_m, in), scalars (r_m,) or None) of matrix ``m``."""
        gen = self.generated()
        kind, start, stop = gen.slices[m]
        cols = gen.cols[kind][start:stop].t()  # (out, r_m)
        rows = gen.rows[kind][start:stop]  # (r_m, in)
        scalars = gen.scalars[kind][start:stop] if gen.scalars is not None else None
        return cols, rows, scalars

    def invalidate(self) -> None:
        self._cache = None

    # -- rank allocation support ------------------------------------------------------------------
    def kept_rank(self, m: int) -> int:
        kind, start, stop = self.matrix_slot[m]
        offset = self.kind_bounds[kind][0]
        return int(self.mask[offset + start:offset + stop].sum())

    def kept_ranks(self) -> list[int]:
        """Kept components per matrix, in spec order."""
        return [self.kept_rank(m) for m in range(len(self.specs))]

    def shrink(self) -> None:
        """Allocation is final: from now on generate only the kept components.

        The encoder still runs on every token (kept components attend to pruned ones, and the
        generated values must not change); the heads run on kept tokens only.
        """
        slices = []
        for kind, start, stop in self.matrix_slot:
            offset = self.kind_bounds[kind][0]
            kept_before = int(self.mask[offset:offset + start].sum())
            count = int(self.mask[offset + start:offset + stop].sum())
            slices.append((kind, kept_before, kept_before + count))
        self._shrunk_slices = slices
        self.shrunk = True
        self.invalidate()

    def block_masks(self) -> list[torch.Tensor]:
        """Per kind, (R, R) float: 1 where two generated rows belong to the same matrix."""
        key = (self.shrunk, self.tokens.device)
        if getattr(self, "_block_key", None) != key:
            slices = self._shrunk_slices if self.shrunk else self.matrix_slot
            masks = []
            for kind, (start, stop) in enumerate(self.kind_bounds):
                size = int(self.mask[start:stop].sum()) if self.shrunk else stop - start
                block = torch.full((size,), -1, dtype=torch.long)
                for index, (k, first, last) in enumerate(slices):
                    if k == kind:
                        block[first:last] = index
                masks.append((block[:, None] == block[None, :]).float().to(self.tokens.device))
            self._block_masks, self._block_key = masks, key
        return self._block_masks

    def block_ids(self) -> list[torch.Tensor]:
        """Per kind, (R,) long: the position of each generated row's matrix among its kind's matrices."""
        ids = []
        for start, stop in self.kind_bounds:
            block = torch.arange(stop - start, device=self.mask.device) // self.rank
            ids.append(block[self.mask[start:stop]] if self.shrunk else block)
        return ids

    def kind_masks(self) -> list[torch.Tensor]:
        return [self.mask[start:stop] for start, stop in self.kind_bounds]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _mark_consumed(result: Generated):
    def hook(grad: torch.Tensor) -> None:
        result.consumed = True

    return hook


def generated_gradients(gen: Generated) -> list[torch.Tensor] | None:
    """Gradients of the tracked generated tensors (plus any carried ones), or None if absent."""
    if gen.scalars is None:
        return None
    # a generation made without retain_grad (no grad, or not tracked) has no gradients to read
    grads = [t.grad if t.retains_grad else None for t in gen.tracked()]
    if any(g is None for g in grads):
        return gen.carried
    if gen.carried is not None:
        grads = [g + c for g, c in zip(grads, gen.carried, strict=True)]
    return grads


def parameter_count_formula(specs: list[MatrixSpec], rank: int, dim: int, depth: int, scalar: bool,
                            matrix_rank: int = 0) -> dict[str, Any]:
    """The hypernetwork's parameter count, by part (documented in the module docstring)."""
    kinds = {s.kind: s for s in specs}
    layers = {s.layer for s in specs}
    parts = {
        "tokens": len(specs) * rank * dim,
        "embeddings": (len(layers) + len(kinds) + rank) * dim,
        "encoder": depth * (8 * dim * dim + 11 * dim) + 2 * dim,
        "heads": sum(dim * (s.out_features + s.in_features + (1 if scalar else 0)) for s in kinds.values()),
        "matrix_corrections": sum(matrix_rank * (2 * dim + s.out_features + s.in_features) for s in specs),
    }
    parts["total"] = sum(parts.values())
    return parts
