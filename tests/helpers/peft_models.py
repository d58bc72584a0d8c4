"""The custom models and LoRA rows of PEFT's own test table (``tests/test_custom_models.py`` of huggingface/peft, the
``TEST_CASES`` rows with a ``LoraConfig``), rebuilt from their definitions, and the mapping of a row's PEFT
``LoraConfig`` arguments to our `LoRAConfig`.

Every model is built after ``torch.manual_seed(0)`` and takes PEFT's test input ``arange(90).view(9, 10)`` (the
float models cast it; ``EmbConv1D`` reads it as token ids).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lightning import LoRAConfig

X = torch.arange(90).view(9, 10)


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class MLPWithGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.gru = nn.GRU(20, 20, num_layers=1, batch_first=True)
        self.fc = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.relu(self.lin0(x.float())).unsqueeze(1))
        return self.sm(self.fc(h.squeeze(1)))


class EmbConv1D(nn.Module):
    """An embedding and Hugging Face's GPT-2 ``Conv1D`` (its weight stored ``[in, out]``)."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        self.emb = nn.Embedding(100, 5)
        self.conv1d = transformers.pytorch_utils.Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(x))))))


class _Conv(nn.Module):
    """``x`` reshaped to ``shape`` -> the convolution (``conv1d``, ``conv2d`` or ``conv3d``) -> ReLU -> flattened ->
    ``lin0`` -> log-softmax."""

    def __init__(self, conv: nn.Module, shape: tuple[int, ...], features: int) -> None:
        super().__init__()
        self.shape = shape
        self.conv_name = f"conv{conv.weight.dim() - 2}d"
        setattr(self, self.conv_name, conv)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(features, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if len(self.shape) == 5 and x.dim() == 2:
            x = torch.stack([x] * 3, dim=-1)
        conv = getattr(self, self.conv_name)
        return self.sm(self.lin0(self.flat(self.relu(conv(x.reshape(self.shape))))))


def conv1d_model() -> nn.Module:
    return _Conv(nn.Conv1d(1, 1, 2), (-1, 1, 10), 9)


def conv2d_model(bias: bool = True) -> nn.Module:
    return _Conv(nn.Conv2d(5, 10, 3, bias=bias), (-1, 5, 3, 3), 10)


def conv3d_model() -> nn.Module:
    return _Conv(nn.Conv3d(5, 10, 3), (-1, 5, 3, 3, 3), 10)


def conv3d_1x1_model() -> nn.Module:
    return _Conv(nn.Conv3d(5, 10, kernel_size=1), (-1, 5, 3, 3, 3), 270)


class Conv2dGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin0(x.float().flatten()).reshape(2, 16, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(h)))))


class Conv2dGroups2(nn.Module):
    """As in PEFT's table, its forward ignores ``x`` (its own input has 16 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.arange(9 * 16 * 20 * 20, device=x.device).view(9, 16, 20, 20).float()
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(h)))))


class Mha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        h, _ = self.mha(x, x, x)
        return self.sm(self.lin0(h))


class LinearUsingParameter(nn.Module):
    """A linear layer written with bare parameters, its weight stored ``[in, out]``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = LinearUsingParameter(10, 20)
        self.lin1 = LinearUsingParameter(20, 2)


class Experts(nn.Module):
    """Fused mixture-of-experts weights as Hugging Face stores them: ``gate_up`` ``[E, hidden, 2 inner]`` and
    ``down`` ``[E, inner, hidden]``, each token through the expert ``route`` names."""

    def __init__(self, experts: int = 3, hidden: int = 10, inner: int = 6) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(0.1 * torch.randn(experts, hidden, 2 * inner))
        self.down = nn.Parameter(0.1 * torch.randn(experts, inner, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = torch.arange(x.shape[0], device=x.device) % self.gate_up.shape[0]
        gate, up = torch.bmm(x[:, None], self.gate_up[route])[:, 0].chunk(2, dim=-1)
        return torch.bmm((torch.nn.functional.silu(gate) * up)[:, None], self.down[route])[:, 0]


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 10)
        self.experts = Experts()
        self.lin1 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.experts(torch.relu(self.lin0(x.float()))))


MODELS = {
    "MLP": MLP,
    "EmbConv1D": EmbConv1D,
    "Conv1d": conv1d_model,
    "Conv2d": conv2d_model,
    "Conv2dGroups": Conv2dGroups,
    "Conv2dGroups2": Conv2dGroups2,
    "Conv3d": conv3d_model,
    "Conv3d1x1": conv3d_1x1_model,
    "MHA": Mha,
    "MlpUsingParameters": MlpUsingParameters,
    "MLPWithGRU": MLPWithGRU,
    "MoE": MoE,
}


def make(model_id: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_id]().eval()


# ``TEST_CASES`` rows with a LoraConfig that use standard layers and LoRA (and DoRA) math: row id -> (model, PEFT
# LoraConfig arguments). PEFT's tests run them with ``init_lora_weights=False`` (random A and B).
ROWS = {
    "Vanilla MLP 1 LoRA": ("MLP", {"target_modules": "lin0"}),
    "Vanilla MLP 2 LoRA": ("MLP", {"target_modules": ["lin0"]}),
    "Vanilla MLP 3 LoRA": ("MLP", {"target_modules": ["lin1"]}),
    "Vanilla MLP 4 LoRA": ("MLP", {"target_modules": ["lin0", "lin1"]}),
    "Vanilla MLP 5 LoRA": ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "Vanilla MLP 6 LoRA": ("MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    "Vanilla MLP 7 LoRA with DoRA": ("MLP", {"target_modules": ["lin0"], "use_dora": True}),
    "Vanilla MLP 8 LoRA with DoRA": ("MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    "Vanilla MLP 9 LoRA with DoRA": ("MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    "Embedding + transformers Conv1D 1 LoRA": ("EmbConv1D", {"target_modules": ["conv1d"]}),
    "Embedding + transformers Conv1D 2 LoRA": ("EmbConv1D", {"target_modules": ["emb"]}),
    "Embedding + transformers Conv1D 3 LoRA": ("EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    "Embedding + transformers Conv1D 1 DoRA": ("EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    "Embedding + transformers Conv1D 2 DoRA": ("EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    "Embedding + transformers Conv1D 3 DoRA": ("EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens": (
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
    ),
    "Conv1d LoRA": ("Conv1d", {"target_modules": ["conv1d"]}),
    "Conv1d LoRA with DoRA": ("Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    "Conv2d 1 LoRA": ("Conv2d", {"target_modules": ["conv2d"]}),
    "Conv2d 2 LoRA": ("Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    "Conv2d 1 LoRA with DoRA": ("Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    "Conv2d 2 LoRA with DoRA": ("Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    "Conv2d Groups LoRA": ("Conv2dGroups", {"target_modules": ["conv2d"]}),
    "Conv2d Groups2 LoRA": ("Conv2dGroups2", {"target_modules": ["conv2d"]}),
    "Conv3d 1 LoRA": ("Conv3d", {"target_modules": ["conv3d"]}),
    "Conv3d 2 LoRA": ("Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    "Conv3d 1 LoRA with DoRA": ("Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    "Conv3d 2 LoRA with DoRA": ("Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    "Conv3d 1x1 LoRA": ("Conv3d1x1", {"target_modules": ["conv3d"]}),
    "Conv3d 1x1 LoRA with DoRA": ("Conv3d1x1", {"target_modules": ["conv3d"], "use_dora": True}),
    "Vanilla MLP 1 LoRA with lora_b bias": (
        "MLP",
        {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
    ),
    "Conv2d 1 LoRA with lora_b bias": ("Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    "Conv3d 1 LoRA with lora_b bias": ("Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    "MHA 1 LoRA": ("MHA", {"target_modules": ["mha"]}),
    "MHA 2 LoRA": ("MHA", {"target_modules": ["mha", "lin0"]}),
    "MLP 1 using nn.Parameter LoRA": ("MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    "MLP 2 using nn.Parameter LoRA": ("MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
}
# Rows we refuse, each with what the refusal names: DoRA on grouped convolutions (PEFT normalizes a reshaped
# product that is no weight), and the research variants.
REFUSED_DORA = {
    "Conv2d Groups LoRA with DoRA": ("Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}),
    "Conv2d Groups2 LoRA with DoRA": ("Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}),
}
# Research rows: (targets, PEFT LoraConfig arguments, what the refusal names); a ``(class name, kwargs)`` value is
# one of PEFT's config classes.
RESEARCH = {
    "Vanilla MLP 1 LoRA with KaSA": (["lin0"], {"r": 4, "kasa_config": ("KasaConfig", {})}, "kasa_config="),
    "Vanilla MLP 1 LoRA with MiCA": (["lin0"], {"r": 4, "init_lora_weights": "mica"}, "init_lora_weights='mica'"),
    "Vanilla MLP 10 LoRA with VeLoRA random": (
        ["lin0"],
        {"velora_config": ("VeloraConfig", {"num_groups": 2, "init_type": "random"})},
        "velora_config=",
    ),
    "Vanilla MLP 11 LoRA with VeLoRA batch_average": (
        ["lin0", "lin1"],
        {"velora_config": ("VeloraConfig", {"num_groups": 2, "init_type": "batch_average"})},
        "velora_config=",
    ),
    "Vanilla MLP 12 LoRA with VeLoRA batch_average_once": (
        ["lin0"],
        {"velora_config": ("VeloraConfig", {"num_groups": 2, "init_type": "batch_average_once"})},
        "velora_config=",
    ),
    "Vanilla MLP 1 LoRA with Monteclora": (
        ["lin0"],
        {"monteclora_config": ("MontecloraConfig", {"num_samples": 2})},
        "monteclora_config=",
    ),
    "BD-LoRA A only": (
        ["lin0", "lin1"],
        {"use_bdlora": ("BdLoraConfig", {"target_modules_bd_a": ["lin0"], "match_strict": False})},
        "use_bdlora=",
    ),
    "BD-LoRA B only": (
        ["lin0", "lin1"],
        {"use_bdlora": ("BdLoraConfig", {"target_modules_bd_b": ["lin1"], "nblocks": 2, "match_strict": False})},
        "use_bdlora=",
    ),
    "BD-LoRA both A and B": (
        ["lin0", "lin1"],
        {
            "use_bdlora": (
                "BdLoraConfig",
                {"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2},
            )
        },
        "use_bdlora=",
    ),
}

_OURS = {"lora_alpha": "alpha", "lora_dropout": "dropout"}


def our_config(kwargs: dict) -> LoRAConfig:
    """Our `LoRAConfig` for a row's PEFT arguments (PEFT's defaults r=8, alpha=8 where the row leaves them)."""
    values = {"r": 8, "lora_alpha": 8, "target_modules": None, **kwargs}
    return LoRAConfig(**{_OURS.get(k, k): v for k, v in values.items()})


def peft_config(kwargs: dict, **overrides):
    """PEFT's ``LoraConfig`` of a row, random-init as PEFT's tests make it (``init_lora_weights=False``)."""
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(**{"init_lora_weights": False, **kwargs, **overrides})
