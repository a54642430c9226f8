"""Sweeps and ATP's β search on Ray: a local Ray instance (2 CPUs) started for this module.
The Ray executor gives the local executor's keys, mask digests and perplexities; a worker that
dies mid-run has its run retried; interrupted sweeps resume without losing or repeating a run."""

import sys

import pytest

import prunewise as pw
from prunewise.errors import PrunewiseError
from prunewise.run.results import read_results
from prunewise.run.trials import Executor
from prunewise.sweep.grid import Sweep
from prunewise.sweep.runner import run_sweep

ray = pytest.importorskip("ray")  # in the [test] extra, so CI runs these


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    fault = tmp_path_factory.mktemp("fault") / "died"
    fault.write_text("armed by deleting this file")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PRUNEWISE_FAULT_ONCE": str(fault)}},
    )
    yield fault
    ray.shutdown()


@pytest.fixture
def base(model_dir, text):
    return pw.PruneConfig(
        model=str(model_dir), calib=f"file:{text}", nsamples=4, seqlen=32, eval_data=f"file:{text}", max_tokens=256
    )


def grid(base, sparsities=(0.5, 0.6)):
    return Sweep(
        base=base,
        metrics=["magnitude", "wanda"],
        allocators=["uniform"],
        sparsities=list(sparsities),
        patterns=["unstructured"],
    )


def perplexity(row):
    """A row's perplexity result, less the note that it was read back from the cache."""
    result = row.get("pruned") or row.get("ppl")
    return {k: v for k, v in result.items() if k != "cached"}


def by_key(folder):
    return {r["key"]: r for r in read_results(folder)}


def test_ray_sweep_equals_the_local_sweep(cluster, base, tmp_path):
    run_sweep(grid(base), tmp_path / "local", progress=False)
    summary = run_sweep(grid(base), tmp_path / "ray", progress=False, executor=Executor("ray", {"workers": 2}))
    assert summary.ran == 4 and summary.failed == 0
    local, remote = by_key(tmp_path / "local"), by_key(tmp_path / "ray")
    assert sorted(local) == sorted(remote) and len(remote) == 5  # 4 runs and the dense baseline
    for key, row in local.items():
        assert remote[key].get("pruning", {}).get("mask_sha256") == row.get("pruning", {}).get("mask_sha256")
        assert perplexity(remote[key]) == perplexity(row)
    dense = [key for key, row in local.items() if row["kind"] == "dense"]
    # the same dense weights: the Ray sweep reads the local sweep's baseline back instead of evaluating again
    assert len(dense) == 1 and "cached" not in local[dense[0]]["ppl"] and remote[dense[0]]["ppl"]["cached"] is True
    again = run_sweep(grid(base), tmp_path / "ray", progress=False, executor=Executor("ray"))
    assert (again.ran, again.skipped_done) == (0, 4) and len(read_results(tmp_path / "ray")) == 5


def test_a_worker_that_dies_has_its_run_retried(cluster, base, tmp_path):
    cluster.unlink()  # the next run a worker starts kills it (once)
    summary = run_sweep(grid(base), tmp_path / "s", progress=False, executor=Executor("ray", {"workers": 2}))
    assert cluster.exists()  # a worker did die
    rows = [r for r in read_results(tmp_path / "s") if r["kind"] == "run"]
    assert summary.ran == 4 and summary.failed == 0 and len(rows) == 4 and all(r["status"] == "ok" for r in rows)


def test_interrupted_sweeps_resume_without_losing_or_repeating(cluster, base, tmp_path, monkeypatch):
    import prunewise.sweep.runner as sweep_module

    real = sweep_module.append_result
    for stop_after in (2, 2):  # two interruptions, then a run to the end
        written = []

        def append(path, row, written=written, stop_after=stop_after):
            real(path, row)
            written.append(row)
            if len(written) == stop_after:
                raise KeyboardInterrupt

        monkeypatch.setattr(sweep_module, "append_result", append)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(grid(base, (0.5, 0.6, 0.7)), tmp_path / "s", progress=False, executor=Executor("ray"))
    monkeypatch.setattr(sweep_module, "append_result", real)
    run_sweep(grid(base, (0.5, 0.6, 0.7)), tmp_path / "s", progress=False, executor=Executor("ray"))
    keys = [r["key"] for r in read_results(tmp_path / "s")]
    assert len(keys) == len(set(keys)) == 7  # 6 runs and the dense baseline, each once


def test_atp_search_trials_in_parallel_choose_as_the_local_search(cluster, base, tmp_path):
    cfg = base.replace(metric="wanda", allocator="atp:step=0.05,heldout=3", sparsity=0.5, eval_data=None)
    local = pw.run(cfg, progress=False, dry_run=True, cache_dir=tmp_path).record.search
    remote = pw.run(
        cfg, progress=False, dry_run=True, cache_dir=tmp_path, executor=Executor("ray", {"workers": 2})
    ).record.search
    assert remote["chosen"] == local["chosen"] and len(remote["curve"]) == len(local["curve"]) > 2
    assert [c["ppl"] for c in remote["curve"]] == pytest.approx([c["ppl"] for c in local["curve"]], rel=1e-6)


def test_auto_candidates_scored_in_parallel_choose_as_locally(cluster, base, tmp_path):
    cfg = base.replace(
        metric="wanda",
        allocator="auto:candidates=uniform/owl/dlp/atp[step=0.1],heldout=3",
        sparsity=0.5,
        eval_data=None,
    )
    local = pw.run(cfg, progress=False, dry_run=True, cache_dir=tmp_path).record.allocation["auto"]
    remote = pw.run(
        cfg, progress=False, dry_run=True, cache_dir=tmp_path, executor=Executor("ray", {"workers": 2})
    ).record.allocation["auto"]
    assert remote["chosen"] == local["chosen"] and remote["trials"] == local["trials"]
    for r, lo in zip(remote["candidates"], local["candidates"]):
        assert r["allocator"] == lo["allocator"] and r["blocks"] == lo["blocks"]
        assert r["heldout_ppl"] == pytest.approx(lo["heldout_ppl"], rel=1e-6)


def test_a_model_that_does_not_load_on_the_workers_is_one_line(cluster, base, tmp_path):
    bad = base.replace(model=str(tmp_path / "no-such-model"))
    with pytest.raises(PrunewiseError, match="executor ray: a worker could not start: .*no such"):
        run_sweep(grid(bad), tmp_path / "s", progress=False, executor=Executor("ray", {"workers": 1}))


def test_ray_missing_is_one_clear_line(monkeypatch):
    from prunewise.run.trials import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(PrunewiseError, match=r"pip install 'prunewise\[ray\]'"):
        require_ray()
