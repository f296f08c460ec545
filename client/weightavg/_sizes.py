"""Byte sizes as people write them (64MiB, 1.5G, 500MB): one reading for the server's flags and
variables and the client's commands (`weightavg merge --batch-bytes`), so both take the same forms."""

from __future__ import annotations

import re
from fractions import Fraction

BYTE_UNITS: dict[str, int] = {"": 1, "b": 1} | {
    prefix + suffix: (1000 if suffix == "b" else 1024) ** power
    for power, prefix in enumerate("kmgt", start=1) for suffix in ("", "i", "ib", "b")
}
"""Unit suffixes of a byte size (lower case; matched case-insensitively) -> bytes. KiB, Ki and a bare
K are powers of 1024, as in docker's --memory, Java's -Xmx, GNU dd and Kubernetes' Ki; KB is a power of
1000 (SI), so 1GB is 10**9 bytes and 1G, 1Gi and 1GiB are 2**30. Case does not matter: 1mb is 1MB
(never megabits)."""
MAX_BYTE_SIZE = 2**63 - 1
"""The largest byte size any setting takes (int64, as the wire and the caps carry it); each flag's own
range is checked by ServerConfig.check."""
BYTE_SIZE_FORMS = (
    "a whole number of bytes, optionally with a unit: K, M, G, T or KiB, MiB, GiB, TiB (powers of 1024), "
    "KB, MB, GB, TB (powers of 1000), any case, e.g. 67108864, 64MiB, 64M, 1.5GiB, 500MB"
)
"""What a byte-size setting takes, for its help and the messages that refuse one."""
_BYTE_SIZE = re.compile(r"\+?(\d+(?:_\d+)*)(?:\.(\d+))?\s*([a-z]*)", re.ASCII | re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """A byte size from a flag, a WEIGHTAVG_* variable or a client command's option: a plain integer as before (67108864), or a
    number with a unit of BYTE_UNITS (64MiB, 64M, 1.5G, 500MB, 1 GiB). Only plain integers were
    taken: `--max-device-bytes 1GiB` stopped the start with "invalid int value".

    Raises:
        ValueError: negative, not a whole number of bytes (1.5 or 0.3K), above MAX_BYTE_SIZE, or
            not a size at all; the message starts with repr(text) and lists the accepted forms.
    """
    shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}..."  # never a whole runaway value
    match = _BYTE_SIZE.fullmatch(text.strip())
    unit = BYTE_UNITS.get(match.group(3).lower()) if match else None
    if match is None or unit is None:
        problem = "is negative" if text.strip().startswith("-") else "is not a size"
        raise ValueError(f"{shown} {problem}; give {BYTE_SIZE_FORMS}")
    whole, fraction = match.group(1).replace("_", ""), match.group(2) or ""
    # More digits than any size has: int() refuses past 4300 with a message of its own.
    size = Fraction(int(whole + fraction), 10 ** len(fraction)) * unit if len(whole + fraction) <= 40 else None
    if size is not None and size.denominator != 1:
        raise ValueError(f"{shown} is {float(size):g} bytes, not a whole number; give {BYTE_SIZE_FORMS}")
    if size is None or size > MAX_BYTE_SIZE:
        raise ValueError(f"{shown} is more than {MAX_BYTE_SIZE} bytes (8 EiB), the most any size setting takes")
    return int(size)
