"""The run folder's life (deepscope.runfolder): only deepscope's own folders are ever replaced, nothing it
did not write is removed, a failure leaves the old run intact, and two writers cannot mix one run."""
import json
import os
from pathlib import Path

import pytest

from deepscope.errors import DataError, OutputError
from deepscope.runfolder import (
    CONFIG, LOCK, MARKER, RunFolder, check_out, foreign_files, is_run_folder, read_config, read_json, read_marker,
    record_file, write_json,
)

quiet = lambda message: None  # noqa: E731 - the runs' notes are checked where they matter


def make_run(out, files=None, *, overwrite=False, kind="train", log=quiet) -> Path:
    """A complete run written through RunFolder, with `files` {name: text}."""
    with RunFolder.prepare(out, kind, overwrite=overwrite, log=log) as run:
        for name, text in (files or {"config.json": "{}", "metrics.json": "[]"}).items():
            path = run.file(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return run.finish()


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_is_written_whole_with_its_marker(tmp_path):
    final = make_run(tmp_path / "runs" / "a", {"config.json": "{}", "tensorboard/events": "x"})
    assert final == tmp_path / "runs" / "a"
    marker = read_marker(final)
    assert marker["state"] == "complete" and marker["kind"] == "train"
    assert marker["files"] == ["config.json", "tensorboard/events"]
    assert not (final / LOCK).exists(), "the lock goes when the run is finished"
    assert not (tmp_path / "runs" / "a.partial").exists()
    assert is_run_folder(final)


def test_parent_of_the_current_folder_is_refused_and_untouched(tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    (parent / "child").mkdir(parents=True)
    (parent / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(parent / "child")
    before = tree(parent)
    for out in ("..", ".", "../child", str(tmp_path)):
        with pytest.raises(OutputError, match="current folder"):
            RunFolder.prepare(out, "train", overwrite=True, log=quiet)
    assert tree(parent) == before


def test_a_folder_of_user_files_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = tree(mine)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="did not write"):
            RunFolder.prepare(mine, "train", overwrite=overwrite, log=quiet)
    assert tree(mine) == before
    assert not (tmp_path / "mine.partial").exists()


def test_an_old_style_run_without_marker_is_not_replaced(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / CONFIG).write_text("{}")
    with pytest.raises(OutputError, match="older deepscope"):
        RunFolder.prepare(old, "train", overwrite=True, log=quiet)
    assert (old / CONFIG).read_text() == "{}"


def test_a_file_a_link_and_a_staging_name_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        RunFolder.prepare(tmp_path / "file", "train", overwrite=True, log=quiet)
    run = make_run(tmp_path / "run")
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(OutputError, match="symbolic link"):
        RunFolder.prepare(tmp_path / "link", "train", overwrite=True, log=quiet)
    with pytest.raises(OutputError, match=".partial"):
        RunFolder.prepare(tmp_path / "x.partial", "train", log=quiet)
    assert (tmp_path / "file").read_text() == "x" and is_run_folder(run)


def test_an_existing_run_needs_overwrite(tmp_path):
    run = make_run(tmp_path / "run", {"config.json": "old"})
    with pytest.raises(OutputError, match="--overwrite"):
        RunFolder.prepare(run, "train", log=quiet)
    assert (run / "config.json").read_text() == "old"


def test_overwrite_swaps_in_the_new_run_and_removes_only_the_old_runs_files(tmp_path):
    run = make_run(tmp_path / "run", {"config.json": "old", "old-only.json": "1", "tensorboard/ev1": "e"})
    make_run(run, {"config.json": "new"}, overwrite=True)
    assert tree(run).keys() == {"config.json", MARKER}
    assert (run / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run"], "no trash or staging folder is left behind"


def test_overwrite_refuses_a_run_holding_a_users_file(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "my-notes.md").write_text("keep me")
    with pytest.raises(OutputError, match="my-notes.md"):
        RunFolder.prepare(run, "train", overwrite=True, log=quiet)
    assert (run / "my-notes.md").read_text() == "keep me"


def test_a_users_file_added_during_training_is_kept_and_so_is_the_new_run(tmp_path):
    run = make_run(tmp_path / "run", {"config.json": "old"})
    notes = []
    with RunFolder.prepare(run, "train", overwrite=True, log=notes.append) as new:
        new.file("config.json").write_text("new")
        (run / "added-meanwhile.txt").write_text("mine")
        final = new.finish()
    assert final != run and (final / "config.json").read_text() == "new"
    assert (run / "added-meanwhile.txt").read_text() == "mine" and (run / "config.json").read_text() == "old"
    assert any(str(final) in n for n in notes)


def test_an_error_leaves_the_old_run_intact_and_says_so(tmp_path):
    run = make_run(tmp_path / "run", {"config.json": "old"})
    before = tree(run)
    with pytest.raises(RuntimeError) as info:
        with RunFolder.prepare(run, "train", overwrite=True, log=quiet) as new:
            new.file("config.json").write_text("half")
            raise RuntimeError("disk on fire")
    assert tree(run) == before
    assert not (tmp_path / "run.partial").exists()
    assert "old run" in info.value.run_folder_outcome and "intact" in info.value.run_folder_outcome


def test_an_interrupt_before_anything_existed_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt) as info:
        with RunFolder.prepare(tmp_path / "deep" / "er" / "run", "train", log=quiet):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [], "the parents this run made are removed too"
    assert "nothing was written" in info.value.run_folder_outcome


def test_a_second_writer_is_stopped_by_the_lock(tmp_path):
    out = tmp_path / "run"
    with RunFolder.prepare(out, "train", log=quiet) as first:
        with pytest.raises(OutputError, match="another deepscope process"):
            RunFolder.prepare(out, "train", overwrite=True, log=quiet)
        first.file("config.json").write_text("first")
        first.finish()
    assert (out / "config.json").read_text() == "first"


def test_a_stale_staging_folder_from_a_killed_run_is_removed_saying_so(tmp_path):
    out = tmp_path / "run"
    run = RunFolder.prepare(out, "train", log=quiet)
    run.file("config.json").write_text("half")
    run._release()  # what kill -9 leaves: the staging folder, its marker, and no process holding the lock
    notes = []
    make_run(out, {"config.json": "whole"}, log=notes.append)
    assert (out / "config.json").read_text() == "whole"
    assert any("interrupted run" in n for n in notes)


def test_a_staging_name_holding_someone_elses_files_is_not_removed(tmp_path):
    (tmp_path / "run.partial").mkdir()
    (tmp_path / "run.partial" / "x").write_text("x")
    with pytest.raises(OutputError, match="not made by deepscope"):
        RunFolder.prepare(tmp_path / "run", "train", log=quiet)
    assert (tmp_path / "run.partial" / "x").read_text() == "x"


def test_an_empty_folder_may_be_used(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_out(tmp_path / "empty", overwrite=False) == tmp_path / "empty"
    make_run(tmp_path / "empty")
    assert is_run_folder(tmp_path / "empty")


def test_default_names_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("deepscope.runfolder.time.strftime", lambda fmt: "20260101-000000")
    a, b = make_run(None), make_run(None)
    assert a != b and a.name == "train-20260101-000000" and b.name == "train-20260101-000000-2"


def test_optional_steps_fail_without_costing_the_run(tmp_path):
    notes = []
    with RunFolder.prepare(tmp_path / "run", "train", log=notes.append) as run:
        run.file("config.json").write_text("{}")
        assert run.optional("report", lambda: 1 / 0) is False
        final = run.finish()
    assert run.failed_optional == ["report"]
    assert (final / "config.json").exists() and "report" in notes[0]


def test_a_file_added_later_is_recorded_so_overwrite_may_remove_it(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "report.html").write_text("<html>")
    assert foreign_files(run) == ["report.html"]
    record_file(run, "report.html")
    assert foreign_files(run) == []


def test_config_has_one_schema_for_every_kind(tmp_path):
    for kind in ("train", "doctor", "lr-find", "ablate"):
        with RunFolder.prepare(tmp_path / kind, kind, log=quiet) as run:
            run.write_config({"lr": 0.1}, environment={"device": "cpu"}, data={"n_train": 3}, options={"k": 1})
            run.finish()
        cfg = read_config(tmp_path / kind)
        assert set(cfg) == {"format", "kind", "config", "options", "data", "environment", "wall_seconds", "command"}
        assert cfg["kind"] == kind and cfg["config"] == {"lr": 0.1}


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"config": [1]}', "'config' should be"),
    ('{"wall_seconds": "soon"}', "wall_seconds"), ("\xff\xfe", "not valid JSON"),
])
def test_a_malformed_config_is_a_data_error_naming_the_file(tmp_path, text, message):
    (tmp_path / CONFIG).write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=message) as info:
        read_config(tmp_path)
    assert str(tmp_path / CONFIG) in str(info.value) or message == "'config' should be"


def test_json_is_strict_and_atomic(tmp_path):
    write_json(tmp_path / "m.json", {"loss": [1.0, float("nan"), float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"loss": [1.0, None, None]}
    assert read_json(tmp_path / "m.json", dict)["loss"][0] == 1.0
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(DataError, match="JSON list"):
        read_json(tmp_path / "m.json", list)


def test_no_other_module_removes_files():
    src = Path(__file__).parents[1] / "src" / "deepscope"
    offenders = [p.relative_to(src).as_posix() for p in src.rglob("*.py")
                 if p.name != "runfolder.py" and ("rmtree" in p.read_text() or "os.remove(" in p.read_text())]
    assert offenders == []


def test_lock_file_is_the_only_one_held_open(tmp_path):
    with RunFolder.prepare(tmp_path / "run", "train", log=quiet) as run:
        assert (run.path / LOCK).exists() and read_marker(run.path)["state"] == "writing"
        assert read_marker(run.path)["pid"] == os.getpid()
        run.finish()
