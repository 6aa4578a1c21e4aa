"""Sphinx directive for the book's API page: one line per documented module.

``api-modules`` takes module names, one a line, and emits for each a section
titled by the module's name followed by ``.. automodule::`` (members from the
book's ``autodoc_default_options``), so that adding a module to the API
reference is adding its name to the list in ``api.md``.
"""

from __future__ import annotations

import importlib
import re

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


class ApiModules(SphinxDirective):
    has_content = True

    def run(self) -> list[nodes.Node]:
        source, _ = self.get_source_info()
        rst = StringList()
        for raw in self.content:
            name = raw.strip()
            if not name or name.startswith("#"):
                continue
            title = f"``{name}``"
            for line in (title, "-" * len(title), "", f".. automodule:: {name}", ""):
                rst.append(line, source)
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, rst, container)
        return container.children


_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _python_object(path: str):
    """The object a dotted path names (module, then attributes), or None."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # not a module at this length: try a shorter prefix
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_existing(app, env, node, contnode):
    """Offline stand-in for intersphinx, for Python references only.

    A reference to a re-exported name (``toponeuro.TopologicalRegulariser``)
    is sent to the page where the object is documented (under its defining
    module). A reference to an object that exists but is documented nowhere in
    this book (``torch.Tensor``, an attribute without docstring) is shown as
    code without a link. Anything that does not import is left alone, so a
    misspelt reference still fails the ``-n`` build. A "target" that is not a
    dotted name at all is prose that napoleon read as a type (a NumPy-style
    type such as ``{"t1", "t2"}`` or ``(m, n) activations``) and stays text.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    if not _DOTTED_NAME.fullmatch(target):
        return contnode
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        candidates += [f"{module}.{cls}.{target}" if cls else None, f"{module}.{target}"]
    domain = env.get_domain("py")
    for candidate in filter(None, candidates):
        obj = _python_object(candidate)
        if obj is None:
            continue
        defined = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if all(defined) and f"{defined[0]}.{defined[1]}" != candidate:
            ref = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                      f"{defined[0]}.{defined[1]}", node, contnode)
            if ref is not None:
                return ref
        return contnode
    return None


def setup(app):
    app.add_directive("api-modules", ApiModules)
    app.connect("missing-reference", _resolve_existing)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
