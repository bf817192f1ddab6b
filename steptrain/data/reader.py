"""Read conversation rows in the ms-swift ``messages`` format and validate them line by line.

Bad rows are either fatal (the default, so that a broken file is noticed before hours of training) or
skipped and counted by reason (``on_error="skip"``); a row is never dropped without being counted.
Every row keeps its origin in ``row["_source"]`` ("path:line" or "path:row N") for later error messages.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator

from steptrain.data.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
# File types read through HF `datasets`, by extension -> builder name.
_DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def read_rows(
    paths: list[str], on_error: str = "error", check: Callable[[dict], dict | None] | None = None
) -> tuple[list[dict], dict[str, int]]:
    """All valid rows of `paths` in order, and the number of skipped rows by reason.

    ``check`` (default :func:`validate_row`) raises DataError for a bad row; it may return a normalised row.
    """
    check = check or validate_row
    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error must be 'error' or 'skip', got {on_error!r}")
    rows: list[dict] = []
    skipped: Counter[str] = Counter()
    for path in paths:
        for location, row in _iter_source(path):
            try:
                if isinstance(row, DataError):
                    raise row
                row = check(row) or row
            except DataError as e:
                if on_error == "error":
                    raise e.at(location) from None
                skipped[e.reason] += 1
                continue
            rows.append({**row, "_source": location})
    return rows, dict(skipped)


def validate_row(row: object, need_reply: bool = True) -> None:
    """Raise DataError (without location) if `row` is not a usable ms-swift conversation (RL prompts:
    ``need_reply=False``, no assistant turn needed)."""
    if not isinstance(row, dict):
        raise DataError("not an object", f"got {type(row).__name__}")
    messages = row.get("messages")
    if not messages:
        raise DataError("missing or empty messages")
    if not isinstance(messages, list):
        raise DataError("messages is not a list", f"got {type(messages).__name__}")
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise DataError("message is not an object", f"message {i} is {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise DataError("unknown role", f"message {i} has role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(
                "content is not a string", f"message {i} ({role}) has {_type(message.get('content'))}"
            )
    if need_reply and not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError("system is not a string", f"got {_type(system)}")
    if system and any(m["role"] == "system" for m in messages):
        raise DataError("conflicting system", "both a 'system' key and a system message")


def row_messages(row: dict) -> list[dict]:
    """The row's conversation, with its top-level "system" key (ms-swift style) as a leading system message."""
    if row.get("system"):
        return [{"role": "system", "content": row["system"]}, *row["messages"]]
    return list(row["messages"])


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _iter_source(path: str) -> Iterator[tuple[str, dict | DataError]]:
    """(location, row) pairs; a row that cannot even be parsed comes as a DataError to report or skip."""
    if os.path.isdir(path):
        return _iter_dataset(path, None)
    if not os.path.exists(path):
        raise DataError("file not found", location=path)
    ext = os.path.splitext(path)[1].lower()
    if ext in _DATASETS_BUILDERS:
        return _iter_dataset(path, _DATASETS_BUILDERS[ext])
    if ext == ".json" and _starts_with_list(path):
        return _iter_json_list(path)
    if ext in (".jsonl", ".json"):
        return _iter_jsonl(path)
    raise DataError(
        "unsupported file type",
        "expected .jsonl, .json, .parquet, .csv, .arrow or a save_to_disk directory",
        location=path,
    )


def _iter_jsonl(path: str) -> Iterator[tuple[str, dict | DataError]]:
    # Binary lines: split on b"\n" only (str.splitlines would also split on U+2028 inside a JSON string)
    # and decode each line alone, so one bad byte costs one row, not the file.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            location = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield location, DataError("invalid UTF-8", f"byte {e.start + 1}")
                continue
            if not text.strip():
                continue
            try:
                yield location, json.loads(text)
            except json.JSONDecodeError as e:
                yield location, DataError("invalid JSON", f"{e.msg} (col {e.colno})")


def _starts_with_list(path: str) -> bool:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped.startswith("[")
    return False


def _iter_json_list(path: str) -> Iterator[tuple[str, dict | DataError]]:
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            # The whole file is unreadable, so this cannot be skipped like a single row.
            raise DataError(
                "invalid JSON", f"{e.msg} (col {e.colno})", location=f"{path}:{e.lineno}"
            ) from None
    for i, row in enumerate(data, 1):
        yield f"{path}:row {i}", row


def _iter_dataset(path: str, builder: str | None) -> Iterator[tuple[str, dict | DataError]]:
    import datasets  # slow to import; only needed for these inputs

    if builder is None:
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise DataError("not a save_to_disk directory", str(e).splitlines()[0], location=path) from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError("DatasetDict has no 'train' split", f"splits: {', '.join(ds)}", location=path)
            ds = ds["train"]
    else:
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    for i, row in enumerate(ds, 1):
        if builder == "csv" and isinstance(row.get("messages"), str):
            # CSV cannot hold nested values, so a messages column is expected to hold JSON text.
            try:
                row["messages"] = json.loads(row["messages"])
            except json.JSONDecodeError as e:
                yield f"{path}:row {i}", DataError("invalid JSON", f"messages: {e.msg} (col {e.colno})")
                continue
        yield f"{path}:row {i}", row
