"""lora_lightning.fused: which layers get a fused path (by structure and wiring, never by name), the same
gradients as the per-layer path, one info line for what was not fused, and clean fallbacks."""

from __future__ import annotations

import copy
import functools
import io
import logging
import pickle
import sys
import types
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_lightning import (
    AdapterSpec,
    LoRAConfig,
    LoRALinear,
    adapter_parameters,
    adapter_state_dict,
    fused,
    inject_lora,
    merge_lora,
    set_active_adapter,
    unload_lora,
)
from lora_lightning.functional import MLPBuffers
from lora_lightning.fused import (
    fold_gated_mlps,
    fused_wiring,
    install_fused_paths,
    remove_fused_paths,
    restore_fused_wiring,
)
from tests.helpers.models import InputKeepingRMSNorm, _rms_norm, keep_norm_inputs, make_llama


@pytest.fixture
def info_lines():
    """The info lines the library logs through Lightning's rank-zero logger."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = Collect(level=logging.INFO)
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, int]:
    """Count the calls of the fused nodes ``names`` that `lora_lightning.fused` makes."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(fused, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(fused, name, counted)
    return calls


def adapted_llama(dropout: float = 0.0, dtype: torch.dtype = torch.float32, **config) -> nn.Module:
    model = make_llama().to(dtype)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, **config))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for param in adapter_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.train()


TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def step_grads(
    model: nn.Module, steps: int = 2, tokens: torch.Tensor = TOKENS
) -> tuple[list[float], list[torch.Tensor]]:
    """Losses of ``steps`` forward/backward passes (the first one is where shared inputs are seen) and the adapter
    gradients and input-embedding gradient of the last."""
    losses = []
    embeddings = model.get_input_embeddings()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        embeddings.weight.requires_grad_(True)
        torch.manual_seed(1)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.item())
    return losses, [embeddings.weight.grad, *(p.grad for p in adapter_parameters(model))]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_paths_give_the_per_layer_path_s_gradients(dropout, info_lines, monkeypatch):
    calls = count_calls(monkeypatch, "lora_shared_input", "lora_gated_mlp")
    plain_losses, plain = step_grads(adapted_llama(dropout))
    model = adapted_llama(dropout)
    report = install_fused_paths(model)
    assert report.gated_mlps == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert report.shared_input_parents == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert report.not_fused == {}
    losses, fused_grads = step_grads(model)
    assert calls == {
        "lora_shared_input": 2,
        "lora_gated_mlp": 4,
    }  # q/k/v share from the second forward on; MLPs from the first
    if dropout:  # one mask per shared input instead of one per adapter: same distribution, other draws
        assert all(g is not None and torch.isfinite(g).all() for g in fused_grads)
        return
    assert losses == pytest.approx(plain_losses, rel=1e-6)
    for got, want in zip(fused_grads, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any("q_proj+k_proj+v_proj x2" in line and "o_proj x2" in line for line in info_lines)


def test_bf16_fused_gradients_match_the_per_layer_path():
    """In bf16 the fused nodes round differently (the folded factors are summed inside the base GEMMs), so both
    paths are held against the fp32 gradients: the fused path is as close to them as the per-layer path."""
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    _, exact = step_grads(adapted_llama(), tokens=tokens)
    _, plain = step_grads(adapted_llama(dtype=torch.bfloat16), tokens=tokens)
    model = adapted_llama(dtype=torch.bfloat16)
    install_fused_paths(model)
    _, fused_grads = step_grads(model, tokens=tokens)

    def errors(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(
            [(g.float() - r.float()).norm() / r.float().norm() for g, r in zip(grads, reference, strict=True)]
        )

    assert errors(fused_grads, exact).mean() <= 1.2 * errors(plain, exact).mean()
    assert errors(fused_grads, plain).max() <= 3e-2


@pytest.mark.parametrize("norms", ["hf", "input-keeping", "noisy"])
def test_nodes_keep_the_norm_s_input_for_their_own_where_the_norm_keeps_it_and_gives_the_same_bits(norms):
    """Hugging Face's norm keeps an fp32 copy, so the nodes keep the norm's output; a norm whose node keeps its
    input (Liger's) lets them keep that instead; a norm that draws noise cannot be run again."""

    def llama() -> nn.Module:
        model = adapted_llama()
        return model if norms == "hf" else keep_norm_inputs(model, noise=norms == "noisy")

    _, want = step_grads(llama())
    model = llama()
    install_fused_paths(model)
    _, got = step_grads(model)
    if norms != "noisy":
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    outputs: dict[str, torch.Tensor] = {}  # held, so that no saved tensor reuses their memory
    for name, module in model.named_modules():
        if name.endswith("layernorm"):
            module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    saved: set[int] = set()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.add(t.untyped_storage().data_ptr()) or t, lambda t: t
    ):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    assert len(outputs) == 4
    kept = {name for name, out in outputs.items() if out.untyped_storage().data_ptr() in saved}
    assert kept == (set() if norms == "input-keeping" else set(outputs))


def test_a_norm_output_or_input_changed_in_place_is_no_longer_produced_by_it():
    norm = InputKeepingRMSNorm(torch.ones(8), 1e-6)
    producers = fused.InputProducers()
    producers.watch([norm])
    hidden = torch.randn(3, 8, requires_grad=True) * 1.0
    x = norm(hidden)
    producer = producers.of(x)
    assert producer is not None and producer.source is hidden and torch.equal(producer.fn(producer.source), x)
    assert producer.fn.probed is None  # on the CPU the module's forward runs again (the kernel is CUDA's)
    assert producers.of(x.clone()) is None
    x.mul_(2.0)
    assert producers.of(x) is None
    x = norm(hidden)
    hidden.add_(1.0)
    assert producers.of(x) is None
    producers.remove()
    assert producers.of(norm(hidden)) is None


@pytest.fixture
def stand_in_norm_kernel(monkeypatch):
    """`norm_triton.rms_norm` on the CPU: the helper norm's own math (so the probes pass), counting its calls."""
    calls = []

    def rms_norm(x, weight, eps, offset=0.0):
        calls.append(x.shape)
        return _rms_norm(x, weight + offset, eps)

    monkeypatch.setitem(sys.modules, "lora_lightning.norm_triton", types.SimpleNamespace(rms_norm=rms_norm))
    monkeypatch.setattr(fused, "triton_applies", lambda t: True)
    return calls


def test_a_norm_reruns_as_the_kernel_only_while_it_is_as_probed(stand_in_norm_kernel):
    norm = InputKeepingRMSNorm(torch.randn(8), 1e-6)
    producers = fused.InputProducers()
    producers.watch([norm])
    hidden = torch.randn(3, 8, requires_grad=True)
    x = norm(hidden)
    rerun = producers.of(x).fn
    assert stand_in_norm_kernel == [(64, 8), (32768, 8)]  # probed at the row counts where kernels may differ
    assert torch.equal(rerun(hidden), x) and len(stand_in_norm_kernel) == 3  # the kernel ran
    norm.eps = 0.5  # the kernel would use the probed eps: the module's forward runs instead
    assert torch.equal(rerun(hidden), norm(hidden)) and len(stand_in_norm_kernel) == 3
    norm.eps = 1e-6
    norm.forward = lambda h: 2 * InputKeepingRMSNorm.forward(norm, h)  # patched after the probe
    assert torch.equal(rerun(hidden), 2 * x) and len(stand_in_norm_kernel) == 3


def test_a_norm_with_other_bits_than_the_kernel_reruns_its_own_forward(stand_in_norm_kernel):
    norm = InputKeepingRMSNorm(torch.randn(8), 1e-6)
    norm.offset = 1.0  # the kernel adds it to the weight, the module does not: the probe's bits differ
    rerun = fused._rerun(norm, torch.randn(3, 8))
    assert rerun.probed is None and torch.equal(rerun(torch.ones(2, 8)), norm(torch.ones(2, 8)))
    assert len(stand_in_norm_kernel) == 1  # one probe told


def test_producers_pickled_by_an_earlier_version_load_and_probe_again(monkeypatch):
    norm = InputKeepingRMSNorm(torch.ones(8), 1e-6)
    fused.InputProducers().watch([norm])
    earlier = fused.InputProducers.__getstate__

    def as_before(self):  # the version before this one pickled its probe results as `_verdicts`
        state = earlier(self)
        del state["_reruns"]
        return {**state, "_verdicts": {}}

    monkeypatch.setattr(fused.InputProducers, "__getstate__", as_before)
    loaded = pickle.loads(pickle.dumps(norm))
    monkeypatch.undo()
    producers = next(iter(loaded._forward_hooks.values())).__self__
    hidden = torch.randn(3, 8, requires_grad=True)
    assert producers.of(loaded(hidden)) is not None and not hasattr(producers, "_verdicts")


def test_a_model_whose_nodes_keep_norm_inputs_pickles_whole_and_trains_on():
    model = keep_norm_inputs(adapted_llama())
    install_fused_paths(model)
    _, want = step_grads(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the producers' weak references are left out
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    _, got = step_grads(loaded)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_state_dict_and_adapter_keys_are_unchanged():
    model = adapted_llama()
    keys, adapter_keys = list(model.state_dict()), list(adapter_state_dict(model))
    install_fused_paths(model)
    step_grads(model)
    assert list(model.state_dict()) == keys and list(adapter_state_dict(model)) == adapter_keys


def test_remove_puts_every_layer_back_on_its_own_path():
    model = adapted_llama()
    mlp, attention = model.model.layers[0].mlp, model.model.layers[0].self_attn
    hooks = (len(attention._forward_pre_hooks), len(attention._forward_hooks))
    install_fused_paths(model)
    assert "forward" in mlp.__dict__ and attention.q_proj.input_group is not None
    remove_fused_paths(model)
    assert "forward" not in mlp.__dict__ and attention.q_proj.input_group is None
    assert (len(attention._forward_pre_hooks), len(attention._forward_hooks)) == hooks
    install_fused_paths(model)
    install_fused_paths(model)  # a second install starts over, it does not stack
    assert len(attention._forward_pre_hooks) == hooks[0] + 1


def test_mlp_weights_live_beside_their_factors_until_removed():
    """The fused MLP keeps its frozen weights in buffers beside the factors (one GEMM applies both); the values and
    the state_dict stay the user's, and removal gives each weight its own storage back."""
    model = adapted_llama()
    mlp = model.model.layers[0].mlp
    weights = {name: w.detach().clone() for name, w in model.state_dict().items()}
    install_fused_paths(model)
    step_grads(model)
    buffers = mlp.__dict__["_lora_fused_paths"].mlp.buffers
    gate = mlp.gate_proj.base_layer.weight
    assert gate.data_ptr() == buffers.gate.data_ptr() and not gate.is_contiguous()
    assert mlp.down_proj.base_layer.weight.data_ptr() == buffers.down.data_ptr()
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    remove_fused_paths(model)
    for role in ("gate_proj", "up_proj", "down_proj"):
        weight = getattr(mlp, role).base_layer.weight
        assert weight.is_contiguous() and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.parametrize("finish", [merge_lora, unload_lora])
def test_merging_or_unloading_takes_the_fused_paths_off(finish):
    model = adapted_llama()
    install_fused_paths(model)
    step_grads(model)
    finish(model)
    assert not fused.fused_paths_installed(model)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert module.weight.is_contiguous(), module
            assert module.weight.untyped_storage().nbytes() == module.weight.numel() * module.weight.element_size()


def two_adapter_llamas(name: str, config: LoRAConfig) -> tuple[nn.Module, nn.Module]:
    """Two equal tiny Llamas with adapter ``name`` beside "default", every factor drawn from its own seed."""
    models = adapted_llama(), adapted_llama()
    for model in models:
        inject_lora(model, config, adapter_name=name)
        with torch.no_grad():
            for seed, param in enumerate(adapter_parameters(model)):
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return models


def test_an_mlp_folds_anew_for_another_rank_or_a_replaced_weight():
    model, reference = two_adapter_llamas("small", LoRAConfig(r=2, alpha=3))
    install_fused_paths(model)
    for name in ("default", "small", "default"):
        for m in (model, reference):
            set_active_adapter(m, name)
        torch.testing.assert_close(step_grads(model)[1], step_grads(reference)[1], rtol=1e-5, atol=1e-6)
    up = torch.randn_like(model.model.layers[1].mlp.up_proj.base_layer.weight)
    for m in (model, reference):
        m.model.layers[1].mlp.up_proj.base_layer.weight = nn.Parameter(up.clone(), requires_grad=False)
    torch.testing.assert_close(step_grads(model)[1], step_grads(reference)[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("update", ["sub_", "fused AdamW"])
def test_factors_changed_in_place_reach_the_next_forward(update):
    """An optimizer step changes A and B in place: the next forward writes them into the MLP's buffers again.
    A fused AdamW step leaves the tensors' in-place version counters as they were."""
    model, reference = adapted_llama(), adapted_llama()
    install_fused_paths(model)
    optimizers = [torch.optim.AdamW(adapter_parameters(m), lr=0.05, fused=True) for m in (model, reference)]
    for _ in range(2):
        step_grads(model, steps=1)
        step_grads(reference, steps=1)
        for m, optimizer in zip((model, reference), optimizers, strict=True):
            if update == "fused AdamW":
                optimizer.step()
                continue
            with torch.no_grad():
                for param in adapter_parameters(m):
                    param.sub_(0.5 * param.grad)
        torch.testing.assert_close(step_grads(model)[1], step_grads(reference)[1], rtol=1e-5, atol=1e-6)


def test_forwards_of_two_adapters_before_one_backward_get_their_own_factors():
    """Backward writes its own factors into the buffers again: a second forward may have written others."""

    def grads(model: nn.Module) -> list[torch.Tensor]:
        losses = []
        for name in ("default", "other"):
            set_active_adapter(model, name)
            losses.append(model(input_ids=TOKENS, labels=TOKENS).loss)
        params = [p for p in adapter_parameters(model) if p.requires_grad]
        return list(torch.autograd.grad(losses[0] + 2 * losses[1], params, allow_unused=True))

    model, reference = two_adapter_llamas("other", LoRAConfig(r=4, alpha=8))
    for m in (model, reference):
        for param in adapter_parameters(m):
            param.requires_grad_(True)
    install_fused_paths(model)
    for got, want in zip(grads(model), grads(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_deepcopy_computes_with_its_own_layers():
    model = adapted_llama()
    plain = copy.deepcopy(model)
    install_fused_paths(model)
    step_grads(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for copied in (clone, plain):
            for param in adapter_parameters(copied):
                param.mul_(3)
    torch.testing.assert_close(clone(input_ids=TOKENS).logits, plain(input_ids=TOKENS).logits)
    assert "forward" in clone.model.layers[0].mlp.__dict__  # the clone runs its own fused paths


class SwappedMLP(nn.Module):
    """Three adapted layers and an activation, but not ``down(act(gate(x)) * up(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) + self.up(x))


class GatedMLP(SwappedMLP):
    """Gated, with the roles under other names than Llama's and in another order of definition."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x) * self.act(self.gate(x)))


class SplitInputs(nn.Module):
    """q/k/v-like siblings fed different tensors (cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        memory = x if memory is None else memory
        return self.q(x) + self.k(memory) * self.v(memory)


def adapted(factory: type[nn.Module], **spec) -> nn.Module:
    torch.manual_seed(0)
    module = factory()
    inject_lora(module, LoRAConfig(r=2, alpha=4, target_modules=".*(gate|up|down|q|k|v)", **spec))
    with torch.no_grad():
        for param in adapter_parameters(module):
            param.normal_(std=0.2)
    return module.train()


def test_detection_is_by_wiring_not_names(info_lines):
    assert install_fused_paths(adapted(GatedMLP)).gated_mlps == [""]
    report = install_fused_paths(adapted(SwappedMLP))
    assert report.gated_mlps == []
    assert report.not_fused == {
        "": "its forward is not down(act(gate(x)) * up(x))",
        "down": "no sibling of its input width",
    }
    assert sum("Not fused: the model (its forward is not down" in line for line in info_lines) == 1


def test_a_swapped_mlp_keeps_its_own_forward_and_gradients():
    x = torch.randn(3, 8, requires_grad=True)
    plain, fused_mlp = adapted(SwappedMLP), adapted(SwappedMLP)
    install_fused_paths(fused_mlp)
    for _ in range(2):  # gate and up share their input from the second forward on
        got, want = fused_mlp(x), plain(x)
        torch.testing.assert_close(got, want)
        grads = torch.autograd.grad(got.square().sum(), [x, *adapter_parameters(fused_mlp)])
        expected = torch.autograd.grad(want.square().sum(), [x, *adapter_parameters(plain)])
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e)


def test_siblings_fed_other_tensors_never_share(monkeypatch):
    calls = count_calls(monkeypatch, "lora_shared_input")
    module, reference = adapted(SplitInputs), adapted(SplitInputs)
    install_fused_paths(module)
    x, memory = torch.randn(4, 8), torch.randn(4, 8)
    for _ in range(2):
        torch.testing.assert_close(module(x, memory), reference(x, memory))
    assert {n for n, layer in module.named_children() if layer.input_group.sets.get(layer)} == {"k", "v"}
    assert calls == {"lora_shared_input": 1}


def test_the_wiring_a_forward_settled_restores_so_a_resumed_model_fuses_from_its_first_step(monkeypatch):
    calls = count_calls(monkeypatch, "lora_shared_input")
    module = adapted(SplitInputs)
    install_fused_paths(module)
    assert fused_wiring(module) == {}  # nothing seen yet
    x, memory = torch.randn(4, 8), torch.randn(4, 8)
    module(x, memory)
    wiring = fused_wiring(module)
    assert wiring == {"": [["k", "v"]]}
    resumed, reference = adapted(SplitInputs), adapted(SplitInputs)
    install_fused_paths(resumed)
    restore_fused_wiring(resumed, wiring)
    torch.testing.assert_close(resumed(x, memory), reference(x, memory))
    assert calls == {"lora_shared_input": 1}  # the first forward already ran k+v as one node
    assert fused_wiring(resumed) == wiring
    for malformed in (["k", "v"], {"": "kv"}, {"": ["kv"]}):
        restore_fused_wiring(resumed, malformed)  # ignored: nothing settles from it
    assert fused_wiring(resumed) == wiring
    restore_fused_wiring(resumed, {"": []})  # recorded as sharing nothing: never shares
    resumed(x, memory)
    assert calls == {"lora_shared_input": 1}


def test_a_changed_wiring_turns_sharing_off_with_one_info_line(info_lines):
    module, reference = adapted(SplitInputs), adapted(SplitInputs)
    install_fused_paths(module)
    x, memory = torch.randn(4, 8), torch.randn(4, 8)
    module(x)  # first forward: q, k and v all get x
    torch.testing.assert_close(module(x), reference(x))
    assert len(module.q.input_group.sets) == 3
    torch.testing.assert_close(module(x, memory), reference(x, memory))  # k and v now get another tensor
    torch.testing.assert_close(module(x, memory), reference(x, memory))
    assert not module.q.input_group.sets
    assert sum("q+k+v of the model run their own nodes from now on (k got another" in line for line in info_lines) == 1


def test_dora_and_gpt2_conv1d_layers_keep_their_own_path():
    model = adapted_llama(use_dora=True)
    report = install_fused_paths(model)
    assert report.gated_mlps == [] and report.shared_input_parents == []
    assert set(report.not_fused.values()) == {"DoRA"} and len(report.not_fused) == 14
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    inject_lora(gpt2, LoRAConfig(r=2, target_modules=["c_attn", "c_fc", "c_proj"]))
    assert set(install_fused_paths(gpt2).not_fused.values()) == {"Conv1D base"}


@pytest.mark.parametrize("held", ["base", "factor"])
def test_weights_held_as_plain_attributes_take_the_module_path(held):
    """FSDP1 (flat parameters) gives each layer views of its weights as plain attributes, not parameters."""
    model = adapted_llama()
    reference = copy.deepcopy(model)
    install_fused_paths(model)
    layers = [model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.down_proj]
    for layer in layers:
        owner = layer.base_layer if held == "base" else layer.lora_B["default"]
        weight = owner._parameters.pop("weight")
        owner.weight = weight.detach().clone().requires_grad_(weight.requires_grad)
        assert layer.fused_operands(TOKENS.float()) is None
    for _ in range(2):
        torch.testing.assert_close(model(input_ids=TOKENS).logits, reference(input_ids=TOKENS).logits)


def test_adapters_in_another_dtype_than_the_base_take_the_module_path():
    """fp32 adapters on a bf16 base (as PEFT keeps them by default): the nodes would multiply mixed dtypes."""
    model = adapted_llama().to(torch.bfloat16)
    for param in adapter_parameters(model):
        param.data = param.data.float()
    reference = copy.deepcopy(model)
    install_fused_paths(model)
    assert model.model.layers[0].mlp.down_proj.fused_operands(torch.zeros(1, 64, dtype=torch.bfloat16)) is None
    losses, grads = step_grads(model)
    want_losses, want = step_grads(reference)
    assert losses == want_losses
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_evaluation_without_autograd_runs_the_fused_paths(mode):
    model = adapted_llama()
    reference = copy.deepcopy(model)
    install_fused_paths(model)
    model.eval()
    reference.eval()
    with mode():
        for _ in range(2):  # the second forward runs the shared-input node
            torch.testing.assert_close(model(input_ids=TOKENS).logits, reference(input_ids=TOKENS).logits)
    assert model.model.layers[0].self_attn.q_proj.input_group.sets


def test_autocast_falls_back_to_the_module_path():
    model = adapted_llama()
    reference = copy.deepcopy(model)
    install_fused_paths(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step_grads(model)
        torch.testing.assert_close(model(input_ids=TOKENS).logits, reference(input_ids=TOKENS).logits)


def test_different_dropout_on_gate_and_up_falls_back():
    model = adapted_llama(dropout=0.1)
    mlp = model.model.layers[0].mlp
    mlp.up_proj.specs["default"] = AdapterSpec(r=4, alpha=8, dropout=0.2)
    install_fused_paths(model)
    x = torch.randn(2, 3, 32)
    assert mlp.__dict__["_lora_fused_paths"].mlp.run(mlp, x) is None
    mlp.eval()  # no dropout in eval: both are 0 and the node runs
    assert mlp.__dict__["_lora_fused_paths"].mlp.run(mlp, x) is not None


@pytest.mark.parametrize("norms", ["hf", "input-keeping"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_keeps_the_fused_gradients(dropout, norms):
    def llama() -> nn.Module:
        model = adapted_llama(dropout)
        return keep_norm_inputs(model) if norms == "input-keeping" else model

    model = llama()
    install_fused_paths(model)
    _, expected = step_grads(model)
    checkpointed = llama()
    install_fused_paths(checkpointed)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, got = step_grads(checkpointed)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.slow
def test_a_fused_decoder_block_compiles_fullgraph():
    model = adapted_llama()
    install_fused_paths(model)
    step_grads(model)  # the first forward settles the shared inputs
    block = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, requires_grad=True)
    block.eval()
    expected = block(x)
    compiled = torch.compile(block, fullgraph=True)  # any graph break raises
    actual = compiled(x)
    torch.testing.assert_close(actual, expected)
    actual.sum().backward()
    assert block.up_proj.lora_B["default"].weight.grad is not None
    layer = model.model.layers[1]
    hidden = torch.randn(2, 5, 32)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(5)[None])
    want = layer(hidden, position_embeddings=position_embeddings)
    got = torch.compile(layer, fullgraph=True)(hidden, position_embeddings=position_embeddings)
    torch.testing.assert_close(got, want)


def compiled_step(model: nn.Module) -> tuple[list[torch.Size], list[torch.Tensor]]:
    """The shapes a compiled forward saves for backward, and the adapter gradients of its backward."""
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    compiled = torch.compile(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    return saved, [p.grad for p in adapter_parameters(model)]


def gelu_mlps(model: nn.Module) -> nn.Module:
    """``model`` with GELU gates: its MLPs fuse, but a compiled one runs its module under the recompute policy
    rather than the SiLU custom op."""
    for layer in model.model.layers:
        layer.mlp.act_fn = nn.GELU()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_a_compiled_gated_mlp_keeps_gate_and_up_but_recomputes_their_product(act):
    """A SiLU MLP runs as the custom op, another under selective checkpointing: either way the compiled graph saves
    G and U but not act(G) * U, and gives the eager gradients."""
    model = adapted_llama() if act == "silu" else gelu_mlps(adapted_llama())
    _, eager = step_grads(copy.deepcopy(model), steps=1)
    module_path_saved, _ = compiled_step(copy.deepcopy(model))
    install_fused_paths(model)
    saved, grads = compiled_step(model)

    def intermediate_wide(shapes: list[torch.Size]) -> int:
        return sum(1 for s in shapes if s[-1:] == (64,) and s.numel() == TOKENS.numel() * 64)

    assert intermediate_wide(module_path_saved) == 3 * 2  # G, U and act(G) * U (down's input) in each of 2 MLPs
    assert intermediate_wide(saved) == 2 * 2
    for got, want in zip(grads, eager[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["eager backend", "graph break in the MLP"])
def test_a_compiled_gated_mlp_that_runs_eagerly_gives_the_eager_gradients(how):
    """Where the MLP's checkpointed region runs eagerly, the adapters' in-place updates must not trip it."""
    model = gelu_mlps(adapted_llama())
    _, eager = step_grads(copy.deepcopy(model), steps=1)
    install_fused_paths(model)
    backend = "inductor"
    if how == "eager backend":
        backend = "eager"
    else:
        for layer in model.model.layers:
            layer.mlp.up_proj.base_layer.register_forward_hook(lambda *_: torch._dynamo.graph_break())
    loss = torch.compile(model, backend=backend)(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    for got, want in zip((p.grad for p in adapter_parameters(model)), eager[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def graph_ops(module: nn.Module, *args: torch.Tensor) -> list[Any]:
    """The functions a fullgraph torch.compile of ``module`` calls (a recording backend; no Inductor)."""
    ops: list[Any] = []

    def recording(graph: torch.fx.GraphModule, example_inputs: list) -> Any:
        ops.extend(node.target for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    torch.compile(module, fullgraph=True, backend=recording)(*args)
    return ops


@pytest.mark.slow
def test_a_compiled_silu_mlp_is_one_custom_op_with_the_eager_node_s_output_and_gradients(monkeypatch):
    model = adapted_llama()
    install_fused_paths(model)
    fold_gated_mlps(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, requires_grad=True)
    params = [x, *(p for p in mlp.parameters() if p.requires_grad)]
    want_y = mlp(x)
    want = torch.autograd.grad(want_y.square().sum(), params)
    assert torch.ops.lora_lightning.gated_mlp.default in graph_ops(mlp, x)
    monkeypatch.setattr(MLPBuffers, "fold", lambda *args: pytest.fail("folded a copy: fold_gated_mlps folded"))
    y = torch.compile(mlp, fullgraph=True)(x)  # any graph break raises
    got = torch.autograd.grad(y.square().sum(), params)
    torch.testing.assert_close(y, want_y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.slow
def test_a_compiled_mlp_with_dropout_runs_its_module():
    """Masks drawn inside the opaque op would be drawn anew where compiled activation checkpointing reruns it."""
    model = adapted_llama(dropout=0.1)
    install_fused_paths(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, requires_grad=True)
    assert torch.ops.lora_lightning.gated_mlp.default not in graph_ops(mlp, x)
    torch.compile(mlp, fullgraph=True)(x).sum().backward()
    assert mlp.down_proj.lora_A["default"].weight.grad is not None


def count_shared_products(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of layers in each `functional.shared_factor_products` call that a trace makes."""
    sizes: list[int] = []
    original = fused.shared_factor_products

    def counted(x: torch.Tensor, layers: list) -> tuple[torch.Tensor, ...]:
        sizes.append(len(layers))
        return original(x, layers)

    monkeypatch.setattr(fused, "shared_factor_products", counted)
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("first", ["compiled", "eager"])
def test_compiled_siblings_share_one_factor_product_with_the_eager_gradients(first, monkeypatch):
    """Compiled from the first forward, q/k/v share the product their first call makes, and o_proj (another tensor)
    makes its own over every member; after an eager forward saw the wiring, only q/k/v take part. The gradients are
    the per-layer path's either way."""
    model = adapted_llama()
    _, want = step_grads(copy.deepcopy(model), steps=1)
    install_fused_paths(model)
    fold_gated_mlps(model)
    if first == "eager":
        step_grads(model, steps=1)
        model.zero_grad(set_to_none=True)
    sizes = count_shared_products(monkeypatch)
    loss = torch.compile(model, fullgraph=True)(input_ids=TOKENS, labels=TOKENS).loss  # any graph break raises
    loss.backward()
    assert sizes == ([4, 4] if first == "compiled" else [3]) * len(model.model.layers)
    got = [model.get_input_embeddings().weight.grad, *(p.grad for p in adapter_parameters(model))]
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_siblings_share_their_product_inside_activation_checkpointing():
    """Dynamo refuses state changed outside a checkpointed region (it would raise here); the shares travel on the
    tensor instead. The checkpointed graph splits one product of the three A factors."""
    model = adapted_llama()
    install_fused_paths(model)
    step_grads(model, steps=1)  # the wiring: q/k/v share
    model.zero_grad(set_to_none=True)
    layer = model.model.layers[0]
    hidden = torch.randn(2, 5, 32, requires_grad=True)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(5)[None])
    params = [hidden, *(p for p in layer.parameters() if p.requires_grad)]
    want = torch.autograd.grad(layer(hidden, position_embeddings=position_embeddings).square().sum(), params)
    splits: list[torch.fx.Node] = []

    def recording(graph: torch.fx.GraphModule, example_inputs: list) -> Any:
        for module in graph.modules():  # the checkpointed region is a submodule
            if isinstance(module, torch.fx.GraphModule):
                splits.extend(n for n in module.graph.nodes if n.op == "call_method" and n.target == "split")
        return graph.forward

    def checkpointed(x: torch.Tensor) -> torch.Tensor:
        return checkpoint(layer, x, position_embeddings=position_embeddings, use_reentrant=False)

    out = torch.compile(checkpointed, fullgraph=True, backend=recording)(hidden)
    got = torch.autograd.grad(out.square().sum(), params)
    assert [n.args[1] for n in splits] == [[4, 4, 4]]  # h = x [A_q; A_k; A_v]^T, split by rank
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_checkpointed_mlp_recomputed_after_another_forward_reruns_its_norm_as_its_forward_did():
    """Only the MLPs checkpointed, norms that keep their input outside (Liger's do), two forwards before one
    backward (two losses): the recomputation of the first forward must keep the norm's input as that forward did,
    though the norm has made another output since (else backward ran the norm on its own output)."""
    second = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(7))

    def grads(fused: bool) -> list[torch.Tensor]:
        model = keep_norm_inputs(adapted_llama())
        with torch.no_grad():  # weights far from 1: a norm run on its own output changes it
            for module in model.modules():
                if isinstance(module, InputKeepingRMSNorm):
                    module.weight.uniform_(0.5, 2.5)
        if fused:
            install_fused_paths(model)
        for layer in model.model.layers:
            layer.mlp.forward = functools.partial(checkpoint, layer.mlp.forward, use_reentrant=False)
        first = model(input_ids=TOKENS, labels=TOKENS).loss
        (first + model(input_ids=second, labels=second).loss).backward()
        return [p.grad for p in adapter_parameters(model)]

    for got, want in zip(grads(fused=True), grads(fused=False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_forwards_before_the_first_backward_under_checkpointing_recompute_as_they_ran(monkeypatch):
    """The first forward sees the wiring; a second before any backward must still run each layer's own node, as
    the recomputations of both in backward will (else they save other tensors than their forwards: an error).
    Sharing starts with the forward after that backward."""
    second = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(7))

    def grads(fused: bool) -> list[torch.Tensor]:
        model = adapted_llama()
        if fused:
            install_fused_paths(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        (model(input_ids=TOKENS, labels=TOKENS).loss + model(input_ids=second, labels=second).loss).backward()
        grads = [p.grad.clone() for p in adapter_parameters(model)]
        if fused:
            calls = count_calls(monkeypatch, "lora_shared_input")
            model(input_ids=TOKENS, labels=TOKENS).loss.backward()
            assert calls == {"lora_shared_input": 2 * len(model.model.layers)}  # forward, and its recomputation
        return grads

    for got, want in zip(grads(fused=True), grads(fused=False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class Heads(nn.Module):
    """Three siblings on one input; ``use`` names those a call runs."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor, use: tuple[str, ...]) -> torch.Tensor:
        return sum(getattr(self, name)(x).square().sum() for name in use)


@pytest.mark.slow
def test_compiled_shares_left_untaken_on_a_tensor_are_dropped_when_the_parent_returns():
    """A call that runs q alone on ``x`` leaves k's and v's shares; after an optimizer step changes ``A_k`` in
    place, a later call running k on the same ``x`` (also under no_grad, in eval) must not take the old one. Nothing
    of the group stays on the caller's tensor (it would pickle the modules)."""
    torch.manual_seed(0)
    reference = Heads()
    inject_lora(reference, LoRAConfig(r=2, alpha=4, target_modules=["q", "k", "v"]))
    with torch.no_grad():
        for p in adapter_parameters(reference):
            p.normal_()
    model = copy.deepcopy(reference)
    install_fused_paths(model)
    sizes: list[int] = []
    compiled = torch.compile(model, fullgraph=True, backend=recording_shared_products(sizes))
    x = torch.randn(3, 8)
    for use in [("q",), ("k",), ("q", "k", "v")]:
        with torch.no_grad():  # an optimizer step on every A
            for net in (model, reference):
                for p in adapter_parameters(net):
                    p.add_(0.5)
        for train, grad in [(True, True), (False, False)]:
            for net in (model, reference):
                net.train(train).zero_grad(set_to_none=True)
            with torch.set_grad_enabled(grad):
                got, want = compiled(x, use), reference(x, use)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            if grad:
                got.backward()
                want.backward()
                for g, w in zip(adapter_parameters(model), adapter_parameters(reference), strict=True):
                    got_grad, want_grad = (torch.zeros_like(w) if t is None else t for t in (g.grad, w.grad))
                    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)  # not run: A's is 0
            assert getattr(x, "_lora_shared_factor_products") is None  # noqa: B009
    assert sizes == [3] * 6  # each graph (3 uses, 2 modes) shares one product of the three A
    buffer = io.BytesIO()
    torch.save(x, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=True), x)


def recording_shared_products(sizes: list[int]) -> Any:
    """A backend that runs the graph as traced (aot_eager) and records the widths of the ``A`` products."""

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> Any:
        sizes.extend(len(n.args[1]) for n in graph.graph.nodes if n.op == "call_method" and n.target == "split")
        return torch._dynamo.backends.debugging.aot_eager(graph, example_inputs)

    return backend


def test_fold_gated_mlps_makes_the_weights_views_of_the_buffers_again_after_a_move():
    """Between a move and the next fold, the custom op would fold copies each call: it says so, naming the fix."""
    model = adapted_llama()
    install_fused_paths(model)
    mlp = model.model.layers[0].mlp
    weights = [layer.base_layer.weight for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    expected = [w.detach().clone() for w in weights]
    assert MLPBuffers._by_storage.get(weights[0].data_ptr()) is None  # installing folds nothing
    for _ in range(2):
        fold_gated_mlps(model)
        buffers = MLPBuffers._by_storage[weights[0].data_ptr()]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert buffers.holds(*weights) and buffers is MLPBuffers.holding(*weights, (4, 4, 4))
        assert all(torch.equal(w, e) for w, e in zip(weights, expected, strict=True))
        for w in weights:  # as a move to another device does
            w.data = w.data.clone()
        assert MLPBuffers._by_storage.get(weights[0].data_ptr()) is None
        with pytest.warns(UserWarning, match=r"folds copies.*fold_gated_mlps\(model\)"):
            MLPBuffers.holding(*weights, (4, 4, 4))


def test_fold_gated_mlps_leaves_sharded_weights_alone():
    """FSDP1 gives each layer a view of its flat parameter as a plain attribute; FSDP2 a DTensor (not folded by
    `fused_operands`' own checks): folding must neither fail nor copy them."""
    model = adapted_llama()
    install_fused_paths(model)
    base = model.model.layers[0].mlp.gate_proj.base_layer
    weight = base._parameters.pop("weight")
    base.weight = weight.detach().flatten()  # a 1-D view, as a flat parameter's shard is
    fold_gated_mlps(model)
    assert base.weight.dim() == 1 and base.weight.data_ptr() == weight.data_ptr()  # not replaced
    assert MLPBuffers._by_storage.get(model.model.layers[0].mlp.up_proj.base_layer.weight.data_ptr()) is None


def test_an_mlp_that_fsdp2_manages_runs_its_layers_own_nodes_and_folds_nothing(monkeypatch):
    """FSDP2 gathers an MLP's weights for each forward into memory of its own: folding them would keep a whole copy
    on every rank (and point FSDP's gathered parameters at it). In the callback's order (install, shard, fold as fit
    starts), with a one-rank gloo group standing in for FSDP2, nothing is folded and the gradients are the
    unsharded model's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, reference = adapted_llama(), adapted_llama()
    install_fused_paths(model)
    install_fused_paths(reference)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with monkeypatch.context() as patch:
            patch.setattr(MLPBuffers, "fold", lambda *args: pytest.fail("folded an MLP that FSDP manages"))
            fold_gated_mlps(model)
            losses, grads = step_grads(model)
        assert all(layer.mlp.__dict__["_lora_fused_paths"].mlp.buffers is None for layer in model.model.layers)
        want_losses, want_grads = step_grads(reference)
        assert losses == pytest.approx(want_losses, rel=1e-6)
        for got, want in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got.full_tensor(), want, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_a_layer_added_as_a_lone_child_is_reported():
    model = nn.Sequential(nn.Linear(4, 4))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    assert install_fused_paths(model).not_fused == {"0": "no sibling of its input width"}
    layer = LoRALinear(nn.Linear(4, 4), AdapterSpec(r=2, alpha=4))
    assert layer.input_group is None
