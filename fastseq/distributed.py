"""Scale-out on established engines: data-parallel training over MPI, sweeps and batch
inference on Dask.

Nothing here is imported by ``import fastseq``; mpi4py and dask are needed only when these
helpers are used (``pip install "fastseq[mpi]"`` / ``"fastseq[dask]"``).

MPI (synchronous data parallelism)::

    mpiexec -n 2 python train.py                       # one machine
    mpiexec -n 8 -f hosts python train.py              # a cluster (MPICH hostfile)

Every rank builds the same model; :class:`DataParallel` broadcasts rank 0's weights, each rank
back-propagates its shard of every batch, :meth:`DataParallel.allreduce_gradients` averages
the gradients with one ``Allreduce`` on the model's flat gradient buffer, and every rank takes
the same optimiser step (clip after averaging). Checkpoints are written by rank 0.

Dask: :func:`sweep` runs one training task per configuration; :func:`predict` runs a saved
model over many sequences in chunks. Both return results in input order and report failed
tasks instead of dropping them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastseq import _validate as v


def limit_threads(threads: int = 1) -> None:
    """Run numba kernels and BLAS on ``threads`` threads in this process (one MPI rank or
    Dask worker per core should use 1, so processes x threads do not oversubscribe)."""
    import numba
    from threadpoolctl import threadpool_limits

    threads = v.positive_int("threads", threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(threads, user_api="blas")


def _flat(model):
    if getattr(model, "flat_grads", None) is None:
        raise TypeError(
            f"model must be a fastseq.nn.Sequential or Seq2Seq (one flat gradient buffer); received {type(model).__name__}"
        )
    return model.flat_params, model.flat_grads


class DataParallel:
    """One model replica per MPI rank, kept identical by averaging gradients.

    Parameters
    ----------
    model : Sequential or Seq2Seq
        This rank's replica; its parameters are overwritten with rank 0's.
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.
    threads : int or None, default 1
        Numba and BLAS threads per rank (None: leave as is).

    Use :meth:`shard` to take this rank's part of each global batch, call
    :meth:`allreduce_gradients` after backward and before clipping and the optimiser step.
    Each rank's loss must be the mean over its shard; with equal shards the averaged gradient
    equals the gradient of the mean over the global batch.
    """

    def __init__(self, model, comm=None, threads=1):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.model = model
        self._params, self._grads = _flat(model)
        if threads is not None:
            limit_threads(threads)
        self.allreduce_seconds = 0.0
        self.broadcast_parameters()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def broadcast_parameters(self) -> None:
        """Copy rank 0's parameters to every rank (one ``Bcast`` of the flat buffer)."""
        self.comm.Bcast(self._params, root=0)

    def allreduce_gradients(self) -> None:
        """Average the gradients over the ranks in place: one ``Allreduce`` on the flat
        gradient buffer, then division by the number of ranks."""
        start = time.perf_counter()
        self.comm.Allreduce(self._mpi.IN_PLACE, self._grads, op=self._mpi.SUM)
        self._grads /= self._grads.dtype.type(self.size)
        self.allreduce_seconds += time.perf_counter() - start

    def shard(self, indices):
        """This rank's contiguous share of ``indices`` (a global batch): deterministic, the
        same on every run; shares differ in length by at most one."""
        return np.array_split(np.asarray(indices), self.size)[self.rank]

    def save(self, path, metadata=None):
        """Rank 0 writes the checkpoint; every rank waits until it is written."""
        if self.is_root:
            self.model.save(path, metadata)
        self.comm.Barrier()

    def max_divergence(self) -> float:
        """Largest absolute difference between this rank's parameters and rank 0's (a
        collective call; 0 when the replicas are in sync)."""
        reference = self._params.copy()
        self.comm.Bcast(reference, root=0)
        local = float(np.max(np.abs(reference - self._params))) if reference.size else 0.0
        return self.comm.allreduce(local, op=self._mpi.MAX)


# ------------------------------------------------------------------------------- Dask
@dataclass
class TaskResult:
    """One task's outcome: ``value`` if ``ok``, else ``error`` (the exception, as text)."""

    index: int
    input: Any
    ok: bool
    value: Any = None
    error: str | None = None


def _gather(futures, inputs):
    results = []
    for k, (item, future) in enumerate(zip(inputs, futures, strict=True)):
        try:
            results.append(TaskResult(k, item, True, future.result()))
        except Exception as err:  # noqa: BLE001 - reported per task, never dropped
            results.append(TaskResult(k, item, False, error=f"{type(err).__name__}: {err}"))
    return results


def sweep(client, train, configs, retries=1):
    """Run ``train(config)`` for every configuration as a Dask task.

    Parameters
    ----------
    client : dask.distributed.Client
    train : callable
        Picklable function (module level) training one model and returning its metrics.
    configs : sequence
        One entry per task.
    retries : int, default 1
        Times a task that raised is run again. A task whose worker dies is rescheduled by
        the scheduler (``distributed.scheduler.allowed-failures``) on its own.

    Returns
    -------
    list of TaskResult, in the order of ``configs``; failed tasks have ``ok=False`` and the
    error.
    """
    configs = list(configs)
    retries = v.positive_int("retries", retries, minimum=0)
    futures = client.map(train, configs, retries=retries, pure=False)
    return _gather(futures, configs)


_worker_models: dict = {}


def _load_cached(path):
    """A worker keeps each checkpoint it loaded (keyed by path and modification time)."""
    from fastseq.nn.container import _paths, load

    npz, _ = _paths(path)
    key = (str(npz), npz.stat().st_mtime_ns)
    if key not in _worker_models:
        model, _ = load(path)
        model.eval()
        _worker_models[key] = model
    return _worker_models[key]


def _predict_chunk(path, sequences):
    model = _load_cached(path)
    lengths = np.array([len(s) for s in sequences])
    first = np.asarray(sequences[0])
    x = np.zeros((lengths.max(), len(sequences)) + first.shape[1:], first.dtype)
    for n, s in enumerate(sequences):
        x[: len(s), n] = s
    out = model(x, lengths=lengths)
    if out.ndim == 2:  # one output per sequence (many-to-one)
        return list(out)
    return [out[: lengths[n], n] for n in range(len(sequences))]


def predict(client, checkpoint, sequences, chunk_size=256, retries=1):
    """Batch inference of a saved model (``Sequential``, see :func:`fastseq.nn.save`) over
    many variable-length sequences on Dask.

    ``sequences``: list of arrays (T_i, C), or token arrays (T_i,) for a model starting with
    an Embedding. They are split into chunks of ``chunk_size``; each chunk is one task that
    pads it, passes ``lengths`` and runs the model in eval mode (each worker loads the
    checkpoint once). Returns one result per sequence, in order: the model's output for that
    sequence, (T_i, K) for per-step models or (K,) for many-to-one models. Raises
    RuntimeError naming the failed chunks if any chunk failed after its retries.
    """
    sequences = list(sequences)
    chunk_size = v.positive_int("chunk_size", chunk_size)
    if not sequences:
        return []
    chunks = [sequences[k : k + chunk_size] for k in range(0, len(sequences), chunk_size)]
    futures = client.map(_predict_chunk, [str(checkpoint)] * len(chunks), chunks, retries=retries, pure=False)
    results = _gather(futures, range(len(chunks)))
    failed = [r for r in results if not r.ok]
    if failed:
        detail = "; ".join(f"chunk {r.index} (sequences {r.index * chunk_size}..): {r.error}" for r in failed)
        raise RuntimeError(f"{len(failed)} of {len(chunks)} chunks failed: {detail}")
    return [item for r in results for item in r.value]
