"""conftest.run_workers's rule for reruns, watched on a probe worker (tests/workers/probe.py):
a native abort is run once more, into a fresh output directory, with a WorkerRerun warning
that the suite's own warning filters show; never after a Python traceback; never twice."""

from __future__ import annotations

import pytest

from conftest import NATIVE_ABORT, ROOT, WorkerRerun, run_workers

pytestmark = pytest.mark.multirank

pytest_plugins = ["pytester"]


def _runs(path) -> int:
    return len(path.read_text().splitlines())


def test_a_native_abort_runs_once_more_into_a_fresh_directory_with_a_shown_warning(pytester):
    """The rerun, inside a pytest session configured as this suite is (pyproject.toml): the
    test passes, its warnings summary shows the WorkerRerun, and the second run started in
    an empty directory while the first run's output was kept aside."""
    pytester.makepyprojecttoml((ROOT / "pyproject.toml").read_text())
    pytester.makepyfile(test_probe=f'''
        from conftest import run_workers

        def test_probe(tmp_path):
            out, runs = tmp_path / "out", tmp_path / "runs"
            run_workers("probe.py", "abort-once", out, runs, {NATIVE_ABORT!r}, out=out)
            assert runs.read_text().splitlines() == ["run", "run"]
            assert [p.name for p in out.iterdir()] == ["run-2"] and (out / "run-2").read_text() == ""
            assert [p.name for p in (tmp_path / "out.aborted").iterdir()] == ["run-1"]
    ''')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, warnings=1)
    summary = result.stdout.str().split("warnings summary")[1]
    assert "WorkerRerun: probe.py: a rank aborted natively" in summary and "SIGABRT" in summary


def test_a_traceback_fails_at_once(tmp_path):
    """A rank printed a Python traceback, then aborted natively: not rerun."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    with pytest.raises(AssertionError, match="run 1") as failure:
        run_workers("probe.py", "traceback-then-abort", out, runs, NATIVE_ABORT, out=out)
    assert _runs(runs) == 1
    # the abort happened too: the traceback alone kept it from a rerun
    text = str(failure.value)
    assert "RuntimeError: a check on rank 1 failed" in text and NATIVE_ABORT in text and "SIGABRT" in text


def test_a_second_abort_fails(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    with pytest.warns(WorkerRerun), pytest.raises(AssertionError, match="run 2"):
        run_workers("probe.py", "abort-always", out, runs, NATIVE_ABORT, out=out)
    assert _runs(runs) == 2
