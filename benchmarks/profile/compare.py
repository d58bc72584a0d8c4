"""Configurations compared: time by category, kernels new or grown, saved bytes by module, and the memory account
of what LoRA keeps for backward against the floor."""

from __future__ import annotations

from typing import Any

from benchmarks.profile.classify import CATEGORIES


def category_delta(base: dict[str, Any], other: dict[str, Any]) -> dict[str, dict[str, float]]:
    b, o = base["profile"]["categories"], other["profile"]["categories"]
    return {
        c: {
            "base_ms": b[c]["time_ms"],
            "other_ms": o[c]["time_ms"],
            "delta_ms": o[c]["time_ms"] - b[c]["time_ms"],
            "base_count": b[c]["count"],
            "other_count": o[c]["count"],
        }
        for c in CATEGORIES
    }


def kernel_delta(base: dict[str, Any], other: dict[str, Any], top: int) -> list[dict[str, Any]]:
    """Kernels (CPU: operators) that are new in ``other`` or whose total time grew, largest growth first."""
    b, o = base["profile"]["kernels"], other["profile"]["kernels"]
    rows = []
    for name, k in o.items():
        old = b.get(name)
        delta = k["time_ms"] - (old["time_ms"] if old else 0.0)
        if delta <= 0:
            continue
        rows.append(
            {
                "kernel": name,
                "category": k["category"],  # where most of its time in `other` went; all of it under "categories"
                "categories": k["categories"],
                "base_ms": old["time_ms"] if old else 0.0,
                "base_count": old["count"] if old else 0,
                "other_ms": k["time_ms"],
                "other_count": k["count"],
                "delta_ms": delta,
                "new": old is None,
            }
        )
    rows.sort(key=lambda r: -r["delta_ms"])
    return rows[:top]


def saved_delta(base: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    groups = sorted(set(base["saved"]["groups"]) | set(other["saved"]["groups"]))
    rows = []
    for g in groups:
        b = base["saved"]["groups"].get(g, {"unique_bytes": 0, "refs": 0})
        o = other["saved"]["groups"].get(g, {"unique_bytes": 0, "refs": 0})
        rows.append(
            {
                "module": g,
                "base_bytes": b["unique_bytes"],
                "other_bytes": o["unique_bytes"],
                "delta_bytes": o["unique_bytes"] - b["unique_bytes"],
                "base_refs": b["refs"],
                "other_refs": o["refs"],
            }
        )
    rows.sort(key=lambda r: (-abs(r["delta_bytes"]), -r["other_bytes"]))
    return rows


def comparisons(records: dict[str, dict[str, Any]], top: int) -> list[dict[str, Any]]:
    pairs = [("floor", "ours"), ("floor", "ours-drop"), ("ours", "ours-drop"), ("floor-compile", "ours-compile")]
    out = []
    for base_name, other_name in pairs:
        base, other = records.get(base_name), records.get(other_name)
        if base is None or other is None:
            continue
        comp: dict[str, Any] = {
            "base": base_name,
            "other": other_name,
            "step_ms": [base["median_step_ms"], other["median_step_ms"]],
            "step_ratio": other["median_step_ms"] / base["median_step_ms"],
            "device_ms": [base["profile"]["total_ms"], other["profile"]["total_ms"]],
            "categories": category_delta(base, other),
            "top_kernels": kernel_delta(base, other, top),
        }
        peaks = base["peak_memory_bytes"], other["peak_memory_bytes"]
        comp["peak_bytes"] = list(peaks)
        comp["peak_ratio"] = peaks[1] / peaks[0] if all(peaks) else None
        if base["saved"] and other["saved"]:
            comp["saved_bytes"] = [base["saved"]["activation_bytes"], other["saved"]["activation_bytes"]]
            comp["saved_by_module"] = saved_delta(base, other)
        out.append(comp)
    return out


def memory_account(records: dict[str, dict[str, Any]], device_type: str) -> dict[str, Any] | None:
    floor, ours = records.get("floor"), records.get("ours")
    if not floor or not ours or not ours.get("lora_saved_account"):
        return None
    rows = ours["lora_saved_account"]
    analytic_saved = sum(r["extra_bytes"] for r in rows)
    x_bytes = sum(r["count"] * (0 if (r["x_shared_with"] or r["x_kept_by"]) else r["x_bytes"]) for r in rows)
    h_bytes = sum(r["count"] * r["h_bytes"] for r in rows)
    adapters = ours["trainable_bytes"] + ours["optimizer_state_bytes"]
    saved_delta_bytes = ours["saved"]["activation_bytes"] - floor["saved"]["activation_bytes"]
    adapter_groups = {g: v for g, v in ours["saved"]["groups"].items() if (v["label"] or "").startswith("lora:")}
    measured_adapters = sum(v["unique_bytes"] for v in adapter_groups.values())
    others = []
    for group in sorted(set(floor["saved"]["groups"]) | set(ours["saved"]["groups"])):
        if group in adapter_groups:
            continue
        delta = ours["saved"]["groups"].get(group, {}).get("unique_bytes", 0) - floor["saved"]["groups"].get(
            group, {}
        ).get("unique_bytes", 0)
        if delta:
            others.append({"module": group, "delta_bytes": delta})
    others.sort(key=lambda r: -abs(r["delta_bytes"]))
    account = {
        "layers": rows,
        "analytic_saved_bytes": analytic_saved,
        "analytic_x_bytes": x_bytes,
        "analytic_h_bytes": h_bytes,
        "adapters_and_optimizer_bytes": adapters,
        "analytic_total_bytes": analytic_saved + adapters,
        "measured_saved_delta_bytes": saved_delta_bytes,
        # first saved by the adapted layers themselves (the analytic figure, measured)
        "measured_adapter_saved_bytes": measured_adapters,
        # every other module, ours minus floor (e.g. the first layer's norm: its input needs no gradient in ours)
        "measured_other_modules_delta_bytes": saved_delta_bytes - measured_adapters,
        "other_modules_delta": others,
        "measured_peak_delta_bytes": None,
        "measured_held_after_forward_delta_bytes": None,
    }
    if device_type == "cuda":
        account["measured_peak_delta_bytes"] = ours["peak_memory_bytes"] - floor["peak_memory_bytes"]
        account["measured_held_after_forward_delta_bytes"] = (
            ours["held_after_forward_bytes"] - floor["held_after_forward_bytes"]
        )
    return account
