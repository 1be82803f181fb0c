"""Batches read ahead on a thread give what reading in step gives, and each sample's draws are its own."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from stagetune.trainer.batches import BatchSource, fetch, sample_seed
from stagetune.trainer.sampler import DatasetPlan, SampleRef, TrainingSampler, expand_repeats


def _sampler(n: int = 12, batch_size: int = 2) -> tuple[TrainingSampler, list[SimpleNamespace]]:
    rows = [SimpleNamespace(bucket="1.0", repeats=0, dataset_id="a", captions=[f"cap {i}", f"alt {i}", ""])
            for i in range(n)]
    return TrainingSampler(expand_repeats(rows), {"a": DatasetPlan("a", batch_size)}, seed=3), rows


def _reader(rows: list[SimpleNamespace], log: list[str] | None = None):
    def latent(row: int, epoch: int) -> dict[str, torch.Tensor]:
        if log is not None:
            log.append(threading.current_thread().name)
        return {"latents": torch.full((1, 2, 2), float(row * 100 + epoch))}
    return latent, lambda caption: {"caption": caption}


def _summary(fetched) -> tuple:
    return (fetched.epoch, [ref.row for ref in fetched.batch.samples], fetched.seeds,
            [t["caption"] for t in fetched.texts], [float(x["latents"][0, 0, 0]) for x in fetched.latents],
            fetched.empty, fetched.state_after)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_threaded_reading_gives_the_same_batches_in_the_same_order(dropout: float) -> None:
    results = []
    for threaded in (False, True):
        sampler, rows = _sampler()
        latent, text = _reader(rows)
        source = BatchSource(lambda s=sampler, r=rows, la=latent, t=text: fetch(s, r, la, t, 11, dropout),
                             threaded=threaded)
        try:
            results.append([_summary(source.next()) for _ in range(20)])  # crosses three epochs
        finally:
            source.close()
    assert results[0] == results[1]
    epochs = {summary[0] for summary in results[0]}
    assert epochs == {0, 1, 2, 3}
    captions = [c for summary in results[0] for c in summary[3]]
    assert "" in captions and any(c.startswith("alt") for c in captions) and any(c.startswith("cap") for c in captions)


def test_the_thread_reads_and_the_state_after_each_batch_is_kept() -> None:
    sampler, rows = _sampler()
    log: list[str] = []
    latent, text = _reader(rows, log)
    source = BatchSource(lambda: fetch(sampler, rows, latent, text, 0, 0.0), ahead=2)
    try:
        first = source.next()
        time.sleep(0.2)
        assert set(log) == {"trainer-batches"}
        assert sampler.state.position > first.state_after.position  # read ahead of the step
        assert first.state_after.position == 1
        assert source.next().state_after.position == 2
    finally:
        source.close()


def test_a_failed_read_is_raised_in_the_step_that_needs_that_batch() -> None:
    sampler, rows = _sampler()
    calls = {"n": 0}

    def read():
        calls["n"] += 1
        if calls["n"] == 3:
            raise FileNotFoundError("latents/ab12 missing from the cache")
        latent, text = _reader(rows)
        return fetch(sampler, rows, latent, text, 0, 0.0)

    source = BatchSource(read, ahead=4)
    try:
        source.next()
        source.next()
        with pytest.raises(FileNotFoundError, match="ab12"):
            source.next()
    finally:
        source.close()


def test_wait_time_is_measured_and_taken() -> None:
    sampler, rows = _sampler()
    latent, text = _reader(rows)

    def slow():
        time.sleep(0.05)
        return fetch(sampler, rows, latent, text, 0, 0.0)

    source = BatchSource(slow, threaded=False)
    source.next()
    source.next()
    waited = source.take_wait()
    assert 0.09 < waited < 2.0
    assert source.take_wait() == 0.0


def test_a_sample_seed_depends_on_seed_epoch_row_and_repeat_only() -> None:
    ref = SampleRef(row=4, repeat=1, bucket="1.0", dataset_id="a")
    same = SampleRef(row=4, repeat=1, bucket="0.5", dataset_id="b")
    assert sample_seed(1, 2, ref) == sample_seed(1, 2, same)
    others = {sample_seed(2, 2, ref), sample_seed(1, 3, ref), sample_seed(1, 2, SampleRef(5, 1, "1.0")),
              sample_seed(1, 2, SampleRef(4, 0, "1.0"))}
    assert sample_seed(1, 2, ref) not in others and len(others) == 4
    assert 0 <= sample_seed(1, 2, ref) < 1 << 63
