"""HTTP/1.1 chunked transfer coding, undone incrementally as the bytes arrive."""

from __future__ import annotations


class ChunkedDecoder:
    """Feed it the body bytes of a chunked response as they come; it returns the data.

    `ended` turns True at the last (empty) chunk; `idle` is True between chunks, when the
    next bytes start a new chunk (a reader may then take a whole chunk on a fast path).
    """

    def __init__(self) -> None:
        self.raw = b""  # bytes not yet decoded: an incomplete chunk-size line
        self.chunk_left = 0  # data bytes left in the current chunk
        self.skip = 0  # bytes of a chunk's closing CRLF still to skip
        self.ended = False

    @property
    def idle(self) -> bool:
        return not (self.raw or self.chunk_left or self.skip)

    def feed(self, data: bytes) -> bytes:
        """The data in `data` (and what was held back of earlier bytes); b"" once ended."""
        if self.ended:
            return b""
        buf = self.raw + data if self.raw else data
        out = []
        pos = 0
        size = len(buf)
        while pos < size:
            if self.chunk_left:
                take = min(self.chunk_left, size - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                if not self.chunk_left:
                    self.skip = 2
            elif self.skip:
                take = min(self.skip, size - pos)
                pos += take
                self.skip -= take
            else:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    break
                length = int(buf[pos:line_end].split(b";", 1)[0], 16)
                pos = line_end + 2
                if length == 0:
                    self.ended = True
                    pos = size
                    break
                self.chunk_left = length
        self.raw = buf[pos:] if pos < size else b""
        return out[0] if len(out) == 1 else b"".join(out)
