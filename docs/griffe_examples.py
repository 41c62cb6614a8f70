"""Griffe extension: read the project's docstrings as the Google style (Markdown) the site renders.

- ``Example:`` sections become Google ``Examples:`` sections, so doctest lines render as code, not as Markdown.
- Sphinx leftovers render as Markdown instead of raw text: a ``text::`` literal block becomes a fenced code
  block (``Example::`` an ``Examples:`` section holding one), and ``:class:`~pkg.Name``` (also ``:func:``,
  ``:meth:``, ``:attr:``, ``:mod:``, ``:exc:``, ``:obj:``, ``:data:``) a cross-reference ``[Name][pkg.Name]``;
  a bare name (``:meth:`parse```) links to the member or sibling of that name, else stays inline code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|obj|data):`(?P<tilde>~?)(?P<path>[\w.]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _fence(block: list[str], indent: str, language: str) -> list[str]:
    width = min(_indent(line) for line in block if line.strip())
    language = "pycon" if block[0].lstrip().startswith(">>>") else language
    body = [indent + line[width:] if line.strip() else "" for line in block]
    return [f"{indent}```{language}", *body, f"{indent}```"]


def _literal_blocks(docstring: str) -> str:
    """``text::`` + an indented block -> ``text:`` + a fenced block; ``Example::`` -> an ``Examples:`` section."""
    lines, out, i = docstring.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        end = i + 1
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > _indent(line)):
            end += 1
        block = lines[i + 1 : end]
        while block and not block[-1].strip():
            block.pop()
        block = block[next((k for k, b in enumerate(block) if b.strip()), len(block)) :]
        indent, text = " " * _indent(line), line.strip()[:-2].rstrip()
        if not block:
            out.append(line)
        elif text in ("Example", "Examples"):
            out += [f"{indent}Examples:", *_fence(block, indent + "    ", "python"), ""]
        else:
            out += [f"{indent}{text}:", "", *_fence(block, indent, "text"), ""]
        i = end
    return "\n".join(out)


def google_style(docstring: str, resolve: Callable[[str], str | None] = lambda name: None) -> str:
    """The docstring with its Sphinx leftovers and ``Example:`` headers rewritten (see the module docstring).

    ``resolve`` maps a bare role target (``parse``) to a full path, or ``None`` to keep it as inline code.

    Example:
        >>> google_style(":class:`~lightning_cmp.CMPStrategy`")
        '[`CMPStrategy`][lightning_cmp.CMPStrategy]'
    """

    def cross_reference(match: re.Match[str]) -> str:
        path = match["path"] if "." in match["path"] else resolve(match["path"])
        title = match["path"].rsplit(".", 1)[-1] if match["tilde"] else match["path"]
        return f"[`{title}`][{path}]" if path else f"`{title}`"

    docstring = _ROLE.sub(cross_reference, _literal_blocks(docstring))
    return _EXAMPLE.sub(r"\1Examples:", docstring)


def _resolver(obj: griffe.Object) -> Callable[[str], str | None]:
    """A bare name means a member of ``obj`` or of its parent (a method's sibling, a function's neighbour)."""

    def resolve(name: str) -> str | None:
        for scope in (obj, obj.parent):
            if scope is not None and name in scope.members:
                return f"{scope.path}.{name}"
        return None

    return resolve


class ExampleSections(griffe.Extension):
    """Rewrite every docstring with ``google_style`` before mkdocstrings parses it."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = google_style(obj.docstring.value, _resolver(obj))
