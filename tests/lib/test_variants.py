"""LoRA variants (rsLoRA, DoRA, gaussian/PiSSA/OLoRA initialisation, rank_pattern/alpha_pattern) against PEFT
itself, both ways: what we save PEFT loads to the same logits, and what PEFT saves we load to the same logits."""

from __future__ import annotations

import json
import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lora_lightning import (
    AdapterSpec,
    LoRAConfig,
    LoRAFinetuneCallback,
    LoRALinear,
    TargetError,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from lora_lightning.params import lora_layers
from lora_lightning.peft_format import CONFIG_NAME
from tests.helpers.adapters import perturb_adapters_
from tests.helpers.models import LlamaModule, make_llama, make_trainer, token_data

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
TARGETS = ["q_proj", "v_proj", "down_proj"]
PATTERNS = {"rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, "alpha_pattern": {"v_proj": 3}}
INIT_SEED = 123  # the RNG state both libraries start an adapter's initialisation from

# Our LoRAConfig keyword arguments of each variant; `peft_config` translates them for PEFT.
VARIANTS = {
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "pissa_niter": {"init": "pissa_niter_4"},
    "olora": {"init": "olora"},
    "patterns": PATTERNS,
    "all_at_once": {"use_dora": True, "use_rslora": True, "init": "pissa", **PATTERNS},
}


# ---------------------------------------------------------------------------------------------- helpers


def peft_config(**ours):
    """PEFT's LoraConfig for our `LoRAConfig` keyword arguments (r=4, alpha=8 on TARGETS unless given)."""
    names = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}
    values = {"r": 4, "alpha": 8, "target_modules": TARGETS, **ours}
    if values.get("init") == "kaiming":
        values["init"] = True
    return peft.LoraConfig(**{names.get(k, k): v for k, v in values.items()})


def our_config(**ours) -> LoRAConfig:
    return LoRAConfig(**{"r": 4, "alpha": 8, "target_modules": TARGETS, **ours})


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def assert_differs_from_base(out: torch.Tensor) -> None:
    assert (out - logits(make_llama(0))).abs().max() > 1e-3, "the adapter must change the output"


def peft_layer(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(f"base_model.model.{name}")


def seeded(build, seed: int = INIT_SEED):
    """``build()`` run from a fixed RNG state: randomised inits (gaussian, pissa_niter) then draw the same
    numbers in both libraries, which create the same factor layers in the same order."""
    torch.manual_seed(seed)
    return build()


# ------------------------------------------------------------------------------- PEFT as oracle, both ways


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_loads_our_adapter_to_the_same_logits(tmp_path, variant):
    ours = make_llama(0)
    seeded(lambda: inject_lora(ours, our_config(**VARIANTS[variant])))
    perturb_adapters_(ours).eval()
    expected = logits(ours)
    assert_differs_from_base(expected)
    path = save_adapter(ours, tmp_path / "ours")

    base = make_llama(0)  # the original base: PEFT re-runs a PiSSA/OLoRA init on it, as we do
    theirs = seeded(lambda: peft.PeftModel.from_pretrained(base, path)).eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)
    for name, layer in lora_layers(ours):
        their_layer = peft_layer(theirs, name)
        assert their_layer.r["default"] == layer.r and their_layer.scaling["default"] == pytest.approx(layer.scaling)
        assert their_layer.use_dora["default"] == layer.spec().use_dora
        torch.testing.assert_close(their_layer.base_layer.weight, layer.base_layer.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_we_load_peft_adapters_to_the_same_logits(tmp_path, variant):
    base = make_llama(0)
    theirs = seeded(lambda: peft.get_peft_model(base, peft_config(**VARIANTS[variant])))
    perturb_adapters_(theirs).eval()
    expected = logits(theirs)
    assert_differs_from_base(expected)
    theirs.save_pretrained(tmp_path / "peft")

    ours = make_llama(0)
    report = seeded(lambda: load_adapter(ours, tmp_path / "peft"))
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    assert len(report.targets) == 2 * len(TARGETS)
    for name, layer in lora_layers(ours):
        their_layer = peft_layer(theirs, name)
        assert layer.r == their_layer.r["default"] and layer.scaling == pytest.approx(their_layer.scaling["default"])
        for key, tensor in layer.adapter_tensors("default").items():  # lora_A.weight -> lora_A["default"].weight
            their = getattr(their_layer, key.split(".")[0])["default"]
            torch.testing.assert_close(tensor, their.weight, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ rsLoRA


def test_rslora_scales_by_the_square_root_of_each_layers_rank():
    model = make_llama(0)
    inject_lora(model, our_config(use_rslora=True, r=9, alpha=6, rank_pattern={"v_proj": 4}))
    for name, layer in lora_layers(model):
        expected = 6 / 2 if name.endswith("v_proj") else 6 / 3
        assert layer.scaling == pytest.approx(expected), name


# ----------------------------------------------------------------------------- initialisation at step 0


@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_every_init_leaves_the_model_unchanged_at_step_0(init, use_dora):
    model = make_llama(0)
    inject_lora(model, our_config(init=init, use_dora=use_dora))
    torch.testing.assert_close(logits(model), logits(make_llama(0)), rtol=1e-5, atol=1e-5)
    for _, layer in lora_layers(model):
        a, b = layer.factors("default")
        if init == "gaussian":
            assert torch.count_nonzero(b) == 0 and 0.15 < a.std().item() < 0.35  # A ~ N(0, 1/r), r = 4
        else:
            assert torch.linalg.matrix_rank(b.detach() @ a.detach()) == 4  # the top of W moved into the adapter


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_pissa_and_olora_match_peft_s_initialisation(init):
    """Same ``s B A`` and the same residual base weight ``W - s B A`` as PEFT's (factors may differ by the
    signs an SVD or QR chooses; ``B A`` may not). pissa_niter's randomised SVD agrees from the same RNG state."""
    ours = make_llama(0)
    seeded(lambda: inject_lora(ours, our_config(init=init, use_dora=True)))
    base = make_llama(0)
    theirs = seeded(lambda: peft.get_peft_model(base, peft_config(init=init, use_dora=True)))
    original = dict(make_llama(0).named_parameters())
    for name, layer in lora_layers(ours):
        their_layer = peft_layer(theirs, name)
        a, b = layer.factors("default")
        their_a, their_b = their_layer.lora_A["default"].weight, their_layer.lora_B["default"].weight
        torch.testing.assert_close(b @ a, their_b @ their_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.base_layer.weight, their_layer.base_layer.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            layer.lora_magnitude_vector["default"], their_layer.lora_magnitude_vector["default"].weight
        )
        rebuilt = layer.base_layer.weight + layer.scaling * (b @ a)
        torch.testing.assert_close(rebuilt, original[f"{name}.weight"], rtol=1e-5, atol=1e-6)
        if init == "pissa":  # B A is W's top-r singular part
            u, s, vh = torch.linalg.svd(original[f"{name}.weight"].detach(), full_matrices=False)
            top = (u[:, :4] * s[:4]) @ vh[:4]
            torch.testing.assert_close(layer.scaling * (b @ a), top, rtol=1e-4, atol=1e-6)
        if init == "olora":  # B has orthonormal columns
            torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=0, atol=1e-5)


def test_merge_lora_after_pissa_gives_the_adapted_model():
    model = make_llama(0)
    inject_lora(model, our_config(init="pissa"))
    perturb_adapters_(model).eval()
    expected = logits(model)
    torch.testing.assert_close(logits(merge_lora(model)), expected, rtol=1e-5, atol=1e-5)
    assert not list(lora_layers(model))


# ------------------------------------------------------------------------------------------------- DoRA


def test_dora_magnitude_starts_at_the_weight_norm_and_gets_gradients():
    model = make_llama(0)
    inject_lora(model, our_config(use_dora=True))
    layer = model.model.layers[0].self_attn.q_proj
    magnitude = layer.lora_magnitude_vector["default"]
    torch.testing.assert_close(magnitude, layer.base_layer.weight.norm(dim=1))
    assert magnitude.requires_grad and not layer.base_layer.weight.requires_grad
    perturb_adapters_(model)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    for _, lora in lora_layers(model):
        for key, tensor in lora.adapter_tensors("default").items():
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0, key
        assert lora.base_layer.weight.grad is None


def test_dora_gradients_match_peft_s(tmp_path):
    """Same adapter, same tokens, same loss: every adapter gradient equals PEFT's. DoRA's weight norm is
    detached (the paper's section 4.3, PEFT's code); dropping the detach changes A's gradient by ~10%, which only
    checking for non-zero gradients cannot see."""
    base = make_llama(0)
    theirs = seeded(lambda: peft.get_peft_model(base, peft_config(use_dora=True)))
    perturb_adapters_(theirs)
    ours = make_llama(0)
    theirs.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft", trainable=True)
    for model in (ours, theirs):
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    checked = 0
    for name, layer in lora_layers(ours):
        their_layer = peft_layer(theirs, name)
        for key, tensor in layer.adapter_tensors("default").items():
            their = getattr(their_layer, key.split(".")[0])["default"]
            their = their if isinstance(their, nn.Parameter) else their.weight
            torch.testing.assert_close(tensor.grad, their.grad, rtol=1e-4, atol=1e-7, msg=f"{name}.{key}")
            checked += 1
    assert checked == 3 * 2 * len(TARGETS)  # A, B and the magnitude of 3 layers in each of 2 blocks


def test_dora_forward_is_the_magnitude_times_the_normalised_adapted_weight():
    layer = perturb_adapters_(LoRALinear(nn.Linear(12, 20), AdapterSpec(r=4, alpha=8, use_dora=True)))
    x = torch.randn(5, 12)
    weight = layer.base_layer.weight + layer.delta_weight()
    weight = layer.lora_magnitude_vector["default"][:, None] * weight / weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ weight.T + layer.base_layer.bias)


def test_dora_merge_and_unmerge_round_trip():
    model = make_llama(0)
    inject_lora(model, our_config(use_dora=True, use_rslora=True, **PATTERNS))
    perturb_adapters_(model).eval()
    expected = logits(model)
    bases = {name: layer.base_layer.weight.clone() for name, layer in lora_layers(model)}
    for _, layer in lora_layers(model):
        layer.merge()
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(layer.base_layer.weight, bases[name]) for name, layer in lora_layers(model))
    for name, layer in lora_layers(model):
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, bases[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(merge_lora(model)), expected, rtol=1e-5, atol=1e-5)


class LossesModule(LlamaModule):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


class GradientsSeen(Callback):
    """The names of the parameters that hold a gradient at each optimizer step."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.names |= {n for n, p in pl_module.named_parameters() if p.grad is not None}


def test_dora_fine_tune_through_lightning_trains_only_adapters_and_magnitudes(tmp_path):
    module = LossesModule()
    seen = GradientsSeen()
    config = our_config(use_dora=True, init="pissa", target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[LoRAFinetuneCallback(config), seen])
    trainer.fit(module, token_data())
    assert module.losses[-1] < module.losses[0]
    adapter_keys = {
        f"model.{name}.{layer.state_key('default', key)}"
        for name, layer in lora_layers(module.model)
        for key in layer.adapter_tensors("default")
    }
    assert seen.names == adapter_keys
    assert sum("lora_magnitude_vector" in key for key in seen.names) == 4
    initial = make_llama(0).model.layers[0].self_attn.q_proj.weight.norm(dim=1)  # DoRA's start, PiSSA or not
    assert not torch.allclose(module.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"], initial)

    model = module.model.eval()
    expected = logits(model)
    path = save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(make_llama(0), path).eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- rank and alpha patterns


def test_rank_and_alpha_patterns_give_per_layer_shapes_and_scaling():
    model = make_llama(0)
    inject_lora(model, our_config(**PATTERNS))
    found = {name: (layer.r, layer.alpha) for name, layer in lora_layers(model)}
    assert found == {
        "model.layers.0.self_attn.q_proj": (2, 8),
        "model.layers.0.self_attn.v_proj": (4, 3),
        "model.layers.0.mlp.down_proj": (4, 8),
        "model.layers.1.self_attn.q_proj": (2, 8),
        "model.layers.1.self_attn.v_proj": (4, 3),
        "model.layers.1.mlp.down_proj": (6, 8),
    }
    down = model.model.layers[1].mlp.down_proj
    assert down.lora_A["default"].weight.shape == (6, 64) and down.lora_B["default"].weight.shape == (32, 6)
    assert model.model.layers[0].self_attn.v_proj.scaling == pytest.approx(3 / 4)


def test_saved_patterns_are_exact_module_names_that_peft_reads(tmp_path):
    model = make_llama(0)
    inject_lora(model, our_config(**PATTERNS))
    path = save_adapter(perturb_adapters_(model), tmp_path / "adapter")
    saved = json.loads((path / CONFIG_NAME).read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8
    assert saved["rank_pattern"] == {"^" + re.escape(f"model.layers.{i}.self_attn.q_proj"): 2 for i in range(2)} | {
        "^" + re.escape("model.layers.1.mlp.down_proj"): 6
    }
    assert saved["alpha_pattern"] == {"^" + re.escape(f"model.layers.{i}.self_attn.v_proj"): 3 for i in range(2)}

    config = peft.LoraConfig.from_pretrained(path)
    assert config.rank_pattern == saved["rank_pattern"] and config.alpha_pattern == saved["alpha_pattern"]
    theirs = peft.PeftModel.from_pretrained(make_llama(0), path)
    for name, layer in lora_layers(model):
        assert peft_layer(theirs, name).r["default"] == layer.r
        assert peft_layer(theirs, name).lora_alpha["default"] == layer.alpha


def nested(seed: int = 0) -> nn.Sequential:
    """Module "0" and "1.0": PEFT would also match a pattern "0" (or target "0") to "1.0"."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))).eval()


@pytest.mark.parametrize("targets", [["0", "1.0", "1.1"], r"0|1\.1"], ids=["all", "not_1.0"])
def test_a_layer_name_that_ends_another_keeps_its_own_rank_and_alpha(tmp_path, targets):
    """Saved patterns and targets must select exactly the layers they were saved from, also when one layer's
    name ("0") is a dotted suffix of another's ("1.0")."""
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    model = nested()
    inject_lora(
        model, LoRAConfig(r=2, alpha=4, target_modules=targets, rank_pattern={"^0": 4}, alpha_pattern={"^0": 8})
    )
    path = save_adapter(perturb_adapters_(model), tmp_path / "adapter")

    ours = nested()
    load_adapter(ours, path)
    theirs = peft.PeftModel.from_pretrained(nested(), path)
    with torch.no_grad():
        expected = model(x)
        assert (expected - nested()(x)).abs().max() > 1e-3
        torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(theirs(x), expected, rtol=1e-6, atol=1e-6)
    assert {n: (la.r, la.alpha) for n, la in lora_layers(ours)} == {n: (la.r, la.alpha) for n, la in lora_layers(model)}
    their_targets = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert their_targets == {n for n, _ in lora_layers(model)}


# --------------------------------------------------------------------------------------------------- errors


def test_pissa_on_an_embedding_is_refused_before_any_change():
    model = make_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for init in ("pissa", "pissa_niter_2", "olora"):
        with pytest.raises(
            TargetError, match=rf"layer 'model.embed_tokens': init='{init}' works on linear layers only"
        ):
            inject_lora(model, our_config(init=init, target_modules=["q_proj", "embed_tokens"]))
    assert not list(lora_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "init", ["pisa", "PiSSA", "pissa_niter_", "pissa_niter_0", "pissa_niter_65", "olora_niter_2", "loftq", "", 1]
)
def test_unknown_inits_are_refused_by_the_config(init):
    with pytest.raises(ValueError, match=r"init=.*must be one of kaiming, gaussian, pissa, pissa_niter_<k> \(k <= 64"):
        LoRAConfig(init=init)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\]=0: must be a positive int"),
        ("rank_pattern", {"q_proj": -2}, r"rank_pattern\['q_proj'\]=-2"),
        ("rank_pattern", {"q_proj": 2.5}, r"rank_pattern\['q_proj'\]=2.5"),
        ("rank_pattern", {"q_proj": True}, r"rank_pattern\['q_proj'\]=True"),
        ("rank_pattern", {"q_proj": "8"}, r"rank_pattern\['q_proj'\]='8'"),
        ("rank_pattern", {"(": 8}, r"key '\(' is not a valid regular expression"),
        ("rank_pattern", {"": 8}, "key '' must be a non-empty module-name pattern"),
        ("rank_pattern", ["q_proj"], "must be a mapping of module-name patterns to values"),
        ("alpha_pattern", {"v_proj": 0}, r"alpha_pattern\['v_proj'\]=0: must be a positive finite number"),
        ("alpha_pattern", {"v_proj": float("inf")}, r"alpha_pattern\['v_proj'\]=inf"),
        ("alpha_pattern", {"v_proj": "x"}, r"alpha_pattern\['v_proj'\]='x'"),
        ("alpha_pattern", {"v_proj": False}, r"alpha_pattern\['v_proj'\]=False"),
    ],
)
def test_bad_patterns_are_refused_by_the_config(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        LoRAConfig(**{field: value})


def test_a_pattern_rank_larger_than_its_layer_warns_and_matches_peft(tmp_path):
    """r=64 on v_proj (32 -> 16), as PEFT allows: a warning names the layers, and PEFT loads the same logits."""
    model = make_llama(0)
    with pytest.warns(UserWarning, match=r"smaller side of 2 layer.*'model.layers.0.self_attn.v_proj' r=64 \(32 ->"):
        inject_lora(model, our_config(rank_pattern={"v_proj": 64}))
    expected = logits(perturb_adapters_(model).eval())
    theirs = peft.PeftModel.from_pretrained(make_llama(0), save_adapter(model, tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_an_svd_or_qr_init_with_a_rank_larger_than_its_layer_is_refused_before_any_change(init):
    model = make_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = rf"layer 'model.layers.0.self_attn.v_proj': init='{init}' takes the top r=64"
    with pytest.raises(TargetError, match=message):
        inject_lora(model, our_config(init=init, rank_pattern={"v_proj": 64}))
    assert not list(lora_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_empty_patterns_mean_none():
    config = LoRAConfig(rank_pattern={}, alpha_pattern={})
    assert config.rank_pattern is None and config.alpha_pattern is None


def test_saved_patterns_round_trip_through_our_loader(tmp_path):
    model = make_llama(0)
    inject_lora(model, our_config(init="olora", use_dora=True, **PATTERNS))
    expected = logits(perturb_adapters_(model).eval())
    path = save_adapter(model, tmp_path / "adapter")
    again = make_llama(0)
    load_adapter(again, path)
    torch.testing.assert_close(logits(again), expected, rtol=1e-5, atol=1e-5)
    assert {n: la.spec() for n, la in lora_layers(again)} == {n: la.spec() for n, la in lora_layers(model)}
