"""`orchestrator bench ddp`: 1 rank against 2 DDP ranks, through the trainer's own path."""
from __future__ import annotations

import json

import pytest
from cli_runner import invoke


@pytest.mark.slow
def test_bench_ddp_reports_both_cases_and_consistent_ratios(tmp_path, monkeypatch) -> None:
    from orchestrator.cli.bench import ddp

    monkeypatch.setattr(ddp, "bench_ddp", _small(ddp.bench_ddp, tmp_path))
    res = invoke("bench", "ddp", "--nodes", "local", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    f = doc["figures"]
    assert doc["bench"] == "ddp" and doc["machine"]["launcher"] == "local"
    assert f["samples_per_s_1_rank"] > 0 and f["samples_per_s_2_ranks"] > 0
    # the ratios are what they say: 2 ranks draw 2 x batch per step
    per_step = 2 * f["batch_per_rank"] / f["step_s_2_ranks"]
    assert f["samples_per_s_2_ranks"] == pytest.approx(per_step, rel=1e-2)
    assert f["scaling_efficiency_ratio"] == pytest.approx(
        f["samples_per_s_2_ranks"] / (2 * f["samples_per_s_1_rank"]), rel=1e-2)
    assert 0 <= f["allreduce_share_ratio"] < 1 and 0 < f["allreduce_alone_s"] < f["step_s_2_ranks"]
    assert f["params"] > 1000


def _small(run, tmp):  # noqa: ANN001, ANN202
    return lambda nodes: run(input_vox=32, steps=2, nodes=nodes, tmp_dir=tmp)
