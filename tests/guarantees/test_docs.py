"""The documentation site: every public name has a docstring, every public module has an API page, and the site
builds in strict mode (a broken cross-reference or any other warning fails) with every public name in it.

Docstrings are read the way the site reads them: by griffe with the site's extension (``docs/api/_sphinx_compat.py``),
so a constant documented by a ``#:`` comment counts as documented.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "docs" / "api"
EXTENSION = f"{API / '_sphinx_compat.py'}:SphinxCompat"

griffe = pytest.importorskip("griffe", reason='the docs extra is not installed: pip install -e ".[docs]"')


@pytest.fixture(scope="module")
def package() -> griffe.Module:
    extensions = griffe.load_extensions(EXTENSION)
    loader = griffe.GriffeLoader(extensions=extensions, docstring_parser=griffe.Parser.google)
    pkg = loader.load("lightning_maxup")
    loader.resolve_aliases(implicit=False, external=False)
    return pkg


def _is_legacy(module: griffe.Module) -> bool:
    """A 0.3 import path kept as a deprecation shim (``lightning_maxup._moved``), with no module of today under it."""
    from lightning_maxup._moved import MOVED

    if module.path not in MOVED:
        return False
    submodules = [member for member in module.members.values() if not member.is_alias and member.is_module]
    return not any(not _is_legacy(member) for member in submodules)  # type: ignore[arg-type]


def _public_modules(module: griffe.Module) -> Iterator[griffe.Module]:
    if _is_legacy(module):
        return
    yield module
    for name, member in module.members.items():
        if not name.startswith("_") and not member.is_alias and member.is_module:
            yield from _public_modules(member)  # type: ignore[arg-type]


def _exports(module: griffe.Module) -> list[str]:
    if module.exports is None:
        return [name for name, member in module.members.items() if not name.startswith("_") and not member.is_alias]
    return [name if isinstance(name, str) else name.name for name in module.exports]


def _is_override(obj: griffe.Object | griffe.Alias) -> bool:
    # An `@override` hook is documented by the base class it overrides (ruff's D102 skips it too).
    return obj.is_function and any(str(d.value).split(".")[-1] == "override" for d in obj.decorators)  # type: ignore[union-attr]


def _undocumented(package: griffe.Module) -> list[str]:
    missing: set[str] = set()
    for module in _public_modules(package):
        if not module.docstring:
            missing.add(module.path)
        for name in _exports(module):
            obj = module.members[name]
            target = obj.final_target if obj.is_alias else obj
            if not target.docstring:
                missing.add(f"{module.path}.{name}")
            if not target.is_class:
                continue
            # Methods and properties; constructor arguments and fields are documented by the class docstring.
            for member_name, member in target.members.items():
                if member_name.startswith("_") or member.is_alias or member.docstring or _is_override(member):
                    continue
                if member.is_function or "property" in member.labels:
                    missing.add(f"{target.path}.{member_name}")
    return sorted(missing)


def test_every_public_name_has_a_docstring(package: griffe.Module) -> None:
    missing = _undocumented(package)
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(missing)


def test_every_public_module_has_an_api_page(package: griffe.Module) -> None:
    documented = {
        match[1] for page in API.rglob("*.md") for match in re.finditer(r"^:::\s+(\S+)", page.read_text(), re.M)
    }
    modules = {module.path for module in _public_modules(package)}
    assert not modules - documented, (
        f"modules without a `::: module` block under docs/api/: {sorted(modules - documented)}"
    )
    assert not documented - modules, f"`:::` blocks naming no public module: {sorted(documented - modules)}"


def test_options_line_matches_the_config(package: griffe.Module) -> None:
    from lightning_maxup import MaxUpConfig

    text = (ROOT / "docs" / "guide" / "options.md").read_text(encoding="utf-8")
    params = inspect.signature(MaxUpConfig).parameters.values()
    expected = "MaxUpConfig(" + ", ".join(f"{p.name}={p.default!r}".replace("'", '"') for p in params) + ")"
    assert expected in text, f"docs/guide/options.md does not show {expected}"


@pytest.mark.slow
def test_site_builds_strictly_with_every_public_name(package: griffe.Module, tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason='mkdocs is not installed: pip install -e ".[docs]"')
    pytest.importorskip("mkdocstrings", reason='mkdocstrings is not installed: pip install -e ".[docs]"')
    from mkdocstrings import Inventory

    site = tmp_path / "site"
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    with (site / "objects.inv").open("rb") as file:
        rendered = set(Inventory.parse_sphinx(file))
    absent = []
    for module in _public_modules(package):
        for name in _exports(module):
            obj = module.members[name]
            if f"{module.path}.{name}" not in rendered and obj.canonical_path not in rendered:
                absent.append(f"{module.path}.{name}")
    assert not absent, "public names missing from the API reference:\n" + "\n".join(absent)


@pytest.mark.slow
def test_getting_started_example_runs(tmp_path: Path) -> None:
    """The complete example on the site's first page trains (3 epochs instead of 10, to stay quick)."""
    text = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    code = re.search(r"## The mixin in 20 lines.*?```python\n(.*?)```", text, re.S)
    assert code is not None, "docs/index.md lost its example"
    assert code[1].count("\n") <= 30, "the getting-started example grew past 20-odd lines of code"
    script = code[1].replace("max_epochs=10", "max_epochs=3, enable_progress_bar=False, logger=False")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _shell_lines(path: Path) -> list[str]:
    """The command lines in the ```bash blocks of ``path`` (comments and blank lines left out)."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and line[0] != "#"]


def test_getting_started_installs_as_the_readme_does() -> None:
    readme, index = _shell_lines(ROOT / "README.md"), _shell_lines(ROOT / "docs" / "index.md")
    installs = [line for line in index if line.startswith("python3 -m venv") or "--index-url" in line]
    assert installs, "docs/index.md lost its install commands"
    differing = [line for line in installs if line not in readme]
    assert not differing, f"docs/index.md installs differently from the README: {differing}"
    for venv in (".venv-demo/bin/activate", ".venv/bin/activate"):
        assert any(venv in line for line in installs), f"docs/index.md does not use {venv}"
    cpu = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    assert cpu in readme, "the README lost the CPU-only torch command"
    assert cpu in index, "docs/index.md lost the CPU-only torch command"
    # The demo's packages (scikit-learn, SciPy, matplotlib) are the `demo` extra: its command installs it.
    demo = 'pip install -e ".[demo]" && lightning-maxup demo'
    for name, lines in (("README.md", readme), ("docs/index.md", index)):
        runs = [line for line in lines if "lightning-maxup demo" in line]
        assert runs, f"{name} lost the demo command"
        assert all(demo in line for line in runs), f"{name} runs the demo without installing its extra: {runs}"
