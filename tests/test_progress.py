"""Tests of calibops.cli.progress, the package's one progress display (tqdm when installed, else a fallback)."""

from __future__ import annotations

import io

import pytest

from calibops.cli.progress import Progress, track


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_fallback_to_a_file_writes_one_line_per_tenth() -> None:
    buf = io.StringIO()
    with Progress(50, desc="train", unit="step", file=buf, use_tqdm=False) as bar:
        for i in range(50):
            bar.update(loss=1.0 / (i + 1))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 11  # 0/10 .. 10/10 of the work: at steps 1, 5, 10, ..., 50
    assert "\r" not in buf.getvalue()
    assert lines[-1].startswith("train: |" + "#" * 24 + "| 50/50 step")
    assert "loss 0.0200" in lines[-1]
    assert lines[5].startswith("train: |" + "#" * 12 + "." * 12 + "| 25/50")


def test_fallback_on_a_terminal_redraws_in_place_and_ends_the_line() -> None:
    buf = _Tty()
    bar = Progress(3, desc="x", file=buf, use_tqdm=False)
    for _ in range(3):
        bar.update()
    bar.close()
    bar.close()  # a second close is a no-op
    text = buf.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "3/3 it" in text


def test_write_prints_above_the_bar(capsys: pytest.CaptureFixture) -> None:
    buf = _Tty()
    with Progress(4, desc="x", file=buf, use_tqdm=False) as bar:
        bar.update()
        bar.write("a table")
        bar.update()
    assert capsys.readouterr().out == "a table\n"
    assert buf.getvalue().count("1/4") == 2  # the bar was redrawn after the text


def test_disabled_shows_nothing() -> None:
    buf = io.StringIO()
    with Progress(5, file=buf, enabled=False) as bar:
        bar.update()
        bar.set_description("y")
    assert list(track(range(4), file=buf, enabled=False)) == [0, 1, 2, 3]
    assert buf.getvalue() == ""


@pytest.mark.parametrize("use_tqdm", [False, True])
def test_track_yields_every_item_and_counts_them(use_tqdm: bool) -> None:
    if use_tqdm:
        pytest.importorskip("tqdm")
    buf = io.StringIO()
    assert list(track(["a", "b", "c"], desc="evaluate", unit="case", file=buf, use_tqdm=use_tqdm)) == ["a", "b", "c"]
    assert "evaluate" in buf.getvalue() and "3/3" in buf.getvalue()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="total"):
        Progress(-1)
    with pytest.raises(TypeError, match="total="):
        list(track(iter([1, 2])))
    assert list(track(iter([1, 2]), total=2, enabled=False)) == [1, 2]
