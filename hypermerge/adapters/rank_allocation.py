"""AdaLoRA's rank allocation: sensitivity scores, the cubic budget schedule, the global mask.

Shared by AdaLoRA (which scores its P, Λ, Q parameters) and HyperAdaLoRA (which scores the
P, Λ, Q its hypernetwork generates). AdaLoRA, Zhang et al., arXiv 2303.10512, section 3.2-3.3:

* element sensitivity ``I = |θ · ∇θ|``; smoothed ``Ī ← β1 Ī + (1-β1) I`` and uncertainty
  ``Ū ← β2 Ū + (1-β2) |I - Ī|``; element score ``s = Ī · Ū``;
* the score of rank component i of a matrix (the triplet P[:, i], λ_i, Q[i, :]) is
  ``s(λ_i) + mean_j s(Q[i, j]) + mean_k s(P[k, i])``;
* one global budget over all matrices: ``init_r · n`` up to step ``tinit``, then falling on a cubic
  to ``target_r · n`` at step ``total_steps - tfinal``; every ``delta_t`` steps the components
  with the lowest scores beyond the budget are masked; the mask is final after ``total_steps - tfinal``.

``step`` counts optimizer steps taken, the one just taken included (1 after the first): that
makes the phases read as PEFT's AdaLoRAConfig documents them (``tinit`` warm-up steps, budget
at ``target_r · n`` exactly at step ``total_steps - tfinal``, then ``tfinal`` steps at the final
ranks). Fed the same parameters, gradients and step numbers, the mask equals the one PEFT's
``RankAllocator`` computes (tests/adapters/test_adalora.py checks it). Deliberate differences:

* ties at the threshold: PEFT masks every score ``<= kthvalue(scores, k)``, so equal scores
  (all zeros when gradients vanish) prune more than the budget asks, down to nothing; here exactly
  the ``k`` lowest scores are pruned (ties broken by position), so the kept rank is the budget;
* the final allocation happens at the first call with ``step >= total_steps - tfinal`` (PEFT
  needs ``step == total_steps - tfinal`` exactly, and with the default ``tfinal=0`` never finalises
  within ``total_steps`` steps counted from 0);
* a schedule that cannot work is a ``ConfigError`` up front instead of an assertion or a
  ``kthvalue`` error mid-training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hypermerge.errors import ConfigError

# Schedule phases: what ``allocate_ranks`` does at a step.
WARMUP, UPDATE, MASK, FINAL = "warmup", "update", "mask", "final"


def schedule_problems(*, init_r, target_r, tinit, tfinal, delta_t, beta1, beta2, total_steps) -> list[str]:
    """Every problem with a rank-allocation schedule, as sentences that say what to change."""
    problems = []

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(init_r) or init_r < 1:
        problems.append(f"init_r must be a positive integer, got {init_r!r}")
    if not is_int(target_r) or target_r < 1:
        problems.append(f"target_r must be a positive integer (the average rank kept per matrix), got {target_r!r}")
    elif is_int(init_r) and target_r > init_r:
        problems.append(f"target_r ({target_r}) must not exceed init_r ({init_r}): ranks are only ever pruned; "
                        f"raise init_r to at least {target_r} or lower target_r")
    for name, value in (("tinit", tinit), ("tfinal", tfinal)):
        if not is_int(value) or value < 0:
            problems.append(f"{name} must be a non-negative integer number of steps, got {value!r}")
    if not is_int(delta_t) or delta_t < 1:
        problems.append(f"delta_t must be an integer >= 1 (steps between two re-maskings), got {delta_t!r}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            problems.append(f"{name} must be in (0, 1), got {value!r}")
    if total_steps is not None:
        if not is_int(total_steps) or total_steps < 1:
            problems.append(f"total_steps must be a positive integer (optimizer steps of the run), got {total_steps!r}")
        elif is_int(tinit) and is_int(tfinal) and tinit >= 0 and tfinal >= 0 and tinit + tfinal >= total_steps:
            problems.append(
                f"tinit ({tinit}) + tfinal ({tfinal}) must be less than total_steps ({total_steps}), or no step is "
                f"left to reduce ranks in: lower tinit or tfinal, or raise total_steps above {tinit + tfinal}")
    return problems


def budget_at(step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_steps: int,
              delta_t: int) -> tuple[int, str]:
    """The global rank budget at ``step`` and the phase (WARMUP, UPDATE, MASK or FINAL).

    The cubic is PEFT's, term for term, so budgets agree to the integer.
    """
    if step <= tinit:
        return init_budget, WARMUP
    if step >= total_steps - tfinal:
        return target_budget, FINAL
    remaining = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    budget = int((init_budget - target_budget) * (remaining ** 3) + target_budget)
    return budget, MASK if step % delta_t == 0 else UPDATE


def check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"allocate_ranks needs the optimizer step count as a non-negative integer, got {step!r}",
                          hint="pass the number of optimizer steps taken so far, the one just taken included")
    return step


class SensitivityEMA:
    """Smoothed sensitivity Ī and uncertainty Ū of a fixed list of tensors (AdaLoRA eq. 6-8).

    Tensors come as a flat list of (P, λ, Q) groups: P (out, r) or generated columns (r, out),
    λ (r,), Q (r, in). All updates are ``torch._foreach_*`` calls: a handful of kernels per step
    however many matrices there are. The operations and their order are PEFT's, so the floats agree.
    """

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.ipt: list[torch.Tensor] | None = None  # Ī
        self.unc: list[torch.Tensor] | None = None  # Ū

    def reset(self) -> None:
        self.ipt = self.unc = None

    @torch.no_grad()
    def update(self, values: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        if self.ipt is None or len(self.ipt) != len(values) or any(
                a.shape != b.shape for a, b in zip(self.ipt, values, strict=True)):
            self.ipt = [torch.zeros_like(v, dtype=torch.float32) for v in values]
            self.unc = [torch.zeros_like(v, dtype=torch.float32) for v in values]
        values = [v.float() for v in values]
        grads = [g.float() for g in grads]
        current = torch._foreach_mul(values, grads)  # I = |θ · ∇θ|
        torch._foreach_abs_(current)
        # Ī = β1 Ī + (1-β1) I, written as PEFT writes it (two products, then a sum).
        torch._foreach_mul_(self.ipt, self.beta1)
        torch._foreach_add_(self.ipt, torch._foreach_mul(current, 1 - self.beta1))
        # Ū = β2 Ū + (1-β2) |I - Ī| with the Ī just updated.
        deviation = torch._foreach_sub(current, self.ipt)
        torch._foreach_abs_(deviation)
        torch._foreach_mul_(self.unc, self.beta2)
        torch._foreach_add_(self.unc, torch._foreach_mul(deviation, 1 - self.beta2))

    @torch.no_grad()
    def triplet_scores(self, p_reduce_dim: int) -> list[torch.Tensor]:
        """Per group, the score of each rank component: s(λ_i) + (mean s(Q[i, :]) + mean s(P[:, i])).

        ``p_reduce_dim`` is the dimension of P's tensor that runs over the output features:
        0 for a parameter P (out, r), 1 for generated columns (r, out).
        """
        if self.ipt is None:
            raise ConfigError("rank allocation has no sensitivity scores yet",
                              hint="call hm.allocate_ranks after at least one backward pass and optimizer step")
        scores = torch._foreach_mul(self.ipt, self.unc)
        out = []
        for i in range(0, len(scores), 3):
            p_score, lam_score, q_score = scores[i], scores[i + 1], scores[i + 2]
            out.append(lam_score + (q_score.mean(dim=1) + p_score.mean(dim=p_reduce_dim)))
        return out


def keep_masks(scores: Sequence[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Boolean keep-masks, one per score vector: the ``budget`` highest scores over all of them.

    Exactly ``sum(len) - budget`` components are dropped, the lowest-scoring first; among equal
    scores the earlier component goes first (PEFT would drop every tied score; see the module doc).
    """
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    drop = flat.numel() - budget
    if drop > 0:
        order = torch.argsort(flat, stable=True)
        keep[order[:drop]] = False
    return list(torch.split(keep, sizes))
