"""One validated, frozen options object, settable from YAML and documented as coded.

Every table below is checked against ``option_names()``, so an option added to :class:`MaxUpConfig` without a
validation case, a YAML value or README documentation fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ArgumentParser

from lightning_maxup import MaxUp, MaxUpMixin, maxup_step
from lightning_maxup.augment import GaussianNoise
from lightning_maxup.core.config import MaxUpConfig, option_names
from lightning_maxup.core.views import Downsample, PointSubset
from lightning_maxup.recipes.models import MaxUpClassifier

README = Path(__file__).resolve().parents[2] / "README.md"


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------
# (option, invalid value, exception); the message must name the option in backticks and show the value's repr.
INVALID: list = [
    pytest.param("m", 0, ValueError, id="m-zero"),
    pytest.param("m", -2, ValueError, id="m-negative"),
    pytest.param("m", 2.0, ValueError, id="m-float"),
    pytest.param("m", True, ValueError, id="m-bool"),
    pytest.param("augment", 3, TypeError, id="augment-not-callable"),
    pytest.param("chunk_size", 0, ValueError, id="chunk_size-zero"),
    pytest.param("chunk_size", "8", ValueError, id="chunk_size-str"),
    pytest.param("selection_size", 0, ValueError, id="selection_size-zero"),
    pytest.param("selection_size", 16.0, ValueError, id="selection_size-float"),
    pytest.param("selection_view", "fps", TypeError, id="selection_view-not-callable"),
    pytest.param("selection_mode", "test", ValueError, id="selection_mode-unknown"),
    pytest.param("selection_mode", "Eval", ValueError, id="selection_mode-case"),
    pytest.param("selection_dtype", "int8", ValueError, id="selection_dtype-unknown-name"),
    pytest.param("selection_dtype", torch.int8, ValueError, id="selection_dtype-unknown-dtype"),
    pytest.param("selection_dtype", torch.float64, ValueError, id="selection_dtype-float64"),
    pytest.param("selection_memory_format", "nhwc", ValueError, id="selection_memory_format-unknown-name"),
    pytest.param("selection_memory_format", torch.preserve_format, ValueError, id="selection_memory_format-preserve"),
    pytest.param("check_finite", 1, ValueError, id="check_finite-int"),
    pytest.param("check_finite", "yes", ValueError, id="check_finite-str"),
    pytest.param("seed", 1.5, ValueError, id="seed-float"),
    pytest.param("seed", True, ValueError, id="seed-bool"),
    pytest.param("randomness", "global", ValueError, id="randomness-unknown"),
    pytest.param("selection_temperature", 0.0, ValueError, id="selection_temperature-zero"),
    pytest.param("selection_temperature", -1.0, ValueError, id="selection_temperature-negative"),
    pytest.param("selection_temperature", float("inf"), ValueError, id="selection_temperature-inf"),
    pytest.param("selection_temperature", "hot", ValueError, id="selection_temperature-str"),
]


def _message(name: str, value: Any) -> str:
    return rf"`{name}`.*{re.escape(repr(value))}"


def test_every_option_has_a_validation_case() -> None:
    assert {p.values[0] for p in INVALID} == set(option_names())


@pytest.mark.parametrize(("name", "value", "error"), INVALID)
def test_invalid_option_raises_naming_it(name: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=_message(name, value)):
        MaxUpConfig(**{name: value})


@pytest.mark.parametrize(("name", "value", "error"), INVALID)
def test_replace_validates(name: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=_message(name, value)):
        MaxUpConfig().replace(**{name: value})


@pytest.mark.parametrize(("name", "value", "error"), INVALID)
def test_every_entry_point_validates(name: str, value: Any, error: type[Exception]) -> None:
    """The function, the mixin and the callback reject what the config rejects, before any training."""
    with pytest.raises(error, match=_message(name, value)):
        maxup_step(lambda b: b.sum(1), torch.zeros(2, 3), **{name: value})
    with pytest.raises(error, match=_message(name, value)):
        _Lit(**{name: value})
    with pytest.raises(error, match=_message(name, value)):
        MaxUp(**{name: value})


def test_selection_size_and_view_exclude_each_other() -> None:
    view = PointSubset(8)
    with pytest.raises(ValueError, match=r"Pass either `selection_size` or `selection_view`, got both \(16 and"):
        MaxUpConfig(selection_size=16, selection_view=view)
    # An override wins over the other spelling instead of clashing with it.
    assert MaxUpConfig(selection_view=view).replace(selection_size=16).view.size == 16
    assert MaxUpConfig(selection_size=16).replace(selection_view=view).view is view


def test_unknown_option_raises_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"Unknown MaxUp option\(s\) \['chunksize'\]; the options are \['m', "):
        MaxUpConfig().replace(chunksize=4)
    with pytest.raises(TypeError, match=r"Unknown MaxUp option\(s\) \['chunksize'\]"):
        maxup_step(lambda b: b.sum(1), torch.zeros(2, 3), chunksize=4)
    with pytest.raises(TypeError, match=r"Unknown MaxUp option\(s\) \['chunksize'\]"):
        MaxUp(chunksize=4)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'chunksize'"):
        MaxUpConfig(chunksize=4)  # type: ignore[call-arg]


def test_mixin_rejects_a_config_of_another_type() -> None:
    with pytest.raises(TypeError, match=r"Expected `maxup` to be a MaxUpConfig, got dict"):
        _Lit(maxup={"m": 2})


def test_config_is_frozen_and_replace_copies() -> None:
    cfg = MaxUpConfig(m=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.m = 3  # type: ignore[misc]
    assert cfg.replace(m=3).m == 3
    assert cfg.m == 2


def test_mixin_attributes_read_the_config_and_setting_one_is_deprecated() -> None:
    model = _Lit(maxup=MaxUpConfig(m=2), chunk_size=8)
    assert (model.maxup_m, model.maxup_chunk_size) == (2, 8)
    with pytest.warns(DeprecationWarning, match=r"maxup_selection_mode.*maxup_config.replace\(selection_mode=\.\.\.\)"):
        model.maxup_selection_mode = "train"
    assert model.maxup_config.selection_mode == "train"
    with (
        pytest.warns(DeprecationWarning, match="maxup_m"),
        pytest.raises(ValueError, match=r"Expected `m` to be a positive integer, got 0"),
    ):
        model.maxup_m = 0
    assert model.maxup_config.m == 2


@pytest.mark.parametrize(
    ("given", "name", "expected"),
    [
        pytest.param(torch.bfloat16, "bfloat16", torch.bfloat16, id="bfloat16"),
        pytest.param(torch.float16, "float16", torch.float16, id="float16"),
        pytest.param(torch.float32, "float32", torch.float32, id="float32"),
        pytest.param("bfloat16", "bfloat16", torch.bfloat16, id="name"),
        pytest.param(None, None, None, id="None"),
    ],
)
def test_selection_dtype_accepts_torch_dtypes_and_normalises(given: Any, name: Any, expected: Any) -> None:
    cfg = MaxUpConfig(selection_dtype=given)
    assert cfg.selection_dtype == name
    assert cfg.dtype == expected
    assert cfg == MaxUpConfig(selection_dtype=name)


@pytest.mark.parametrize(
    ("given", "name", "expected"),
    [
        pytest.param(torch.channels_last, "channels_last", torch.channels_last, id="channels_last"),
        pytest.param(torch.contiguous_format, "contiguous", torch.contiguous_format, id="contiguous_format"),
        pytest.param("channels_last", "channels_last", torch.channels_last, id="name"),
        pytest.param(None, None, None, id="None"),
    ],
)
def test_selection_memory_format_accepts_torch_formats_and_normalises(given: Any, name: Any, expected: Any) -> None:
    cfg = MaxUpConfig(selection_memory_format=given)
    assert cfg.selection_memory_format == name
    assert cfg.memory_format == expected
    assert cfg == MaxUpConfig(selection_memory_format=name)


class _Lit(MaxUpMixin, pl.LightningModule):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)


# ----------------------------------------------------------------------------------------------------------------------
# YAML (LightningCLI reads signatures through jsonargparse)
# ----------------------------------------------------------------------------------------------------------------------
# A non-default YAML value for every option, and what the parsed config must hold.
YAML_VALUES: dict[str, tuple[Any, Any]] = {
    "m": (3, 3),
    "augment": ({"class_path": "lightning_maxup.augment.GaussianNoise", "init_args": {"sigma": 0.25}}, None),
    "chunk_size": (5, 5),
    "selection_size": (None, None),  # set below, in place of selection_view (they exclude each other)
    "selection_view": ({"class_path": "lightning_maxup.core.views.PointSubset", "init_args": {"k": 16}}, None),
    "selection_mode": ("train", "train"),
    "selection_dtype": ("bfloat16", "bfloat16"),
    "selection_memory_format": ("channels_last", "channels_last"),
    "check_finite": (False, False),
    "seed": (7, 7),
    "randomness": ("sample", "sample"),
    "selection_temperature": (0.5, 0.5),
}


def _check_parsed(cfg: MaxUpConfig, view: type) -> None:
    for name, (_, expected) in YAML_VALUES.items():
        if expected is not None:
            assert getattr(cfg, name) == expected, name
    assert isinstance(cfg.augment, GaussianNoise)
    assert cfg.augment.sigma == 0.25
    assert isinstance(cfg.view, view)


def _parse(options: dict[str, Any]) -> MaxUpConfig:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MaxUpConfig, "maxup")
    return parser.instantiate(parser.parse_string(yaml.safe_dump({"maxup": options}))).maxup


def test_every_option_has_a_yaml_value() -> None:
    assert list(YAML_VALUES) == option_names()


def test_every_option_settable_from_yaml() -> None:
    cfg = _parse({name: value for name, (value, _) in YAML_VALUES.items()})
    assert isinstance(cfg, MaxUpConfig)
    _check_parsed(cfg, PointSubset)
    assert cfg.selection_view.k == 16
    cfg = _parse({**{n: v for n, (v, _) in YAML_VALUES.items()}, "selection_size": 16, "selection_view": None})
    _check_parsed(cfg, Downsample)
    assert cfg.view.size == 16


@pytest.mark.parametrize(
    ("options", "error"),
    [
        pytest.param({"selection_mode": "test"}, r'"maxup.selection_mode"', id="literal"),
        pytest.param({"selection_dtype": "float64"}, r'"maxup.selection_dtype"', id="dtype"),
        pytest.param({"m": 0}, r"Expected `m` to be a positive integer, got 0", id="validator"),
    ],
)
def test_yaml_rejects_invalid_values(options: dict[str, Any], error: str) -> None:
    with pytest.raises(Exception, match=error):  # noqa: PT011 - jsonargparse's ArgumentError or the validator's
        _parse(options)


# Lightning 2.6's LightningCLI calls jsonargparse APIs that jsonargparse 4.5x deprecates; not this library's calls.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_lightning.cli")
@pytest.mark.skipif(
    "maxup" not in inspect.signature(MaxUpClassifier.__init__).parameters,
    reason="MaxUpClassifier does not take `maxup: MaxUpConfig | None` yet",
)
def test_every_option_settable_from_lightning_cli_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["lightning-maxup"])  # LightningCLI warns when pytest's arguments are there
    monkeypatch.chdir(tmp_path)
    options = {name: value for name, (value, _) in YAML_VALUES.items()}
    model = {
        "backbone": {
            "class_path": "lightning_maxup.recipes.models.SmallCNN",
            "init_args": {"in_channels": 1, "num_classes": 3},
        },
        "num_classes": 3,
        "maxup": options,
    }
    config = yaml.safe_dump({"model": model, "trainer": {"logger": False}})
    cli = LightningCLI(MaxUpClassifier, run=False, args=["--config", config], seed_everything_default=False)
    _check_parsed(cli.model.maxup_config, PointSubset)


# ----------------------------------------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------------------------------------
def documented_signature(text: str) -> list[tuple[str, Any]]:
    """``(name, default)`` pairs of the first ``MaxUpConfig(...)`` in ``text`` (a markdown document)."""
    found = re.search(r"\bMaxUpConfig\(", text)
    assert found is not None, "README.md documents no `MaxUpConfig(...)` signature"
    depth, end = 0, found.end() - 1
    for end in range(found.end() - 1, len(text)):  # noqa: B007 - the closing parenthesis is wanted after the loop
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            break
    call = ast.parse(text[found.start() : end + 1].replace("\n", " "), mode="eval").body
    assert isinstance(call, ast.Call), text[found.start() : end + 1]
    assert not call.args, f"documented positional arguments: {[ast.unparse(a) for a in call.args]}"
    pairs = []
    for keyword in call.keywords:
        try:
            pairs.append((keyword.arg, ast.literal_eval(keyword.value)))
        except ValueError:
            pairs.append((keyword.arg, ast.unparse(keyword.value)))
    return pairs


def signature_drift(documented: list[tuple[str, Any]]) -> list[str]:
    """What differs between a documented signature and ``MaxUpConfig``'s fields, one line each (empty if none)."""
    coded = [(f.name, f.default) for f in dataclasses.fields(MaxUpConfig)]
    doc, code = dict(documented), dict(coded)
    drift = [f"missing from the README: {name}={default!r}" for name, default in coded if name not in doc]
    drift += [f"not an option: {name}={default!r}" for name, default in documented if name not in code]
    drift += [
        f"{name}: README says {doc[name]!r}, the code {code[name]!r}"
        for name in code
        if name in doc and doc[name] != code[name]
    ]
    if not drift and [n for n, _ in documented] != [n for n, _ in coded]:
        drift.append(f"order: README {[n for n, _ in documented]}, code {[n for n, _ in coded]}")
    return drift


def _signature_text(pairs: list[tuple[str, Any]]) -> str:
    return "- **`MaxUpConfig(" + ", ".join(f"{k}={v!r}" for k, v in pairs) + ")`** is the one options object."


CODED = [(f.name, f.default) for f in dataclasses.fields(MaxUpConfig)]


@pytest.mark.parametrize(
    ("pairs", "drift"),
    [
        pytest.param(CODED, [], id="agrees"),
        pytest.param(CODED[:-1], ["missing from the README: selection_temperature=None"], id="missing"),
        pytest.param([*CODED, ("jitter", 0.1)], ["not an option: jitter=0.1"], id="extra"),
        pytest.param([("m", 8), *CODED[1:]], ["m: README says 8, the code 4"], id="default"),
        pytest.param([CODED[1], CODED[0], *CODED[2:]], ["order: README ['augment', 'm', "], id="order"),
    ],
)
def test_signature_drift_on_a_string(pairs: list[tuple[str, Any]], drift: list[str]) -> None:
    text = "Use `MaxUpConfig` like this:\n\n" + _signature_text(pairs) + "\n\n`MaxUpConfig(m=2)` later."
    found = signature_drift(documented_signature(text))
    assert len(found) == len(drift)
    for line, expected in zip(found, drift, strict=True):
        assert line.startswith(expected), (line, expected)


def test_signature_spanning_lines() -> None:
    text = "```python\nMaxUpConfig(\n    m=4,\n    augment=None,\n)\n```"
    assert documented_signature(text) == [("m", 4), ("augment", None)]


def test_readme_documents_the_coded_signature() -> None:
    drift = signature_drift(documented_signature(README.read_text(encoding="utf-8")))
    assert not drift, "README.md's MaxUpConfig signature and the code disagree:\n" + "\n".join(drift)
