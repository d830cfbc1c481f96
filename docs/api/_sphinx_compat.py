"""Griffe extension: read the package's Sphinx conventions as mkdocstrings expects them.

The docstrings are Google-style with Sphinx roles (``:class:`~lightning_maxup.MaxUpMixin```, ``:func:`maxup_step```)
and document constants with ``#:`` comments, which read well in ``help()``, in an editor and in Sphinx. mkdocstrings
understands neither, and griffe reads ``Example:`` (singular) as an admonition rather than as doctests. Once the
package is loaded, this extension:

- turns a ``#:`` comment right above a module- or class-level assignment into that attribute's docstring;
- renames ``Example:`` sections to ``Examples:`` so their ``>>>`` lines render as code;
- rewrites each role the way Python would resolve the name from the docstring's scope. A documented public name of
  this package becomes an autorefs link to the page of the module that defines it (``[`MaxUpMixin`][path]``), so
  ``mkdocs build --strict`` fails if that page does not render it. Any other name (``torch.random.fork_rng``, a
  Lightning hook, a private helper, an undocumented attribute) becomes inline code. ``~`` keeps only the last
  component of the displayed name and ``!`` never links, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

PACKAGE = "lightning_maxup"
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const):`(?P<target>[^`]+)`")
_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_EXPLICIT = re.compile(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>")
_LOOKUP_ERRORS = (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError)


def _is_private(path: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in path.split("."))


class _Links:
    """Where each object of the package is rendered: its own path if public, else a public re-export of it."""

    def __init__(self, pkg: griffe.Module) -> None:
        self.collection = pkg.modules_collection
        self.public: dict[str, str] = {}
        self._index(pkg)

    def _index(self, module: griffe.Module) -> None:
        for name, member in module.members.items():
            if name.startswith("_"):
                continue
            if not member.is_alias and member.is_module:
                self._index(member)  # type: ignore[arg-type]
                continue
            try:
                if member.is_public:
                    self.public.setdefault(member.canonical_path, member.path)
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue  # an import from outside the package

    def target(self, path: str) -> str | None:
        """The identifier to link ``path`` to, or None if no page documents it."""
        try:
            obj = self.collection.get_member(path)
            canonical = obj.canonical_path
            documented = obj.is_module or (bool(obj.docstring) and obj.is_public)  # else the page leaves it out
        except _LOOKUP_ERRORS:
            return path if path.split(".")[0] == PACKAGE else None  # unknown: left for the strict build to report
        if not documented:
            return None
        if not _is_private(canonical):
            return canonical
        return self.public.get(canonical)


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """Full path of ``target`` as seen from ``obj``'s scope, or None if it is not a name of this package."""
    head, _, rest = target.partition(".")
    if head == PACKAGE:
        return target
    try:
        path = obj.resolve(head)
    except griffe.NameResolutionError:
        return None
    if path.split(".")[0] != PACKAGE:
        return None
    return f"{path}.{rest}" if rest else path


def _rewrite(obj: griffe.Object, text: str, links: _Links) -> str:
    def replace(match: re.Match[str]) -> str:
        target = match["target"].strip()
        explicit = _EXPLICIT.fullmatch(target)
        title = explicit["title"] if explicit else None
        target = explicit["target"] if explicit else target
        no_link, short = target.startswith("!"), target.startswith("~")
        target = target.lstrip("~!")
        shown = title or (target.rsplit(".", 1)[-1] if short else target)
        path = None if no_link else _resolve(obj, target)
        link = None if path is None else links.target(path)
        return f"[`{shown}`][{link}]" if link else f"`{shown}`"

    return _EXAMPLE.sub(r"\g<indent>Examples:", _ROLE.sub(replace, text))


def _walk(obj: griffe.Object, links: _Links) -> None:
    if obj.docstring is not None:
        obj.docstring.value = _rewrite(obj, obj.docstring.value, links)
    for member in obj.members.values():
        if not member.is_alias and member.parent is obj:
            _walk(member, links)  # type: ignore[arg-type]


class SphinxCompat(griffe.Extension):
    """Read ``#:`` comments, ``Example:`` sections and Sphinx roles of this package for mkdocstrings."""

    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, agent: Any, **kwargs: Any) -> None:
        """Use the ``#:`` comment lines right above an undocumented assignment as its docstring."""
        if attr.docstring is not None or attr.lineno is None or attr.filepath is None:
            return
        try:
            lines = attr.lines_collection[attr.filepath]  # type: ignore[index]
        except KeyError:
            return
        comment: list[str] = []
        index = attr.lineno - 2
        while index >= 0 and lines[index].strip().startswith("#:"):
            comment.insert(0, lines[index].strip()[2:].strip())
            index -= 1
        if comment:
            attr.docstring = griffe.Docstring("\n".join(comment), lineno=index + 2, parent=attr)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite the roles and ``Example:`` sections of every docstring of this package."""
        if pkg.name == PACKAGE:
            _walk(pkg, _Links(pkg))
