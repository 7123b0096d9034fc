"""Pure parsers shared by the internal operations (ckp.md §4.3) and output mappings (§5.6).

JSON text (with Markdown code fences), XML (no DTDs, no entities, no network), CSV and XLSX workbooks. Every
function raises :class:`ParseError` with a stable ``reason`` on bad input; callers turn it into their own error.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import zipfile
from collections.abc import Iterable
from typing import Any

from lxml import etree

__all__ = [
    "MAX_WORKBOOK_BYTES",
    "ParseError",
    "canonical_json",
    "compact_json",
    "loads_json",
    "parse_csv",
    "parse_json_text",
    "parse_workbook",
    "parse_xml",
    "safe_xml_parser",
    "strip_code_fence",
    "xml_to_object",
]

MAX_WORKBOOK_BYTES = 20 * 1024 * 1024
MAX_WORKBOOK_UNCOMPRESSED = 200 * 1024 * 1024  # zip-bomb guard for XLSX packages
_NUMERAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_FENCE_LANG = re.compile(r"[A-Za-z0-9_+.#-]*")


class ParseError(Exception):
    """A parse failure: ``reason`` is the stable reason code (``invalid_json``, ``invalid_xml``, …)."""

    def __init__(self, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.details = details


# -- JSON ------------------------------------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, compact separators, UTF-8 (not ASCII-escaped)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def compact_json(value: Any) -> str:
    """Compact JSON text in document key order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def strip_code_fence(text: str) -> str:
    """Remove one Markdown code fence surrounding the whole text (```` ```json … ``` ````), else return it as is."""
    stripped = text.strip()
    if len(stripped) < 6 or not stripped.startswith("```") or not stripped.endswith("```"):
        return text
    inner = stripped[3:-3]
    first, newline, rest = inner.partition("\n")
    if newline and _FENCE_LANG.fullmatch(first.strip()):
        inner = rest
    return inner.strip()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_json(text: str) -> Any:
    """Strict JSON decoding (no ``NaN``/``Infinity``). Raises :class:`ParseError` ``invalid_json``."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ParseError("invalid_json", f"invalid JSON: {exc}") from None


def parse_json_text(text: str) -> Any:
    """Decode JSON text after stripping a surrounding Markdown code fence."""
    return loads_json(strip_code_fence(text))


# -- XML -------------------------------------------------------------------------------------------------------


def safe_xml_parser() -> etree.XMLParser:
    """An XML parser that never loads DTDs, resolves entities or touches the network."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                           huge_tree=False, remove_comments=True, remove_pis=True, encoding="utf-8")


def _qualified(name: str, nsmap: dict[str | None, str]) -> str:
    if not name.startswith("{"):
        return name
    uri, local = name[1:].split("}", 1)
    for prefix, value in nsmap.items():
        if value == uri and prefix:
            return f"{prefix}:{local}"
    return local


def xml_to_object(root: etree._Element) -> dict[str, Any]:
    """The root element as ``{<tag>: content}`` (§4.3 ``parse_xml``).

    Content is the stripped text (or ``null``) for a leaf without attributes; otherwise an object with
    attributes as ``@name``, non-blank text as ``#text``, children by tag and repeated tags as lists.
    """
    return {_qualified(str(root.tag), dict(root.nsmap)): _element_content(root)}


def _element_content(el: etree._Element) -> Any:
    nsmap = dict(el.nsmap)
    children: list[etree._Element] = []
    text_parts = [el.text or ""]
    for child in el:
        if isinstance(child, etree._Entity):
            raise ParseError("invalid_xml", "XML entities are not allowed")
        if isinstance(child.tag, str):
            children.append(child)
        text_parts.append(child.tail or "")
    text = "".join(text_parts).strip()
    if not children and not el.attrib:
        return text or None
    out: dict[str, Any] = {}
    for name, value in el.attrib.items():
        out["@" + _qualified(str(name), nsmap)] = str(value)
    if text:
        out["#text"] = text
    for child in children:
        key = _qualified(str(child.tag), dict(child.nsmap))
        value = _element_content(child)
        if key not in out:
            out[key] = value
        elif isinstance(out[key], list):
            out[key].append(value)
        else:
            out[key] = [out[key], value]
    return out


def parse_xml_root(text: str) -> etree._Element:
    """Parse an XML document safely; DTDs and entity references are refused (``invalid_xml``)."""
    try:
        tree = etree.fromstring(text.encode("utf-8"), safe_xml_parser()).getroottree()
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise ParseError("invalid_xml", f"invalid XML: {exc}") from None
    docinfo: Any = tree.docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise ParseError("invalid_xml", "XML documents with a DTD are not allowed")
    return tree.getroot()


def parse_xml(text: str) -> dict[str, Any]:
    """XML text → object (see :func:`xml_to_object`)."""
    return xml_to_object(parse_xml_root(text))


# -- CSV -------------------------------------------------------------------------------------------------------


def infer_scalar(cell: str) -> Any:
    """``infer_types``: JSON numerals become numbers, ``true``/``false`` (any case) booleans."""
    t = cell.strip()
    low = t.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if _NUMERAL.fullmatch(t):
        if "." in t or "e" in low:
            value = float(t)
            return value if value not in (float("inf"), float("-inf")) else cell
        return int(t)
    return cell


def parse_csv(text: str, delimiter: str = ",", quotechar: str = '"', header: bool = True,
              infer_types: bool = False) -> list[Any]:
    """CSV text → list of objects keyed by the header row (missing cells ``null``), or list of lists.

    Blank lines are skipped. A data row longer than the header is ``invalid_csv``.
    """
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar=quotechar, strict=True)
        rows = [row for row in reader if row and not (len(row) == 1 and not row[0].strip())]
    except csv.Error as exc:
        raise ParseError("invalid_csv", f"invalid CSV: {exc}") from None

    def cells(row: list[str]) -> list[Any]:
        return [infer_scalar(c) for c in row] if infer_types else list(row)

    if not header:
        return [cells(row) for row in rows]
    if not rows:
        return []
    names = rows[0]
    out: list[Any] = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) > len(names):
            raise ParseError("invalid_csv", f"row {number} has {len(row)} cells but the header has {len(names)}",
                             row=number)
        values = cells(row)
        out.append({name: values[i] if i < len(values) else None for i, name in enumerate(names)})
    return out


# -- XLSX ------------------------------------------------------------------------------------------------------


def _cell_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


def _check_package(data: bytes) -> None:
    if not data.startswith(b"PK\x03\x04"):
        raise ParseError("unsupported_format", "the file is not an XLSX workbook")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as package:
            names = set(package.namelist())
            total = sum(info.file_size for info in package.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ParseError("invalid_workbook", f"invalid workbook: {exc}") from None
    if "xl/workbook.xml" not in names:
        raise ParseError("unsupported_format", "the file is a ZIP package but not an XLSX workbook")
    if total > MAX_WORKBOOK_UNCOMPRESSED:
        raise ParseError("invalid_workbook", "the workbook expands to more than "
                         f"{MAX_WORKBOOK_UNCOMPRESSED // (1024 * 1024)} MiB")


def _column_name(index: int) -> str:
    name = ""
    n = index + 1
    while n:
        n, rem = divmod(n - 1, 26)
        name = chr(65 + rem) + name
    return name


def parse_workbook(data: bytes, sheet_name: str | None = None, header: bool = True,
                   header_row: int = 1) -> list[Any]:
    """XLSX bytes → rows of one sheet (first sheet by default).

    Rows before ``header_row`` (1-based) are ignored; with ``header`` that row names the columns (blank header
    cells are named by their column letter) and each later non-empty row becomes an object. Without ``header``
    every non-empty row from ``header_row`` on is a list. Dates become ISO strings, empty cells ``null``.
    """
    if len(data) > MAX_WORKBOOK_BYTES:
        raise ParseError("invalid_workbook", "the workbook is larger than 20 MiB")
    _check_package(data)
    import openpyxl  # deferred: only this operation needs it

    try:
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many unrelated types for damaged packages
        raise ParseError("invalid_workbook", f"invalid workbook: {exc}") from None
    try:
        if sheet_name is None:
            sheet = book.worksheets[0] if book.worksheets else None
            if sheet is None:
                raise ParseError("sheet_not_found", "the workbook has no worksheet")
        elif sheet_name in book.sheetnames:
            sheet = book[sheet_name]
        else:
            raise ParseError("sheet_not_found", f"no sheet named '{sheet_name}'", sheet_name=sheet_name)
        try:
            raw_rows: Iterable[tuple[Any, ...]] = sheet.iter_rows(min_row=header_row, values_only=True)
            rows = [[_cell_value(v) for v in row] for row in raw_rows]
        except Exception as exc:  # damaged sheet XML
            raise ParseError("invalid_workbook", f"invalid worksheet: {exc}") from None
    finally:
        book.close()
    if header:
        if not rows:
            return []
        head = list(rows[0])
        while head and (head[-1] is None or head[-1] == ""):
            head.pop()
        names = [_column_name(i) if v is None or v == "" else _format_header(v) for i, v in enumerate(head)]
        out: list[Any] = []
        for row in rows[1:]:
            if all(v is None for v in row):
                continue
            record: dict[str, Any] = {name: None for name in names}
            for i, value in enumerate(row):
                if i < len(names):
                    record[names[i]] = value
                elif value is not None:  # a cell right of the header row: named by its column letter
                    record[_column_name(i)] = value
            out.append(record)
        return out
    body = [row for row in rows if any(v is not None for v in row)]
    width = max((len(r) for r in body), default=0)
    return [row + [None] * (width - len(row)) for row in body]


def _format_header(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
