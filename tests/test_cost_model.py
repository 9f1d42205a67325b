"""Cost model formula and (de)serialisation (the online fit: test_cost_fit.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cost_steps import TRUE_MODEL
from smartspec.core.cost_model import (
    DEFAULT_COST_MODEL,
    CostModel,
    CostModelError,
    padded_attention_cells,
)
from smartspec.v1 import common_pb2


def draft_by_depth(cost: CostModel, ks, contexts) -> float:
    """The draft formula exactly as written in common.proto: one term per draft depth, one per row asked."""
    total = cost.d_row_ms * sum(1 for k in ks if k > 0)
    for depth in range(1, max(ks, default=0) + 1):
        active = [i for i, k in enumerate(ks) if k >= depth]
        total += cost.d_fixed_ms + cost.d_tok_ms * len(active) + cost.d_kv_ms * sum(contexts[i] for i in active)
    return total


# ---------------------------------------------------------------- formula


# Medians of the steps a real engine measured here (BENCHMARKS.md, "Cost model validation": the mean
# of two runs of scripts/validate_cost_model.py; SmolLM2-135M fp32 on 2 CPU cores, about 300-700
# tokens of context): (batch, ks) -> ms of draft + verify.
MEASURED_STEPS = {
    (1, (8,)): 70.7,
    (8, (0,) * 8): 71.7,
    (8, (2,) * 8): 107.7,
    (8, (8,) + (0,) * 7): 109.1,
    (16, (4,) * 16): 228.5,
    (16, (8,) + (0,) * 15): 162.8,
    (32, (0,) * 32): 160.7,
    (32, (2,) * 32): 303.2,
    (32, (8,) + (0,) * 31): 287.9,
    (32, (8,) * 32): 646.0,
}


@pytest.mark.parametrize(("batch", "ks"), sorted(MEASURED_STEPS))
def test_default_model_reproduces_steps_measured_on_this_machine_class(batch, ks):
    """Within 15%: the same machine ran 10-15% faster or slower from one run to the next, which a
    fixed default cannot follow (the online fit does)."""
    contexts = np.linspace(300, 700, batch) if batch > 1 else [500]
    predicted = DEFAULT_COST_MODEL.draft_ms(ks, contexts) + DEFAULT_COST_MODEL.verify_ms(ks, contexts)
    assert predicted == pytest.approx(MEASURED_STEPS[batch, ks], rel=0.15)


def test_formula_by_hand():
    ks, contexts, prefills = [0, 3, 1], [100, 200, 300], [0, 0, 50]
    # fixed, speculating step, 2 speculating rows, query tokens, context, 3 rows, 3 x 4 x 300 cells
    verify = 30.0 + 12.0 + 3.0 * 2 + 1.5 * (1 + 4 + 2 + 50) + 0.004 * 600 + 2.0 * 3 + 4e-4 * 3 * 4 * 300
    assert TRUE_MODEL.verify_ms(ks, contexts, prefills) == pytest.approx(verify)
    assert TRUE_MODEL.draft_ms(ks, contexts) == pytest.approx(draft_by_depth(TRUE_MODEL, ks, contexts))
    with_overhead = TRUE_MODEL.replace(overhead_ms=2.5)
    assert with_overhead.predict_ms(ks, contexts, prefills) == pytest.approx(
        verify + draft_by_depth(TRUE_MODEL, ks, contexts) + 2.5
    )
    # no speculation anywhere: no c_spec, no draft, width 1
    assert TRUE_MODEL.predict_ms([0, 0], [10, 10]) == pytest.approx(30.0 + 1.5 * 2 + 0.004 * 20 + 2.0 * 2
                                                                     + 4e-4 * 2 * 1 * 10)
    assert TRUE_MODEL.predict_ms([], []) == pytest.approx(30.0)  # an empty step: the fixed cost only


def test_padded_attention_cells_are_rows_times_widest_query_times_longest_context():
    assert padded_attention_cells([0, 3, 1], [100, 200, 300]) == 3 * 4 * 300
    assert padded_attention_cells(np.zeros((2, 0)), np.zeros((2, 0))).tolist() == [0.0, 0.0]
    many = padded_attention_cells([[0, 8], [2, 2]], [[100, 50], [100, 50]])  # [N, B] -> [N]
    assert many.tolist() == [2 * 9 * 100, 2 * 3 * 100]


def test_width_term_charges_one_wide_row_more_than_the_same_tokens_spread():
    """12 rows at 400 tokens: one row at k = 8 verifies as many tokens as 8 rows at k = 1, but
    makes all 12 rows attend 9 query columns wide. The token terms cannot tell the two apart;
    the width term charges the difference, and nothing else does."""
    contexts = [400] * 12
    one_wide, spread = [8] + [0] * 11, [1] * 8 + [0] * 4
    tokens_only = CostModel(c_fixed_ms=50.0, c_tok_ms=1.0)
    assert tokens_only.verify_ms(one_wide, contexts) == pytest.approx(tokens_only.verify_ms(spread, contexts))
    with_width = tokens_only.replace(c_width_ms=1e-3)
    extra = with_width.verify_ms(one_wide, contexts) - with_width.verify_ms(spread, contexts)
    assert extra == pytest.approx(1e-3 * 12 * (9 - 2) * 400)
    # and one wide row costs more than every row at k = 2 (more tokens, but a third of the width)
    every_row = [2] * 12
    assert with_width.verify_ms(one_wide, contexts) > with_width.verify_ms(every_row, contexts) \
        > tokens_only.verify_ms(one_wide, contexts)


def test_per_row_terms_count_rows_and_speculating_rows():
    model = CostModel(c_row_ms=2.0, c_spec_row_ms=5.0, d_row_ms=0.5)
    assert model.verify_ms([0, 0, 4, 1], [10] * 4) == pytest.approx(2.0 * 4 + 5.0 * 2)
    assert model.draft_ms([0, 0, 4, 1], [10] * 4) == pytest.approx(0.5 * 2)
    assert model.predict_ms([0] * 4, [10] * 4) == pytest.approx(2.0 * 4)


def test_vectorised_path_matches_row_by_row():
    rng = np.random.default_rng(3)
    ks = rng.integers(0, 6, size=(50, 7))  # [N, B]
    contexts = rng.integers(1, 3000, size=(50, 7))
    prefills = rng.integers(0, 3, size=(50, 7))
    many = TRUE_MODEL.predict_ms(ks, contexts, prefills)
    assert many.shape == (50,)
    for row in range(50):
        one = TRUE_MODEL.predict_ms(ks[row].tolist(), contexts[row].tolist(), prefills[row].tolist())
        assert many[row] == pytest.approx(one)
        assert TRUE_MODEL.draft_ms(ks[row], contexts[row]) == pytest.approx(
            draft_by_depth(TRUE_MODEL, ks[row].tolist(), contexts[row].tolist())
        )


@pytest.mark.parametrize(("field", "value"), [("c_tok_ms", -1.0), ("d_kv_ms", math.nan), ("c_spec_ms", math.inf)])
def test_bad_coefficients_name_the_field(field, value):
    with pytest.raises(CostModelError) as info:
        CostModel(**{field: value})
    assert info.value.field == field
    with pytest.raises(CostModelError) as info:
        CostModel.from_proto(common_pb2.CostModel(**{field: value}))
    assert info.value.field == field


def test_round_trips_through_dict_json_and_proto():
    assert CostModel.from_dict(json.loads(json.dumps(TRUE_MODEL.to_dict()))) == TRUE_MODEL
    assert CostModel.from_proto(TRUE_MODEL.to_proto()) == TRUE_MODEL
    for name in ("c_spec_row_ms", "c_row_ms", "c_width_ms", "d_row_ms"):  # the proto carries every term
        assert getattr(TRUE_MODEL.to_proto(), name) == getattr(TRUE_MODEL, name) > 0
    # a model written before the per-row and width terms existed still reads, those terms 0
    old = {"c_fixed_ms": 84.8, "c_spec_ms": 46.5, "c_tok_ms": 2.9, "c_kv_ms": 0.011,
           "d_fixed_ms": 0.0, "d_tok_ms": 0.0, "d_kv_ms": 0.0, "overhead_ms": 0.0}
    assert CostModel.from_dict(old) == CostModel(**old)
    assert CostModel.from_dict(old).c_width_ms == 0.0
    assert CostModel.from_dict({"c_fixed_ms": 5}) == CostModel(c_fixed_ms=5.0)
    with pytest.raises(CostModelError) as info:
        CostModel.from_dict({"c_fixed": 5})
    assert info.value.field == "c_fixed"


def test_the_per_count_table_adds_to_the_line_at_its_count_only():
    model = TRUE_MODEL.replace(token_count_ms=[0.0, -5.0, 7.0, 0.0, 2.5])
    for ks, prefills, extra in (([0], [0], -5.0), ([1], [0], 7.0), ([0, 0], [0, 0], 7.0), ([0], [3], 2.5),
                                ([3, 3], [0, 0], 0.0), ([2], [0], 0.0)):
        contexts = [100] * len(ks)
        line = TRUE_MODEL.verify_ms(ks, contexts, prefills)
        assert model.verify_ms(ks, contexts, prefills) == pytest.approx(line + extra)
        assert model.predict_ms(ks, contexts, prefills) == pytest.approx(TRUE_MODEL.predict_ms(ks, contexts, prefills) + extra)
    # vectorised: [N, B] -> [N], each row its own count
    batch = np.array([[0, 0], [1, 0], [3, 3]])
    expected = TRUE_MODEL.verify_ms(batch, [[100, 100]] * 3) + np.array([7.0, 0.0, 0.0])
    assert np.allclose(model.verify_ms(batch, [[100, 100]] * 3), expected)
    assert CostModel.from_proto(model.to_proto()) == model
    assert CostModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model


@pytest.mark.parametrize("table", [[0.0, -31.0], [math.nan], [math.inf], [0.0] * 66, ["1"], 5.0])
def test_a_bad_per_count_table_is_refused_by_name(table):
    """Entries below -c_fixed (30 here) would predict negative steps; more than 65 entries, or
    anything but numbers, is not a table."""
    with pytest.raises(CostModelError) as info:
        TRUE_MODEL.replace(token_count_ms=table)
    assert info.value.field == "token_count_ms"
