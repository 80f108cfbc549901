"""Reading the XML answers of AWS APIs (S3, STS): namespaces ignored, and no DOCTYPE, so
no entity can be declared (nor expanded) whatever the parser version."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

NS = re.compile(r"^\{[^}]*\}")


def parse_xml(data: bytes) -> ET.Element:
    """Parse an answer. It must be UTF-8 (as AWS sends) and have no DOCTYPE; parsing text,
    not bytes, makes expat ignore any other declared encoding. Whitespace before the XML
    declaration is skipped: S3 (and MinIO) keep a slow CompleteMultipartUpload's 200
    answer alive with spaces and newlines before its body, which expat refuses ("XML or
    text declaration not at start of entity"). Raises ValueError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if "<!DOCTYPE" in text:
        raise ValueError("an XML answer with a DOCTYPE")
    try:
        return ET.fromstring(text.removeprefix("\ufeff").lstrip(" \t\r\n"))
    except ET.ParseError as exc:
        raise ValueError(f"malformed XML: {exc}") from None


def tag(e: ET.Element) -> str:
    return NS.sub("", e.tag)


def children(root: ET.Element, name: str) -> list[ET.Element]:
    return [e for e in root if tag(e) == name]


def text(root: ET.Element, name: str) -> str:
    for e in children(root, name):
        return e.text or ""
    return ""


def error_fields(data: bytes) -> tuple[str, str]:
    """``(Code, Message)`` of an AWS error answer: its root ``Error`` (S3), or the first
    ``Error`` inside it (STS wraps one in ``ErrorResponse``); empty strings for a body
    that is no such answer."""
    if not data.lstrip().startswith(b"<"):
        return "", ""
    try:
        root = parse_xml(data)
    except ValueError:
        return "", ""
    for e in root.iter():
        if tag(e) == "Error":
            return text(e, "Code"), text(e, "Message")
    return "", ""
