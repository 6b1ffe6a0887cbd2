"""AdaLoRA: an SVD-shaped low-rank update whose ranks are allocated during training.

AdaLoRA (Zhang et al., arXiv 2303.10512, section 3): ``W' = W + s · P diag(Λ) Q`` with P (out x r),
Λ (r), Q (r x in), ``s = alpha / init_r``. Λ starts at zero (the injected model is the base model),
P and Q at N(0, 0.02) as in PEFT. An orthogonality regulariser, the mean over the 2n matrices of
``‖PᵀP − I‖_F`` and ``‖QQᵀ − I‖_F`` (PEFT's and the authors' code; the paper writes it squared),
keeps P and Q near-orthogonal, so Λ behaves like singular values; a rank allocator
(``rank_allocation.py``) scores every (P column, λ, Q row) triplet and masks the least important
ones, across all matrices, down to ``target_r`` per matrix on average.

Training outside ``hypermerge train``::

    config = hm.AdaLoRAConfig(init_r=12, target_r=8, tinit=50, tfinal=100, delta_t=10, total_steps=1000)
    hm.inject(model, config)
    for step in range(1, 1001):
        loss = model(**batch).loss + hm.regularization_loss(model)
        loss.backward()
        optimizer.step()
        hm.allocate_ranks(model, step)   # after step(), before zero_grad(): it reads the gradients
        optimizer.zero_grad()

Masking follows the paper's update (Λ takes its gradient step, then the truncation zeroes the
pruned entries): a masked λ keeps receiving its gradient, so a component can come back at the
next allocation. Between allocations (``delta_t > 1``) a masked component stays out of the forward
pass (PEFT lets regrown values back in until the next mask): the live model then always equals the
model its rank pattern describes, which is what a checkpoint saves and what fold writes.

Once allocation is final (step ``total_steps - tfinal``) the forward gathers the kept components
and computes at the final ranks for the remaining steps. The parameters keep their shapes, so any
optimizer (and its state) carries on untouched. Checkpoints always hold only the kept ranks and
record ``rank_pattern``; fold needs nothing else.

The training loss ``model(**batch).loss + hm.regularization_loss(model)`` equals PEFT's
``AdaLoraModel`` loss for the same parameters (tests/adapters/test_adalora.py), masked components
included in the regulariser as PEFT includes them. Differences from PEFT's AdaLoRA, all
deliberate: the scale is ``alpha / init_r`` (PEFT divides by ``init_r + 1e-5``, a 1e-6 relative
difference); the regulariser is added explicitly with ``hm.regularization_loss`` rather than inside
``forward``; see ``rank_allocation.py`` for the allocator's. The paper's squared form was our
default until issue 14: at initialisation on MiniLM it is ~3x PEFT's value at the same weight and
larger than the task loss, so the shared default ``orth_reg_weight=0.5`` (tuned by PEFT for the
unsquared form) over-regularised; it was not kept as an option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import hypermerge.adapters.rank_allocation as ra
from hypermerge.adapters.base import AdapterConfig, AdapterLayer, AdapterMethod, ParamSpec
from hypermerge.adapters.state import adapter_state
from hypermerge.errors import AdapterMismatchError, ConfigError

INIT_STD = 0.02  # P and Q start at N(0, 0.02), as in PEFT and the paper's code


@dataclasses.dataclass(frozen=True)
class AdaLoRAConfig(AdapterConfig):
    """Args:
    init_r: rank of every matrix at the start.
    target_r: average rank per matrix once allocation is final (the budget is ``target_r · n``).
    tinit: warm-up steps at full rank before pruning starts.
    tfinal: steps at the final ranks at the end (allocation is final at ``total_steps - tfinal``).
    delta_t: steps between two re-maskings while the budget falls.
    beta1: EMA factor of the sensitivity.
    beta2: EMA factor of the uncertainty.
    orth_reg_weight: weight of the orthogonality regulariser (``hm.regularization_loss``).
    total_steps: optimizer steps of the run; ``hypermerge train`` fills it in. Required by
        ``hm.allocate_ranks``, not by inject or fold.
    alpha: the update is scaled by ``alpha / init_r`` (constant: pruning does not rescale it).
    dropout: dropout on the adapter branch's input during training.
    """

    method = "adalora"

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_steps: int | None = None
    alpha: float = 8.0
    dropout: float = 0.0

    def problems(self) -> list[str]:
        problems = super().problems()
        problems += ra.schedule_problems(init_r=self.init_r, target_r=self.target_r, tinit=self.tinit,
                                         tfinal=self.tfinal, delta_t=self.delta_t, beta1=self.beta1,
                                         beta2=self.beta2, total_steps=self.total_steps)
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            problems.append(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            problems.append(f"alpha must be positive, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        return problems

    @property
    def scaling(self) -> float:
        return self.alpha / self.init_r


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Low-precision bases get float32 adapters: small updates would vanish in bf16/fp16.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class AdaLoRALayer(AdapterLayer):
    """``y = W x + c + s · P (Λ ⊙ (Q x))`` with a keep-mask on the rank components."""

    def __init__(self, base_layer: nn.Module, config: AdaLoRAConfig, weight_name: str, rank: int | None = None):
        super().__init__(base_layer, config, weight_name)
        weight = base_layer.weight
        rank = config.init_r if rank is None else rank
        kwargs = dict(device=weight.device, dtype=_adapter_dtype(weight))
        self.P = nn.Parameter(torch.randn(self.out_features, rank, **kwargs) * INIT_STD)  # (out, r)
        self.lam = nn.Parameter(torch.zeros(rank, **kwargs))  # (r,) the "singular values" Λ
        self.Q = nn.Parameter(torch.randn(rank, self.in_features, **kwargs) * INIT_STD)  # (r, in)
        # True where the component is kept; all True until the allocator masks some.
        self.register_buffer("rank_mask", torch.ones(rank, dtype=torch.bool, device=weight.device),
                             persistent=False)
        self.masked = False  # fast path: no mask arithmetic while every component is kept
        self.kept: torch.Tensor | None = None  # indices of the kept components once allocation is final
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling

    @property
    def rank(self) -> int:
        return int(self.rank_mask.sum()) if self.masked else self.lam.numel()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, Λ as used by the forward, Q)."""
        if self.kept is not None:
            # Allocation is final: compute at the kept ranks only (gathers are (out + in)·r copies,
            # far cheaper than the token-sized products they shrink).
            return (self.P.index_select(1, self.kept), self.lam.index_select(0, self.kept),
                    self.Q.index_select(0, self.kept))
        lam = self.lam
        if self.masked:
            # Value Λ ⊙ mask, gradient as if unmasked: the masked λ takes its gradient step and
            # may win its place back at the next allocation (the paper's update, eq. 5).
            lam = lam - (lam * ~self.rank_mask).detach()
        return self.P, lam, self.Q

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        if not self.masked:
            return {"P": self.P, "lambda": self.lam, "Q": self.Q}
        keep = self.rank_mask.nonzero().squeeze(1)  # pruned ranks are not saved
        return {"P": self.P.index_select(1, keep), "lambda": self.lam.index_select(0, keep),
                "Q": self.Q.index_select(0, keep)}

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.masked:
            raise AdapterMismatchError(f"{self.weight_name}: cannot load into a layer with masked ranks",
                                       hint="load into a freshly injected model (hm.load_adapter)")
        super().load_adapter_tensors(tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        P, lam, Q = self.factors()
        h = nn.functional.linear(self.dropout(x), Q.to(x.dtype))  # (..., r)
        h = h * (lam * self.scaling).to(x.dtype)  # the scale rides on the r-sized vector, not the output
        return y + nn.functional.linear(h, P.to(x.dtype))

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor) -> None:
        """Mask the components where ``keep`` is False and zero their λ (the truncation step)."""
        if self.kept is not None:
            raise ConfigError(f"{self.weight_name}: rank allocation is already final")
        self.rank_mask.copy_(keep)
        self.lam.masked_fill_(~keep, 0.0)
        self.masked = not bool(keep.all())

    def finalize(self) -> None:
        """Allocation is final: from now on the forward runs on the kept components only."""
        if self.masked:
            self.kept = self.rank_mask.nonzero().squeeze(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


def check_total_steps(config: AdaLoRAConfig) -> int:
    if config.total_steps is None:
        raise ConfigError(f"{type(config).__name__}.total_steps is not set; rank allocation needs the run's "
                          "number of optimizer steps",
                          hint="pass total_steps=N to the config (hypermerge train fills it in), or call "
                               "hm.set_total_steps(model, N) after inject")
    return config.total_steps


class AllocatorState:
    """What the allocator keeps between calls; lives on the model, outside its state dict."""

    ATTR = "_hypermerge_rank_allocator"

    def __init__(self, config: AdaLoRAConfig):
        self.ema = ra.SensitivityEMA(config.beta1, config.beta2)
        self.final = False
        self.last_step: int | None = None

    @classmethod
    def of(cls, model: nn.Module, config: AdaLoRAConfig) -> AllocatorState:
        state = getattr(model, cls.ATTR, None)
        if state is None:
            state = cls(config)
            object.__setattr__(model, cls.ATTR, state)
        return state

    @classmethod
    def remove(cls, model: nn.Module) -> None:
        if hasattr(model, cls.ATTR):
            object.__delattr__(model, cls.ATTR)


def orthogonality_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over the 2n matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F, for (P (out, r), Q (r, in)) pairs.

    PEFT's ``AdaLoraModel.forward`` form (unsquared norms). Matrices of equal shape are stacked
    and handled by one batched product.
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for P, Q in pairs:
        groups.setdefault(("P", tuple(P.shape)), []).append(P)
        groups.setdefault(("Q", tuple(Q.shape)), []).append(Q)
    total = None
    for (kind, _shape), tensors in groups.items():
        stacked = torch.stack(tensors)  # (g, out, r) or (g, r, in)
        gram = stacked.transpose(1, 2) @ stacked if kind == "P" else stacked @ stacked.transpose(1, 2)  # (g, r, r)
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        term = torch.linalg.matrix_norm(gram - eye).sum()  # Frobenius norm per matrix
        total = term if total is None else total + term
    return total / (2 * len(pairs))


class AdaLoRA(AdapterMethod):
    """AdaLoRA (arXiv 2303.10512, section 3): SVD-form update, sensitivity-based rank allocation."""

    name = "adalora"
    config_cls = AdaLoRAConfig
    layer_cls = AdaLoRALayer
    params = (ParamSpec("P", ("out", "r")), ParamSpec("lambda", ("r",)), ParamSpec("Q", ("r", "in")))

    @classmethod
    def rank_range(cls, config: AdapterConfig) -> tuple[int, int | None]:
        return 0, config.init_r  # pruning may remove every rank of a matrix, never add one

    @staticmethod
    def fold(weight: torch.Tensor, params: Mapping[str, torch.Tensor], config: AdapterConfig) -> torch.Tensor:
        # (out, r) * (r,) @ (r, in); saved tensors hold only the kept ranks
        return weight + config.scaling * ((params["P"] * params["lambda"]) @ params["Q"])

    @classmethod
    def create_layer(cls, base_layer, config, weight_name, saved=None):
        rank = None
        if saved is not None and "lambda" in saved:
            rank = int(saved["lambda"].shape[0])
            if rank > config.init_r:
                raise AdapterMismatchError(f"{weight_name} has rank {rank} in the checkpoint, above init_r "
                                           f"{config.init_r}", hint="the checkpoint's config was edited; restore it")
        return cls.layer_cls(base_layer, config, weight_name, rank=rank)

    @classmethod
    def detach(cls, model: nn.Module) -> None:
        AllocatorState.remove(model)

    @classmethod
    def checkpoint_metadata(cls, model, layers) -> dict[str, Any]:
        return {"rank_pattern": {name: layer.rank for name, layer in layers.items()}}

    @classmethod
    def regularization_loss(cls, model, layers) -> torch.Tensor | None:
        config = next(iter(layers.values())).config
        if config.orth_reg_weight == 0:
            return None
        # Every component, masked ones included and after the final allocation too, as PEFT does
        # (a masked component may come back while the budget falls, and the loss stays PEFT's).
        pairs = [(layer.P, layer.Q) for layer in layers.values()]
        return config.orth_reg_weight * orthogonality_loss(pairs)

    @classmethod
    def restore_allocation(cls, model: nn.Module, layers: Mapping[str, AdapterLayer], final: bool) -> None:
        """After a resume restored the masks: the layers take up the state they had (masked, final)."""
        for layer in layers.values():
            layer.masked = not bool(layer.rank_mask.all())
            if final and layer.kept is None:
                layer.finalize()

    @classmethod
    def allocate_ranks(cls, model, layers, step) -> None:
        step = ra.check_step(step)
        layer_list = list(layers.values())
        config = current_config(model, layer_list)
        total_steps = check_total_steps(config)
        state = AllocatorState.of(model, config)
        if state.final:
            return
        present = sum(layer.lam.numel() for layer in layer_list)
        budget, phase = ra.budget_at(step, init_budget=config.init_r * len(layer_list),
                                     target_budget=config.target_r * len(layer_list), tinit=config.tinit,
                                     tfinal=config.tfinal, total_steps=total_steps, delta_t=config.delta_t)
        if phase != ra.FINAL:
            values, grads = [], []
            for layer in layer_list:
                for param in (layer.P, layer.lam, layer.Q):
                    values.append(param)
                    grads.append(param.grad)
            if all(g is None for g in grads):
                raise ConfigError("allocate_ranks found no gradients on the adapter",
                                  hint="call it after loss.backward() and optimizer.step(), before optimizer.zero_grad()")
            grads = [torch.zeros_like(v) if g is None else g for v, g in zip(values, grads, strict=True)]
            state.ema.update(values, grads)
        state.last_step = step
        if phase in (ra.MASK, ra.FINAL) and budget < present:
            keeps = ra.keep_masks(state.ema.triplet_scores(p_reduce_dim=0), budget)
            for layer, keep in zip(layer_list, keeps, strict=True):
                layer.apply_mask(keep)
        if phase == ra.FINAL:
            state.final = True
            state.ema.reset()  # the scores are no longer needed: free them
            for layer in layer_list:
                layer.finalize()


def current_config(model: nn.Module, layers: list[AdapterLayer]) -> AdaLoRAConfig:
    """The adapter's config as the model holds it now (``set_total_steps`` may have replaced it)."""
    state = adapter_state(model, required=False)
    return state.config if state is not None else layers[0].config


ALLOCATOR_PREFIX = "rank_allocator::"


def allocator_state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The rank allocator's state, for an exact resume: whether allocation is final and the
    sensitivity / uncertainty averages. ``{}`` for an adapter that does not allocate ranks.

    Not part of the adapter checkpoint (fold does not need it); ``hypermerge train`` keeps it
    in its training-state file.
    """
    state = adapter_state(model, required=False)
    if state is None or not isinstance(state.config, AdaLoRAConfig):
        return {}
    allocator = getattr(model, AllocatorState.ATTR, None)
    final = allocator is not None and allocator.final
    tensors = {f"{ALLOCATOR_PREFIX}final": torch.tensor([final])}
    if allocator is not None and allocator.ema.ipt is not None:
        for i, (ipt, unc) in enumerate(zip(allocator.ema.ipt, allocator.ema.unc, strict=True)):
            tensors[f"{ALLOCATOR_PREFIX}ipt.{i}"] = ipt
            tensors[f"{ALLOCATOR_PREFIX}unc.{i}"] = unc
    return tensors


def restore_allocator_state(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore what ``allocator_state_tensors`` saved (after the masks and parameters are restored)."""
    state = adapter_state(model)
    if not isinstance(state.config, AdaLoRAConfig):
        return
    allocator = AllocatorState.of(model, state.config)
    count = sum(1 for key in tensors if key.startswith(f"{ALLOCATOR_PREFIX}ipt."))
    if count:
        device = next(iter(state.layers.values())).base_layer.weight.device
        allocator.ema.ipt = [tensors[f"{ALLOCATOR_PREFIX}ipt.{i}"].to(device) for i in range(count)]
        allocator.ema.unc = [tensors[f"{ALLOCATOR_PREFIX}unc.{i}"].to(device) for i in range(count)]
    allocator.final = bool(tensors.get(f"{ALLOCATOR_PREFIX}final", torch.tensor([False])).item())
    state.method.restore_allocation(model, state.layers, allocator.final)


def allocation_final(model: nn.Module) -> bool:
    """True once rank allocation has made its final allocation (the ranks no longer change)."""
    allocator = getattr(model, AllocatorState.ATTR, None)
    return allocator is not None and allocator.final


def set_total_steps(model: nn.Module, total_steps: int) -> None:
    """Set ``total_steps`` of an injected AdaLoRA / HyperAdaLoRA adapter (validates the schedule).

    For when the run's length is known only after inject; ``hypermerge train`` uses it.

    Raises:
        ConfigError: the model's adapter has no rank schedule, or the schedule does not fit.
    """
    state = adapter_state(model)
    if not isinstance(state.config, AdaLoRAConfig):
        raise ConfigError(f"the {state.method.name} adapter has no rank schedule (total_steps)")
    config = dataclasses.replace(state.config, total_steps=total_steps)
    state.config = config
    for layer in state.layers.values():
        layer.config = config
