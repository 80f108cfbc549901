"""Choosing how a chunk is stored: zstd where that saves space, raw where it does not.

``Compressor`` is not thread-safe (it owns a zstd context); make one per thread.
Incompressible data (images, audio, archives) is detected from a sample, so most of
such a chunk is never fed to zstd.
"""

from __future__ import annotations

import zstandard

from cafs.format.location import CODEC_RAW, CODEC_ZSTD

SAMPLE = 32 << 10
SAMPLE_GAIN = 0.92  # a sample that does not shrink below this is taken as incompressible
KEEP_GAIN = 0.97  # compressed output is kept only if at most this fraction of the input


class Compressor:
    def __init__(self, level: int = 3) -> None:
        self._full = zstandard.ZstdCompressor(level=level)
        self._probe = zstandard.ZstdCompressor(level=1)

    def encode(self, data: bytes | memoryview) -> tuple[int, bytes | memoryview]:
        """``(codec, stored bytes)`` for one chunk or node."""
        n = len(data)
        if n < 64:
            return CODEC_RAW, data
        if n > 2 * SAMPLE:
            mid = n // 2
            sample = data[mid:mid + SAMPLE]
            if len(self._probe.compress(sample)) > SAMPLE_GAIN * SAMPLE:
                return CODEC_RAW, data
        packed = self._full.compress(data)
        if len(packed) <= KEEP_GAIN * n:
            return CODEC_ZSTD, packed
        return CODEC_RAW, data
