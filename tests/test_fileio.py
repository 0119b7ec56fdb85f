import pytest

from cs336_basics.fileio import atomic_output


def test_atomic_output_renames_on_success_and_creates_the_folder(tmp_path):
    target = tmp_path / "new" / "out.bin"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"done")
        assert not target.exists()  # nothing at the final name until the block succeeds
    assert target.read_bytes() == b"done"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_atomic_output_keeps_the_old_file_and_removes_the_temp_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half-writ")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
