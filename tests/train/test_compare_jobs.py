"""`make compare --jobs N`: variants run side by side, each step with its share of the cores, and a
failed variant stops no other. The steps are real subprocesses (tiny Python scripts standing in for
the training entry points, so that the scheduling is what is tested)."""

import sys
from pathlib import Path

import pytest

from train import compare
from train.demo import Step

# Each variant's one step records its OMP_NUM_THREADS, announces itself, then waits (up to 60 s) for
# every other variant's announcement: it can only finish if all variants run at the same time.
WAIT_FOR_ALL = """
import os, sys, time
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2].split(",")
me, run = out.parent.name, out.parent.parent
(run / f"{me}.started").write_text("")
if me == "bad":
    sys.exit(3)
deadline = time.time() + 60
while not all((run / f"{n}.started").exists() for n in names):
    if time.time() > deadline:
        sys.exit("the other variants never started: not run side by side")
    time.sleep(0.05)
out.mkdir(parents=True)
(out / "threads").write_text(os.environ.get("OMP_NUM_THREADS", "unset"))
(out / "done").write_text("")
"""


@pytest.fixture
def fake_steps(monkeypatch, tmp_path):
    def steps(names):
        def variant_steps(name, variant, run, data, sched):
            out = run / name / "out"
            argv = [sys.executable, "-c", WAIT_FOR_ALL, str(out), ",".join(names)]
            return [Step("only", argv, out / "done", out)]

        monkeypatch.setattr(compare, "variant_steps", variant_steps)
        monkeypatch.setitem(compare.VARIANTS, "bad", compare.VARIANTS["eve"])
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(compare.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
        (tmp_path / "logs").mkdir()
        return tmp_path

    return steps


def test_variants_run_side_by_side_with_their_share_of_the_cores(fake_steps):
    names = ["eve", "llava"]
    run = fake_steps(names)
    # 4 cores (patched), 2 jobs: each step gets 2 threads; both must run at once to finish at all.
    compare.run_variants(names, run, Path("unused"), compare.Schedule(), force=False, jobs=2)
    assert [(run / n / "out" / "threads").read_text() for n in names] == ["2", "2"]
    timings = [(run / n / "timings.json").is_file() for n in names]
    assert timings == [True, True]


def test_a_failed_variant_is_named_and_the_others_finish(fake_steps):
    names = ["eve", "bad", "llava"]
    run = fake_steps(names)
    with pytest.raises(SystemExit, match=r"variants failed: bad: .*exit 3.*bad\.only\.log"):
        compare.run_variants(names, run, Path("unused"), compare.Schedule(), force=False, jobs=3)
    # 4 cores over 3 jobs: one thread each.
    assert [(run / n / "out" / "threads").read_text() for n in ("eve", "llava")] == ["1", "1"]
    assert not (run / "bad" / "out").exists()


def test_one_job_runs_in_order_with_the_threads_as_set(fake_steps, monkeypatch):
    run = fake_steps(["eve"])
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    compare.run_variants(["eve"], run, Path("unused"), compare.Schedule(), force=False, jobs=None)
    assert (run / "eve" / "out" / "threads").read_text() == "3"
