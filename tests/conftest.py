import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["a gripping , moving film", "great fun from start to finish", "one of the best of the year",
            "warm , funny and wise", "a triumph of acting", "beautifully shot and deeply felt",
            "smart and surprising", "an absolute delight", "i loved every minute", "a joyous ride"]
NEGATIVE = ["dull , lifeless and far too long", "a mess from start to finish", "i wanted my time back",
            "flat , tired and predictable", "a waste of a good cast", "painfully unfunny",
            "clumsy and boring", "an ugly , empty film", "nothing works here", "a tedious slog"]


def write_task(folder: Path, repeat: int = 3) -> Path:
    """A small sentiment task folder (train.tsv, test.tsv) in GLUE layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
    for name, times in (("train.tsv", repeat), ("test.tsv", 1)):
        lines = ["sentence\tlabel"] + [f"{t}\t{y}" for _ in range(times) for t, y in rows]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def task_dir(tmp_path) -> Path:
    return write_task(tmp_path / "task")
