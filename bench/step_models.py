"""`--step-model` values: coefficients, a named published fit, or a JSON file from a real worker.

Published fits are the SmartSpec authors' H100 measurements (verify time per batch); this
machine's CPU default is the controller's DEFAULT_COST_MODEL (fitted to real engine steps here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from smartspec.core.cost_model import DEFAULT_COST_MODEL, CostModel

PRESETS: dict[str, CostModel] = {
    # SmartSpec authors' H100 fits (ms; per batched token; per context token).
    "h100-llama8b": CostModel(c_fixed_ms=6.94, c_tok_ms=0.0184, c_kv_ms=4.86e-5),
    "h100x4-llama70b": CostModel(c_fixed_ms=18.35, c_tok_ms=0.064, c_kv_ms=6.24e-5),
    # SmolLM2-135M fp32 on this repo's 2-core CPU reference machine.
    "cpu-smollm2": DEFAULT_COST_MODEL,
}


def _field(key: str) -> str:
    key = key.strip()
    return key if key.endswith("_ms") else f"{key}_ms"


def cost_model_from_profile(samples: list[Mapping[str, Any]]) -> CostModel:
    """Fit a startup profile: [{batch_size, speculation_length, context_tokens, draft_ms, verify_ms}, ...]."""
    from types import SimpleNamespace

    from smartspec.core.cost_fit import fit_profile

    needed = ("batch_size", "speculation_length", "context_tokens", "draft_ms", "verify_ms")
    for i, sample in enumerate(samples):
        missing = [k for k in needed if k not in sample]
        if missing:
            raise ValueError(f"profile sample {i} lacks {', '.join(missing)}")
    return fit_profile([SimpleNamespace(**{k: float(sample[k]) for k in needed}) for sample in samples])


def cost_model_from_mapping(data: Mapping[str, Any]) -> CostModel:
    """{'c_fixed': 6.94, ...} or {'c_fixed_ms': 6.94, ...} or {'cost_model': {...}} (a status/bench dump)."""
    if "cost_model" in data and isinstance(data["cost_model"], Mapping):
        data = data["cost_model"]
    return CostModel.from_dict({_field(k): [float(x) for x in v] if isinstance(v, list) else float(v)
                                for k, v in data.items()})  # a list: the per-count table


def parse_step_model(text: str) -> CostModel:
    """'c_fixed=6.94,c_tok=0.0184,c_kv=4.86e-5', a preset name, or a JSON file: a cost model
    ({"c_fixed_ms": ...} or {"cost_model": {...}}) or a profile to fit ([{batch_size, ...}, ...])."""
    text = text.strip()
    if text in PRESETS:
        return PRESETS[text]
    if "=" in text:
        pairs = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            try:
                pairs[key] = float(value)
            except ValueError:
                raise ValueError(f"bad step-model term {part!r}: expected NAME=NUMBER") from None
        return cost_model_from_mapping(pairs)
    path = Path(text)
    if path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, list) or "samples" in data:  # a worker's startup profile: fit it
            return cost_model_from_profile(data if isinstance(data, list) else data["samples"])
        return cost_model_from_mapping(data)
    raise ValueError(f"bad step model {text!r}: expected c_fixed=...,c_tok=..., a preset "
                     f"({', '.join(sorted(PRESETS))}) or a JSON file")
