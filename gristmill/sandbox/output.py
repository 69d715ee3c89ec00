"""A cell's captured output: head and tail kept, terminal control characters escaped."""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, and the C1 controls (U+009B is an 8-bit CSI).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """Escape terminal control characters as Python-style `\\xNN` text; keep tab and newline.

    A cell's output lands in the dataset and in logs: raw escape sequences ("\\x1b[2J",
    OSC titles, carriage returns that overwrite a line) would act on whatever terminal shows
    it. Escaping, rather than stripping, keeps every byte visible to the reader.
    """
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Capture:
    """Keeps the first and last `keep` bytes of a stream and counts the rest."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        """Take the next chunk read from the stream."""
        self.total += len(data)
        room = self.keep - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.keep:
                del self.tail[: len(self.tail) - self.keep]

    @property
    def omitted(self) -> int:
        """Bytes dropped from the middle."""
        return self.total - len(self.head) - len(self.tail)

    def raw(self) -> bytes:
        """Everything kept, head then tail, with no marker (for short private channels)."""
        return bytes(self.head + self.tail)

    def text(self) -> str:
        """The kept output as text, controls escaped, with a marker where bytes were cut."""
        if not self.omitted:
            return escape_controls((self.head + self.tail).decode("utf-8", "replace"))
        head = escape_controls(self.head.decode("utf-8", "replace"))
        tail = escape_controls(self.tail.decode("utf-8", "replace"))
        return f"{head}\n[... {self.omitted} bytes omitted ...]\n{tail}"
