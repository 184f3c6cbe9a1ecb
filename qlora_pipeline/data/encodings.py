"""Text-file encodings: which codec a local .csv/.tsv/.jsonl is read with (`data.sources[].encoding`).

null reads UTF-8 (strict: a file in another encoding stops with the byte offset and the option that fixes it);
a codec name is used as given; `auto` detects, in this order:

1. a byte-order mark (UTF-8, UTF-16, UTF-32): certain;
2. strict UTF-8 over the whole file, unless NUL characters say it is UTF-16 without a mark: UTF-8 is by far the
   most common encoding, and a non-UTF-8 text of any length almost never decodes as UTF-8 by chance;
3. charset-normalizer on a sample (the first MiB, or around the first byte that is not UTF-8), which scores
   candidate codecs by how plausible the decoded text is;
4. GB2312 / GBK / CP936 / HZ answers are read as GB18030, their superset (identical text for every byte sequence
   they define); when nothing fits, GB18030 too, since a Chinese corpus is the usual reason for a non-UTF-8 file.

Measured on files of 10 rows and more: GBK, GB18030, UTF-16 with and without a mark, UTF-8 with and without a
mark and Big5 are all detected and decoded exactly. A file of a handful of short rows gives the detector little
to go on (a 1-5 row GBK file is sometimes taken for CP949, Korean): name the encoding for such files.
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

SAMPLE_BYTES = 1 << 20  # what the detector reads: enough text to be sure, fast on any file size
BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
GB_FAMILY = {"gb2312", "gbk", "cp936", "hz", "hz_gb_2312", "hz-gb-2312", "gb18030"}
FALLBACK = "gb18030"


@dataclass(frozen=True)
class Encoding:
    name: str  # the codec the file is read with
    how: str  # "default" (UTF-8), "config" (named), or "detected" (auto)

    def record(self) -> dict[str, str]:
        """What data_summary.json records for the source."""
        return {"encoding": self.name, "encoding_from": self.how}


def resolve(requested: str | None, data: bytes) -> Encoding:
    """The codec for a file's bytes: UTF-8 when `requested` is None, `requested` as named, or detected for `auto`."""
    if requested is None:
        return Encoding("utf-8", "default")
    if requested == "auto":
        return Encoding(detect(data), "detected")
    return Encoding(codecs.lookup(requested).name, "config")


def detect(data: bytes) -> str:
    """The codec `data` is most plausibly written in (see the module docstring for the order of checks)."""
    for mark, name in BOMS:
        if data.startswith(mark):
            return name
    first_bad = first_non_utf8(data)
    if first_bad is None and not _looks_like_utf16(data):
        return "utf-8"
    start = 0 if first_bad is None or first_bad < SAMPLE_BYTES // 2 else first_bad - SAMPLE_BYTES // 4
    if first_bad is not None and start:  # begin on a line: the detector then never sees half a character at the front
        newline = data.find(b"\n", start)
        start = newline + 1 if 0 <= newline < first_bad else start
    sample = data[start : start + SAMPLE_BYTES]
    found = _charset_normalizer(sample, whole=start == 0 and len(data) <= SAMPLE_BYTES)
    if found is None:
        log.info("encoding: no confident detection; reading as %s", FALLBACK)
        return FALLBACK
    return FALLBACK if found in GB_FAMILY else found


def first_non_utf8(data: bytes, chunk: int = SAMPLE_BYTES) -> int | None:
    """Offset of the first byte that is not UTF-8, or None when all of `data` decodes. Decoded a chunk at a time, so
    a large file never exists twice in memory (bytes and text)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    view = memoryview(data)
    for offset in range(0, max(len(data), 1), chunk):
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
        try:
            decoder.decode(view[offset : offset + chunk], final=offset + chunk >= len(data))
        except UnicodeDecodeError as exc:
            return offset - pending + int(exc.start)
    return None


def _looks_like_utf16(data: bytes) -> bool:
    """UTF-16 without a mark is valid UTF-8 when its text is ASCII (every other byte NUL); real text has no NULs."""
    sample = data[:SAMPLE_BYTES]
    return len(sample) >= 4 and sample.count(0) > len(sample) // 8


def _charset_normalizer(sample: bytes, whole: bool) -> str | None:
    """charset-normalizer's best guess, normalized to Python's codec name. A sample cut in the middle of a character
    can make it find nothing: retried with up to 3 bytes trimmed off the end."""
    from charset_normalizer import from_bytes

    for trim in range(1 if whole else 4):
        best = from_bytes(sample[: len(sample) - trim] if trim else sample).best()
        if best is not None:
            return codecs.lookup(best.encoding).name
    return None
