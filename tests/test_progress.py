"""sensitivity.progress: the work up front, plain lines in logs, whole counts on a terminal."""

from __future__ import annotations

import io
import re

from sensitivity.progress import Progress, duration

PLAIN = re.compile(
    r"^masking: (\d+)/40800 image forwards \((\d+)%\), [\d.]+/s, ETA (\d+ s|\d+ min \d+ s)$"
)


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as sys.stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_a_log_gets_the_work_then_a_line_per_tenth_and_the_end():
    stream = io.StringIO()
    with Progress("masking", 40800, "image forwards", work="40800 image forwards (10 images)",
                  stream=stream, interval=1e9) as bar:
        for _ in range(17):
            bar.update(2400)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "masking: 40800 image forwards (10 images)"
    assert re.fullmatch(r"masking: 40800/40800 image forwards \(100%\), [\d.]+/s, done in \d+ s",
                        lines[-1])
    counts = [int(PLAIN.match(line).group(1)) for line in lines[1:-1]]
    # one line per tenth passed: 4800 (11%), 9600 (23%), ... 38400 (94%); none per update
    assert counts == [4800, 9600, 14400, 16800, 21600, 26400, 28800, 33600, 38400]
    assert "\r" not in stream.getvalue()


def test_a_log_gets_a_line_per_interval_between_tenths():
    stream = io.StringIO()
    with Progress("lda", 1000, "fits", stream=stream, interval=0.0) as bar:
        for _ in range(3):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "lda: 1000 fits"  # the default work line: the total
    assert [line.split(" (")[0] for line in lines[1:4]] == [f"lda: {n}/1000 fits"
                                                            for n in (1, 2, 3)]
    assert lines[4].startswith("lda: stopped at 3/1000 fits (0%)")


def test_a_terminal_gets_a_bar_of_whole_counts():
    stream = Terminal()
    with Progress("sobol", 320, "rows", stream=stream) as bar:
        bar.update(32)
    text = stream.getvalue()
    assert text.startswith("sobol: 320 rows\n")
    assert "0/320" in text and "32/320" in text and " rows/s" in text
    assert not re.search(r"\d\.\d\d/320", text)  # not "0.00/320" (unit_scale)


def test_a_resumed_count_says_where_it_resumes():
    stream = io.StringIO()
    bar = Progress("sobol", 320, "rows", initial=96, stream=stream, interval=1e9)
    bar.update(32)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["sobol: 320 rows", "sobol: resuming at row 96 of 320"]
    assert lines[2].startswith("sobol: 128/320 rows (40%), ")
    assert lines[3].startswith("sobol: stopped at 128/320 rows (40%), ")


def test_switched_off_prints_nothing():
    stream = Terminal()
    with Progress("sobol", 320, "rows", initial=10, stream=stream, enabled=False) as bar:
        bar.update(310)
    assert stream.getvalue() == ""


def test_durations_read_as_people_say_them():
    assert [duration(s) for s in (0.2, 42.4, 59.6, 1125, 7500)] == [
        "0 s", "42 s", "1 min 0 s", "18 min 45 s", "2 h 05 min"
    ]
