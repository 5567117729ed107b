"""`python -m x2x_jax.evaluate.guidance`: the per-operation split of its IoU and its command-line checks."""

import pytest

from x2x_jax.evaluate import guidance


@pytest.mark.parametrize("text, op", [
    ("Add the finding of pleural effusion.", "add"),
    ("Remove the findings of edema and pneumonia.", "remove"),
    ("Change the level of cardiomegaly from mild to severe.", "change"),
    ("Add the finding of edema. Remove the finding of pneumonia.", "mixed"),
    ("Make it look nicer.", "mixed"),  # no edit parsed: not counted as any one operation
])
def test_instruction_op_names_the_one_operation_or_mixed(text, op):
    assert guidance.instruction_op(text) == op


def test_tau_grid_spans_the_open_unit_interval():
    assert guidance.TAU_GRID[0] == 0.05 and guidance.TAU_GRID[-1] == 0.95 and 0.1 in guidance.TAU_GRID


def test_one_seed_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        guidance.main(["measure", "--data-dir", "unused", "--seeds", "1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --seeds 1 must be >= 2 (seed stability compares seeds) and "
                                               "--n 64 >= 1")
