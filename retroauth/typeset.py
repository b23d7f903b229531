"""HTML to PDF for letters: the HTML a template rendered, typeset by Typst, with no data ever parsed as markup.

The letter templates write one document, in a small subset of HTML; that HTML is the HTML letter,
and the PDF is typeset from it, so both always say the same thing. The way there:

1. ``parse_html`` reads the HTML (entities decoded) into a tree and checks that it stays in the
   subset below; anything else fails with the line of the rendered HTML.
2. ``to_document`` turns the tree into plain JSON: blocks (paragraphs, headings, lists, tables,
   boxes with CSS classes) whose text is lists of runs (a string plus bold/italic/small flags).
3. ``Typesetter.pdf`` hands that JSON to a fixed Typst program (``templates/letter.typ``) through
   ``sys.inputs``; the program reads it with ``json(bytes(sys.inputs.letter))`` and shows every
   string as text. A patient named ``#set text(red)`` or ``$x$`` prints exactly that: no escaping
   to get wrong, because the data never becomes Typst source.

The subset (enough for business letters; ``check_templates`` reports anything outside it):

- containers: ``html body main header section article div address aside``, with classes;
- blocks: ``p h1 h2 h3 h4 ul ol li table thead tbody tfoot tr th td hr``; ``td``/``th`` take
  ``colspan`` and the class ``num`` (right-aligned); a table may give ``data-cols="auto,1fr,..."``;
- inline: ``strong b em i small span a abbr br`` (links print as their text);
- ``head``: ``<title>`` is the PDF title, ``<meta name="author|date">`` its author and date
  (``YYYY-MM-DD``, also the PDF's creation date: no clock is read, so the same HTML always gives
  the same PDF bytes); ``<style>`` is for browsers and ignored here;
- ``<footer class="page-footer">``: the text of every page's footer, next to "Page X of Y".

Fonts are Typst's embedded ones (Libertinus Serif); system fonts are ignored, so a letter is the
same on every machine. Typst releases the GIL while it typesets: threads run letters in parallel, one
compile per core at a time (``COMPILES_AT_ONCE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from datetime import date, datetime, timezone
from html import unescape
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any

import typst

# Bump when the HTML-to-document conversion changes what a PDF looks like: template hashes include it.
CONVERTER_VERSION = 1
ENGINE = f"typst-py {_dist_version('typst')}"

CONTAINERS = frozenset({"html", "body", "main", "header", "section", "article", "div", "address", "aside"})
TEXT_BLOCKS = frozenset({"p", "h1", "h2", "h3", "h4"})
LISTS = frozenset({"ul", "ol"})
TABLE_PARTS = frozenset({"thead", "tbody", "tfoot"})
INLINE_STYLE = {"strong": "b", "b": "b", "em": "i", "i": "i", "small": "sm"}
INLINE_PLAIN = frozenset({"span", "a", "abbr"})
VOID = frozenset({"br", "hr", "meta", "link", "wbr"})
HEAD_ONLY = frozenset({"head", "title", "style"})
ALLOWED = (CONTAINERS | TEXT_BLOCKS | LISTS | TABLE_PARTS | frozenset(INLINE_STYLE) | INLINE_PLAIN | VOID
           | HEAD_ONLY | frozenset({"li", "table", "tr", "th", "td", "footer"}))

_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML white space (not U+00A0, which stays)
_TRACK = re.compile(r"auto|(\d+(?:\.\d+)?)(fr|%)")


class TypesetError(Exception):
    """The HTML is outside the subset, or Typst failed. Messages name tags and lines, never text."""


# --- HTML to a tree -------------------------------------------------------------------------------


class Element:
    """A tag of the letter HTML; its children are elements and (entity-decoded) strings."""

    __slots__ = ("tag", "attrs", "pos", "src", "children")

    def __init__(self, tag: str, attrs: dict[str, str], pos: int, src: str = "",
                 children: list[Element | str] | None = None):
        self.tag = tag
        self.attrs = attrs
        self.pos = pos  # offset of the tag in ``src``: the line is counted only when an error needs it
        self.src = src
        self.children: list[Element | str] = [] if children is None else children

    def __repr__(self) -> str:
        return f"Element({self.tag!r}, {self.attrs!r}, children={self.children!r})"

    @property
    def line(self) -> int:
        return self.src.count("\n", 0, self.pos) + 1

    @property
    def classes(self) -> list[str]:
        return self.attrs["class"].split() if "class" in self.attrs else []


# The tokens: text, a comment, a doctype, a leaf (a start tag, plain text, its own end tag: most of a
# letter, in one step), a start or end tag, or a "<" that starts none of these (an error). Together
# they match at every position, so ``finditer`` walks the whole HTML without gaps. Values from the
# data reach here autoescaped: a raw "<" or ">" can only come from the template.
# Groups: text; leaf tag, attributes, text; end "/", tag, attributes, self-closing "/"; the stray "<".
_ATTRS = r"""((?:\s+[^\s"'>/=]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?)*)"""
_TOKEN = re.compile(
    r"""([^<]+)
    | <!--.*?-->
    | <![^>]*>
    | <(?!(?i:br|hr|meta|link|wbr|style|script)(?![a-zA-Z0-9]))([a-zA-Z][a-zA-Z0-9]*)""" + _ATTRS + r"""\s*>([^<]*)</\2>
    | <(/?)([a-zA-Z][a-zA-Z0-9]*)""" + _ATTRS + r"""\s*(/?)>
    | (<)""",
    re.S | re.X,
)
_ATTR = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?""")
_RAW_TEXT = frozenset({"style", "script"})


def _attrs(text: str) -> dict[str, str]:
    if not text:
        return {}
    return {m.group(1).lower(): unescape(m.group(2) or m.group(3) or m.group(4) or "") for m in _ATTR.finditer(text)}


def parse_html(html: str) -> Element:
    """The document tree; ``TypesetError`` for tags outside the subset, unbalanced tags or a stray "<".

    A small tokenizer rather than ``html.parser``: the subset needs no error recovery (malformed
    markup is an error to report, not to repair), and one regular expression does the scanning.
    """
    root = Element("#document", {}, 0, html)
    stack = [root]
    children = root.children  # of the innermost open element

    def line_at(at: int) -> int:
        return html.count("\n", 0, at) + 1

    scan: Iterator[re.Match[str]] | None = _TOKEN.finditer(html)
    while scan is not None:
        tokens, scan = scan, None
        for m in tokens:
            text, leaf, leaf_attrs, leaf_text, end, tag, attrs, self_closing, stray = m.groups()
            if text is not None:
                children.append(unescape(text) if "&" in text else text)
            elif leaf is not None:  # as its start tag, text and end tag would be, one by one
                tag = leaf.lower()
                if tag not in ALLOWED:
                    raise TypesetError(f"line {line_at(m.start())}: <{tag}> is not in the letter HTML subset")
                children.append(Element(tag, _attrs(leaf_attrs) if leaf_attrs else {}, m.start(), html,
                                        [unescape(leaf_text) if "&" in leaf_text else leaf_text] if leaf_text else []))
            elif tag is not None:
                tag = tag.lower()
                if end:
                    if tag not in VOID:
                        top = stack[-1]
                        if top.tag != tag:
                            raise TypesetError(f"line {line_at(m.start())}: </{tag}> closes <{top.tag}> "
                                               f"(opened at line {top.line})")
                        stack.pop()
                        children = stack[-1].children
                    continue
                if tag not in ALLOWED:
                    raise TypesetError(f"line {line_at(m.start())}: <{tag}> is not in the letter HTML subset")
                el = Element(tag, _attrs(attrs) if attrs else {}, m.start(), html)
                children.append(el)
                if tag in _RAW_TEXT:  # style: scan on after its end tag
                    close = html.find(f"</{tag}", m.end())
                    if close < 0:
                        raise TypesetError(f"line {line_at(m.start())}: <{tag}> is never closed")
                    scan = _TOKEN.finditer(html, html.index(">", close) + 1)
                    break
                if tag not in VOID and not self_closing:
                    stack.append(el)
                    children = el.children
            elif stray is not None:
                raise TypesetError(f"line {line_at(m.start())}: a '<' that starts no tag (text must be escaped)")
            # else a comment or a doctype
    if len(stack) > 1:
        top = stack[-1]
        raise TypesetError(f"<{top.tag}> opened at line {top.line} is never closed")
    return root


# --- the tree to a JSON document ------------------------------------------------------------------


Run = dict[str, Any]
INLINE = frozenset(INLINE_STYLE) | INLINE_PLAIN | frozenset({"br", "wbr"})
_WHITE = " \t\n\r\f"  # HTML white space, as in ``_SPACE``


def _runs(el: Element) -> list[Run]:
    """The text of an element as runs, white space normalized once for the whole block."""
    children = el.children
    if len(children) == 1 and type(children[0]) is str:  # the common case: plain text
        text = _SPACE.sub(" ", children[0]).strip(" ")
        return [{"s": text}] if text else []
    if not children:
        return []
    pieces: list[tuple[str, tuple[str, ...]] | None] = []
    _collect(el, (), pieces)
    return _normalize(pieces)


def _collect(el: Element, style: tuple[str, ...], out: list[tuple[str, tuple[str, ...]] | None]) -> None:
    """Text pieces with their style flags in the order they nest; None for a line break."""
    for child in el.children:
        if type(child) is str:
            out.append((child, style))
            continue
        tag = child.tag  # type: ignore[union-attr]
        if tag == "br":
            out.append(None)
        elif tag in INLINE_STYLE:
            flag = INLINE_STYLE[tag]
            _collect(child, style if flag in style else (*style, flag), out)  # type: ignore[arg-type]
        elif tag in INLINE_PLAIN:
            _collect(child, style, out)  # type: ignore[arg-type]
        elif tag != "wbr":
            raise TypesetError(f"line {child.line}: <{tag}> inside <{el.tag}>, where only text and "  # type: ignore[union-attr]
                               "inline tags (strong, em, small, span, a, br) may go")


def _normalize(pieces: list[tuple[str, tuple[str, ...]] | None]) -> list[Run]:
    """Collapse white space as a browser does, trim line ends, merge neighbours of the same style."""
    out: list[list[Any] | None] = []  # [text, style] or None (a line break)
    line_start = True
    for piece in pieces:
        if piece is None:
            _rstrip_last(out)
            out.append(None)
            line_start = True
            continue
        text = _SPACE.sub(" ", piece[0])
        prev = out[-1] if out else None
        if line_start or (prev is not None and prev[0].endswith(" ")):
            text = text.lstrip(" ")
        if not text:
            continue
        line_start = False
        style = piece[1]
        if prev is not None and (prev[1] == style or set(prev[1]) == set(style)):
            prev[0] += text
        else:
            out.append([text, style])
    _rstrip_last(out)
    while out and out[-1] is None:
        out.pop()
        _rstrip_last(out)
    return [{"br": True} if r is None else {"s": r[0], **dict.fromkeys(r[1], True)} if r[1] else {"s": r[0]}
            for r in out]


def _rstrip_last(out: list[list[Any] | None]) -> None:
    while out and out[-1] is not None:
        last = out[-1]
        last[0] = last[0].rstrip(" ")
        if last[0]:
            return
        out.pop()


def _tracks(spec: str, line: int) -> list[dict[str, Any]]:
    tracks = []
    for part in (p.strip() for p in spec.split(",")):
        m = _TRACK.fullmatch(part)
        if not m:
            raise TypesetError(f"line {line}: data-cols entry {part!r} must be auto, <n>fr or <n>%")
        tracks.append({"auto": True} if part == "auto" else {m.group(2).replace("%", "pct"): float(m.group(1))})
    return tracks


def _row(tr: Element) -> dict[str, Any]:
    cells = []
    for c in tr.children:
        if type(c) is str:
            if not c.strip(_WHITE):
                continue
            raise TypesetError(f"line {tr.line}: a <tr> holds <td> and <th> cells only")
        tag = c.tag
        if tag != "td" and tag != "th":
            raise TypesetError(f"line {tr.line}: a <tr> holds <td> and <th> cells only")
        attrs = c.attrs
        if attrs:
            span = attrs.get("colspan", "1")
            if not span.isdigit() or int(span) < 1:
                raise TypesetError(f"line {c.line}: colspan must be a positive whole number")
            cells.append({"r": _runs(c), "span": int(span), "num": "num" in c.classes, "th": tag == "th"})
        else:
            cells.append({"r": _runs(c), "span": 1, "num": False, "th": tag == "th"})
    return {"cls": tr.classes, "cells": cells}


def _table(el: Element) -> dict[str, Any]:
    head: list[dict[str, Any]] = []
    body: list[dict[str, Any]] = []
    for child in el.children:
        if type(child) is str:
            if not child.strip(_WHITE):
                continue
            raise TypesetError(f"line {el.line}: text directly inside <table>")
        tag = child.tag
        if tag == "tr":
            body.append(_row(child))
        elif tag in TABLE_PARTS:
            into = head if tag == "thead" else body
            for tr in child.children:
                if type(tr) is str:
                    if not tr.strip(_WHITE):
                        continue
                elif tr.tag == "tr":
                    into.append(_row(tr))
                    continue
                raise TypesetError(f"line {child.line}: <{tag}> holds <tr> rows only")
        else:
            raise TypesetError(f"line {child.line}: <{tag}> inside <table>")
    cols = max((sum(c["span"] for c in r["cells"]) for r in head + body), default=0)
    if cols == 0:
        raise TypesetError(f"line {el.line}: a table without cells")
    spec = el.attrs.get("data-cols")
    tracks = _tracks(spec, el.line) if spec else [{"auto": True}] * cols
    if len(tracks) != cols:
        raise TypesetError(f"line {el.line}: data-cols gives {len(tracks)} columns, the rows have {cols}")
    return {"t": "table", "cls": el.classes, "cols": tracks, "head": head, "rows": body}


def _blocks(el: Element, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The blocks inside a container; loose inline content becomes a paragraph."""
    out: list[dict[str, Any]] = []
    pending: list[Element | str] = []

    def flush() -> None:
        runs = _runs(Element("#inline", {}, el.pos, el.src, pending[:]))
        if runs:
            out.append({"t": "p", "cls": [], "r": runs})
        pending.clear()

    for child in el.children:
        if type(child) is str:
            if pending or child.strip(_WHITE):  # white space before a paragraph's first word is dropped anyway
                pending.append(child)
            continue
        tag = child.tag
        if tag in INLINE:
            pending.append(child)
            continue
        if pending:
            flush()
        if tag in TEXT_BLOCKS:
            runs = _runs(child)
            if runs or child.classes:
                out.append({"t": tag, "cls": child.classes, "r": runs})
        elif tag in CONTAINERS:
            inner = _blocks(child, doc)
            classes = child.classes
            if classes:
                out.append({"t": "box", "cls": classes, "body": inner})
            else:
                out += inner
        elif tag == "table":
            out.append(_table(child))
        elif tag in LISTS:
            items = []
            for li in child.children:
                if type(li) is str:
                    if not li.strip(_WHITE):
                        continue
                elif li.tag == "li":
                    items.append(_runs(li))
                    continue
                raise TypesetError(f"line {child.line}: <{tag}> holds <li> items only")
            out.append({"t": tag, "cls": child.classes, "items": items})
        elif tag in HEAD_ONLY:
            _head(child, doc)
        elif tag == "meta":
            _meta(child, doc)
        elif tag == "link":
            continue
        elif tag == "footer":
            if "page-footer" not in child.classes:
                raise TypesetError(f"line {child.line}: <footer> is only for class=\"page-footer\" (the page footer)")
            doc["footer"] = _runs(child)
        elif tag == "hr":
            out.append({"t": "hr", "cls": child.classes})
        else:
            raise TypesetError(f"line {child.line}: <{tag}> cannot stand inside <{el.tag}>")
    if pending:
        flush()
    return out


def _head(el: Element, doc: dict[str, Any]) -> None:
    if el.tag == "title":
        doc["title"] = "".join(r.get("s", "") for r in _runs(el))
    elif el.tag == "head":
        for child in el.children:
            if isinstance(child, Element):
                if child.tag == "meta":
                    _meta(child, doc)
                elif child.tag in ("title", "style"):
                    _head(child, doc)


def _meta(el: Element, doc: dict[str, Any]) -> None:
    name, content = el.attrs.get("name", ""), el.attrs.get("content", "")
    if name == "author":
        doc["author"] = content
    elif name == "date":
        try:
            day = date.fromisoformat(content)
        except ValueError:
            raise TypesetError(f"line {el.line}: <meta name=\"date\"> must be YYYY-MM-DD") from None
        doc["date"] = [day.year, day.month, day.day]


def to_document(html: str) -> dict[str, Any]:
    """The JSON document the Typst program reads: title, author, date, footer runs and blocks."""
    doc: dict[str, Any] = {"title": "", "author": "", "date": None, "footer": []}
    doc["blocks"] = _blocks(parse_html(html), doc)
    if doc["date"] is None:
        raise TypesetError('the HTML needs <meta name="date" content="YYYY-MM-DD">: the PDF date comes from it, not the clock')
    return doc


# --- Typst ------------------------------------------------------------------------------------------


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Typst typesets a letter on one core. More compiles at once than cores (two batches in flight, each on
# a thread per core) only time-slice them and evict each other's caches: ~4 ms more CPU per compile
# here, 10%. Threads beyond the cores prepare their next letter (HTML, document) and wait their turn.
CORES = _cores()
COMPILES_AT_ONCE = threading.BoundedSemaphore(CORES)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Typesetter:
    """Typesets letter HTML with one Typst program.

    Compilers are pooled, not per thread: a compiler loads its fonts once, and a batch's threads come
    and go while the pool stays. A compiler is used by one thread at a time."""

    def __init__(self, program: Path):
        self.program = Path(program).resolve()
        if not self.program.is_file():
            raise TypesetError(f"Typst program {self.program} not found")
        self._idle: list[typst.Compiler] = []
        self._lock = threading.Lock()

    def _new_compiler(self) -> typst.Compiler:
        # A path, not bytes: typst-py's in-memory main file is found on the first compile only.
        return typst.Compiler(str(self.program), root=str(self.program.parent), ignore_system_fonts=True)

    def pdf_from_document(self, doc: dict[str, Any]) -> bytes:
        y, m, d = doc["date"]
        stamp = datetime(y, m, d, tzinfo=timezone.utc)
        payload = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            compiler = self._idle.pop() if self._idle else None
        if compiler is None:
            compiler = self._new_compiler()
        try:
            with COMPILES_AT_ONCE:
                out = compiler.compile(format="pdf", sys_inputs={"letter": payload}, timestamp=stamp)
        except typst.TypstError as exc:  # the program's own source lines only: the data is not in it
            raise TypesetError(f"{self.program.name}: {exc.message}") from None
        finally:
            with self._lock:
                self._idle.append(compiler)
        assert isinstance(out, bytes)
        return out

    def pdf(self, html: str) -> bytes:
        """The PDF of letter HTML: the same HTML always gives the same bytes."""
        return self.pdf_from_document(to_document(html))
