"""Checks that compile the kernels in a fresh interpreter from an empty cache of their own
(minutes of LLVM work on one core each) start with the session, one after another, so that
they compile on the core the suite's own compiles leave idle; their tests run last and wait
for them.

A test opts in with ``@pytest.mark.background(command=command)``: ``command(workdir)``
returns the subprocess's ``(argv, env)`` (or None: nothing to run here), ``workdir`` a fresh
directory of its own (a ``pathlib.Path``); the test takes the ``background`` fixture
(tests/conftest.py) and gets the finished ``subprocess.CompletedProcess`` (text output, or
None) and that directory.
"""

import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _Job:
    def __init__(self, command):
        self.workdir = Path(tempfile.mkdtemp(prefix="fastseq-background-"))
        self.spec = command(self.workdir)
        self.process = self.result = None
        self.done = threading.Event()

    def run(self):
        with _LOCK:  # started before stop_all's kills, or not at all
            if self.spec is not None and not _STOPPING.is_set():
                argv, env = self.spec
                self.process = subprocess.Popen(
                    argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
        if self.process is not None:
            out, err = self.process.communicate()
            self.result = subprocess.CompletedProcess(argv, self.process.returncode, out, err)
        self.done.set()


_JOBS = {}  # test node id -> _Job
_QUEUE = queue.Queue()
_STOPPING = threading.Event()
_LOCK = threading.Lock()  # orders a job's start against stop_all


def _worker():
    while True:
        job = _QUEUE.get()
        if job is None:
            return
        job.run()  # after stop_all: marked done without starting


def start(node_id, command):
    """Queue ``command``'s subprocess for the test ``node_id`` (once); the first call starts
    the thread that runs the queue in order."""
    if node_id in _JOBS:
        return
    if not _JOBS:
        _STOPPING.clear()
        threading.Thread(target=_worker, name="fastseq-background", daemon=True).start()
    _JOBS[node_id] = job = _Job(command)
    _QUEUE.put(job)


def result(node_id):
    """(the finished subprocess of ``node_id`` or None, its working directory); the job was
    started when collection ended (tests/conftest.py)."""
    job = _JOBS[node_id]
    job.done.wait()
    return job.result, job.workdir


def stop_all():
    """Kill what still runs (a session stopped early), end the thread, remove the directories."""
    with _LOCK:
        _STOPPING.set()
        for job in _JOBS.values():
            if job.process is not None and job.process.poll() is None:
                job.process.kill()
    _QUEUE.put(None)
    for job in _JOBS.values():
        shutil.rmtree(job.workdir, ignore_errors=True)
    _JOBS.clear()
