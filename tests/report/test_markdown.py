"""``report.md`` of a folder of runs: one unreadable run is listed, the others reported (issue 22
case 12)."""

from __future__ import annotations

from prunewise.config import PruneConfig
from prunewise.report import write_report
from prunewise.run.pipeline import run


def test_one_unreadable_run_is_listed_and_the_others_reported(model_dir, text, tmp_path):
    for sparsity in (0.5, 0.6):
        cfg = PruneConfig(
            model=str(model_dir),
            metric="magnitude",
            sparsity=sparsity,
            calib=f"file:{text}",
            eval_data=f"file:{text}",
            seqlen=16,
            max_tokens=320,
        )
        run(cfg, out=tmp_path / "runs" / f"m{sparsity}", progress=False)
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "pruning.json").write_text('{"config": {"model": 1}, "pruned": "abc"}')
    report = write_report(tmp_path / "runs", tmp_path / "out").read_text()
    assert "| magnitude | uniform |" in report and "50%" in report and "60%" in report
    assert "## Unreadable runs" in report and "broken/pruning.json" in report
