"""Prompt datasets: JSONL and Parquet files with one prompt per row (schema in docs/data.md).

Row fields: ``prompt`` (string) or ``messages`` (chat list of {role, content}); ``answer`` (string, used by
verifiers); optional ``expert`` (a demonstration, GFT), ``teachers`` (list of responses, GFT), ``id``.
Other columns are ignored. Column names can be mapped (``fields={"prompt": "question"}``).

A malformed row is reported with its file and line; the run stops when more than ``max_skipped_fraction``
of the rows are malformed, and otherwise logs how many were skipped and why. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gift_megatron.errors import StartupError

log = logging.getLogger("gift_megatron.data")

FIELDS = ("prompt", "messages", "answer", "expert", "teachers", "id")
JSONL_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet", ".pq")
SHOWN_REASONS = 5  # how many bad rows an error or a warning lists


class DatasetError(StartupError):
    """A dataset that cannot be used; the message names the file, the line and the reason."""


@dataclass(frozen=True)
class PromptExample:
    """One dataset row.

    messages: the chat as ``((role, content), ...)`` (tuples keep the dataclass hashable and immutable).
    source: the file the row came from; line: its 1-based line (JSONL) or 1-based row number (Parquet),
    so that ``f"{source}:{line}"`` points at the row in either format.
    """

    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None
    answer: str | None
    expert: str | None = None
    teachers: tuple[str, ...] = ()
    id: str | None = None
    source: str = ""
    line: int = 0

    @property
    def prompt_text(self) -> str:
        """The prompt as text (the last user message of a chat), for verifiers and logs."""
        if self.prompt is not None:
            return self.prompt
        users = [c for r, c in self.messages or () if r == "user"]
        return users[-1] if users else ""

    @property
    def chat(self) -> list[dict[str, str]]:
        """The row as chat messages for ``apply_chat_template``: ``messages``, or the prompt as one user turn."""
        if self.messages is not None:
            return [{"role": r, "content": c} for r, c in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    @property
    def where(self) -> str:
        """``file:line`` of the row, for error messages."""
        return f"{self.source}:{self.line}"


@dataclass
class LoadReport:
    """rows: rows read (blank JSONL lines are not rows); skipped: (file, line, reason) of every malformed row."""

    rows: int = 0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)

    @property
    def used(self) -> int:
        return self.rows - len(self.skipped)

    def reasons(self, limit: int = SHOWN_REASONS) -> str:
        """The first ``limit`` skipped rows as ``file:line: reason; ...``."""
        shown = "; ".join(f"{p}:{n}: {why}" for p, n, why in self.skipped[:limit])
        return shown + (f"; ... ({len(self.skipped) - limit} more)" if len(self.skipped) > limit else "")


# ------------------------------------------------------------------------------------------ one row
def _text(row: Mapping, key: str, name: str) -> str | None:
    """Field ``key`` (reported as the column the user wrote) as a string, or None when absent/null."""
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("answer", "id"):
        # Numeric answers are common (GSM8K-style columns) and ids are often numbers; NaN is how pandas
        # writes a missing float, and "nan" as a reference answer would silently mark every response wrong.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"field {key!r} is {value}")
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _as_list(value: Any) -> Any:
    # Parquet list columns may arrive as numpy arrays when a caller passes pandas rows.
    return value.tolist() if hasattr(value, "tolist") else value


def _messages(value: Any, key: str) -> tuple[tuple[str, str], ...]:
    value = _as_list(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"field {key!r} must be a non-empty list of {{role, content}}")
    chat = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{key}[{i}] must be {{'role': str, 'content': str}}, got {m!r:.80}")
        chat.append((m["role"], m["content"]))
    if not any(c.strip() for _, c in chat):
        raise ValueError(f"field {key!r}: every message is empty")
    return tuple(chat)


def parse_row(row: Any, fields: Mapping[str, str], source: str, line: int) -> PromptExample:
    """A PromptExample from a decoded row; ValueError says what is wrong with it (without the location,
    which the caller adds)."""
    if not isinstance(row, Mapping):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    key = {f: fields.get(f, f) for f in FIELDS}
    prompt = _text(row, key["prompt"], "prompt")
    raw_messages = row.get(key["messages"])
    if prompt is None and raw_messages is None:
        raise ValueError(f"needs {key['prompt']!r} or {key['messages']!r}")
    if prompt is not None and not prompt.strip():
        raise ValueError(f"empty {key['prompt']!r}")
    messages = _messages(raw_messages, key["messages"]) if raw_messages is not None else None
    teachers = _as_list(row.get(key["teachers"]))
    if teachers is None:
        teachers = ()
    if not isinstance(teachers, (list, tuple)) or not all(isinstance(t, str) for t in teachers):
        raise ValueError(f"field {key['teachers']!r} must be a list of strings")
    return PromptExample(
        prompt=prompt,
        messages=messages,
        answer=_text(row, key["answer"], "answer"),
        expert=_text(row, key["expert"], "expert"),
        teachers=tuple(teachers),
        id=_text(row, key["id"], "id"),
        source=source,
        line=line,
    )


# ---------------------------------------------------------------------------------------- one file
Row = tuple[int, Any, "str | None"]  # (line, decoded row or None, why it could not be decoded)


def _jsonl_rows(path: str) -> Iterator[Row]:
    # Bytes, decoded per line: one badly encoded line is one bad row, not a crash that hides the others.
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield n, None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
                continue
            if not text.strip():
                continue
            try:
                yield n, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield n, None, f"invalid JSON: {exc.msg} (column {exc.colno})"


def _parquet_rows(path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=4096)  # bounded memory for large prompt files
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield n, row, None
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid / ArrowIOError derive from these
        raise DatasetError(f"{path}: cannot read Parquet: {exc}") from exc


def _rows(path: str) -> Iterator[Row]:
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such dataset file")
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: is not a file (give the .jsonl / .parquet files, not their folder)")
    ext = os.path.splitext(path)[1].lower()
    if ext in JSONL_EXTENSIONS:
        return _jsonl_rows(path)
    if ext in PARQUET_EXTENSIONS:
        return _parquet_rows(path)
    known = ", ".join(JSONL_EXTENSIONS + PARQUET_EXTENSIONS)
    raise DatasetError(f"{path}: unknown dataset format {ext!r} (expected {known})")


# ------------------------------------------------------------------------------------------ files
def load_prompts(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    max_skipped_fraction: float = 0.0,
    fields: Mapping[str, str] | None = None,
) -> tuple[list[PromptExample], LoadReport]:
    """All rows of ``paths`` (``.jsonl``/``.json`` JSON Lines, or ``.parquet``) as PromptExamples, in file order.

    fields: column renames, ``{schema field: column in the file}``. max_skipped_fraction: the largest
    fraction of malformed rows (over all files) that is skipped with a logged warning instead of an error.

    Raises DatasetError naming the file for a missing or unreadable file, an unknown extension, an empty
    dataset, or more malformed rows than ``max_skipped_fraction`` allows (the first ones are listed as
    ``file:line: reason``).
    """
    files = [str(os.fspath(paths))] if isinstance(paths, (str, os.PathLike)) else [str(os.fspath(p)) for p in paths]
    if not files:
        raise DatasetError("no dataset files given")
    if not 0.0 <= max_skipped_fraction <= 1.0:
        raise DatasetError(f"data.max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise DatasetError(f"data.fields: unknown schema field(s) {unknown}; known: {list(FIELDS)}")
    bad_names = {k: v for k, v in fields.items() if not isinstance(v, str) or not v}
    if bad_names:
        raise DatasetError(f"data.fields: column names must be non-empty strings, got {bad_names}")

    examples: list[PromptExample] = []
    report = LoadReport()
    for path in files:
        for line, row, problem in _rows(path):
            report.rows += 1
            if problem is None:
                try:
                    examples.append(parse_row(row, fields, path, line))
                    continue
                except ValueError as exc:
                    problem = str(exc)
            report.skipped.append((path, line, problem))

    where = ", ".join(files)
    if report.rows == 0:
        raise DatasetError(f"{where}: the dataset has no rows")
    bad = len(report.skipped)
    if bad / report.rows > max_skipped_fraction:
        raise DatasetError(
            f"{bad} of {report.rows} rows are malformed (data.max_skipped_fraction="
            f"{max_skipped_fraction}): {report.reasons()}"
        )
    if bad:
        log.warning(
            "skipped %d of %d malformed rows (data.max_skipped_fraction=%s): %s",
            bad,
            report.rows,
            max_skipped_fraction,
            report.reasons(),
        )
    if not examples:
        raise DatasetError(f"{where}: no usable rows (all {report.rows} are malformed): {report.reasons()}")
    log.info("loaded %d prompts from %s", len(examples), where)
    return examples, report
