"""PII scrubbing: e-mail addresses, phone numbers, IP addresses and card numbers become placeholders.

Rules, in the order they are applied (the README lists them for users):

- email  -> <EMAIL>: ASCII local part (letters, digits, . _ % + -) @ dotted domain whose last label
  has 2-24 letters; not inside a longer word.
- card   -> <CARD>: 13-19 digits, either run together or in the usual groups (4-4-4-4, 4-4-4-4-3,
  4-6-5, 4-6-4) split by one kind of separator (space or dash); the first digit 2-6 (the card
  networks' ranges) and the Luhn checksum valid. A 16-digit number that fails Luhn is left alone.
- ipv6   -> <IP_ADDRESS>: what Python's `ipaddress` accepts as an IPv6 address, with at least three
  non-empty groups or one group of four hex digits (so `::`, `a[1::2]` and times like 12:30:45
  are left alone).
- ipv4   -> <IP_ADDRESS>: four dot-separated decimal octets, each 0-255 without leading zeros, not
  touching a letter, digit or another dotted part (`v1.2.3.4`, `1.2.3.4.5`, `10.0.0.300` are
  left alone).
- phone  -> <PHONE>: international numbers (`+` and a 1-3 digit country code, then groups split
  by single spaces or dashes, an area code may be in parentheses; 8-15 digits in all) and North
  American ones ((415) 555-0132, 415-555-0132, 415.555.0132, 415 555 0132, optionally preceded
  by 1; area code and exchange start with 2-9, both separators alike). Dates (2024-01-15),
  versions and plain numbers are not phone numbers.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from dsgpt.data.clean.settings import PII_KINDS

PLACEHOLDERS = {"email": "<EMAIL>", "card": "<CARD>", "ipv6": "<IP_ADDRESS>", "ipv4": "<IP_ADDRESS>",
                "phone": "<PHONE>"}
ORDER = ("email", "card", "ipv6", "ipv4", "phone")
assert set(ORDER) == set(PII_KINDS)

# Each pattern starts with a literal or a character class and checks the character before its
# start with a lookbehind placed after that first character: Python's re then skips ahead to
# candidate characters instead of trying the whole pattern at every position (3-10x faster).
_AT_DOMAIN = re.compile(r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
_LOCAL_PART = re.compile(r"(?<![\w.%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?\Z")
_CARD = re.compile(
    r"[0-9](?<![\w.,+-][0-9])(?:"
    r"[0-9]{12,18}"
    r"|[0-9]{3}(?P<a>[ -])[0-9]{4}(?P=a)[0-9]{4}(?P=a)[0-9]{4}(?:(?P=a)[0-9]{3})?"
    r"|[0-9]{3}(?P<b>[ -])[0-9]{6}(?P=b)[0-9]{4,5}"
    r")(?![\w]|[.,][0-9])"
)
_IPV6 = re.compile(
    r"(?=[0-9A-Fa-f:])(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
    r"(?:[0-9A-Fa-f]{1,4}|(?<=:)(?:[0-9]{1,3}\.){3}[0-9]{1,3})?(?![\w:]|\.\w)"
)
_IPV4 = re.compile(r"[0-9](?<![\w.][0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![\w]|\.\w)")
_PHONE_INTL = re.compile(r"\+(?<![\w+.-]\+)[0-9]{1,3}(?:[ -]?\([0-9]{1,5}\))?(?:[ -]?[0-9]{1,8}){1,6}(?![\w]|[.-][0-9])")
_PHONE_NANP = re.compile(
    r"[(0-9](?<![\w+.-][(0-9])(?:"
    r"(?<=1)(?:[ .-]?)\([2-9][0-9]{2}\)[ ]?[2-9][0-9]{2}[ .-][0-9]{4}"
    r"|(?<=\()[2-9][0-9]{2}\)[ ]?[2-9][0-9]{2}[ .-][0-9]{4}"
    r"|(?<=1)(?P<s1>[ .-])[2-9][0-9]{2}(?P<s>[ .-])[2-9][0-9]{2}(?P=s)[0-9]{4}"
    r"|(?<=[2-9])[0-9]{2}(?P<t>[ .-])[2-9][0-9]{2}(?P=t)[0-9]{4}"
    r")(?![\w]|[.-][0-9])"
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _emails(text: str) -> list[tuple[int, int]]:
    """Spans of e-mail addresses: each '@domain' found, then its local part read backwards."""
    spans = []
    for m in _AT_DOMAIN.finditer(text):
        at = m.start()
        local = _LOCAL_PART.search(text, max(0, at - 64), at)
        if local is not None:
            spans.append((local.start(), m.end()))
    return spans


def _matches(pattern, check=None):
    def spans(text: str) -> list[tuple[int, int]]:
        return [m.span() for m in pattern.finditer(text) if check is None or check(m.group(0))]
    return spans


def _is_card(text: str) -> bool:
    digits = text.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    groups = [g for g in text.split(":") if g]
    return len(groups) >= 3 or any(len(g) == 4 for g in groups)


def _is_ipv4(text: str) -> bool:
    return all(o == "0" or (o[0] != "0" and int(o) <= 255) for o in text.split("."))


def _is_intl_phone(text: str) -> bool:
    return 8 <= sum(c.isdigit() for c in text) <= 15


def _phones(text: str) -> list[tuple[int, int]]:
    return _matches(_PHONE_INTL, _is_intl_phone)(text) + _matches(_PHONE_NANP)(text)


_FIND = {"email": _emails, "card": _matches(_CARD, _is_card), "ipv6": _matches(_IPV6, _is_ipv6),
         "ipv4": _matches(_IPV4, _is_ipv4), "phone": _phones}
# A kind cannot occur in text without this character: skip its search when it is absent.
_NEEDS = {"email": "@", "ipv6": ":", "ipv4": "."}
_DIGIT = re.compile(r"[0-9]")


class Scrubber:
    """Replaces the enabled kinds of PII (settings.PII_KINDS) and counts each kind."""

    def __init__(self, kinds=PII_KINDS):
        self.kinds = [k for k in ORDER if k in kinds]
        self.found: Counter = Counter({k: 0 for k in self.kinds})
        self.documents_changed = 0

    def __call__(self, text: str) -> str:
        changed = False
        has_digit = None
        for kind in self.kinds:
            need = _NEEDS.get(kind)
            if need is not None and need not in text:
                continue
            if kind in ("card", "phone", "ipv4"):
                if has_digit is None:
                    has_digit = _DIGIT.search(text) is not None
                if not has_digit:
                    continue
            spans = _FIND[kind](text)
            if spans:
                text, n = _replace(text, sorted(spans), PLACEHOLDERS[kind])
                self.found[kind] += n
                changed = True
        self.documents_changed += changed
        return text


def _replace(text: str, spans, placeholder: str) -> tuple[str, int]:
    """`text` with each of the sorted spans replaced by `placeholder`, and how many were."""
    out, last, n = [], 0, 0
    for start, end in spans:
        if start < last:  # overlaps the one before (two phone forms at one place): keep the first
            continue
        out += (text[last:start], placeholder)
        last, n = end, n + 1
    out.append(text[last:])
    return "".join(out), n
