"""save_gguf_adapter: llama.cpp's LoRA-adapter GGUF. On CPU without llama.cpp: the keys, names and shapes that
llama.cpp's loader (src/llama-adapter.cpp) checks, the update it would compute from the file against our layers'
own, the q/k row permutation against the packaged SmolLM2 GGUF, and refusals that write nothing. With llama.cpp
(llama-cpp-python, marked slow): SmolLM2-135M's GGUF base plus our adapter against our merged model."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from lora_lightning import LoRAConfig, inject_lora, merge_lora, save_gguf_adapter, save_merged
from lora_lightning.gguf_adapter import rope_permute
from lora_lightning.layers import LoRAEmbedding
from lora_lightning.params import lora_layers
from tests.helpers.adapters import assert_unchanged, perturb_adapters_, snapshot
from tests.helpers.deploy import ATTENTION_MLP, adapted_llama, load_smollm2, rewrite_gguf, smollm2_gguf, tied_llama
from tests.helpers.models import make_llama

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
GGUF_NAMES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}  # fmt: skip
EVERYTHING = [*ATTENTION_MLP, "embed_tokens", "lm_head"]


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """The file's metadata, its tensors in torch's order, and their shapes in ggml's order (``ne``)."""
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    return fields, tensors, shapes


def gguf_name(module: str) -> str:
    if module.endswith("embed_tokens"):
        return "token_embd.weight"
    if module == "lm_head":
        return "output.weight"
    block, leaf = module.split(".")[2], module.rsplit(".", 1)[1]
    return f"blk.{block}.{GGUF_NAMES[leaf]}.weight"


# (config, the file's alpha: the most common s r, with s = alpha / r, or alpha / sqrt(r) with rsLoRA)
VARIANTS = {
    "lora": ({}, 8.0),
    "rslora_and_patterns": (
        {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}},
        8 / 4**0.5 * 4,
    ),
}


@pytest.mark.parametrize(("variant", "alpha"), VARIANTS.values(), ids=VARIANTS.keys())
def test_the_file_adds_what_our_layers_add_as_llama_cpp_computes_it(tmp_path, variant, alpha):
    model = adapted_llama(target_modules=EVERYTHING, **variant)
    before = snapshot(model)
    save_gguf_adapter(model, tmp_path / "adapter.gguf")

    fields, tensors, shapes = read_adapter(tmp_path / "adapter.gguf")
    assert fields == {
        "general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
        "adapter.lora.alpha": pytest.approx(alpha),
    }  # fmt: skip
    layers = dict(lora_layers(model))
    assert set(tensors) == {f"{gguf_name(n)}.lora_{ab}" for n in layers for ab in "ab"}
    heads = {"q_proj": 4, "k_proj": 2}
    for module, layer in layers.items():
        name = gguf_name(module)
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        (a_ne, b_ne), weight = (shapes[f"{name}.lora_{ab}"] for ab in "ab"), layer.base_layer.weight
        scale = fields["adapter.lora.alpha"] / b_ne[0]  # llama.cpp: alpha / rank, rank = lora_b's ne[0]
        ours = layer.delta_weight().float()
        if isinstance(layer, LoRAEmbedding):  # rows of lora_a looked up by token, then lora_b applied
            assert (weight.shape[1], weight.shape[0]) == (b_ne[1], a_ne[1])
            torch.testing.assert_close(scale * (a @ b.t()), ours, atol=1e-6, rtol=1e-5)
            continue
        assert (a_ne[0], b_ne[1], a_ne[1]) == (weight.shape[1], weight.shape[0], b_ne[0])  # llama.cpp's checks
        leaf = module.rsplit(".", 1)[-1]
        expected = rope_permute(ours, heads[leaf]) if leaf in heads else ours
        torch.testing.assert_close(scale * (b @ a), expected, atol=1e-6, rtol=1e-5, msg=module)
    assert_unchanged(model, before)


def gpt2(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    inject_lora(model, LoRAConfig(r=2, alpha=4))
    return model, {}


def dora(tmp_path):
    return adapted_llama(use_dora=True, target_modules=["q_proj"]), {}


def modules_to_save(tmp_path):
    return adapted_llama(target_modules=["q_proj"], modules_to_save=["lm_head"]), {}


def tied_head(tmp_path):
    return tied_llama(["lm_head", "q_proj"]), {}


def tied_embedding(tmp_path):
    return tied_llama(["embed_tokens"]), {}


def unknown_layer(tmp_path):
    model = make_llama(0)
    model.model.extra = torch.nn.Linear(4, 4)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["extra", "q_proj"]))
    return perturb_adapters_(model), {}


def existing_file(tmp_path):
    (tmp_path / "adapter.gguf").write_bytes(b"mine")
    return adapted_llama(target_modules=["q_proj"]), {}


def no_gguf_package(tmp_path):
    return adapted_llama(target_modules=["q_proj"]), {"gguf": None}


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [
        (gpt2, ValueError, "model_type 'llama'; this is a GPT2LMHeadModel"),
        (dora, ValueError, "q_proj: DoRA"),
        (modules_to_save, ValueError, "modules_to_save \\['lm_head'\\]"),
        (tied_head, ValueError, "lm_head: its weight is tied"),
        (tied_embedding, ValueError, "embed_tokens: its weight is tied"),
        (unknown_layer, ValueError, "model.extra: llama.cpp has no tensor"),
        (existing_file, ValueError, "already exists; pass overwrite=True"),
        (no_gguf_package, ImportError, "pip install 'lora-lightning\\[deploy\\]'"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_save_gguf_adapter_refuses_before_writing_anything(tmp_path, monkeypatch, case, error, words):
    model, modules = case(tmp_path)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    before, files = snapshot(model), {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(error, match=words):
        save_gguf_adapter(model, tmp_path / "adapter.gguf")

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert_unchanged(model, before)


# ------------------------------------------------- the packaged SmolLM2-135M (slow), with a real llama.cpp


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, torch.nn.Module, list[int]]:
    """The packaged Q4_1 GGUF, the model transformers loads from it (dequantized), and a sentence's tokens."""
    file = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    text = "The film was a quiet delight: the cast is warm, the story honest, and the ending earns its tears."
    return file, load_smollm2(file).eval(), tokenizer(text)["input_ids"]


def noisy_adapter(model: torch.nn.Module, config: LoRAConfig, scale: float) -> torch.nn.Module:
    """``model`` with ``config``'s adapter, its zero-initialised factor (``B``; an embedding's ``A``) drawn at
    ``scale``, so that the adapter changes the logits a lot."""
    torch.manual_seed(0)  # A's init
    inject_lora(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            factor = layer.factors("default")[0 if isinstance(layer, LoRAEmbedding) else 1]
            factor.copy_(scale * torch.randn(factor.shape, generator=generator))
    return model.eval()


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0]


def llama_cpp_logits(base: Path, tokens: list[int], adapter: Path | None = None) -> torch.Tensor:
    """llama.cpp's logits at every position of ``tokens`` for the GGUF ``base`` (plus the LoRA ``adapter``), with
    an fp32 KV cache."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(base), lora_path=str(adapter) if adapter else None, n_ctx=64, n_batch=64, logits_all=True,
        n_threads=2, type_k=0, type_v=0, flash_attn=False, verbose=False,
    )  # fmt: skip
    try:
        llm.eval(tokens)
        return torch.tensor(llm.scores[: len(tokens)], dtype=torch.float32)
    finally:
        llm.close()


def gap(theirs: torch.Tensor, ours: torch.Tensor) -> float:
    return ((theirs - ours).norm() / ours.norm()).item()


@pytest.mark.slow
def test_rope_permute_is_the_order_of_the_packaged_smollm2_gguf(smollm2):
    """The converter that made the packaged GGUF permuted q/k rows; transformers undoes it on load."""
    file, model, _ = smollm2
    stored = {t.name: t for t in gguf.GGUFReader(file).tensors}
    attention = model.model.layers[3].self_attn
    for leaf, n_head in (("q", model.config.num_attention_heads), ("k", model.config.num_key_value_heads)):
        tensor = stored[f"blk.3.attn_{leaf}.weight"]
        weights = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        ours = getattr(attention, f"{leaf}_proj").weight.detach()
        torch.testing.assert_close(weights.reshape(ours.shape), rope_permute(ours, n_head), atol=1e-6, rtol=0)
        assert not torch.allclose(weights.reshape(ours.shape), ours)  # the permutation is not the identity


@pytest.mark.slow
def test_save_merged_of_the_gguf_loaded_smollm2_reloads_with_the_adapted_logits(tmp_path, smollm2):
    """transformers refuses to save_pretrained a model it loaded from GGUF (dequantized); the merged copy is saved."""
    _, base, tokens = smollm2
    model = noisy_adapter(copy.deepcopy(base), LoRAConfig(r=8, alpha=16, target_modules=ATTENTION_MLP), 0.05)
    save_merged(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(hf_logits(merged, tokens), hf_logits(model, tokens), atol=1e-4, rtol=1e-5)
    assert model.config.quantization_config is not None  # the caller's model keeps its own


@pytest.mark.slow
def test_llama_cpp_runs_our_adapter_on_the_packaged_q4_1_smollm2_as_our_merged_model(tmp_path, smollm2):
    """llama.cpp quantizes the activations that meet Q4_1 weights (to 8 bits), so even its base logits differ from
    transformers' on the same dequantized weights: by 2.9% (relative L2), top-1 the same at 22 of 23 positions.
    With our adapter, which moves our logits by 68%, it must stay as close to our merged model (measured 4.1%,
    2.3% to 4.5% over five seeds); with q/k rows left unpermuted it was 8.0%."""
    pytest.importorskip("llama_cpp")
    file, base, tokens = smollm2
    model = noisy_adapter(copy.deepcopy(base), LoRAConfig(r=8, alpha=16, target_modules=ATTENTION_MLP), 0.2)
    save_gguf_adapter(model, tmp_path / "adapter.gguf")
    save_merged(model, tmp_path / "merged")
    ours_base = hf_logits(base, tokens)
    ours = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), tokens)

    theirs, theirs_base = llama_cpp_logits(file, tokens, tmp_path / "adapter.gguf"), llama_cpp_logits(file, tokens)

    def top1(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.argmax(-1) == b.argmax(-1)).float().mean().item()

    assert gap(ours, ours_base) > 0.5  # the adapter matters
    assert gap(theirs_base, ours_base) < 0.05
    assert gap(theirs, ours) < 2 * gap(theirs_base, ours_base)
    assert top1(theirs, ours) >= top1(theirs_base, ours_base) - 0.05


@pytest.mark.slow
def test_llama_cpp_matches_our_merged_model_on_an_fp32_untied_smollm2(tmp_path, smollm2):
    """Without quantization (the packaged GGUF's weights dequantized to fp32, as transformers holds them) llama.cpp
    computes what we compute, up to fp32 rounding through 30 layers (measured: 3e-6 relative L2, 5e-4 at most on
    logits of up to 32, while the adapter moves them by 169%): also with adapters on the token embedding and on an
    untied output head."""
    pytest.importorskip("llama_cpp")
    file, base, tokens = smollm2
    plain = rewrite_gguf(file, tmp_path / "fp32-untied.gguf", dequantize=True, untie=True)
    model = copy.deepcopy(base)
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False
    noisy_adapter(model, LoRAConfig(r=8, alpha=16, target_modules=EVERYTHING), 0.05)
    save_gguf_adapter(model, tmp_path / "adapter.gguf")
    ours = hf_logits(merge_lora(model), tokens)

    theirs = llama_cpp_logits(plain, tokens, tmp_path / "adapter.gguf")

    assert gap(ours, hf_logits(base, tokens)) > 0.5
    assert gap(theirs, ours) < 2e-5
    assert (theirs - ours).abs().max() < 1e-2
