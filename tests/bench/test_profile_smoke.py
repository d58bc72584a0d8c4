"""CPU smoke test of the step profile (benchmarks.profile) on the tiny shape: the report is written, every unit
of time lands in a category, the LoRA GEMMs are told apart from the base ones, and ours saves more for backward
than the frozen floor (exactly the inputs and ``x A^T`` the analytic account predicts). No timing assertions.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import benchmarks.profile as prof
from benchmarks.profile.classify import EVALUATE, Dims, classify_events, gemm_role, summarize_units
from benchmarks.profile.compare import comparisons, memory_account
from benchmarks.profile.report import render_markdown, where_it_goes

pytest.importorskip("transformers")

CATEGORIES = {
    "base_gemm_forward",
    "base_gemm_input_grad",
    "lora_x_at",
    "lora_h_bt",
    "lora_grad_a",
    "lora_grad_b",
    "lora_grad_h",
    "lora_grad_x",
    "elementwise_accumulate",
    "dropout",
    "attention",
    "norms_activations",
    "optimizer",
    "other",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("profile")
    argv = ["--shape=tiny", "--device=cpu", "--warmup=2", "--steps=1", "--threads=1", f"--out={out}"]
    threads = torch.get_num_threads()
    try:
        assert prof.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the whole process
    return json.loads((out / prof.JSON_NAME).read_text()), (out / prof.MARKDOWN_NAME).read_text()


def test_gemm_roles_from_shapes() -> None:
    """Llama-3.2-1B's shapes: T = 8192 tokens equals the MLP width, so grad B and grad h of gate/up_proj have the
    same shape and only the first operand's strides (g^T is transposed) tell them apart."""
    dims = Dims(ranks=frozenset({16}), tokens=8192)
    role = gemm_role
    assert role([[8192, 2048], [2048, 2048]], None, "aten::mm", "forward", dims) == "base_gemm_forward"
    assert role([[8192, 2048], [2048, 2048]], None, "aten::mm", "backward", dims) == "base_gemm_input_grad"
    assert role([[8192, 2048], [2048, 16]], None, "aten::mm", "forward", dims) == "lora_x_at"
    assert role([[8192, 512], [8192, 16], [16, 512], [], []], None, "aten::addmm_", "forward", dims) == "lora_h_bt"
    assert role([[16, 8192], [8192, 8192]], None, "aten::mm", "backward", dims) == "lora_grad_a"
    assert role([[8192, 2048], [8192, 16], [16, 2048], [], []], None, "aten::addmm_", "backward", dims) == "lora_grad_x"
    assert role([[512, 8192], [8192, 16]], None, "aten::mm", "backward", dims) == "lora_grad_b"  # k_proj: out 512
    assert role([[8192, 512], [512, 16]], None, "aten::mm", "backward", dims) == "lora_grad_h"
    square = [[8192, 8192], [8192, 16]]  # gate_proj: out = T
    assert role(square, [[1, 8192], [16, 1]], "aten::mm", "backward", dims) == "lora_grad_b"
    assert role(square, [[8192, 1], [16, 1]], "aten::mm", "backward", dims) == "lora_grad_h"
    assert role(square, None, "aten::mm", "backward", dims) == "lora_grad_b_or_h"


@pytest.mark.slow
def test_every_config_has_every_category(run: tuple[dict[str, Any], str]) -> None:
    report, markdown = run
    assert set(report["categories"]) >= CATEGORIES
    assert list(report["configs"]) == ["floor", "ours", "ours-drop"]
    for name, record in report["configs"].items():
        profile = record["profile"]
        assert set(profile["categories"]) == set(report["categories"]), name
        assert all(c["time_ms"] >= 0 and c["count"] >= 0 for c in profile["categories"].values())
        assert profile["total_ms"] > 0 and record["median_step_ms"] > 0
        assert profile["total_ms"] == pytest.approx(sum(c["time_ms"] for c in profile["categories"].values()))
        assert profile["phases"].get("forward", 0) > 0 and profile["phases"].get("backward", 0) > 0
    assert report["where_it_goes"] and all(p.strip() for p in report["where_it_goes"])
    for heading in ("## Step time and memory", "## Where it goes", "minus floor", "## Analytic account"):
        assert heading in markdown


@pytest.mark.slow
def test_lora_gemms_and_dropout_are_attributed(run: tuple[dict[str, Any], str]) -> None:
    report, _ = run
    floor, ours, drop = (report["configs"][n]["profile"]["categories"] for n in ("floor", "ours", "ours-drop"))
    adapted = report["configs"]["ours"]["adapted_layers"]
    assert adapted == 2 * 7  # two decoder layers, q k v o gate up down
    lora = [c for c in CATEGORIES if c.startswith("lora_")]
    assert all(floor[c]["count"] == 0 for c in [*lora, "dropout", "optimizer"])
    for counts in (ours, drop):  # one of each adapter product per adapted layer and step
        assert counts["lora_x_at"]["count"] == counts["lora_h_bt"]["count"] == adapted
        assert counts["lora_grad_a"]["count"] == adapted
        assert counts["lora_grad_b"]["count"] + counts["lora_grad_h"]["count"] + counts["lora_grad_b_or_h"][
            "count"
        ] == (2 * adapted)
        assert counts["base_gemm_forward"]["count"] == floor["base_gemm_forward"]["count"]  # the same base products
        assert counts["optimizer"]["count"] > 0
    assert ours["dropout"]["count"] == 0
    assert drop["dropout"]["count"] > 0 and drop["dropout"]["time_ms"] > 0
    comparison = next(c for c in report["comparisons"] if (c["base"], c["other"]) == ("floor", "ours"))
    assert comparison["top_kernels"] and all(k["delta_ms"] > 0 for k in comparison["top_kernels"])
    assert any(k["category"] in lora for k in comparison["top_kernels"])


@pytest.mark.slow
def test_ours_saves_more_for_backward_than_the_floor(run: tuple[dict[str, Any], str]) -> None:
    report, _ = run
    floor, ours = report["configs"]["floor"]["saved"], report["configs"]["ours"]["saved"]
    assert ours["activation_bytes"] > floor["activation_bytes"] > 0
    groups = {name: g for name, g in ours["groups"].items() if g["label"].startswith("lora:")}
    assert groups and not any(g["label"].startswith("lora:") for g in floor["groups"].values())
    assert groups["layers.*.mlp.down_proj"]["unique_bytes"] > 0

    account = report["memory_account"]
    settings = report["settings"]
    tokens, model = settings["batch_size"] * settings["seq_len"], settings["model"]
    layers = {row["layer"]: row for row in account["layers"]}
    assert layers["down_proj"]["x_bytes"] == tokens * model["intermediate_size"] * 2  # bf16
    assert layers["k_proj"]["x_shared_with"] == layers["v_proj"]["x_shared_with"] == "q_proj"
    assert layers["up_proj"]["x_shared_with"] == "gate_proj"
    # What the adapted layers were measured to save is exactly the analytic account of x and x A^T.
    assert account["measured_adapter_saved_bytes"] == account["analytic_saved_bytes"] > 0
    assert account["measured_saved_delta_bytes"] == ours["activation_bytes"] - floor["activation_bytes"]


def test_cuda_kernels_are_attributed_through_ranges_and_autograd_nodes() -> None:
    """The CUDA path on synthetic profiler events (no GPU needed): kernels hang off the operators that launched
    them; backward kernels get the module of the forward operator with their node's sequence number."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    tokens, n_in, n_out, r = 64, 32, 48, 4
    events: list[FunctionEvent] = []

    def event(name, start, end, parent=None, seq=-1, shapes=(), thread=1, kernel=None, **kwargs):
        e = FunctionEvent(
            id=len(events) + 1,
            name=name,
            thread=thread,
            start_us=start,
            end_us=end,
            input_shapes=[list(s) for s in shapes],
            sequence_nr=seq,
            **kwargs,
        )
        if parent is not None:
            e.set_cpu_parent(parent)
            parent.append_cpu_child(e)
        if kernel is not None:
            e.append_kernel(kernel[0], 0, kernel[1])
            events.append(event_on_device(kernel[0], start, kernel[1]))
        events.append(e)
        return e

    def event_on_device(name, start, duration, **kwargs):
        return FunctionEvent(
            id=10_000 + len(events), name=name, thread=7, start_us=start, end_us=start + duration,
            device_type=DeviceType.CUDA, **kwargs,
        )  # fmt: skip

    forward = event("profile_step::forward", 0, 100)
    q_proj = event("mod::lora:q_proj", 1, 50, forward)
    node = event("_LoRALinearFunction", 2, 49, q_proj, seq=7)
    matmul = event("aten::matmul", 3, 10, event("aten::linear", 3, 11, node))
    event("aten::mm", 4, 9, matmul, shapes=[[tokens, n_in], [n_in, n_out]], kernel=("sm90_gemm_big", 30.0))
    event(
        "aten::mm", 12, 15, event("aten::matmul", 12, 16, node), shapes=[[tokens, n_in], [n_in, r]], kernel=("k_a", 5.0)
    )
    event("aten::native_dropout", 17, 18, node, kernel=("fused_dropout_kernel", 1.5))
    shapes = [[tokens, n_out], [tokens, r], [r, n_out], [], []]
    event("aten::addmm_", 20, 25, node, shapes=shapes, kernel=("k_b", 4.0))
    event("aten::mul", 52, 55, event("mod::norm", 51, 60, forward), seq=8, kernel=("elementwise_kernel", 2.0))

    backward = event(EVALUATE + "_LoRALinearFunctionBackward", 200, 300, seq=7, thread=2)
    node_b = event("_LoRALinearFunctionBackward", 201, 290, backward, seq=7, thread=2)
    event("aten::mm", 202, 210, node_b, shapes=[[r, tokens], [tokens, n_in]], thread=2, kernel=("k_ga", 6.0))
    event("aten::mm", 211, 220, node_b, shapes=[[n_out, tokens], [tokens, r]], thread=2, kernel=("k_gb", 3.0))
    event("aten::mm", 221, 230, node_b, shapes=[[tokens, n_out], [n_out, n_in]], thread=2, kernel=("gemm_dx", 25.0))
    event("aten::add_", 291, 295, backward, thread=2, kernel=("add_kernel", 1.0))  # the engine summing gradients
    mul_b = event("MulBackward0", 311, 319, event(EVALUATE + "MulBackward0", 310, 320, seq=8, thread=2), seq=8)
    event("aten::mul", 312, 318, mul_b, thread=2, kernel=("elementwise_kernel", 2.0))
    event("aten::_fused_adamw_", 401, 410, event("profile_step::optimizer", 400, 500), kernel=("adam_kernel", 3.0))
    events.append(event_on_device("stray_kernel", 600, 2.0))  # launched by no recorded operator
    events.append(event_on_device("mod::lora:q_proj", 1, 1000.0, is_user_annotation=True))  # a GPU-side range span

    dims = Dims(ranks=frozenset({r}), tokens=tokens)
    units, unclaimed = classify_events(events, "cuda", dims, compiled=False)
    by_kernel = {(u.name, u.phase): u for u in units}
    expected = {
        ("sm90_gemm_big", "forward"): ("base_gemm_forward", "lora:q_proj"),
        ("k_a", "forward"): ("lora_x_at", "lora:q_proj"),
        ("fused_dropout_kernel", "forward"): ("dropout", "lora:q_proj"),
        ("k_b", "forward"): ("lora_h_bt", "lora:q_proj"),
        ("elementwise_kernel", "forward"): ("norms_activations", "norm"),
        ("k_ga", "backward"): ("lora_grad_a", "lora:q_proj"),
        ("k_gb", "backward"): ("lora_grad_b", "lora:q_proj"),
        ("gemm_dx", "backward"): ("base_gemm_input_grad", "lora:q_proj"),
        ("add_kernel", "backward"): ("elementwise_accumulate", "lora:q_proj"),
        ("elementwise_kernel", "backward"): ("norms_activations", "norm"),
        ("adam_kernel", "optimizer"): ("optimizer", None),
    }
    assert {key: (u.category, u.label) for key, u in by_kernel.items()} == expected
    assert unclaimed == pytest.approx(2.0)
    summary = summarize_units(units, unclaimed, steps=1)
    assert summary["total_ms"] == pytest.approx(sum(u.time_us for u in units) / 1e3)
    assert summary["lora_by_layer"]["q_proj"]["lora_grad_a"] == pytest.approx(0.006)
    assert "base_gemm_forward" not in summary["lora_by_layer"]["q_proj"]


@pytest.mark.slow
def test_cuda_figures_render(run: tuple[dict[str, Any], str]) -> None:
    """The CUDA-only parts of the report (peaks, memory held after forward, kernel time against wall time) on the
    CPU run's numbers with made-up allocator figures."""
    report = json.loads(json.dumps(run[0]))
    report["environment"]["device_type"] = "cuda"
    gib = 2**30
    for name, (peak, held) in {"floor": (23.47, 9.0), "ours": (26.46, 12.0), "ours-drop": (26.46, 12.0)}.items():
        report["configs"][name]["peak_memory_bytes"] = int(peak * gib)
        report["configs"][name]["held_after_forward_bytes"] = int(held * gib)
    report["comparisons"] = comparisons(report["configs"], 15)
    report["memory_account"] = memory_account(report["configs"], "cuda")
    assert report["memory_account"]["measured_peak_delta_bytes"] == int(26.46 * gib) - int(23.47 * gib)
    paragraphs = where_it_goes(report)
    text = " ".join(paragraphs)
    assert "Kernels fill" in text and "The measured peak grows by +2.99 GiB (1.13x)" in text
    markdown = render_markdown({**report, "where_it_goes": paragraphs})
    assert "| measured: peak allocated, ours - floor | +2.99 GiB |" in markdown
    assert "| floor |" in markdown and "23.47 GiB" in markdown
