"""Sweeps (one model, many runs, resumable JSON lines) and reports."""

import json

import pytest

from helpers import make_text, tiny_model
from prunewise.cli import main
from prunewise.config import PruneConfig
from prunewise.errors import ConfigError, PrunewiseError
from prunewise.report.markdown import comparisons, load_groups, results_table, write_report
from prunewise.run.pipeline import run
from prunewise.run.record import RunRecord
from prunewise.run.results import RESULTS, read_results
from prunewise.sweep.grid import Sweep, run_key
from prunewise.sweep.runner import run_sweep


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("sweep")
    model = tiny_model("llama", layers=4)
    model.save_pretrained(d / "model")
    tokenizer.save_pretrained(d / "model")
    (d / "t.txt").write_text(make_text(3000), encoding="utf-8")
    base = PruneConfig(
        model=str(d / "model"),
        calib=f"file:{d / 't.txt'}",
        nsamples=4,
        seqlen=32,
        eval_data=f"file:{d / 't.txt'}",
        max_tokens=256,
    )
    return d, base


def grid(base, **axes):
    return Sweep(
        base=base,
        metrics=axes.get("metrics", ["wanda", "sparsegpt"]),
        allocators=axes.get("allocators", ["uniform", "owl", "alphapruning"]),
        sparsities=axes.get("sparsities", [0.5, 0.7]),
        patterns=axes.get("patterns", ["unstructured", "2:4"]),
    )


def test_expand_crosses_unstructured_runs_nm_once_and_skips_with_reason(setup):
    _, base = setup
    runs, skipped = grid(base).expand()
    # unstructured: 2 sparsities x 2 metrics x 3 allocators; 2:4: 2 metrics x (uniform, owl)
    assert len(runs) == 12 + 4
    assert sum(c.pattern == "2:4" for c in runs) == 4 and all(c.target == 0.5 for c in runs if c.pattern == "2:4")
    assert [(c["metric"], c["allocator"]) for c, _ in skipped] == [
        ("wanda", "alphapruning"),
        ("sparsegpt", "alphapruning"),
    ]
    assert all("needs an unstructured pattern" in r for _, r in skipped)
    keys = {run_key(c) for c in runs}
    assert len(keys) == len(runs)
    assert run_key(runs[0]) == run_key(PruneConfig.from_dict(runs[0].to_dict()))
    assert run_key(runs[0]) != run_key(runs[0].replace(seed=1))
    with pytest.raises(ConfigError, match="unknown metric 'wandaa'"):
        grid(base, metrics=["wandaa"]).expand()
    with pytest.raises(ConfigError, match="no run that can execute"):
        grid(base, allocators=["alphapruning"], patterns=["2:4"]).expand()


def test_sweep_equals_single_runs_then_resumes(setup, tmp_path):
    d, base = setup
    sweep = grid(
        base,
        metrics=["wanda", "sparsegpt", "gblm"],
        allocators=["uniform", "owl", "atp:beta=0.1"],
        sparsities=[0.6],
        patterns=["unstructured", "2:4"],
    )
    out = tmp_path / "s"
    summary = run_sweep(sweep, out, progress=False)
    runs, _ = sweep.expand()
    assert (summary.ran, summary.failed, summary.skipped_done) == (len(runs), 0, 0) == (18, 0, 0)
    rows = read_results(out)
    assert [r["kind"] for r in rows] == ["dense"] + ["run"] * 18
    by_key = {r["key"]: r for r in rows}
    # Each run of the sweep (one model, weights restored in between, caches shared) equals the
    # same run done alone from a fresh load: same masks, same perplexity.
    for config in (runs[4], runs[-1], runs[8]):  # sparsegpt / owl, gblm / atp 2:4, gblm / atp
        alone = run(config, progress=False).record
        row = by_key[run_key(config)]
        assert row["pruning"]["mask_sha256"] == alone.mask_sha256
        assert row["pruned"]["ppl"] == alone.pruned["ppl"]
        assert row["pruning"]["sparsity"] == alone.sparsity
        assert rows[0]["ppl"]["ppl"] == alone.dense["ppl"]
        assert RunRecord.from_dict(row).mask_sha256 == alone.mask_sha256 and "layers" not in row["pruning"]
    # Rerun: nothing to do. Interrupted (last two lines lost, a torn line): exactly those two run again.
    again = run_sweep(sweep, out, progress=False)
    assert (again.ran, again.skipped_done) == (0, 18)
    lines = (out / RESULTS).read_text().splitlines()
    (out / RESULTS).write_text("\n".join(lines[:-2]) + '\n{"key": "torn', encoding="utf-8")
    resumed = run_sweep(sweep, out, progress=False)
    assert (resumed.ran, resumed.skipped_done) == (2, 16)
    final = read_results(out)
    assert {r["key"] for r in final if r["kind"] == "run"} == {run_key(c) for c in runs}
    assert {r["key"]: r["pruning"]["mask_sha256"] for r in final[-2:]} == {
        r["key"]: r["pruning"]["mask_sha256"] for r in rows[-2:]
    }


def test_failed_run_is_recorded_and_sweep_goes_on(setup, tmp_path, capsys):
    d, base = setup
    argv = [
        "sweep",
        "--model",
        base.model,
        "--calib",
        base.calib,
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--metric",
        "magnitude",
        "--allocator",
        "uniform",
        "atp:beta=0.3",
        "--sparsity",
        "0.5",
        "0.8",
        "--out",
        str(tmp_path / "f"),
        "-q",
    ]
    assert main(argv) == 1  # one failure -> exit 1
    printed = capsys.readouterr().out
    assert "3 runs finished, 1 failed" in printed
    rows = read_results(tmp_path / "f")
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["config"]["sparsity"] == 0.8
    assert "outside the valid range" in failed[0]["error"]
    # failures are kept on a rerun unless --retry-failed
    assert main(argv) == 0
    assert "0 runs finished, 0 failed, 4 already done" in capsys.readouterr().out
    assert main(argv + ["--retry-failed"]) == 1
    assert len(read_results(tmp_path / "f")) == 5


def test_toml_with_overrides_dry_run_and_save(setup, tmp_path, capsys):
    d, base = setup
    toml = tmp_path / "grid.toml"
    toml.write_text(
        f'model = "{base.model}"\ncalib = "{base.calib}"\nnsamples = 4\nseqlen = 32\n'
        'metric = ["magnitude", "wanda"]\nallocator = "uniform"\nsparsity = [0.3, 0.6]\n'
        'pattern = ["unstructured", "4:8"]\neval_tokens = 128\n',
        encoding="utf-8",
    )
    sweep = Sweep.from_toml(toml, {"metric": ["wanda"]})
    assert sweep.metrics == ["wanda"] and sweep.sparsities == [0.3, 0.6] and sweep.base.max_tokens == 128
    out = tmp_path / "t"
    assert main(["sweep", "--config", str(toml), "--metric", "wanda", "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "3 runs, 0 already in" in printed and printed.count("to do") == 3 and not out.exists()
    assert (
        main(
            [
                "sweep",
                "--config",
                str(toml),
                "--metric",
                "wanda",
                "--sparsity",
                "0.6",
                "--pattern",
                "unstructured",
                "--out",
                str(out),
                "--save",
                "-q",
            ]
        )
        == 0
    )
    row = read_results(out)[-1]
    saved = json.loads((out / "runs" / row["saved"].split("/")[-1] / "pruning.json").read_text())
    assert saved["pruning"]["mask_sha256"] == row["pruning"]["mask_sha256"]
    assert saved["schema"] == 2 and saved["output"]["format"] == "safetensors"
    bad = tmp_path / "bad.toml"
    bad.write_text('metric = ["wanda"]\nsparsityy = 0.5\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown field.*sparsityy"):
        Sweep.from_toml(bad)


def _line(metric, allocator, target, ppl, pattern="unstructured", blocks=(0.5, 0.5), zs=None, status="ok"):
    return {
        "key": f"{metric}{allocator}{target}{pattern}",
        "kind": "run",
        "status": status,
        "target": target,
        "config": {
            "metric": metric,
            "allocator": allocator,
            "pattern": pattern,
            "sparsity": target,
            "model": "m",
            "nsamples": 4,
            "seqlen": 32,
            "calib": "wiki",
            "seed": 0,
            "mode": "two-pass",
        },
        "sparsity": target,
        "ppl": {"ppl": ppl} if ppl else None,
        "allocation": {"blocks": list(blocks)},
        "zero_shot": zs,
        "error": None if status == "ok" else "ValueError: boom",
        "wall_s": 1.0,
    }


def test_report_tables_comparisons_plots(tmp_path):
    zs = {"tasks": {"boolq": {"acc": 0.6}, "rte": {"acc": 0.5, "acc_norm": 0.55}}, "average": {"acc": 0.55}}
    lines = [
        {
            "key": "d",
            "kind": "dense",
            "status": "ok",
            "ppl": {"ppl": 10.0, "data": "wiki", "split": "test", "windows": 4, "seqlen": 32, "tokens": 128},
        },
        _line("magnitude", "uniform", 0.5, 300.0),
        _line("magnitude", "uniform", 0.7, 9000.0),
        _line("wanda", "uniform", 0.5, 30.0, zs=zs),
        _line("wanda", "uniform", 0.7, 600.0),
        _line("wanda", "owl", 0.5, 31.0),
        _line("wanda", "owl", 0.7, 500.0, blocks=(0.6, 0.8)),
        _line("wanda", "atp:beta=auto", 0.7, 600.0),
        _line("wanda", "uniform", 0.5, None, pattern="2:4"),
        _line("wanda", "owl", 0.5, 80.0, pattern="2:4"),
        _line("wanda", "uniform", 0.5, 90.0, pattern="2:4"),
        _line("gblm", "uniform", 0.7, None, status="failed"),
    ]
    (tmp_path / RESULTS).write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    (group,) = load_groups(tmp_path)
    rows = group.rows
    assert group.dense["ppl"]["ppl"] == 10.0 and group.repeated == 0
    table = results_table(rows, 10.0)
    assert "| metric | allocator | 50% | 70% | 2:4 |" in table
    assert "| wanda | owl | 31.000 | **500.00** | **80.000** |" in table
    assert "| wanda | uniform | **30.000** | 600.00 | 90.000 |" in table  # 2:4 retried line supersedes
    claims = comparisons(rows)
    assert "- **owl beats uniform** at 70% and above and with N:M: 2 of 2." in claims
    assert (
        "- **atp:beta=auto beats uniform** at 70% and above and with N:M: 0 of 1; "
        "equal in: wanda 70% (600.00 vs 600.00)."
    ) in claims
    assert "- **wanda beats magnitude** (uniform allocation): 2 of 2." in claims
    path = write_report(tmp_path)
    md = path.read_text()
    assert (
        "dense **10.000**" in md
        and "## Zero-shot accuracy (%)" in md
        and "| wanda | uniform | unstructured | 0.5 | 60.00 | 50.00 | 55.00 | - |" in md
    )
    assert "- gblm / uniform / unstructured 0.7: `ValueError: boom`" in md
    for png in ("ppl_magnitude.png", "ppl_wanda.png", "profile_owl.png"):
        assert f"({png})" in md
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "e").mkdir()
    with pytest.raises(PrunewiseError, match="no results"):
        write_report(tmp_path / "e")


def test_report_from_a_folder_of_runs(setup, tmp_path, capsys):
    d, base = setup
    for metric in ("magnitude", "wanda"):
        run(base.replace(metric=metric, sparsity=0.6), out=tmp_path / "runs" / metric, progress=False)
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| magnitude | uniform |" in md and "| wanda | uniform |" in md
    assert "wanda beats magnitude" in md


def test_report_groups_runs_by_protocol(setup, tmp_path, capsys):
    """Runs with different calibration sets are not one table: a section each, its own header and
    counts; a repeated cell is said to be repeated."""
    _, base = setup
    runs = tmp_path / "runs"
    run(base.replace(metric="wanda", sparsity=0.6), out=runs / "a", progress=False)
    run(base.replace(metric="wanda", sparsity=0.6, nsamples=2), out=runs / "b", progress=False)
    run(base.replace(metric="wanda", sparsity=0.6, nsamples=2), out=runs / "c", progress=False)
    groups = load_groups(runs)
    assert [g.settings["nsamples"] for g in groups] == [base.nsamples, 2]
    assert [len(g.rows) for g in groups] == [1, 2] and [g.repeated for g in groups] == [0, 1]
    md = write_report(runs).read_text()
    assert "3 runs under 2 protocols" in md and md.count("## Protocol ") == 2
    one, two = md.split("## Protocol 2")
    assert f"calibration {base.nsamples} x {base.seqlen} tokens" in one and "1 run finished, 0 failed." in one
    assert "calibration 2 x" in two and "2 runs finished, 0 failed; 1 run repeat" in two
    assert one.count("| wanda | uniform |") == 1 and two.count("| wanda | uniform |") == 1
    assert "dense **" in one and "dense **" in two
    single = write_report(runs / "a").read_text()
    assert "## Protocol" not in single and "1 run finished, 0 failed." in single


def test_searching_allocators_in_a_sweep_restore_from_the_sweeps_copy(setup, tmp_path):
    """ATP's beta search and MRP's dynamic rounds prune trial models inside a sweep and restore
    the dense weights from the sweep's own copy: the rows equal the same runs done alone."""
    _, base = setup
    sweep = grid(
        base,
        metrics=["wanda"],
        allocators=["atp:beta=auto,step=0.05", "mrp:stats=dynamic"],
        sparsities=[0.6],
        patterns=["unstructured"],
    )
    run_sweep(sweep, tmp_path / "s", progress=False)
    rows = {r["key"]: r for r in read_results(tmp_path / "s")}
    for config in sweep.expand()[0]:
        alone = run(config, progress=False).record
        row = rows[run_key(config)]
        assert row["pruning"]["mask_sha256"] == alone.mask_sha256
        assert row["pruned"]["ppl"] == alone.pruned["ppl"]
    assert len(rows[run_key(sweep.expand()[0][0])]["allocation"]["search"]["curve"]) > 2


def test_identical_plot_series_are_drawn_once_with_every_name():
    from prunewise.report.plots import merge_identical

    series = [
        ("wanda", [0, 1], [0.5, 0.7]),
        ("magnitude", [0, 1], [0.6, 0.6]),
        ("sparsegpt", [0, 1], [0.5, 0.7 * (1 + 1e-9)]),
        ("gblm", [0, 1], [0.5, 0.7]),
        ("x", [0], [0.5]),
    ]
    assert merge_identical(series) == [
        ("wanda = sparsegpt = gblm", [0, 1], [0.5, 0.7]),
        ("magnitude", [0, 1], [0.6, 0.6]),
        ("x", [0], [0.5]),
    ]
    assert len(merge_identical(series, rel=0.0)) == 4  # sparsegpt differs by 1e-9 when nothing is tolerated


def test_a_foreign_line_in_the_middle_of_the_results_is_refused(tokenizer, text, tmp_path):
    """Issue 22 case 11: every line's fingerprint is checked, not only the first's."""
    from prunewise.run.results import RESULTS

    src = tmp_path / "m"
    tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    base = PruneConfig(model=str(src), calib=f"file:{text}", nsamples=4, seqlen=32)
    grid = Sweep(base=base, metrics=["magnitude"], sparsities=[0.5, 0.6])
    run_sweep(grid, tmp_path / "s", progress=False)
    lines = (tmp_path / "s" / RESULTS).read_text().splitlines()
    foreign = json.loads(lines[1])
    foreign["key"] = "0" * 16
    foreign["source"]["fingerprint"] = "f" * 64
    (tmp_path / "s" / RESULTS).write_text("\n".join([lines[0], json.dumps(foreign), *lines[1:]]) + "\n")
    more = Sweep(base=base, metrics=["magnitude"], sparsities=[0.5, 0.6, 0.7])
    with pytest.raises(PrunewiseError, match=r"result 2, key 0000000000000000"):
        run_sweep(more, tmp_path / "s", progress=False)
