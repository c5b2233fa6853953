"""Read labelled text tables (TSV, CSV, JSON lines, ``save_to_disk`` folders) into a TextDataset.

Tables as users have them: with a header (columns found by name, see ``TEXT_COLUMNS``), or
without one (``header=False``, columns named by index: ``text_a="3", label="1"``). The GLUE
layouts are recognised without configuration, and the layout is recorded on the dataset so the
task's metric follows from it: CoLA (headerless ``source, label, mark, sentence``), MRPC
(``Quality, #1 ID, #2 ID, #1 String, #2 String``), QNLI / RTE (``index`` + pair + ``label``),
SST-2 (``sentence, label``).

Every problem with the input becomes a one-line :class:`DataError` that names the file and the
line (or row) and column involved, so a user can go straight to the bad cell.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpeptao.data.dataset import DataError, TextDataset, stratified_split

LABEL_COLUMNS = ("label", "Quality", "category")
# Pairs first: "sentence" alone would otherwise match QNLI's question/sentence layout.
TEXT_COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("#1 String", "#2 String"),
    ("sentence", None),
    ("text", None),
)
TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
COLA_COLUMNS = ["source", "label", "mark", "sentence"]  # GLUE CoLA's headerless train/dev files
NO_TRAIN_SPLIT_SEED = 0  # fixed, so a task without a train file always splits the same way

csv.field_size_limit(1 << 30)  # long documents are legitimate cells


@dataclass
class _Table:
    """Parsed cells before any column is chosen; ``where[i]`` locates row i for messages."""

    source: str
    columns: list[str]
    rows: list[list]
    where: list[str]
    label_orders: dict[str, list[str]] = field(default_factory=dict)  # ClassLabel column -> its names
    layout: str | None = None


def read_table(
    path,
    text_a: str | None = None,
    text_b: str | None = None,
    label: str | None = None,
    label_names: list[str] | None = None,
    split: str = "train",
    header: bool = True,
) -> TextDataset:
    """Read one labelled table; columns are auto-detected when not named (see ``TEXT_COLUMNS``).

    ``header=False``: the first line is data and columns are named by index (``"0"``, ``"1"``, ...).
    """
    return _to_dataset(_load(Path(path), split, header), text_a, text_b, label, label_names)


def load_task_dir(path, label_names: list[str] | None = None, header: bool = True,
                  columns: dict[str, str | None] | None = None
                  ) -> tuple[TextDataset, TextDataset | None, TextDataset]:
    """(train, validation, test) from a task folder with ``train``/``dev``/``test`` tables.

    With labelled dev and test files, dev is the validation split and test the test split. GLUE's
    test files carry no labels: then the labelled dev file is the test split and the validation
    split is ``None`` (the caller holds part of the training data out). Without a train file, the
    labelled held-out file is split 80/20 with a fixed seed into train and test.
    ``columns`` (``text_a``, ``text_b``, ``label``) name the columns when detection cannot.
    """
    text_a, text_b, label = ((columns or {}).get(k) for k in ("text_a", "text_b", "label"))
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    found = {name: _find_split_file(folder, name) for name in ("train", "dev", "test")}
    labelled = {}
    for name in ("test", "dev"):
        table = _load(found[name], "train", header) if found[name] is not None else None
        if table is not None and (label or _detect_label(table.columns)) in table.columns:
            labelled[name] = table
    if found["train"] is not None:
        train = read_table(found["train"], text_a, text_b, label, label_names, header=header)
        if not labelled:
            raise DataError(f"{folder}: has a train file but no labelled test or dev file to evaluate on")
        split = {name: _to_dataset(table, text_a, text_b, label, train.label_names) for name, table in labelled.items()}
        if "test" in split:
            return train, split.get("dev"), split["test"]
        return train, None, split["dev"]
    for name in ("dev", "test"):
        if name in labelled:
            train, test = stratified_split(_to_dataset(labelled[name], text_a, text_b, label, label_names), 0.2,
                                           NO_TRAIN_SPLIT_SEED)
            return train, None, test
    raise DataError(f"{folder}: no labelled train, dev or test file ({', '.join('*' + s for s in TABLE_SUFFIXES)})")


def _find_split_file(folder: Path, name: str) -> Path | None:
    for suffix in TABLE_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return None


# -- parsing ------------------------------------------------------------------------------


def _load(path: Path, split: str, header: bool = True) -> _Table:
    if path.is_dir():
        return _read_saved(path, split)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type '{suffix}' (use .tsv, .csv, .jsonl/.json or a save_to_disk folder)"
        )
    text = _decode(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if suffix in (".jsonl", ".json"):
        table = _parse_json(path, text)
    else:
        table = _parse_delimited(path, text, "\t" if suffix == ".tsv" else ",", header)
    if not table.rows:
        raise DataError(f"{path}: no data rows after the header")
    table.layout = table.layout or _layout(table.columns)
    return table


def _layout(columns: list[str]) -> str | None:
    """The GLUE layout a header names (CoLA's files have none; :func:`_looks_like_cola` finds them)."""
    if "Quality" in columns and "#1 String" in columns:
        return "mrpc"
    if columns[:1] == ["index"] and "question" in columns and "sentence" in columns:
        return "qnli"
    if columns[:1] == ["index"] and "sentence1" in columns and "sentence2" in columns:
        return "rte"
    if columns == ["sentence", "label"]:
        return "sst-2"
    return None


def _looks_like_cola(first: list[str]) -> bool:
    """GLUE CoLA's headerless rows: a source id, a 0/1 label, an empty or ``*`` mark, the sentence."""
    return len(first) == 4 and first[1] in ("0", "1") and first[2] in ("", "*") and bool(first[3].strip())


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # MRPC's files start with a byte-order mark
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8"
        ) from None


def _parse_delimited(path: Path, text: str, delimiter: str, has_header: bool = True) -> _Table:
    # GLUE TSVs put bare quotes inside fields (MRPC), so TSV cells are never quoted; CSV follows RFC 4180.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    layout = None
    try:
        first = next(reader)
        rows, where = [], []
        if has_header and _looks_like_cola(first):  # CoLA as GLUE distributes it: no header
            header, layout = list(COLA_COLUMNS), "cola"
        elif has_header:
            header, first = [name.strip() for name in first], None
        else:
            header = [str(i) for i in range(len(first))]
        if first is not None:
            rows.append(first)
            where.append("line 1")
        for fields in reader:
            if not fields or fields == [""]:
                continue  # blank line
            if len(fields) != len(header):
                raise DataError(
                    f"{path}: line {reader.line_num}: {len(fields)} fields, header has {len(header)} "
                    f"({', '.join(header)})"
                )
            rows.append(fields)
            where.append(f"line {reader.line_num}")
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: malformed {path.suffix[1:].upper()}: {err}") from None
    return _Table(str(path), header, rows, where, layout=layout)


def _parse_json(path: Path, text: str) -> _Table:
    """JSON lines (one object per line); a ``.json`` file holding one array of objects also works."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = [(f"record {i}", r) for i, r in enumerate(json.loads(stripped), start=1)]
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: invalid JSON: {err.msg}") from None
    else:
        records = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno}: invalid JSON: {err.msg}") from None
    columns: dict[str, None] = {}
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
        columns.update(dict.fromkeys(record))
    names = list(columns)
    return _Table(str(path), names, [[r.get(c) for c in names] for _, r in records], [w for w, _ in records])


def _read_saved(path: Path, split: str) -> _Table:
    import datasets  # noqa: PLC0415 - only needed for save_to_disk folders

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: folder is not a datasets.save_to_disk output") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split '{split}' (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    if loaded.num_rows == 0:
        raise DataError(f"{path}: dataset has no rows")
    columns = list(loaded.column_names)
    data = loaded.to_dict()
    rows = [list(r) for r in zip(*(data[c] for c in columns))]
    table = _Table(f"{path} [{split}]", columns, rows, [f"row {i}" for i in range(1, len(rows) + 1)])
    # ClassLabel columns store ints: turn them back into names and keep the dataset's own order.
    for col, name in enumerate(columns):
        feature = loaded.features[name]
        if isinstance(feature, datasets.ClassLabel):
            for row in rows:
                if row[col] is not None and 0 <= row[col] < feature.num_classes:
                    row[col] = feature.names[row[col]]
            table.label_orders[name] = list(feature.names)
    return table


# -- choosing columns and building the dataset ---------------------------------------------


def _detect_label(columns: list[str]) -> str | None:
    return next((c for c in LABEL_COLUMNS if c in columns), None)


def _detect_text(columns: list[str]) -> tuple[str, str | None] | None:
    return next(((a, b) for a, b in TEXT_COLUMNS if a in columns and (b is None or b in columns)), None)


def _require(table: _Table, column: str, role: str) -> int:
    if column not in table.columns:
        raise DataError(f"{table.source}: no {role} column '{column}' (columns: {', '.join(table.columns)})")
    return table.columns.index(column)


def _to_dataset(
    table: _Table, text_a: str | None, text_b: str | None, label: str | None, label_names: list[str] | None
) -> TextDataset:
    columns = ", ".join(table.columns)
    if label is None:
        label = _detect_label(table.columns)
        if label is None:
            raise DataError(
                f"{table.source}: no label column (looked for {', '.join(LABEL_COLUMNS)}; columns: {columns}); "
                "pass label=<column> or use a labelled file"
            )
    if text_a is None:
        if text_b is not None:
            raise DataError(f"{table.source}: text_b='{text_b}' given without text_a")
        detected = _detect_text(table.columns)
        if detected is None:
            looked = "; ".join(a if b is None else f"{a}+{b}" for a, b in TEXT_COLUMNS)
            raise DataError(
                f"{table.source}: no text column (looked for {looked}; columns: {columns}); pass text_a=<column>"
            )
        text_a, text_b = detected
    col_a = _require(table, text_a, "text")
    col_b = _require(table, text_b, "text") if text_b is not None else None
    col_y = _require(table, label, "label")

    texts_a = _text_column(table, col_a)
    texts_b = _text_column(table, col_b) if col_b is not None else None
    raw_labels = _label_column(table, col_y)
    if label_names is None:
        label_names = table.label_orders.get(label) or _sorted_labels(set(raw_labels))
    index = {name: i for i, name in enumerate(label_names)}
    labels = np.empty(len(raw_labels), dtype=np.int64)
    for i, value in enumerate(raw_labels):
        if value not in index:
            raise DataError(
                f"{table.source}: {table.where[i]}, column '{table.columns[col_y]}': label '{value}' "
                f"is not one of {label_names}"
            )
        labels[i] = index[value]
    return TextDataset(texts_a, texts_b, labels, list(label_names), table.layout, table.source)


def _text_column(table: _Table, col: int) -> list[str]:
    out = []
    for i, row in enumerate(table.rows):
        value = row[col]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{table.source}: {table.where[i]}, column '{table.columns[col]}': empty text")
        if not isinstance(value, str):
            raise DataError(
                f"{table.source}: {table.where[i]}, column '{table.columns[col]}': "
                f"expected text, got {type(value).__name__}"
            )
        out.append(value)
    return out


def _label_column(table: _Table, col: int) -> list[str]:
    """Labels as strings; JSON integers (and whole floats such as 1.0) become "1"."""
    out = []
    for i, row in enumerate(table.rows):
        value = row[col]
        if isinstance(value, (dict, list)) or (isinstance(value, float) and not value.is_integer()):
            raise DataError(
                f"{table.source}: {table.where[i]}, column '{table.columns[col]}': "
                f"label {value!r} is not a class name or integer"
            )
        text = str(int(value)) if isinstance(value, float) else ("" if value is None else str(value).strip())
        if not text:
            raise DataError(f"{table.source}: {table.where[i]}, column '{table.columns[col]}': empty label")
        out.append(text)
    return out


def _sorted_labels(values: set[str]) -> list[str]:
    """Numeric-looking labels in numeric order ("2" < "10"), anything else alphabetically."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)
