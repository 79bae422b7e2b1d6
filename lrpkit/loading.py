"""A user's own model and input on the command line: ``file.py:factory``, weights and inputs from paths.

``lrpkit explain``, ``lrpkit describe`` and ``lrpkit bench models`` take a model as a torchvision
name or as ``path/to/file.py:factory`` / ``package.module:factory``: the factory (a function or a
class) is called without arguments and returns the ``nn.Module``; an ``nn.Module`` object named
there is used as it is. Weights come from a ``state_dict`` file (:func:`load_weights`), never from
the network. Inputs come from a tensor file or an image (:func:`load_input`).

Examples
--------
>>> import tempfile, pathlib, torch
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "net.py").write_text("import torch\\ndef build():\\n    return torch.nn.Linear(4, 2)\\n")
>>> model = model_from_spec(f"{folder / 'net.py'}:build")
>>> torch.save(model.state_dict(), folder / "net.pt")
>>> load_weights(model_from_spec(f"{folder / 'net.py'}:build"), folder / "net.pt")
>>> is_model_spec("resnet18"), is_model_spec("net.py:build")
(False, True)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["is_model_spec", "load_input", "load_weights", "model_from_spec"]

#: Keys under which training scripts commonly keep the state dict inside a checkpoint.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
#: File endings read as images (with Pillow).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def is_model_spec(name: str) -> bool:
    """Whether ``name`` names a factory (``file.py:factory``, ``package.module:factory``), not a built-in model."""
    return ":" in name


def model_from_spec(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The model that ``spec`` (``path/to/file.py:factory`` or ``package.module:factory``) names.

    ``factory`` may be dotted (``Net.small``). A callable is called with the keyword arguments
    ``kwargs`` (none by default); an ``nn.Module`` object is returned as it is.

    Raises
    ------
    ValueError
        If ``spec`` has no ``:factory`` part, the factory gives no ``nn.Module``, or it does
        not take ``kwargs`` (or ``kwargs`` are given for a module object).
    FileNotFoundError, ImportError, AttributeError
        If the file, the module or the factory does not exist (the message names it).
    """
    location, _, attribute = spec.rpartition(":")
    if not location or not attribute:
        raise ValueError(f"model {spec!r}: write it as path/to/file.py:factory or package.module:factory")
    found: Any = _import(location)
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise AttributeError(f"model {spec!r}: {location} has no {attribute!r}")
        found = getattr(found, part)
    if isinstance(found, nn.Module) or not callable(found):
        if kwargs:
            raise ValueError(f"model {spec!r}: {attribute} is a {type(found).__name__} object, not a factory; it takes no arguments")
        model = found
    else:
        model = _called(spec, found, dict(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: {attribute} gave {type(model).__name__}, not a torch.nn.Module")
    return model


def _called(spec: str, factory: Any, kwargs: dict[str, Any]) -> Any:
    """``factory(**kwargs)``; a signature that does not take ``kwargs`` is a ``ValueError`` naming it."""
    if kwargs:
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as error:
            raise ValueError(f"model {spec!r}: the factory does not take {kwargs} ({error})") from error
        except ValueError:  # no signature to read (a builtin): let the call decide
            pass
    return factory(**kwargs)


def _import(location: str) -> ModuleType:
    """The module at ``location``: a ``.py`` file (imported under a name of its own) or a module name."""
    if not location.endswith(".py"):
        return importlib.import_module(location)
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"model file {location!r} does not exist")
    name = "lrpkit_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load the ``state_dict`` saved at ``path`` into ``model`` (on the CPU, tensors only).

    A checkpoint dictionary that keeps the state dict under ``"state_dict"``, ``"model_state_dict"``
    or ``"model"`` is unpacked, and the ``"module."`` prefix that ``nn.DataParallel`` adds is
    dropped when ``model`` has none.

    Raises
    ------
    ValueError
        If the weights do not fit ``model``: the message lists the first missing and unexpected
        names and the parameters whose shapes differ.
    """
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"weights {str(path)!r}: hold a {type(state).__name__}, not a state_dict")
    for key in _CHECKPOINT_KEYS:
        if isinstance(state.get(key), Mapping) and not isinstance(state.get(key), Tensor):
            state = state[key]
            break
    state = _without_data_parallel_prefix(dict(state), model)
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    reshaped = [
        f"{name} {tuple(state[name].shape)} (model: {tuple(value.shape)})"
        for name, value in expected.items()
        if name in state and isinstance(state[name], Tensor) and state[name].shape != value.shape
    ]
    if missing or unexpected or reshaped:
        problems = [
            f"{label}: {_first(items)}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped))
            if items
        ]
        raise ValueError(
            f"weights {str(path)!r} do not fit {type(model).__name__}: " + "; ".join(problems)
            + ". Load them into the model they were saved from"
        )
    model.load_state_dict(state)


def _without_data_parallel_prefix(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``state`` without the ``module.`` prefix of ``nn.DataParallel`` where ``model``'s names have none."""
    prefix = "module."
    if state and all(name.startswith(prefix) for name in state) and not any(
        name.startswith(prefix) for name in model.state_dict()
    ):
        return {name[len(prefix):]: value for name, value in state.items()}
    return state


def _first(items: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(items[:count])
    return shown + (f" and {len(items) - count} more" if len(items) > count else "")


def load_input(path: str | os.PathLike[str], size: Sequence[int] | None = None) -> Tensor:
    """An input batch read from ``path``.

    - A tensor file (``torch.save``; ``.pt``, ``.pth``) or a NumPy file (``.npy``), as saved:
      give it the batch dimension the model expects.
    - An image (PNG, JPEG, ...): ``(1, 3, H, W)`` float32 in ``[0, 1]`` (RGB), resized to
      ``size = (H, W)`` when given (``lrpkit explain --mean/--std`` normalises it afterwards).

    Raises
    ------
    ValueError
        If the file holds no tensor (or array), or its kind is not known.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"input {str(path)!r} does not exist")
    suffix = file.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _image(file, size)
    if suffix == ".npy":
        values: Any = torch.from_numpy(np.load(file, allow_pickle=False))
    elif suffix in (".pt", ".pth"):
        values = torch.load(file, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"input {str(path)!r}: unknown kind of file; give an image ({', '.join(sorted(IMAGE_SUFFIXES))}), "
            "a tensor saved with torch.save (.pt, .pth) or a NumPy array (.npy)"
        )
    if not isinstance(values, Tensor):
        raise ValueError(f"input {str(path)!r} holds a {type(values).__name__}, not a tensor")
    return values


def _image(file: Path, size: Sequence[int] | None) -> Tensor:
    from PIL import Image

    with Image.open(file) as image:
        rgb = image.convert("RGB")
        if size is not None:
            height, width = size
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()
