"""PII redaction: e-mail addresses and public IPv4 addresses are replaced, never dropped.

As FineWeb's PIIFormatter does, private, loopback, link-local and reserved IPv4 ranges (10/8,
127/8, 169.254/16, 172.16/12, 192.168/16, 0/8, 224/3 and the documentation nets) are left alone:
they identify nobody. The number of replacements goes into `meta["pii"]` when there are any.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

from pipeline.data.config import PiiConfig
from pipeline.data.document import Document
from pipeline.data.stage import Stage

EMAIL_RE = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,63}[A-Za-z0-9])?@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b"
)
IPV4_RE = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]\d)"
)


def is_public_ip(text: str) -> bool:
    ip = ipaddress.IPv4Address(text)
    return ip.is_global and not ip.is_multicast


class PiiRedactor(Stage):
    """Replace e-mail addresses and public IPv4 addresses with fixed placeholders."""

    name = "pii"

    def __init__(self, cfg: PiiConfig):
        self.cfg = cfg

    def process_one(self, doc: Document) -> Document:
        text, n_email = EMAIL_RE.subn(self.cfg.email_replacement, doc.text)
        n_ip = 0

        def swap(m: re.Match) -> str:
            nonlocal n_ip
            if not is_public_ip(m.group(0)):
                return m.group(0)
            n_ip += 1
            return self.cfg.ip_replacement

        text = IPV4_RE.sub(swap, text) if "." in text else text
        if not (n_email or n_ip):
            return doc
        meta = {**doc.meta, "pii": {"email": n_email, "ip": n_ip}}
        return replace(doc, text=text, meta=meta)
