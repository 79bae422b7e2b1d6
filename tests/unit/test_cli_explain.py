"""``lrpkit explain`` and ``lrpkit describe`` on a user's own model, weights and input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lrpkit
from lrpkit.cli import main

MODEL_FILE = """
import torch
from torch import nn

def cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False))

def mlp():
    return nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))

def sequence():
    return nn.Sequential(nn.Conv1d(6, 4, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(4, 2, bias=False))

def video():
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                         nn.Flatten(), nn.Linear(4, 2, bias=False))

class Bag(nn.Module):
    def __init__(self, vocabulary=10, classes=2):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 4)
        self.head = nn.Linear(4, classes, bias=False)

    def forward(self, ids):
        return self.head(self.embedding(ids).sum(dim=1))

class ImageAndIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.embedding = nn.Embedding(12, 4)
        self.head = nn.Linear(8, 2, bias=False)

    def forward(self, image, ids):
        pictured = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return self.head(torch.cat([pictured, self.embedding(ids).sum(dim=1)], dim=1))

class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        return {"features": x, "logits": self.body(x)}
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "net.py").write_text(MODEL_FILE)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(MODEL_FILE, namespace)
    cnn = namespace["cnn"]()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults: the weights must arrive
        cnn[1].running_mean.uniform_(-0.5, 0.5)
        cnn[1].running_var.uniform_(0.5, 2.0)
    torch.save(cnn.state_dict(), tmp_path / "cnn.pt")
    torch.save({"epoch": 3, "model_state_dict": namespace["mlp"]().state_dict()}, tmp_path / "mlp.ckpt")
    pixels = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    torch.save(torch.rand(3, 5, dtype=torch.float64), tmp_path / "rows.pt")
    return tmp_path


def test_explain_own_cnn_on_an_image(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, saved = files / "heatmap.png", files / "result.pt"
    argv = ["explain", f"{files}/net.py:cnn", "--weights", str(files / "cnn.pt"), "--input", str(files / "image.png"),
            "--size", "16", "--composite", "epsilon_plus", "--out", str(out), "--save", str(saved)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "sample 0: class" in printed
    with Image.open(out) as image:
        assert image.size[0] > image.size[1] > 0  # input and heatmap side by side
    result = torch.load(saved, weights_only=True)
    assert result["input"].shape == (1, 3, 16, 16) and result["relevance"].shape == (1, 3, 16, 16)
    # the weights were loaded (the output is the weighted model's) and the relevance is lrpkit.explain's
    namespace: dict = {}
    exec(MODEL_FILE, namespace)
    model = namespace["cnn"]()
    model.load_state_dict(torch.load(files / "cnn.pt", weights_only=True))
    expected = model.eval()(result["input"])
    assert torch.allclose(result["output"], expected, atol=1e-6)
    reference = lrpkit.explain(model, result["input"], composite="epsilon_plus")
    assert torch.equal(result["relevance"], reference.relevance)


def test_explain_rows_from_a_tensor_file(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", f"{files}/net.py:mlp", "--weights", str(files / "mlp.ckpt"), "--input", str(files / "rows.pt"),
            "--composite", "epsilon_plus", "--save", str(files / "r.pt"), "--out", str(files / "strips.png")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sample 2: class" in printed and "= 1.0000 x the logit" in printed  # no biases: conserved
    result = torch.load(files / "r.pt", weights_only=True)
    assert result["relevance"].dtype == torch.float32  # the model's dtype
    # the features of largest |relevance| first, with their values
    first = int(result["relevance"][1].abs().argmax())
    value = float(result["input"][1, first])
    assert f"sample 1, largest |relevance| at position: {first} (value {value:.3g}) " in printed
    with Image.open(files / "strips.png") as image:  # one strip per sample
        assert image.size[0] >= 256 and image.size[1] >= 3 * 24


def test_explain_token_ids_with_a_vocabulary_as_an_html_page(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torch.tensor([[1, 2, 3, 11], [4, 4, 0, 5]]), files / "ids.pt")
    (files / "vocab.txt").write_text("".join(f"w{index}\n" for index in range(12)))
    page, saved = files / "page.html", files / "ids-result.pt"
    argv = ["explain", f"{files}/net.py:Bag", "--model-args", '{"vocabulary": 12, "classes": 3}', "--input",
            str(files / "ids.pt"), "--vocab", str(files / "vocab.txt"), "--out", str(page), "--save", str(saved)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "output (2, 3), relevance (2, 4)" in printed  # the factory took --model-args
    relevance = torch.load(saved, weights_only=True)["relevance"]
    first = int(relevance[0].abs().argmax())
    assert f"sample 0, largest |relevance| at position: {first} (token 'w{[1, 2, 3, 11][first]}') " in printed
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count("<p>sample") == 2
    assert ">w11</span>" in text and text.count("title=") == 8  # every token, with its relevance
    assert main([*argv[:6], "--out", str(files / "ids.png")]) == 0
    printed = capsys.readouterr().out  # without a vocabulary the ids name the tokens
    assert f"sample 0, largest |relevance| at position: {first} (id {[1, 2, 3, 11][first]}) " in printed
    assert (files / "ids.png").exists()


def test_explain_a_model_with_two_inputs(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--input`` twice: ``model(image, ids)``; one heatmap file per input, the relevance of both
    together sums to the logit. (Options before MODEL work too.)"""
    torch.save(torch.tensor([[1, 2, 3, 11]]), files / "ids.pt")
    (files / "vocab.txt").write_text("".join(f"w{index}\n" for index in range(12)))
    out, saved = files / "both.png", files / "both.pt"
    argv = ["explain", "--input", str(files / "image.png"), "--input", str(files / "ids.pt"), f"{files}/net.py:ImageAndIds",
            "--size", "8", "--vocab", str(files / "vocab.txt"), "--composite", "epsilon_plus", "--out", str(out),
            "--save", str(saved)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "relevance (1, 3, 8, 8), (1, 4)" in printed and "= 1.0000 x the logit" in printed
    assert "input 1, sample 0, largest |relevance| at position: " in printed and "(token 'w" in printed
    assert (files / "both-input0.png").exists() and (files / "both-input1.png").exists()
    image, ids = torch.load(saved, weights_only=True)["relevance"]
    assert image.shape == (1, 3, 8, 8) and ids.shape == (1, 4)
    assert main([*argv, "--imagenet"]) == 2
    assert "with several, save them normalised" in capsys.readouterr().err


def test_explain_a_map_per_sample_sums_long_axes_into_bins(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lrpkit.cli import _viewable

    out = files / "maps.png"
    assert main(["explain", f"{files}/net.py:sequence", "--input-shape", "6", "700", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size[0] >= 512 and image.size[1] >= 24
    relevance = torch.randn(6, 700, dtype=torch.float64)
    shown = _viewable(relevance)
    assert shown.shape == (24, 512)  # 6 rows repeated 4 times; 700 columns summed into 512 bins
    assert np.isclose(shown.sum() / 4, float(relevance.sum()))
    assert _viewable(torch.arange(3.0)).shape == (24, 255)  # a short strip: repeated


def test_explain_a_video_clip_frame_by_frame(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = files / "clip.png"
    assert main(["explain", f"{files}/net.py:video", "--input-shape", "3", "12", "16", "16", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:  # 8 of the 12 frames (16 x 16, scaled 8 times), two rows per sample
        assert image.size[0] > 8 * 128 and 2 * 128 < image.size[1] < 3 * 128


def test_explain_a_torchvision_model_with_model_args(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "resnet18", "--size", "32", "--model-args", '{"num_classes": 7}']) == 0
    assert "fc" in capsys.readouterr().out
    assert main(["explain", "resnet18", "--size", "32", "--model-args", '{"num_classes": 7}', "--out", "/dev/null"]) == 0
    assert "output (1, 7)" in capsys.readouterr().out


def test_explain_random_input_of_a_shape(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", f"{files}/net.py:mlp", "--input-shape", "5", "--out", str(files / "x.png")]) == 0
    assert "relevance (1, 5)" in capsys.readouterr().out


def test_explain_a_segmentation_map_and_a_dict_output(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "segmentation.lraspp_mobilenet_v3_large", "--output", "out", "--target", "1", "--size", "32",
            "--composite", "epsilon_plus", "--out", str(files / "seg.png")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "output (1, 21, 32, 32)" in printed and "sample 0: class 1, sum of its logits" in printed
    assert main(argv) == 0  # seeded: the same random model and image on every run
    assert capsys.readouterr().out == printed
    assert main(["explain", f"{files}/net.py:Pair", "--output", "logits", "--input-shape", "5", "--target", "1"]) == 0
    assert "sample 0: class 1, logit" in capsys.readouterr().out


def test_explain_normalises_with_mean_and_std(files: Path) -> None:
    saved = files / "normalised.pt"
    argv = ["explain", f"{files}/net.py:cnn", "--weights", str(files / "cnn.pt"), "--input", str(files / "image.png"),
            "--imagenet", "--composite", "epsilon_plus", "--save", str(saved), "--out", str(files / "n.png")]
    assert main(argv) == 0
    result = torch.load(saved, weights_only=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(result["input"], (result["given"] - mean) / std)
    assert result["given"].min() >= 0 and result["given"].max() <= 1  # the pixels, shown in the heatmap PNG
    namespace: dict = {}
    exec(MODEL_FILE, namespace)
    model = namespace["cnn"]()
    model.load_state_dict(torch.load(files / "cnn.pt", weights_only=True))
    assert torch.equal(result["relevance"], lrpkit.explain(model.eval(), result["input"], composite="epsilon_plus").relevance)
    same = ["--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]
    assert main([*argv[:6], *same, *argv[7:]]) == 0
    assert torch.equal(torch.load(saved, weights_only=True)["relevance"], result["relevance"])


def test_describe_own_model(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", f"{files}/net.py:cnn", "--weights", str(files / "cnn.pt"), "--input-shape", "3", "8", "8"]) == 0
    table = capsys.readouterr().out
    assert "Conv2d" in table and "Flat(" in table and "1x4x8x8" in table


@pytest.mark.parametrize("command", ["explain", "describe"])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{files}/net.py:cnn", "--model-args", "{{nope"], "--model-args is not JSON"),
        (["{files}/net.py:cnn", "--model-args", "[1]"], "must be a JSON object of keyword arguments, not a list"),
        (["{files}/net.py:cnn", "--model-args", '{{"depth": 3}}'], "the factory does not take {{'depth': 3}}"),
        (["digits-cnn", "--model-args", '{{"depth": 3}}'], "--weights and --model-args are for"),
        (["resnet18", "--model-args", '{{"weights": "DEFAULT"}}'], "never downloaded"),
        (["resnet18", "--size", "32", "--model-args", '{{"depth": 3}}'], "torchvision's resnet18 with --model-args"),
    ],
)
def test_bad_model_args(files: Path, command: str, argv: list[str], message: str,
                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, *(word.format(files=files) for word in argv)]) == 2
    assert f"lrpkit {command}: " in (error := capsys.readouterr().err) and message.format() in error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{files}/net.py:cnn", "--vocab", "{files}/vocab.txt"], "--vocab names token ids, and the input holds torch.float32"),
        (["{files}/net.py:Bag", "--input", "{files}/ids.pt", "--vocab", "{files}/vocab.txt"], "names ids 0 to 2, and the input holds ids 1 to 11"),
        (["{files}/net.py:Bag", "--input", "{files}/ids.pt", "--vocab", "{files}/absent.txt"], "No such file"),
        (["{files}/net.py:cnn", "--out", "{files}/page.html"], "this one is shaped (1, 3, 64, 64): write a .png"),
    ],
)
def test_bad_explain_outputs(files: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torch.tensor([[1, 11]]), files / "ids.pt")
    (files / "vocab.txt").write_text("a\nb\nc\n")
    assert main(["explain", *(word.format(files=files) for word in argv)]) == 2
    assert "lrpkit explain: " in (error := capsys.readouterr().err) and message in error
    assert not (files / "page.html").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{files}/net.py:cnn", "--input", "{files}/image.png", "--input-shape", "3", "4", "4"], "not both"),
        (["{files}/net.py:cnn", "--weights", "{files}/mlp.ckpt"], "other shape: 0.weight (4, 5) (model: (4, 3, 3, 3))"),
        (["{files}/net.py:nothing"], "has no 'nothing'"),
        (["{files}/absent.py:cnn"], "does not exist"),
        (["{files}/net.py:cnn", "--input", "{files}/net.py"], "unknown kind of file"),
        (["{files}/net.py:cnn", "--composite", "nope"], "unknown composite 'nope'"),
        (["no_such_model"], "torchvision has no model 'no_such_model'"),
        (["digits-cnn", "--weights", "{files}/cnn.pt"], "digits-cnn comes with its weights"),
        (["{files}/net.py:cnn", "--input-shape", "0"], "at least 1"),
        (["{files}/net.py:cnn", "--mean", "0.5"], "give --mean and --std together"),
        (["{files}/net.py:cnn", "--mean", "0.5", "--std", "0.2", "0.3"], "--mean has 1 values and --std 2"),
        (["{files}/net.py:cnn", "--mean", "0.5", "--std", "0"], "--std must be positive"),
        (["{files}/net.py:cnn", "--mean", "0.5", "--std", "0.2"], "has 3 channels (dim 1)"),
        (["{files}/net.py:cnn", "--imagenet", "--mean", "0.5", "--std", "0.2"], "--imagenet or --mean/--std"),
    ],
)
@pytest.mark.parametrize("command", ["explain", "describe"])
def test_bad_command_lines(files: Path, command: str, argv: list[str], message: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, *(word.format(files=files) for word in argv)]) == 2
    assert f"lrpkit {command}: " in (error := capsys.readouterr().err) and message in error
