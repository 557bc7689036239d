"""User-facing errors: each says what was wrong and where (file, line, field)."""

from __future__ import annotations


class CaptionerError(Exception):
    """Base class for errors the CLI reports as one line and a non-zero exit."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line
        self.field = field


class ConfigError(CaptionerError):
    pass


class DataError(CaptionerError):
    pass


class ImageError(CaptionerError):
    """An image could not be decoded (corrupt, truncated, empty)."""


class ImageUnsupported(ImageError):
    """The bytes are not in an image format Pillow reads."""


class ImageTooLarge(ImageError):
    """More pixels than allowed (a decompression bomb, or just too big)."""


class ModelError(CaptionerError):
    pass
