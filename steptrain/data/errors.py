"""The one exception type of the data layer.

Users fix data problems in an editor, so every message is a single line that starts with the location
("data/train.jsonl:17: invalid JSON: ...") and can be pasted into a jump-to-line command. ``reason`` is
kept apart from the detail because ``on_error=skip`` counts skipped rows by it.
"""

from __future__ import annotations


class DataError(ValueError):
    def __init__(self, reason: str, detail: str = "", *, location: str = ""):
        self.reason = reason
        self.detail = detail
        self.location = location
        super().__init__(": ".join(part for part in (location, reason, detail) if part))

    def at(self, location: str) -> DataError:
        """The same error, reported at `location` (for errors raised where the source is not known)."""
        return DataError(self.reason, self.detail, location=location)
