"""Checks that compile the kernels in a fresh interpreter from an empty cache of their own
(minutes of LLVM work on one core each) start with the session, so that they compile on the
core the suite's own compiles leave idle; their tests then wait for them.

A test opts in with ``@pytest.mark.background(command=command)``: ``command(workdir)`` returns the
subprocess's ``(argv, env)`` (or None: nothing to run here), ``workdir`` a fresh directory
of its own (a ``pathlib.Path``); the test takes the ``background`` fixture (tests/conftest.py)
and gets the finished ``subprocess.CompletedProcess`` (text output) and that directory.
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_JOBS = {}  # test node id -> (Popen or None, workdir)


def start(node_id, command):
    """Start ``command``'s subprocess for the test ``node_id`` (once)."""
    if node_id in _JOBS:
        return
    workdir = Path(tempfile.mkdtemp(prefix="fastseq-background-"))
    spec = command(workdir)
    process = None
    if spec is not None:
        argv, env = spec
        with open(workdir / "stdout", "w") as out, open(workdir / "stderr", "w") as err:
            process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=err, text=True)
    _JOBS[node_id] = (process, workdir)


def result(node_id, command):
    """The finished subprocess of ``node_id`` (started now if collection did not) and its
    working directory."""
    start(node_id, command)
    process, workdir = _JOBS[node_id]
    if process is None:
        return None, workdir
    returncode = process.wait()
    out, err = ((workdir / name).read_text() for name in ("stdout", "stderr"))
    return subprocess.CompletedProcess(process.args, returncode, out, err), workdir


def stop_all():
    """Kill what still runs (a session stopped early) and remove the working directories."""
    for process, workdir in _JOBS.values():
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    _JOBS.clear()
