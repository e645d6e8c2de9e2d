"""The one atomic-write helper: a finished write replaces the file, a failed one leaves it as it was."""
from __future__ import annotations

import pytest

from fwl_scale.atomic import atomic_write, atomic_write_json, atomic_write_text, commit, temp_path


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "pointer"
    atomic_write_text(target, "step_00000001\n")
    atomic_write_text(target, "step_00000002\n")
    assert target.read_text() == "step_00000002\n"
    atomic_write_json(tmp_path / "m.json", {"step": 2})
    assert (tmp_path / "m.json").read_text() == '{\n "step": 2\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "pointer"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def half_then_crash(tmp):
        tmp.write_bytes(b"new but incomple")
        raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_streamed_file_is_committed_under_its_name(tmp_path):
    target = tmp_path / "shard-000000.tar"
    tmp = temp_path(target)
    assert tmp.parent == tmp_path and tmp.name != target.name
    with open(tmp, "wb") as f:
        f.write(b"tar bytes")
    assert not target.exists()
    commit(tmp, target)
    assert target.read_bytes() == b"tar bytes" and not tmp.exists()
