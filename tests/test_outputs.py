"""The output-folder policy every command follows (x2x_jax.outputs)."""

import pytest

from x2x_jax import outputs
from x2x_jax.errors import ConfigError


def write(out, command, files):
    outputs.check(out, command)
    with outputs.staged(out, command) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def test_new_folder_then_rerun_replaces_it_as_a_whole(tmp_path):
    out = tmp_path / "a" / "b"
    write(out, "x2x-edit", {"one.txt": "1", "two.txt": "2"})
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER, "one.txt", "two.txt"]
    assert outputs.written_by(out) == "x2x-edit"
    write(out, "x2x-edit", {"one.txt": "new"})
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER, "one.txt"]  # no stale two.txt
    assert (out / "one.txt").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["b"]  # no staging or old folder left


def test_empty_folder_is_used(tmp_path):
    (tmp_path / "e").mkdir()
    write(tmp_path / "e", "x2x-convert", {"f": "x"})
    assert (tmp_path / "e" / "f").read_text() == "x"


@pytest.mark.parametrize("holder", ["foreign", "other_command"])
def test_a_folder_this_command_did_not_write_is_refused_unless_overwrite(tmp_path, holder):
    out = tmp_path / "o"
    if holder == "foreign":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        words = "files this command did not write"
    else:
        write(out, "x2x-evaluate", {"mine.txt": "keep"})
        words = "an output of x2x-evaluate"
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match=words) as e:
        outputs.check(out, "x2x-edit")
    assert "--overwrite" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == before
    outputs.check(out, "x2x-edit", overwrite=True)
    with outputs.staged(out, "x2x-edit") as tmp:
        (tmp / "new.txt").write_text("n")
    assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER, "new.txt"]


def test_a_file_added_to_an_earlier_output_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "o"
    write(out, "x2x-edit", {"one.txt": "1"})
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(ConfigError, match=r"did not write \(notes.txt\)"):
        outputs.check(out, "x2x-edit")
    assert (out / "notes.txt").read_text() == "the user's"


def test_a_failure_leaves_the_earlier_output_as_it_was(tmp_path):
    out = tmp_path / "o"
    write(out, "x2x-edit", {"one.txt": "1"})
    with pytest.raises(RuntimeError):
        with outputs.staged(out, "x2x-edit") as tmp:
            (tmp / "one.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (out / "one.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_bad_places_get_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    for out, words in [(tmp_path / "file", "is not a folder"), (tmp_path / "file" / "o", "is a file"),
                       (tmp_path, "current folder")]:
        with pytest.raises(ConfigError, match=words):
            outputs.check(out, "x2x-edit", flag="--out")
