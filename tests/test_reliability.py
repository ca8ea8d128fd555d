"""Nothing is lost: outputs appear complete or not at all."""
from __future__ import annotations

import pytest

from datamodules.atomic import atomic_path, write_text


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    write_text(path, "new")
    assert path.read_text() == "new" and oct(path.stat().st_mode & 0o777) != oct(0o600)
