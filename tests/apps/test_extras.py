"""The lean base install: SciPy, scikit-learn and matplotlib are extras, imported only where they are used.

Each check runs in a fresh interpreter where the optional packages are made unimportable (``sys.modules[name] =
None``, what Python does for a package that is not installed), as in an install without the extras.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = ("sklearn", "scipy", "matplotlib")
# The design card's packages come first, as they are: torchmetrics imports matplotlib when it is installed (in the base
# install it is not, and torchmetrics goes without). Then every optional module is dropped and made unimportable.
DEPENDENCIES = "import sys, torch, torchvision, torchmetrics, pytorch_lightning\n"
BLOCK = DEPENDENCIES + textwrap.dedent(
    f"""
    for _name in [m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r}]:
        del sys.modules[_name]
    for _name in {OPTIONAL!r}:
        sys.modules[_name] = None
    """
)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_every_module_imports_without_the_extras() -> None:
    code = BLOCK + textwrap.dedent(
        """
        import importlib, pkgutil, warnings
        import lightning_maxup
        from lightning_maxup import MaxUp, MaxUpMixin
        failed = {}
        for info in pkgutil.walk_packages(lightning_maxup.__path__, "lightning_maxup."):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    importlib.import_module(info.name)
            except ImportError as err:
                failed[info.name] = str(err)
        print(failed)
        """
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "{}", f"modules that import an extra at import time: {result.stdout}"


@pytest.mark.slow
def test_the_core_imports_none_of_the_extras() -> None:
    code = DEPENDENCIES + textwrap.dedent(
        """
        before = {m for m in sys.modules if m.split(".")[0] in ("sklearn", "scipy", "matplotlib")}
        import lightning_maxup
        from lightning_maxup import MaxUp, MaxUpMixin, MaxUpConfig, maxup_step
        import lightning_maxup.training.mixin, lightning_maxup.core.functional, lightning_maxup.augment
        import lightning_maxup.evaluation.paired
        optional = [m for m in sys.modules if m.split(".")[0] in ("sklearn", "scipy", "matplotlib")]
        print(sorted(set(optional) - before))
        """
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


# (code that needs an extra, the package it names, the extra it names)
CASES = [
    pytest.param(
        "from lightning_maxup.evaluation.paired import paired_interval; paired_interval([1.0, 2.0])",
        "paired_interval needs scipy",
        "study",
        id="paired-interval",
    ),
    pytest.param(
        "from lightning_maxup.certify import clopper_pearson_lower;"
        " clopper_pearson_lower(torch.tensor([5]), 10, alpha=0.05)",
        "clopper_pearson_lower needs scipy",
        "certify",
        id="clopper-pearson",
    ),
    pytest.param(
        "from lightning_maxup.certify import predict_from_counts; predict_from_counts(torch.tensor([[9, 1]]))",
        "predict_from_counts needs scipy",
        "certify",
        id="binomial-test",
    ),
    pytest.param(
        "from lightning_maxup.data.datasets import load_digits_split; load_digits_split()",
        "load_digits_split needs scikit-learn",
        "demo",
        id="digits",
    ),
    pytest.param(
        "from lightning_maxup.certify.table import plot_certified_accuracy; plot_certified_accuracy({}, 'x.png')",
        "plot_certified_accuracy needs matplotlib",
        "plots",
        id="certify-plot",
    ),
    pytest.param(
        "from lightning_maxup.callbacks.monitor import _figure; _figure(1.0, 1.0)",
        "SelectionMonitor's figures needs matplotlib",
        "plots",
        id="monitor-figure",
    ),
    pytest.param(
        "from pathlib import Path; from lightning_maxup.apps.study import Cell, plot_gains;"
        " plot_gains([], [Cell(1)], 'val/acc', 8, Path('gain.png'))",
        "plot_gains needs matplotlib",
        "study",
        id="study-plot",
    ),
]


@pytest.mark.slow
def test_a_missing_extra_is_named_at_the_point_of_use() -> None:
    cases = [(p.values[0], p.values[1], p.values[2]) for p in CASES]
    code = BLOCK + textwrap.dedent(
        f"""
        import json, torch
        out = []
        for code, _, _ in {cases!r}:
            try:
                exec(code)
                out.append(None)
            except ModuleNotFoundError as err:
                out.append(str(err))
        print(json.dumps(out))
        """
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    expected = [f'{what}: pip install "lightning_maxup[{extra}]"' for _, what, extra in cases]
    assert got == expected


@pytest.mark.slow
def test_the_demo_command_names_its_extra_in_one_line() -> None:
    code = BLOCK + "from lightning_maxup.apps.cli import main\nsys.exit(main(['demo', '--quick', '--no-progress']))"
    result = _python(code)
    assert result.returncode == 1
    expected = 'error: lightning-maxup demo needs scikit-learn: pip install "lightning_maxup[demo]"'
    assert result.stderr.strip() == expected
    assert result.stdout == ""  # nothing trained before the error


def test_extras_in_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for r in requirements}

    base, extras = names(project["dependencies"]), project["optional-dependencies"]
    assert not base & {"scikit-learn", "scipy", "matplotlib"}, base
    assert names(extras["demo"]) == {"scikit-learn", "scipy", "matplotlib"}
    assert names(extras["certify"]) == {"scipy"}
    assert names(extras["study"]) == {"scipy", "matplotlib"}
    assert names(extras["plots"]) == {"matplotlib"}
    every = set().union(*(names(extras[e]) for e in extras if e != "dev"))
    assert every <= names(extras["dev"]), f"dev (what .ci/run installs) lacks {every - names(extras['dev'])}"


@pytest.mark.parametrize("m", [2, 3, 4, 8, 64, 1024])
def test_expected_max_normal_without_scipy_matches_quadrature(m: int) -> None:
    from lightning_maxup.core.functional import expected_max_normal

    stats = pytest.importorskip("scipy.stats")
    integrate = pytest.importorskip("scipy.integrate")
    reference, _ = integrate.quad(
        lambda z: z * m * stats.norm.pdf(z) * stats.norm.cdf(z) ** (m - 1), -12.0, 12.0, epsabs=1e-11, limit=200
    )
    closed = {2: 1 / math.sqrt(math.pi), 3: 1.5 / math.sqrt(math.pi)}
    assert abs(expected_max_normal(m) - reference) < 1e-10, (expected_max_normal(m), reference)
    if m in closed:
        assert abs(expected_max_normal(m) - closed[m]) < 1e-10
