"""Scale-out: data-parallel training over MPI (2 ranks under mpiexec, as a subprocess) and
sweeps / batch inference on a Dask LocalCluster."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastseq
from fastseq import nn
from tests import dask_tasks, mpi_job
from tests.test_examples import SMALL, run_example

HERE = Path(__file__).resolve().parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_two_ranks_with_half_batches_equal_one_process(cell, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [str(MPIEXEC), "-n", "2", sys.executable, str(HERE / "mpi_job.py"), cell, str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(Path(f"{out}.json").read_text())
    assert report == {"ranks": 2, "divergence": 0.0}  # replicas stay bitwise in sync
    distributed = np.load(f"{out}.npz")["flat"]
    single, _ = mpi_job.train(cell)  # one process, the whole batch
    assert not np.allclose(single.flat_params, mpi_job.train(cell, epochs=1)[0].flat_params)  # training moved
    np.testing.assert_allclose(distributed, single.flat_params, rtol=1e-9, atol=1e-12)
    restored, meta = nn.load(f"{out}-ckpt")  # written by rank 0 only, once
    assert meta == {"ranks": 2}
    np.testing.assert_array_equal(restored.flat_params, distributed)


def test_data_parallel_needs_a_flat_buffer():
    from fastseq.distributed import DataParallel

    with pytest.raises(TypeError, match="one flat gradient buffer"):
        DataParallel(fastseq.LSTM(2, 3), threads=None)


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("dask.distributed")
    import cloudpickle

    cloudpickle.register_pickle_by_value(dask_tasks)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def test_sweep_returns_every_result_in_order_and_survives_a_dying_worker(client, tmp_path):
    from fastseq.distributed import sweep

    configs = [
        {"hidden": 4, "lr": 0.01},
        {"hidden": 8, "lr": 0.03},
        {"hidden": 4, "lr": 0.03, "fail": "raise"},
        {"hidden": 6, "lr": 0.02, "fail": str(tmp_path / "died-once")},
    ]
    results = sweep(client, dask_tasks.train_task, configs, retries=1)
    assert [r.index for r in results] == [0, 1, 2, 3] and [r.input for r in results] == configs
    assert [r.ok for r in results] == [True, True, False, True]
    assert "ValueError: bad configuration" in results[2].error and results[2].value is None
    assert (tmp_path / "died-once").exists()  # the worker did die, and the task was rerun
    for r in (results[0], results[1], results[3]):
        local = dask_tasks.train_task({k: v for k, v in r.input.items() if k != "fail"})
        assert r.value["loss"] == pytest.approx(local["loss"], rel=1e-12)


def test_batch_inference_in_chunks_matches_the_local_model(client, tmp_path):
    from fastseq.distributed import predict

    model = nn.Sequential(nn.Embedding(7, 3, seed=0), fastseq.GRU(3, 5, seed=1), nn.Linear(5, 7, seed=2))
    model.save(tmp_path / "model")
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 7, size=rng.integers(1, 12)) for _ in range(37)]
    outputs = predict(client, tmp_path / "model", sequences, chunk_size=8)
    assert len(outputs) == len(sequences)
    model.eval()
    for seq, out in zip(sequences, outputs, strict=True):
        np.testing.assert_allclose(out, model(seq[:, None])[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="chunks failed"):
        predict(client, tmp_path / "missing", sequences[:3])


def test_language_model_example_runs_distributed():
    result = run_example("char_lm.py", "--mpi", *SMALL["char_lm.py"], launcher=(str(MPIEXEC), "-n", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MPI: 2 rank(s), 32 streams each" in result.stdout
    assert result.stdout.count("validation bits/char:") == 1  # rank 0 reports, once
    assert "MPI: allreduce" in result.stdout
