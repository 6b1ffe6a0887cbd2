"""AdaLoRA: PEFT's allocator decisions reproduced, exact budgets, pruned checkpoints, schedule errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import hypermerge as hm
from hypermerge.adapters import rank_allocation as ra
from hypermerge.cli import cli
from tests.helpers.common import load_tiny, model_output, relative_error, sample_inputs, save_tiny, tiny_model

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_adalora(model, **schedule):
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(target_modules=LLAMA_LINEARS, lora_alpha=8, lora_dropout=0.0,
                                init_r=schedule["init_r"], target_r=schedule["target_r"], tinit=schedule["tinit"],
                                tfinal=schedule["tfinal"], deltaT=schedule["delta_t"],
                                total_step=schedule["total_steps"], beta1=0.85, beta2=0.85)
    return peft.get_peft_model(model, config)


def _peft_triplets(peft_model) -> dict[str, tuple]:
    """base weight name -> (lora_B = P, lora_E = λ, lora_A = Q) parameters of PEFT's model."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            out[f"{name}.weight"] = (module.lora_B["default"], module.lora_E["default"], module.lora_A["default"])
    return out


@pytest.mark.parametrize("schedule", [
    dict(init_r=6, target_r=3, tinit=3, tfinal=6, delta_t=2, total_steps=30),
    dict(init_r=4, target_r=1, tinit=0, tfinal=4, delta_t=1, total_steps=24),
])
def test_allocator_reproduces_peft_masks(schedule):
    """Same parameters, same gradients, same steps: the same masks and the same masked Λ, every step."""
    torch.manual_seed(0)
    peft_model = _peft_adalora(tiny_model("llama"), **schedule)
    ours = hm.inject(tiny_model("llama"), hm.AdaLoRAConfig(alpha=8, **schedule))
    peft_triplets = _peft_triplets(peft_model)
    layers = hm.adapter_layers(ours)
    assert list(peft_triplets) == list(layers)

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    finals = 0
    for step in range(1, schedule["total_steps"] + 1):
        ids = torch.randint(0, 128, (2, 12), generator=generator)
        peft_model(input_ids=ids).logits.pow(2).mean().backward()
        optimizer.step()
        # Hand our allocator PEFT's parameters and gradients as they are now.
        with torch.no_grad():
            for name, (B, E, A) in peft_triplets.items():
                layer = layers[name]
                for ours_param, theirs in ((layer.P, B), (layer.lam, E), (layer.Q, A)):
                    ours_param.copy_(theirs.reshape(ours_param.shape))
                    ours_param.grad = theirs.grad.reshape(ours_param.shape).clone()
        peft_model.base_model.update_and_allocate(step)
        hm.allocate_ranks(ours, step)
        pattern = peft_model.peft_config["default"].rank_pattern
        final = step >= schedule["total_steps"] - schedule["tfinal"]
        for name, (_B, E, _A) in peft_triplets.items():
            layer = layers[name]
            # After the final allocation PEFT re-zeroes the masked Λ every step; we leave them
            # (the forward gathers the kept ranks), so only the kept Λ are compared then.
            kept = layer.rank_mask if final else torch.ones_like(layer.rank_mask)
            torch.testing.assert_close(layer.lam.detach() * kept, E.detach().view(-1) * kept, rtol=0, atol=0)
            if pattern is not None:
                key = next(k for k in pattern if k.startswith(name.removesuffix("weight")))
                assert layer.rank_mask.tolist() == [bool(v) for v in pattern[key]], (step, name)
        if pattern is not None and final:
            finals += 1
        optimizer.zero_grad()
    assert finals == schedule["tfinal"] + 1
    n = len(layers)
    assert sum(hm.rank_pattern(ours).values()) == schedule["target_r"] * n
    assert sum(sum(v) for v in peft_model.peft_config["default"].rank_pattern.values()) == schedule["target_r"] * n


@pytest.mark.parametrize("tinit, tfinal, total, delta_t", [(0, 0, 10, 1), (3, 5, 40, 3), (10, 20, 100, 7)])
def test_budget_schedule_equals_peft(tinit, tfinal, total, delta_t):
    peft = pytest.importorskip("peft")
    from peft.tuners.adalora.layer import RankAllocator

    config = peft.AdaLoraConfig(init_r=12, target_r=4, tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total,
                                target_modules=["q_proj"])
    allocator = RankAllocator.__new__(RankAllocator)
    allocator.peft_config, allocator.init_bgt, allocator.target_bgt = config, 12 * 36, 4 * 36
    for step in range(1, total - tfinal):
        budget, phase = ra.budget_at(step, init_budget=12 * 36, target_budget=4 * 36, tinit=tinit, tfinal=tfinal,
                                     total_steps=total, delta_t=delta_t)
        peft_budget, peft_mask = allocator.budget_schedule(step)
        assert budget == peft_budget
        assert (phase == ra.MASK) == peft_mask
    assert ra.budget_at(total - tfinal, init_budget=1, target_budget=1, tinit=tinit, tfinal=tfinal,
                        total_steps=total, delta_t=delta_t)[1] == ra.FINAL


def test_forward_equals_peft_svd_linear():
    torch.manual_seed(0)
    peft_model = _peft_adalora(tiny_model("llama"), init_r=4, target_r=2, tinit=0, tfinal=0, delta_t=1,
                               total_steps=10)
    ours = hm.inject(tiny_model("llama"), hm.AdaLoRAConfig(init_r=4, target_r=2, total_steps=10, alpha=8))
    with torch.no_grad():
        for name, (B, E, A) in _peft_triplets(peft_model).items():
            E.normal_()
            layer = hm.adapter_layers(ours)[name]
            layer.P.copy_(B), layer.lam.copy_(E.view(-1)), layer.Q.copy_(A)
    inputs = sample_inputs()
    expected = model_output(peft_model, inputs)
    # PEFT scales by alpha / (init_r + 1e-5), we by alpha / init_r: a 2.5e-6 relative difference.
    assert relative_error(model_output(ours, inputs), expected) < 1e-5


def _train(model, steps: int, lr: float = 1e-2, seed: int = 0) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        ids = torch.randint(0, 128, (2, 10), generator=generator)
        loss = model(input_ids=ids, labels=torch.randint(0, 3, (2,), generator=generator)).loss
        (loss + hm.regularization_loss(model)).backward()
        optimizer.step()
        hm.allocate_ranks(model, step)
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", ["adalora", "hyperadalora"])
def test_training_prunes_to_the_exact_budget_and_folds_to_the_live_model(method, tmp_path):
    base = save_tiny("bert", tmp_path / "base")
    model = load_tiny("bert", base)
    config_cls = hm.AdaLoRAConfig if method == "adalora" else hm.HyperAdaLoRAConfig
    extra = {} if method == "adalora" else {"hyper_dim": 16, "hyper_heads": 2}
    hm.inject(model, config_cls(init_r=5, target_r=2, tinit=2, tfinal=3, delta_t=2, total_steps=16, **extra))
    _train(model, 16)
    n = len(hm.adapter_layers(model))
    pattern = hm.rank_pattern(model)
    assert sum(pattern.values()) == 2 * n
    assert len(set(pattern.values())) > 1, "the allocator should move rank between matrices"

    inputs = sample_inputs()
    live = model_output(model, inputs)
    hm.save_adapter(model, tmp_path / "adapter", base_model=base)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == pattern
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name, rank in pattern.items():
        layer = hm.adapter_layers(model)[name]
        assert tensors[f"{name}::{method}.P"].shape == (layer.out_features, rank)
        assert tensors[f"{name}::{method}.lambda"].shape == (rank,)
        assert tensors[f"{name}::{method}.Q"].shape == (rank, layer.in_features)

    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "folded", progress=False)
    folded = load_tiny("bert", tmp_path / "folded")
    assert relative_error(model_output(folded, inputs), live) <= 1e-5

    reloaded = hm.load_adapter(load_tiny("bert", base), tmp_path / "adapter")
    assert hm.rank_pattern(reloaded) == pattern
    assert relative_error(model_output(reloaded, inputs), live) <= 1e-6

    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert f"rank pattern         total {2 * n} over {n} matrices" in result.output


def test_mid_schedule_checkpoint_holds_the_kept_ranks_and_folds_exactly(tmp_path):
    """Saved between two allocations (delta_t > 1): masked ranks are out of the forward and the file."""
    base = save_tiny("gpt2", tmp_path / "base")  # Conv1D: weights stored transposed
    model = hm.inject(load_tiny("gpt2", base), hm.AdaLoRAConfig(init_r=4, target_r=1, delta_t=3, total_steps=30))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 8):
        ids = torch.randint(0, 128, (2, 10), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        hm.allocate_ranks(model, step)
        optimizer.zero_grad()
    # step 7: masked at step 6, and the optimizer has moved the masked λ off zero since
    assert any(layer.masked and bool((layer.lam[~layer.rank_mask] != 0).any())
               for layer in hm.adapter_layers(model).values())
    live = model_output(model, sample_inputs())
    hm.save_adapter(model, tmp_path / "adapter", base_model=base)
    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "folded", progress=False)
    assert relative_error(model_output(load_tiny("gpt2", tmp_path / "folded"), sample_inputs()), live) <= 1e-5
    assert 1 * 8 < sum(hm.rank_pattern(model).values()) < 4 * 8


def test_orthogonality_loss_is_peft_s_formula():
    """Mean over the 2n matrices of the unsquared Frobenius norms, as PEFT's AdaLoraModel computes it."""
    model = hm.inject(tiny_model("llama"), hm.AdaLoRAConfig(init_r=3, target_r=2, orth_reg_weight=0.3))
    layers = list(hm.adapter_layers(model).values())
    eye = torch.eye(3)
    expected = sum(torch.norm(layer.P.T @ layer.P - eye, p="fro") + torch.norm(layer.Q @ layer.Q.T - eye, p="fro")
                   for layer in layers) / (2 * len(layers))
    torch.testing.assert_close(hm.regularization_loss(model), 0.3 * expected)
    assert float(hm.regularization_loss(hm.inject(tiny_model("llama"), hm.LoRAConfig()))) == 0.0
    assert float(hm.regularization_loss(hm.inject(tiny_model("llama"), hm.AdaLoRAConfig(orth_reg_weight=0)))) == 0.0


def test_training_loss_with_the_regulariser_equals_peft():
    """Fed the same parameters, gradients and steps through a whole schedule (masking, final
    allocation, steps at the final ranks): our loss + hm.regularization_loss equals PEFT's
    AdaLoraModel loss, and its gradients equal PEFT's."""
    schedule = dict(init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=1, total_steps=12)
    torch.manual_seed(0)
    peft_model = _peft_adalora(tiny_model("llama"), **schedule)
    ours = hm.inject(tiny_model("llama"), hm.AdaLoRAConfig(alpha=8, orth_reg_weight=0.5, **schedule))
    assert peft_model.peft_config["default"].orth_reg_weight == 0.5  # PEFT's default, and ours
    peft_triplets = _peft_triplets(peft_model)
    layers = hm.adapter_layers(ours)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    peft_model.train(), ours.train()
    for step in range(1, schedule["total_steps"] + 1):
        with torch.no_grad():
            for name, (B, E, A) in peft_triplets.items():
                layer = layers[name]
                for ours_param, theirs in ((layer.P, B), (layer.lam, E), (layer.Q, A)):
                    ours_param.copy_(theirs.reshape(ours_param.shape))
                    ours_param.grad = None
        ids = torch.randint(0, 128, (2, 12), generator=generator)
        # AdaLoraModel.forward adds the regulariser (the generic PeftModel wrapper bypasses it)
        peft_loss = peft_model.base_model(input_ids=ids, labels=ids).loss
        our_loss = ours(input_ids=ids, labels=ids).loss + hm.regularization_loss(ours)
        # PEFT scales the update by alpha / (init_r + 1e-5), we by alpha / init_r
        torch.testing.assert_close(our_loss, peft_loss, rtol=2e-6, atol=0, msg=f"step {step}")
        peft_loss.backward()
        our_loss.backward()
        for name, (B, E, A) in peft_triplets.items():
            layer = layers[name]
            kept = layer.rank_mask  # PEFT zeroes masked λ; our masked λ get the unmasked gradient
            torch.testing.assert_close(layer.P.grad[:, kept], B.grad[:, kept], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(layer.Q.grad[kept], A.grad[kept], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(layer.lam.grad[kept], E.grad.view(-1)[kept], rtol=1e-4, atol=1e-7)
        optimizer.step()
        with torch.no_grad():
            for name, (B, E, A) in peft_triplets.items():
                layer = layers[name]
                for ours_param, theirs in ((layer.P, B), (layer.lam, E), (layer.Q, A)):
                    ours_param.copy_(theirs.reshape(ours_param.shape))
                    ours_param.grad = theirs.grad.reshape(ours_param.shape).clone()
        peft_model.base_model.update_and_allocate(step)
        hm.allocate_ranks(ours, step)
        optimizer.zero_grad()
    assert sum(hm.rank_pattern(ours).values()) == 2 * len(layers)


def test_ties_keep_exactly_the_budget():
    """PEFT's `score <= kthvalue` prunes every tied score; zero scores would prune everything."""
    keeps = ra.keep_masks([torch.zeros(4), torch.zeros(4), torch.ones(4)], budget=6)
    assert sum(int(k.sum()) for k in keeps) == 6
    assert bool(keeps[2].all())


@pytest.mark.parametrize("kwargs, message", [
    (dict(tinit=60, tfinal=40, total_steps=100), r"tinit \(60\) \+ tfinal \(40\) must be less than total_steps \(100\)"
                                                 r".*raise total_steps above 100"),
    (dict(init_r=4, target_r=8), r"target_r \(8\) must not exceed init_r \(4\).*raise init_r to at least 8"),
    (dict(target_r=0), "target_r must be a positive integer"),
    (dict(delta_t=0), "delta_t must be an integer >= 1"),
    (dict(beta1=1.0), r"beta1 must be in \(0, 1\)"),
    (dict(total_steps=0), "total_steps must be a positive integer"),
    (dict(orth_reg_weight=-1), "orth_reg_weight must be >= 0"),
    (dict(tinit=-1), "tinit must be a non-negative integer"),
])
def test_bad_schedules_are_config_errors(kwargs, message):
    with pytest.raises(hm.ConfigError, match=message):
        hm.AdaLoRAConfig(**kwargs)
    with pytest.raises(hm.ConfigError, match=message):
        hm.HyperAdaLoRAConfig(**kwargs)


def test_every_schedule_problem_is_reported_at_once():
    with pytest.raises(hm.ConfigError) as info:
        hm.AdaLoRAConfig(init_r=2, target_r=3, delta_t=0, tinit=5, tfinal=5, total_steps=10)
    message = str(info.value)
    assert "target_r (3)" in message and "delta_t" in message and "tinit (5) + tfinal (5)" in message


def test_allocate_ranks_needs_total_steps_gradients_and_a_step():
    model = hm.inject(tiny_model("llama"), hm.AdaLoRAConfig())
    with pytest.raises(hm.ConfigError, match="total_steps is not set.*set_total_steps"):
        hm.allocate_ranks(model, 1)
    with pytest.raises(hm.ConfigError, match="tinit .* must be less than total_steps"):
        hm.set_total_steps(hm.inject(tiny_model("llama"), hm.AdaLoRAConfig(tinit=5)), 5)
    hm.set_total_steps(model, 50)
    assert hm.adapter_layers(model)[next(iter(hm.adapter_layers(model)))].config.total_steps == 50
    with pytest.raises(hm.ConfigError, match="no gradients.*before optimizer.zero_grad"):
        hm.allocate_ranks(model, 1)
    with pytest.raises(hm.ConfigError, match="non-negative integer"):
        hm.allocate_ranks(model, -1)
    with pytest.raises(hm.ConfigError, match="has no rank schedule"):
        hm.set_total_steps(hm.inject(tiny_model("llama"), hm.LoRAConfig()), 10)


def test_allocation_is_a_no_op_for_other_methods():
    model = hm.inject(tiny_model("llama"), hm.LoRAConfig(r=2))
    hm.allocate_ranks(model, 1)
    assert hm.rank_pattern(model) == {}
