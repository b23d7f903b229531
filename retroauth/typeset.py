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
same on every machine. Typst releases the GIL while it typesets: threads run letters in parallel.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
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


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    pos: int  # offset of the tag in ``src``: the line is counted only when an error needs it
    src: str = field(default="", repr=False)
    children: list[Element | str] = field(default_factory=list)

    @property
    def line(self) -> int:
        return self.src.count("\n", 0, self.pos) + 1

    @property
    def classes(self) -> list[str]:
        return self.attrs["class"].split() if "class" in self.attrs else []


# One token at a time: a comment, a doctype, a start or end tag, or text. Values from the data reach
# here autoescaped, so a raw "<" or ">" can only come from the template itself.
_TOKEN = re.compile(
    r"""<!--.*?-->
    | <![^>]*>
    | <(?P<end>/)?(?P<tag>[a-zA-Z][a-zA-Z0-9]*)
      (?P<attrs>(?:\s+[^\s"'>/=]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?)*)\s*(?P<self>/)?>
    | (?P<text>[^<]+)""",
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
    markup is an error to report, not to repair), and it is twice as fast.
    """
    root = Element("#document", {}, 0, html)
    stack = [root]
    pos, n = 0, len(html)

    def line_at(at: int) -> int:
        return html.count("\n", 0, at) + 1

    while pos < n:
        m = _TOKEN.match(html, pos)
        if m is None:
            raise TypesetError(f"line {line_at(pos)}: a '<' that starts no tag (text must be escaped)")
        text = m.group("text")
        if text is not None:
            stack[-1].children.append(unescape(text) if "&" in text else text)
        elif m.group("tag"):
            tag = m.group("tag").lower()
            if m.group("end"):
                if tag not in VOID:
                    top = stack[-1]
                    if top.tag != tag:
                        raise TypesetError(f"line {line_at(pos)}: </{tag}> closes <{top.tag}> "
                                           f"(opened at line {top.line})")
                    stack.pop()
            else:
                if tag not in ALLOWED:
                    raise TypesetError(f"line {line_at(pos)}: <{tag}> is not in the letter HTML subset")
                el = Element(tag, _attrs(m.group("attrs")), pos, html)
                stack[-1].children.append(el)
                if tag in _RAW_TEXT:  # style: skip to its end tag
                    close = html.find(f"</{tag}", m.end())
                    if close < 0:
                        raise TypesetError(f"line {line_at(pos)}: <{tag}> is never closed")
                    pos = html.index(">", close) + 1
                    continue
                if tag not in VOID and not m.group("self"):
                    stack.append(el)
        pos = m.end()
    if len(stack) > 1:
        top = stack[-1]
        raise TypesetError(f"<{top.tag}> opened at line {top.line} is never closed")
    return root


# --- the tree to a JSON document ------------------------------------------------------------------


Run = dict[str, Any]


def _runs(el: Element) -> list[Run]:
    """The text of an element as runs, white space normalized once for the whole block."""
    out: list[Run] = []
    _collect(el, (), out)
    return _normalize(out)


def _collect(el: Element, style: tuple[str, ...], out: list[Run]) -> None:
    for child in el.children:
        if type(child) is str:
            out.append({"s": child, **dict.fromkeys(style, True)} if style else {"s": child})
        elif child.tag == "br":
            out.append({"br": True})
        elif child.tag in INLINE_STYLE:
            flag = INLINE_STYLE[child.tag]
            _collect(child, style if flag in style else (*style, flag), out)
        elif child.tag in INLINE_PLAIN:
            _collect(child, style, out)
        elif child.tag == "wbr":
            continue
        else:
            raise TypesetError(f"line {child.line}: <{child.tag}> inside <{el.tag}>, where only text and "
                               "inline tags (strong, em, small, span, a, br) may go")


def _normalize(runs: list[Run]) -> list[Run]:
    """Collapse white space as a browser does, trim line ends, merge neighbours of the same style."""
    out: list[Run] = []
    line_start = True
    for r in runs:
        if "br" in r:
            _rstrip_last(out)
            out.append(r)
            line_start = True
            continue
        text = _SPACE.sub(" ", r["s"])
        prev = out[-1] if out else None
        if line_start or (prev is not None and prev.get("s", "").endswith(" ")):
            text = text.lstrip(" ")
        if not text:
            continue
        line_start = False
        style = {k for k in r if k != "s"}
        if prev is not None and "s" in prev and {k for k in prev if k != "s"} == style:
            prev["s"] += text
        else:
            out.append({**r, "s": text})
    _rstrip_last(out)
    while out and "br" in out[-1]:
        out.pop()
        _rstrip_last(out)
    return out


def _rstrip_last(out: list[Run]) -> None:
    while out and "s" in out[-1]:
        out[-1]["s"] = out[-1]["s"].rstrip(" ")
        if out[-1]["s"]:
            return
        out.pop()


def _is_blank(child: Element | str) -> bool:
    return isinstance(child, str) and not _SPACE.sub("", child)


def _is_inline(child: Element | str) -> bool:
    return isinstance(child, str) or child.tag in INLINE_STYLE or child.tag in INLINE_PLAIN or child.tag in ("br", "wbr")


def _tracks(spec: str, line: int) -> list[dict[str, Any]]:
    tracks = []
    for part in (p.strip() for p in spec.split(",")):
        m = _TRACK.fullmatch(part)
        if not m:
            raise TypesetError(f"line {line}: data-cols entry {part!r} must be auto, <n>fr or <n>%")
        tracks.append({"auto": True} if part == "auto" else {m.group(2).replace("%", "pct"): float(m.group(1))})
    return tracks


def _table(el: Element) -> dict[str, Any]:
    head: list[dict[str, Any]] = []
    body: list[dict[str, Any]] = []

    def row(tr: Element, into: list[dict[str, Any]]) -> None:
        cells = []
        for c in tr.children:
            if _is_blank(c):
                continue
            if isinstance(c, str) or c.tag not in ("td", "th"):
                raise TypesetError(f"line {tr.line}: a <tr> holds <td> and <th> cells only")
            span = c.attrs.get("colspan", "1")
            if not span.isdigit() or int(span) < 1:
                raise TypesetError(f"line {c.line}: colspan must be a positive whole number")
            cells.append({"r": _runs(c), "span": int(span), "num": "num" in c.classes, "th": c.tag == "th"})
        into.append({"cls": tr.classes, "cells": cells})

    for child in el.children:
        if _is_blank(child):
            continue
        if isinstance(child, str):
            raise TypesetError(f"line {el.line}: text directly inside <table>")
        if child.tag == "tr":
            row(child, body)
        elif child.tag in TABLE_PARTS:
            for tr in child.children:
                if _is_blank(tr):
                    continue
                if isinstance(tr, str) or tr.tag != "tr":
                    raise TypesetError(f"line {child.line}: <{child.tag}> holds <tr> rows only")
                row(tr, head if child.tag == "thead" else body)
        else:
            raise TypesetError(f"line {child.line}: <{child.tag}> inside <table>")
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
        if pending:
            runs = _runs(Element("#inline", {}, el.line, list(pending)))
            if runs:
                out.append({"t": "p", "cls": [], "r": runs})
            pending.clear()

    for child in el.children:
        if _is_inline(child):
            pending.append(child)
            continue
        flush()
        assert isinstance(child, Element)
        tag = child.tag
        if tag in HEAD_ONLY:
            _head(child, doc)
        elif tag == "meta":
            _meta(child, doc)
        elif tag == "link":
            continue
        elif tag == "footer":
            if "page-footer" not in child.classes:
                raise TypesetError(f"line {child.line}: <footer> is only for class=\"page-footer\" (the page footer)")
            doc["footer"] = _runs(child)
        elif tag in CONTAINERS:
            inner = _blocks(child, doc)
            if child.classes:
                out.append({"t": "box", "cls": child.classes, "body": inner})
            else:
                out += inner
        elif tag in TEXT_BLOCKS:
            runs = _runs(child)
            if runs or child.classes:
                out.append({"t": tag if tag != "p" else "p", "cls": child.classes, "r": runs})
        elif tag in LISTS:
            items = []
            for li in child.children:
                if _is_blank(li):
                    continue
                if isinstance(li, str) or li.tag != "li":
                    raise TypesetError(f"line {child.line}: <{tag}> holds <li> items only")
                items.append(_runs(li))
            out.append({"t": tag, "cls": child.classes, "items": items})
        elif tag == "table":
            out.append(_table(child))
        elif tag == "hr":
            out.append({"t": "hr", "cls": child.classes})
        else:
            raise TypesetError(f"line {child.line}: <{tag}> cannot stand inside <{el.tag}>")
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
