"""``lrpkit describe``: the rule table from the command line."""

from __future__ import annotations

import pytest

from lrpkit.cli import main


def test_describe_torchvision_model_lists_captured_calls(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "resnet18", "--size", "32", "--composite", "epsilon_plus"]) == 0
    table = capsys.readouterr().out
    assert "layer1.0.add" in table and "Norm(stabilizer=1e-06)" in table
    assert table.splitlines()[0].split()[:3] == ["#", "name", "kind"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["describe", "resnet18", "--composite", "nope"], "unknown composite 'nope'"),
        (["describe", "no_such_model"], "torchvision has no model 'no_such_model'"),
    ],
)
def test_describe_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
