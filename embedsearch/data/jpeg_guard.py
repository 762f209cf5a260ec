"""Bound the work of decoding a JPEG before libjpeg starts, from its markers alone.

A progressive JPEG may hold any number of scans, and libjpeg decodes every one over all of
the image's blocks: a 0.3 MB file of 6000×6000 pixels with thousands of scans costs minutes
of CPU although its header looks harmless. Ordinary encoders write 1 scan (baseline) or
about 10 (progressive; mozjpeg up to ~20), so a file with many more is refused before it is
decoded, as is one whose scans × pixels would cost more than about a second. TIFFs with
JPEG compression embed the same streams and get the same check.
"""

from __future__ import annotations

import re

#: More scans than any encoder writes for a real photo (libjpeg's default script: 10).
MAX_SCANS = 100
#: Upper bound on scans × pixels; libjpeg spends about 1 ns per pixel per scan here, and a
#: 100-megapixel progressive photo with 10 scans stays inside it.
MAX_SCAN_WORK = 1_500_000_000

# A marker: 0xFF (fill bytes allowed) then a code that is neither a stuffed 0x00, a
# restart marker (0xD0-0xD7) nor another fill byte. Entropy-coded data never contains one.
_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")
_SOS, _EOI, _TEM = 0xDA, 0xD9, 0x01


def count_scans(data: bytes, stop_after: int = MAX_SCANS + 1) -> int:
    """Start-of-scan segments of the first image in ``data`` (stops at EOI or ``stop_after``).

    Segments are skipped by their length, so bytes inside EXIF or an embedded thumbnail are
    never taken for markers, and images appended after the end marker do not count.
    """
    pos, scans = 2, 0  # after SOI
    while scans < stop_after:
        m = _MARKER.search(data, pos)
        if m is None:
            break
        code, pos = m.group(1)[0], m.end()
        if code == _EOI:
            break
        if code == _TEM:
            continue
        if code == _SOS:
            scans += 1
        pos += int.from_bytes(data[pos:pos + 2], "big")
    return scans


def scan_work_problem(data: bytes, pixels: int) -> str | None:
    """Why decoding this JPEG would cost too much, or None when it is fine.

    ``data.count`` runs at memory speed and never under-counts (0xFFDA cannot occur in
    entropy-coded data), so the exact marker walk runs only for suspicious files.
    """
    rough = data.count(b"\xff\xda")
    if rough <= MAX_SCANS and rough * pixels <= MAX_SCAN_WORK:
        return None
    # Inside a TIFF the JPEG streams sit among other data: the upper bound has to do.
    scans = count_scans(data) if data.startswith(b"\xff\xd8") else rough
    if scans > MAX_SCANS:
        return (f"over {MAX_SCANS} scans (ordinary JPEGs have 1 to about 20); refused "
                "before decoding")
    if scans * pixels > MAX_SCAN_WORK:
        return (f"{scans} progressive scans of {pixels:,} pixels would cost over "
                f"{MAX_SCAN_WORK / 1e9:.1f} G pixel-scans to decode; refused before decoding")
    return None
