"""Prompt datasets: JSONL and Parquet files with one prompt per row (schema in docs/data.md).

Row fields: ``prompt`` (string) or ``messages`` (chat list of {role, content}); ``answer`` (string, used by
verifiers); optional ``expert`` (a demonstration, GFT), ``teachers`` (list of responses, GFT), ``id``.
Column names can be mapped (``fields={"prompt": "question"}``). A malformed row is reported with its file
and line; the run stops when more than ``max_skipped_fraction`` of the rows are malformed, and otherwise
logs how many were skipped and why. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

log = logging.getLogger("gift_megatron.data")

FIELDS = ("prompt", "messages", "answer", "expert", "teachers", "id")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file, the line and the reason."""


@dataclass(frozen=True)
class PromptExample:
    """One row. source: its file; line: 1-based line (JSONL) or row number (Parquet)."""

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


@dataclass
class LoadReport:
    """rows: rows read; skipped: (file, line, reason) of every malformed row."""

    rows: int = 0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)


def _text(row: dict, key: str, name: str, required: bool = False) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field {name!r}")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("answer", "id"):
        return str(value)  # numeric answers are common (GSM8K); ids may be numbers
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def parse_row(row: Any, fields: dict[str, str], source: str, line: int) -> PromptExample:
    """A PromptExample from a decoded row; ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    key = {f: fields.get(f, f) for f in FIELDS}
    prompt = _text(row, key["prompt"], "prompt")
    messages = row.get(key["messages"])
    if prompt is None and messages is None:
        raise ValueError(f"needs {key['prompt']!r} or {key['messages']!r}")
    if prompt is not None and not prompt.strip():
        raise ValueError("empty prompt")
    chat = None
    if messages is not None:
        if hasattr(messages, "tolist"):
            messages = messages.tolist()
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"field {key['messages']!r} must be a non-empty list of {{role, content}}")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{key['messages']}[{i}] must be {{'role': str, 'content': str}}")
            chat.append((m["role"], m["content"]))
        chat = tuple(chat)
    teachers = row.get(key["teachers"])
    if teachers is None:
        teachers = ()
    if hasattr(teachers, "tolist"):
        teachers = teachers.tolist()
    if not isinstance(teachers, (list, tuple)) or not all(isinstance(t, str) for t in teachers):
        raise ValueError(f"field {key['teachers']!r} must be a list of strings")
    return PromptExample(prompt=prompt, messages=chat, answer=_text(row, key["answer"], "answer"),
                         expert=_text(row, key["expert"], "expert"), teachers=tuple(teachers),
                         id=_text(row, key["id"], "id"), source=source, line=line)


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any, str | None]]:
    with open(path, encoding="utf-8") as fh:
        for n, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                yield n, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield n, None, f"invalid JSON: {exc.msg} (column {exc.colno})"


def _parquet_rows(path: str) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DatasetError(f"{path}: cannot read Parquet: {exc}") from exc
    for n, row in enumerate(table.to_pylist(), 1):
        yield n, row, None


def load_prompts(paths: str | Sequence[str], *, max_skipped_fraction: float = 0.0,
                 fields: dict[str, str] | None = None) -> tuple[list[PromptExample], LoadReport]:
    """All rows of ``paths`` (``.jsonl``/``.json`` lines or ``.parquet``) as PromptExamples, in file order.

    Raises DatasetError naming the file for a missing or unreadable file, an unknown extension, an empty
    dataset, or more malformed rows than ``max_skipped_fraction`` allows (the first reasons are listed).
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise DatasetError("no dataset files given")
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise DatasetError(f"data.fields: unknown field(s) {unknown}; known: {list(FIELDS)}")
    examples, report = [], LoadReport()
    for path in paths:
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: no such dataset file")
        ext = os.path.splitext(path)[1].lower()
        if ext in (".jsonl", ".json"):
            rows: Iterable = _jsonl_rows(path)
        elif ext in (".parquet", ".pq"):
            rows = _parquet_rows(path)
        else:
            raise DatasetError(f"{path}: unknown dataset format {ext!r} (expected .jsonl or .parquet)")
        for line, row, problem in rows:
            report.rows += 1
            if problem is None:
                try:
                    examples.append(parse_row(row, fields, path, line))
                    continue
                except ValueError as exc:
                    problem = str(exc)
            report.skipped.append((path, line, problem))
    bad = len(report.skipped)
    if report.rows == 0:
        raise DatasetError(f"{', '.join(paths)}: the dataset has no rows")
    if bad:
        listing = "; ".join(f"{p}:{n}: {why}" for p, n, why in report.skipped[:5])
        if bad / report.rows > max_skipped_fraction:
            raise DatasetError(f"{bad} of {report.rows} rows are malformed (data.max_skipped_fraction="
                               f"{max_skipped_fraction}): {listing}{' ...' if bad > 5 else ''}")
        log.warning("skipped %d of %d malformed rows: %s", bad, report.rows, listing)
    if not examples:
        raise DatasetError(f"{', '.join(paths)}: no usable rows")
    return examples, report
