"""Request traces: Mooncake's JSONL format in and out.

A trace is a list of :class:`Request` in arrival order. Mooncake's ``conversation_trace.jsonl``
has one JSON object per line: ``timestamp`` (ms since the start), ``input_length`` and
``output_length`` (tokens) and ``hash_ids``: the chained hashes of the prompt's blocks (512 tokens
each; the last one may be partial), so equal leading ids mean an equal prefix. File order is kept
for equal timestamps; a timestamp that goes backwards is an error, not silently re-sorted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

__all__ = ["Request", "TraceError", "read_mooncake", "write_mooncake", "iter_mooncake"]


class TraceError(ValueError):
    """A malformed trace line; the message names the file, the line and the field."""


class Request(msgspec.Struct, frozen=True):
    """One inference request: arrival time (s), prompt and output lengths (tokens), block ids."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    blocks: tuple[int, ...]


class _Line(msgspec.Struct):
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: list[int]


_decoder = msgspec.json.Decoder(_Line)


def iter_mooncake(path: str | Path) -> Iterator[Request]:
    """Yield the requests of a Mooncake-format JSONL trace, validating every line."""
    p = Path(path)
    try:
        fh = p.open("rb")
    except OSError as e:
        raise TraceError(f"cannot read trace {str(p)!r}: {e.strerror or e}") from e
    last_ts = -1.0
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                ln = _decoder.decode(raw)
            except msgspec.ValidationError as e:
                raise TraceError(f"{p}:{lineno}: {e}") from None
            except msgspec.DecodeError as e:
                raise TraceError(f"{p}:{lineno}: not a JSON object ({e})") from None
            if ln.timestamp < 0:
                raise TraceError(f"{p}:{lineno}: timestamp {ln.timestamp} is negative")
            if ln.timestamp < last_ts:
                raise TraceError(
                    f"{p}:{lineno}: timestamp {ln.timestamp} is earlier than the previous line's "
                    f"{last_ts}; traces must be in arrival order"
                )
            if ln.input_length < 0 or ln.output_length < 0:
                raise TraceError(f"{p}:{lineno}: input_length/output_length must be >= 0")
            last_ts = ln.timestamp
            yield Request(
                ln.timestamp / 1000.0, ln.input_length, ln.output_length, tuple(ln.hash_ids)
            )


def read_mooncake(path: str | Path, *, max_requests: int | None = None) -> list[Request]:
    """Read a whole Mooncake-format trace (optionally only its first ``max_requests`` lines)."""
    out: list[Request] = []
    for r in iter_mooncake(path):
        if max_requests is not None and len(out) >= max_requests:
            break
        out.append(r)
    if not out:
        raise TraceError(f"trace {str(path)!r} holds no requests")
    return out


def write_mooncake(requests: Iterable[Request], path: str | Path) -> int:
    """Write requests in Mooncake's JSONL format; returns the number of lines written."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as fh:
        for r in requests:
            fh.write(
                json.dumps(
                    {
                        "timestamp": int(round(r.arrival_s * 1000.0)),
                        "input_length": r.input_tokens,
                        "output_length": r.output_tokens,
                        "hash_ids": list(r.blocks),
                    }
                )
            )
            fh.write("\n")
            n += 1
    return n
