"""A user's model, weights and input from paths (:mod:`lrpkit.loading`), as the command line takes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lrpkit.loading import is_model_spec, load_input, load_weights, model_from_spec

MODEL_FILE = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(4, 2)

    def forward(self, x):
        return self.dense(x)

    @staticmethod
    def small():
        return Net()

instance = Net()
not_a_model = 3
def gives_a_number():
    return 3
"""


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_net.py"
    path.write_text(MODEL_FILE)
    return path


@pytest.mark.parametrize("factory", ["build", "Net", "Net.small", "instance"])
def test_model_from_a_file(model_file: Path, factory: str) -> None:
    model = model_from_spec(f"{model_file}:{factory}")
    assert isinstance(model, nn.Module)
    assert model(torch.rand(2, 4)).shape == (2, 2)


def test_model_from_a_module_name(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(model_file.parent))
    assert isinstance(model_from_spec("user_net:Net"), nn.Module)
    assert isinstance(model_from_spec("torchvision.models:resnet18"), nn.Module)


def test_the_same_file_is_imported_once(model_file: Path) -> None:
    assert model_from_spec(f"{model_file}:instance") is model_from_spec(f"{model_file}:instance")


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("{file}", ValueError, "path/to/file.py:factory"),
        ("{file}:missing", AttributeError, "has no 'missing'"),
        ("{file}:not_a_model", ValueError, "gave int, not a torch.nn.Module"),
        ("{file}:gives_a_number", ValueError, "gave int, not a torch.nn.Module"),
        ("{folder}/nothing_here.py:build", FileNotFoundError, "does not exist"),
        ("no_such_package_here:build", ModuleNotFoundError, "no_such_package_here"),
    ],
)
def test_bad_model_specs_say_what_is_wrong(model_file: Path, spec: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        model_from_spec(spec.format(file=model_file, folder=model_file.parent))


def test_is_model_spec() -> None:
    assert is_model_spec("net.py:build") and is_model_spec("pkg.models:Net")
    assert not is_model_spec("resnet18") and not is_model_spec("digits-cnn")


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


@pytest.mark.parametrize("packing", ["plain", "checkpoint", "data_parallel"])
def test_load_weights(tmp_path: Path, packing: str) -> None:
    saved, fresh = _pair()
    state = saved.state_dict()
    if packing == "checkpoint":
        state = {"epoch": 7, "state_dict": state}
    elif packing == "data_parallel":
        state = {f"module.{name}": value for name, value in state.items()}
    torch.save(state, tmp_path / "weights.pt")
    assert not torch.equal(fresh[0].weight, saved[0].weight)
    load_weights(fresh, tmp_path / "weights.pt")
    for name, value in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    torch.save(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).state_dict(), tmp_path / "other.pt")
    _, model = _pair()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError) as caught:
        load_weights(model, tmp_path / "other.pt")
    message = str(caught.value)
    assert "missing: 1.weight, 1.bias" in message
    assert "unexpected: 2.weight, 2.bias" in message
    assert "other shape: 0.weight (5, 4) (model: (3, 4))" in message
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())  # untouched


def test_weights_file_without_a_state_dict(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a state_dict"):
        load_weights(_pair()[0], tmp_path / "tensor.pt")


def test_load_an_image(tmp_path: Path) -> None:
    pixels = np.zeros((5, 7, 3), dtype=np.uint8)
    pixels[1, 2] = (255, 0, 51)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    x = load_input(tmp_path / "image.png")
    assert x.shape == (1, 3, 5, 7) and x.dtype == torch.float32
    assert x[0, :, 1, 2].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert x.sum().item() == pytest.approx(1.2)
    assert load_input(tmp_path / "image.png", size=(10, 4)).shape == (1, 3, 10, 4)


def test_load_tensors_and_arrays(tmp_path: Path) -> None:
    values = torch.rand(2, 6, dtype=torch.float64)
    torch.save(values, tmp_path / "x.pt")
    np.save(tmp_path / "x.npy", values.numpy())
    assert torch.equal(load_input(tmp_path / "x.pt"), values)
    assert torch.equal(load_input(tmp_path / "x.npy"), values)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("x.txt", "1 2 3", "unknown kind of file"), ("x.pt", {"a": 1}, "holds a dict, not a tensor"),
     ("missing.pt", None, "does not exist")],
)
def test_bad_inputs_say_what_is_wrong(tmp_path: Path, name: str, content: object, message: str) -> None:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_input(path)
