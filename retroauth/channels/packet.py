"""The packet channel (portal upload, fax, mail): one PDF a person sends, then records the outcome.

The PDF is the case's latest request letter (for an appeal: its latest appeal letter) followed by the
packet's included documents: PDF documents as they are, text notes typeset as plain pages. It is stored under
``outbound/packets/<payer>/<idempotency key>.pdf``; the tracking number is the idempotency key. A send
asked again with the same key finds the object there and writes nothing.
"""

from __future__ import annotations

import io
import tempfile
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from retroauth.channels import Answer, ChannelRefused, Outgoing, SendResult
from retroauth.db import session_scope
from retroauth.models import Letter, Packet
from retroauth.storage import Storage, key

_TEXT_PROGRAM = """\
#set page(paper: "us-letter", margin: 0.9in)
#set text(size: 10pt)
#set raw(theme: none)
#let title = sys.inputs.at("title", default: "")
#if title != "" [#heading(title)]
#raw(sys.inputs.at("body"), block: true)
"""

_lock = threading.Lock()
_compilers: list[Any] = []
_program_dir: Path | None = None


def packet_key(payer_id: str, idempotency_key: str) -> str:
    return key("outbound", "packets", payer_id, f"{idempotency_key}.pdf")


def text_pdf(text: str, title: str | None = None) -> bytes:
    """A plain PDF of ``text`` (the text is data to Typst, never markup)."""
    import typst

    global _program_dir
    with _lock:
        if _program_dir is None:
            _program_dir = Path(tempfile.mkdtemp(prefix="retroauth-text-"))
            (_program_dir / "text.typ").write_text(_TEXT_PROGRAM)
        compiler = _compilers.pop() if _compilers else None
    if compiler is None:
        compiler = typst.Compiler(str(_program_dir / "text.typ"), root=str(_program_dir), ignore_system_fonts=True)
    try:
        out = compiler.compile(format="pdf", sys_inputs={"title": title or "", "body": text})
    finally:
        with _lock:
            _compilers.append(compiler)
    assert isinstance(out, bytes)
    return out


def build_packet_pdf(engine: sa.Engine, storage: Storage, case_id: int, kind: str = "request") -> bytes:
    """The letter and the included documents as one PDF. Refuses (``ChannelRefused``) without a letter."""
    import pypdf

    with session_scope(engine) as s:
        letter = s.execute(sa.select(Letter).where(Letter.case_id == case_id, Letter.kind == kind)
                           .order_by(Letter.appeal_level.desc(), Letter.version.desc(), Letter.id.desc())
                           .limit(1)).scalars().first()
        packet = s.execute(sa.select(Packet).where(Packet.case_id == case_id)).scalars().first()
    if letter is None:
        raise ChannelRefused(f"no_{kind}_letter")
    writer = pypdf.PdfWriter()
    writer.append(pypdf.PdfReader(io.BytesIO(storage.get(letter.pdf_key, sha256=letter.pdf_sha256))))
    for item in (packet.manifest or {}).get("items", []) if packet else []:
        k = item.get("storage_key")
        if item.get("status") != "included" or not k:
            continue
        media = (item.get("media_type") or item.get("content_type") or "").lower()
        data = storage.get(k, sha256=item.get("sha256"))
        if media.startswith("application/pdf") or data[:5] == b"%PDF-":
            writer.append(pypdf.PdfReader(io.BytesIO(data)))
        elif media.startswith("text/"):
            pdf = text_pdf(data.decode("utf-8", errors="replace"), item.get("label"))
            writer.append(pypdf.PdfReader(io.BytesIO(pdf)))
        # other media (images, JSON for machines) do not go into the fax/portal PDF
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


class PacketChannel:
    """Writes the PDF a person uploads, faxes or mails; the case stays submitted until they record the outcome."""

    name = "packet"

    def send(self, engine: sa.Engine, storage: Storage, library: Any, settings: Any, out: Outgoing) -> SendResult:
        k = packet_key(out.payer_id, out.idempotency_key)
        if not storage.exists(k):  # sent before (a crash before it was recorded): the same object stands
            storage.put(k, build_packet_pdf(engine, storage, out.case_id, out.kind), content_type="application/pdf")
        return SendResult(tracking_number=out.idempotency_key, payload_key=k)

    def poll(self, engine: sa.Engine, storage: Storage, library: Any, settings: Any, out: Outgoing,
             tracking_number: str | None) -> Answer | None:
        return None  # the answer comes by fax, mail or portal: a person records it (`retroauth record`)
