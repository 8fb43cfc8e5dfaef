"""threefold.files: names stay inside their directory, durable atomic writes, safe output, run locks."""

import multiprocessing as mp
import os

import pytest

from threefold.files import RunLock, check_output_dir, inside, sync_tree, write_atomic


def test_inside_accepts_plain_and_nested_names(tmp_path):
    (tmp_path / "a").mkdir()
    assert inside(tmp_path, "x.safetensors") == tmp_path / "x.safetensors"
    assert inside(tmp_path, "a/y.bin") == tmp_path / "a" / "y.bin"


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "", "a\x00b"])
def test_inside_rejects_escaping_names(tmp_path, name):
    with pytest.raises(ValueError, match="name"):
        inside(tmp_path, name)


def test_inside_rejects_a_symlink_leaving_the_directory(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x")
    (root / "rank0.safetensors").symlink_to(secret)
    with pytest.raises(ValueError, match="outside"):
        inside(root, "rank0.safetensors")
    (root / "inner.bin").write_bytes(b"y")
    (root / "link.bin").symlink_to(root / "inner.bin")
    assert inside(root, "link.bin") == root / "link.bin"  # a link that stays inside is fine


def test_inside_rejects_non_string_names(tmp_path):
    with pytest.raises(ValueError):
        inside(tmp_path, 3)  # type: ignore[arg-type]


def test_write_atomic_replaces_whole_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "latest"
    write_atomic(target, "step_1\n")
    write_atomic(target, b"step_2\n")
    assert target.read_text() == "step_2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_sync_tree_fsyncs_every_file(tmp_path, monkeypatch):
    for n in ("a", "b"):
        (tmp_path / n).write_text(n)
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    sync_tree(tmp_path)
    assert len(synced) == 3  # two files and the directory


def test_check_output_dir(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False)  # missing: fine
    full = tmp_path / "full"
    full.mkdir()
    check_output_dir(full, overwrite=False)  # empty: fine
    (full / "step_4").mkdir()
    with pytest.raises(ValueError, match=r"not empty \(step_4\).*--overwrite"):
        check_output_dir(full, overwrite=False)
    check_output_dir(full, overwrite=True)
    # Never over the input, even with overwrite: the output holds it, or is it.
    with pytest.raises(ValueError, match="holds the input"):
        check_output_dir(full, overwrite=True, keep=[full / "step_4"])
    with pytest.raises(ValueError, match="holds the input"):
        check_output_dir(full, overwrite=True, keep=[full])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)


def _hold(path, ready, done):
    with RunLock(path):
        ready.set()
        done.wait(10)


def test_run_lock_refuses_a_second_writer_and_names_the_first(tmp_path):
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready, done))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(RuntimeError, match=rf"in use by another run .*\"pid\": {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        done.set()
        holder.join(10)
    with RunLock(tmp_path):  # released when the holder ended
        pass


def test_run_lock_dies_with_a_killed_holder(tmp_path):
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready, done))
    holder.start()
    assert ready.wait(10)
    holder.kill()
    holder.join(10)
    with RunLock(tmp_path):
        pass
