"""HyperAdaLoRA and HyperLoRA: one generation per step, allocation on generated values, checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import hypermerge as hm
from hypermerge.adapters.adalora import AllocatorState
from hypermerge.adapters.hyperadalora import HyperAdaLoRA
from hypermerge.adapters.hypernetwork import matrix_spec, parameter_count_formula
from tests.helpers.common import load_tiny, model_output, relative_error, sample_inputs, save_tiny, tiny_model

SMALL = dict(hyper_dim=16, hyper_heads=2)


def _net(model):
    return HyperAdaLoRA.hypernetwork(model)


def _count_generations(net) -> list[int]:
    calls = [0]
    encode = net.encode

    def counted():
        calls[0] += 1
        return encode()

    net.encode = counted
    return calls


def _step(model, generator, *, backward: bool = True):
    ids = torch.randint(0, 128, (2, 9), generator=generator)
    loss = model(input_ids=ids, labels=ids).loss + hm.regularization_loss(model)
    if backward:
        loss.backward()
    return loss


def test_hypernetwork_runs_once_per_training_step_and_once_in_eval():
    model = hm.inject(tiny_model("llama"), hm.HyperAdaLoRAConfig(init_r=4, target_r=2, total_steps=10, **SMALL))
    calls = _count_generations(_net(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, 4):
        _step(model, generator)  # 14 adapted layers + the regulariser read one generation
        assert calls[0] == 2 * step - 1
        optimizer.step()
        hm.allocate_ranks(model, step)  # one more, without gradients: the values after the step
        optimizer.zero_grad()
        assert calls[0] == 2 * step
    model.eval()
    before = calls[0]
    with torch.no_grad():
        first = model_output(model, sample_inputs())
        again = model_output(model, sample_inputs())
    assert calls[0] <= before + 1, "eval forwards reuse the generation while parameters are unchanged"
    torch.testing.assert_close(first, again)
    with torch.no_grad():
        _net(model).tokens.add_(0.1)
        model_output(model, sample_inputs())
    assert calls[0] == before + 2, "a parameter change invalidates the cache"


def test_gradient_accumulation_sums_the_generated_gradients():
    """Two micro-batches before one optimizer step: the allocator sees both, as PEFT's p.grad would."""
    model = hm.inject(tiny_model("llama"), hm.HyperAdaLoRAConfig(init_r=3, target_r=2, total_steps=10, **SMALL))
    model.train()
    net = _net(model)
    with torch.no_grad():
        for head in net.scalar_heads:
            head.weight.normal_(std=0.1)  # λ != 0, so every generated tensor gets a gradient
    batches = [torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    single = []
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        single.append([t.grad.clone() for t in net._cache.tracked()])
        model.zero_grad()
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
    from hypermerge.adapters.hypernetwork import generated_gradients

    accumulated = generated_gradients(net._cache)
    for total, first, second in zip(accumulated, *single, strict=True):
        torch.testing.assert_close(total, first + second)


def test_allocation_reads_generated_gradients_and_masks_generated_lambda():
    model = hm.inject(tiny_model("llama"), hm.HyperAdaLoRAConfig(init_r=4, target_r=2, tinit=0, tfinal=2, delta_t=1,
                                                                 total_steps=8, **SMALL))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    net = _net(model)
    n = len(hm.adapter_layers(model))
    for step in range(1, 9):
        _step(model, generator)
        optimizer.step()
        hm.allocate_ranks(model, step)
        optimizer.zero_grad()
        if step == 1:
            ema = AllocatorState.of(model, None).ema
            assert all(float(t.abs().sum()) > 0 for t in ema.ipt[1::3]), "λ sensitivities come from generated grads"
            assert int(net.mask.sum()) < 4 * n
        if step == 3:
            # masked, not final: the layers see λ = 0 for masked components
            with torch.no_grad():
                for layer in hm.adapter_layers(model).values():
                    _P, lam, _Q = layer.factors()
                    kind, start, stop = net.matrix_slot[layer.index]
                    offset = net.kind_bounds[kind][0]
                    assert bool((lam[~net.mask[offset + start:offset + stop]] == 0).all())
    assert net.shrunk and int(net.mask.sum()) == 2 * n
    assert sum(hm.rank_pattern(model).values()) == 2 * n
    with torch.no_grad():
        for layer in hm.adapter_layers(model).values():
            assert layer.factors()[1].numel() == layer.rank  # final: only kept components are generated


def test_shrinking_after_the_final_allocation_keeps_the_function():
    model = hm.inject(tiny_model("bert"), hm.HyperAdaLoRAConfig(init_r=4, target_r=2, total_steps=4, **SMALL))
    net = _net(model)
    with torch.no_grad():
        for head in net.scalar_heads:
            head.weight.normal_(std=0.1)
        net.mask.copy_(torch.rand(net.mask.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    net.invalidate()
    inputs = sample_inputs()
    masked = model_output(model, inputs)
    saved = {name: layer.adapter_tensors() for name, layer in hm.adapter_layers(model).items()}
    net.shrink()
    torch.testing.assert_close(model_output(model, inputs), masked, rtol=1e-6, atol=1e-6)
    for name, layer in hm.adapter_layers(model).items():
        for key, value in layer.adapter_tensors().items():
            torch.testing.assert_close(value, saved[name][key], rtol=1e-6, atol=1e-7)


def test_orthogonality_loss_equals_the_per_matrix_formula():
    model = hm.inject(tiny_model("gpt2"), hm.HyperAdaLoRAConfig(init_r=3, target_r=2, orth_reg_weight=0.5, **SMALL))
    net = _net(model)
    with torch.no_grad():
        net.mask[::4] = False  # masked components are still regularised (as in AdaLoRA)
    net.invalidate()
    layers = list(hm.adapter_layers(model).values())
    eye = torch.eye(3)
    expected = 0
    for index in range(len(layers)):
        P, Q, _lam = net.factors(index)
        # AdaLoRA's (PEFT's) form: unsquared Frobenius norms, averaged over the 2n matrices
        expected = expected + torch.norm(P.T @ P - eye, p="fro") + torch.norm(Q @ Q.T - eye, p="fro")
    torch.testing.assert_close(hm.regularization_loss(model), 0.5 * expected / (2 * len(layers)))


def test_resume_from_a_mid_schedule_checkpoint(tmp_path):
    base = save_tiny("llama", tmp_path / "base")
    config = hm.HyperAdaLoRAConfig(init_r=4, target_r=2, tinit=0, tfinal=2, delta_t=1, total_steps=10, **SMALL)
    model = hm.inject(load_tiny("llama", base), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, 5):
        _step(model, generator)
        optimizer.step()
        hm.allocate_ranks(model, step)
        optimizer.zero_grad()
    pattern = hm.rank_pattern(model)
    hm.save_adapter(model, tmp_path / "adapter", base_model=base)
    resumed = hm.load_adapter(load_tiny("llama", base), tmp_path / "adapter")
    assert hm.rank_pattern(resumed) == pattern
    torch.testing.assert_close(_net(resumed).mask, _net(model).mask)
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    resumed.train()
    for step in range(5, 11):
        _step(resumed, generator)
        optimizer.step()
        hm.allocate_ranks(resumed, step)
        optimizer.zero_grad()
    assert sum(hm.rank_pattern(resumed).values()) == 2 * len(pattern)


def test_loading_checks_the_hypernetwork_against_the_saved_factors(tmp_path):
    base = save_tiny("bert", tmp_path / "base")
    model = hm.inject(load_tiny("bert", base), hm.HyperAdaLoRAConfig(init_r=3, target_r=2, **SMALL))
    with torch.no_grad():
        for head in _net(model).scalar_heads:
            head.weight.normal_(std=0.1)
    hm.save_adapter(model, tmp_path / "adapter", base_model=base)
    # what was trained is the hypernetwork, not the materialised factors saved beside it
    assert hm.inspect_adapter(tmp_path / "adapter")["trainable_parameters"] == hm.trainable_parameters(model)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("::hyperadalora.P"))
    tampered = dict(tensors)
    tampered[key] = tensors[key] + 0.5
    save_file(tampered, str(weights))
    with pytest.raises(hm.CheckpointError, match="does not reproduce the saved .*hypermerge fold still works"):
        hm.load_adapter(load_tiny("bert", base), tmp_path / "adapter")
    save_file({k: v for k, v in tensors.items() if not k.startswith("hyperadalora::")}, str(weights))
    with pytest.raises(hm.CheckpointError, match="no hyperadalora hypernetwork"):
        hm.load_adapter(load_tiny("bert", base), tmp_path / "adapter")
    # fold needs only the materialised factors
    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "folded", progress=False)
    folded = load_tiny("bert", tmp_path / "folded")
    assert relative_error(model_output(folded, sample_inputs()), model_output(model, sample_inputs())) <= 1e-5


@pytest.mark.parametrize("method", ["hyperadalora", "hyperlora"])
def test_only_the_hypernetwork_trains_and_its_size_is_the_documented_formula(method):
    model = tiny_model("llama")
    if method == "hyperadalora":
        config = hm.HyperAdaLoRAConfig(init_r=4, target_r=2, hyper_dim=16, hyper_depth=2, hyper_heads=2)
    else:
        config = hm.HyperLoRAConfig(r=4, hyper_dim=16, hyper_depth=2, hyper_heads=2)
    hm.inject(model, config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(f"{method}_hypernetwork.") for n in trainable)
    specs = [matrix_spec(name, layer.out_features, layer.in_features) for name, layer in hm.adapter_layers(model).items()]
    formula = parameter_count_formula(specs, 4, 16, 2, scalar=method == "hyperadalora",
                                      matrix_rank=config.hyper_matrix_rank if method == "hyperadalora" else 0)
    assert hm.trainable_parameters(model) == formula["total"]
    assert len({s.kind for s in specs}) == 7 and len({s.layer for s in specs}) == 2


def test_minilm_sized_hypernetwork_matches_the_documented_count():
    """all-MiniLM-L6-v2: 6 blocks x (query, key, value, attention.output.dense 384x384,
    intermediate.dense 1536x384, output.dense 384x1536)."""
    shapes = {"attention.self.query": (384, 384), "attention.self.key": (384, 384),
              "attention.self.value": (384, 384), "attention.output.dense": (384, 384),
              "intermediate.dense": (1536, 384), "output.dense": (384, 1536)}
    specs = [matrix_spec(f"encoder.layer.{i}.{name}.weight", *shape) for i in range(6) for name, shape in shapes.items()]
    assert parameter_count_formula(specs, 12, 64, 2, scalar=True)["total"] == 539_008
    # the default per-matrix correction of rank 4: 4 x (2·64 + out + in) per matrix
    assert parameter_count_formula(specs, 12, 64, 2, scalar=True, matrix_rank=4)["total"] == 723_328


def test_hyper_configs_validate_their_sizes():
    with pytest.raises(hm.ConfigError, match=r"hyper_dim \(30\) must be divisible by hyper_heads \(4\)"):
        hm.HyperAdaLoRAConfig(hyper_dim=30)
    with pytest.raises(hm.ConfigError, match="hyper_depth must be a non-negative integer"):
        hm.HyperLoRAConfig(hyper_depth=-1)


def test_hyperlora_trains(tmp_path):
    model = hm.inject(tiny_model("llama"), hm.HyperLoRAConfig(r=4, alpha=8, **SMALL))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_a_model_mid_step_can_be_deep_copied():
    import copy

    model = hm.inject(tiny_model("llama"), hm.HyperAdaLoRAConfig(init_r=3, target_r=2, **SMALL))
    model.train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss  # a live graph in the cache
    twin = copy.deepcopy(model)
    model.eval(), twin.eval()
    assert loss.requires_grad
    torch.testing.assert_close(model_output(twin, sample_inputs()), model_output(model, sample_inputs()))
    assert _net(twin) is hm.adapter_layers(twin)[next(iter(hm.adapter_layers(twin)))].hypernetwork


@pytest.mark.parametrize("lambda_init", ["offset", "zero"])
def test_lambda_offset_starts_as_the_identity_and_lets_the_task_gradient_reach_the_encoder(lambda_init):
    base = tiny_model("bert")
    expected = model_output(base, sample_inputs())
    model = hm.inject(base, hm.HyperAdaLoRAConfig(init_r=4, target_r=2, hyper_lambda_init=lambda_init, **SMALL))
    torch.testing.assert_close(model_output(model, sample_inputs()), expected, rtol=0, atol=0)
    net = _net(model)
    model.train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()  # the task loss alone
    reaches = float(net.tokens.grad.abs().sum()) > 0 and float(net.blocks[0].qkv.weight.grad.abs().sum()) > 0
    assert reaches == (lambda_init == "offset")
    assert float(net.scalar_heads[0].weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("reset", [True, False])
def test_a_pruned_lambda_restarts_at_zero_as_in_adalora(reset):
    model = hm.inject(tiny_model("llama"), hm.HyperAdaLoRAConfig(init_r=4, target_r=2, tinit=0, tfinal=3, delta_t=1,
                                                                 total_steps=8, hyper_prune_reset=reset, **SMALL))
    net = _net(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, 4):
        _step(model, generator)
        optimizer.step()
        hm.allocate_ranks(model, step)
        optimizer.zero_grad()
    with torch.no_grad():
        gen = net.generated()
        behind_mask = torch.cat([raw[~keep] for raw, keep in zip(gen.raw_scalars, net.kind_masks(), strict=True)])
    assert behind_mask.numel() > 0
    # λ of a pruned component (before the mask): 0 right after the masking with the reset, its
    # generated value drifting on behind the mask without it
    assert (float(behind_mask.abs().max()) < 1e-6) == reset


def test_the_hypernetwork_trains_at_its_learning_rate_multiple():
    from hypermerge.training.trainer import apply_lr_multipliers

    model = hm.inject(tiny_model("bert"), hm.HyperAdaLoRAConfig(init_r=4, target_r=2, hyper_lr_multiplier=3.0,
                                                                modules_to_save=["classifier"], **SMALL))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trainable, "weight_decay": 0.0}], lr=1e-3)
    apply_lr_multipliers(optimizer, model)
    net_ids = {id(p) for p in _net(model).parameters()}
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert by_lr == {1e-3: {id(p) for p in model.classifier.parameters()}, 3e-3: net_ids}
