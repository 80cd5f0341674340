"""Cache entries (warm-ups, teachers, preference pairs) are published atomically and safely when several writers
— the ranks of one job — build the same entry at once."""

import pytest

from trainer.warmup import publish_entry


def test_concurrent_writers_first_rename_wins_and_nothing_is_deleted_under_a_writer(tmp_path):
    def write_b(folder):
        (folder / "value").write_text("b")
        (folder / "done").write_text("")

    def write_a(folder):
        (folder / "value").write_text("a")
        publish_entry(tmp_path, "key", write_b)  # another rank publishes while this one is still writing
        assert (folder / "value").read_text() == "a"  # ... without touching this writer's files
        (folder / "done").write_text("")

    target = publish_entry(tmp_path, "key", write_a)
    assert (target / "value").read_text() == "b" and (target / "done").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary folder left behind


def test_a_failed_writer_leaves_no_entry(tmp_path):
    def broken(folder):
        (folder / "value").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_entry(tmp_path, "key", broken)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_entry_is_replaced(tmp_path):
    (tmp_path / "key").mkdir()
    (tmp_path / "key" / "model.pt").write_text("half")  # no done marker

    def write(folder):
        (folder / "done").write_text("")

    target = publish_entry(tmp_path, "key", write)
    assert sorted(p.name for p in target.iterdir()) == ["done"]
