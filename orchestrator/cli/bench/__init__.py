"""`orchestrator bench ...`: the benchmark commands; each bench is a module beside this one.

The benches build models and data, so each command but `bench status` imports its module
when it runs (`# deferred: torch (CLI start-up)`): `orchestrator --help` stays fast.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from orchestrator.cli import render
from orchestrator.cli.app import bench_app, emit_json, err, out
from orchestrator.cli.bench import status as status_bench
from orchestrator.cli.options import Json, OnDevice
from orchestrator.config import DeviceName


def _bench(run: Callable[[], dict[str, Any]], what: str, json_out: bool) -> None:
    """Run a benchmark under a spinner; print its JSON document or its figures."""
    with err.status(f"benchmarking {what}..."):
        doc = run()
    if json_out:
        emit_json(doc)
        return
    render.figures(out, doc)


@bench_app.command("data")
def bench_data(json_out: Json = False) -> None:
    """Random crops from .nii.gz vs the HDF5 cache (96^3, 144^3), and loader samples/s."""
    from orchestrator.cli.bench.data import bench_data as run  # deferred: torch (CLI start-up)

    _bench(run, "data loading (about 20 s)", json_out)


@bench_app.command("step")
def bench_step(json_out: Json = False, device: OnDevice = "auto") -> None:
    """Seconds per training step: the trainer and TrainStep against a bare PyTorch loop."""
    from orchestrator.cli.bench.step import bench_step as run  # deferred: torch (CLI start-up)

    _bench(lambda: run(device=device), "the training step (about a minute)", json_out)


@bench_app.command("ddp")
def bench_ddp(json_out: Json = False,
              nodes: Annotated[Literal["auto", "srun", "local"], typer.Option(
                  "--nodes", help="Where the 2 ranks run: srun (two SLURM nodes), local (two "
                  "processes here), or auto (srun where a cluster of 2+ nodes answers).")] = "auto",
              ) -> None:
    """Samples/s of stage 1 with 1 rank against 2 DDP ranks (one CPU thread each), and the
    share of a 2-rank step spent on the all-reduce and waiting."""
    from orchestrator.cli.bench.ddp import bench_ddp as run  # deferred: torch (CLI start-up)

    _bench(lambda: run(nodes=nodes), "DDP with 1 and 2 ranks (about a minute)", json_out)


@bench_app.command("plan")
def bench_plan(json_out: Json = False) -> None:
    """Seconds to plan 4 stages + LCNN at 4, 6, 20 and 80 GB, CPU and GPU, and for three GPU
    types at once (16, 40, 80 GB, each stage placed), each case in a fresh process as
    `plan` runs (cold estimates)."""
    from orchestrator.cli.bench.plan import bench_plan as run  # deferred: torch (CLI start-up)

    _bench(run, "the planner at 8 budgets and 3 GPU types (about 4 minutes)", json_out)


@bench_app.command("gpu")
def bench_gpu(json_out: Json = False,
              device: Annotated[DeviceName, typer.Option(
                  "--device", help="auto: the GPU where there is one; a CPU runs the quick sizes.")] = "auto",
              out_file: Annotated[Path | None, typer.Option(
                  "--out", help="JSON file rewritten after each section (a run cut short keeps "
                  "what it measured).")] = None,
              quick: Annotated[bool, typer.Option(
                  "--quick", help="Tiny sizes (16^3 patches, 2 steps): a smoke test in a minute.")]
              = False) -> None:
    """GPU acceptance bench (sized for at most 8 minutes on one H200), progress on stderr.

    1 plan: every stage of stages/progressive.yaml at 20 GB and at the GPU's own size,
    with plan seconds.

    2 verify: each stage of the 20 GB plan for 3 real steps in a fresh process, measured
    (max_memory_reserved + context, and NVML's used memory of the process) against
    predicted.

    3 step: steady TrainStep time of each stage at its planned size with bf16; samples/s,
    voxels/s.

    4 fp16: stage 1 with fp16 autocast and a GradScaler through the trainer: finite losses,
    the scale.

    5 oom: stage 1 under half the memory its planned step needs: the out-of-memory error in
    the first steps falls back (state.json memory_fallback) and the steps complete (CUDA
    only).

    6 loader: one short epoch of stage 1 at 96^3 on ATLAS-size subjects from the HDF5
    cache: loader samples/s against what the GPU consumes (batch / the trainer's step on a
    loaded batch), with the workers used.

    A failed section is recorded and the rest runs; the exit code is then 1. On a node
    without network access: docs/benchmarks.md, "GPU acceptance bench".
    """
    # deferred: torch (CLI start-up)
    from orchestrator.cli.bench.gpu import bench_gpu as run
    from orchestrator.cli.bench.gpu import failed, section_lines

    docs: list[dict[str, Any]] = []

    def go() -> dict[str, Any]:
        docs.append(run(device=device, quick=quick, out=out_file,
                        say=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True)))
        return docs[0]

    _bench(go, "the GPU path", json_out)
    for line in section_lines(docs[0]) if not json_out else []:
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    if failed(docs[0]):
        raise typer.Exit(1)


@bench_app.command("curriculum")
def bench_curriculum(json_out: Json = False,
                     quick: Annotated[bool, typer.Option(
                         "--quick", help="Tiny phantoms and a few steps (seconds): a smoke test.")]
                     = False,
                     threads: Annotated[int | None, typer.Option(
                         "--threads", min=1,
                         help="torch's CPU threads per arm (default: the usable CPUs shared "
                              "among the jobs, at least 1; threads that wait on other "
                              "processes ran a step up to 20x slower).")] = None,
                     jobs: Annotated[int | None, typer.Option(
                         "--jobs", min=1,
                         help="Arms trained at once, each in its own process (default: the "
                              "usable CPUs, at most 3; 1: one after the other). The figures "
                              "do not depend on it; the wall time does.")] = None) -> None:
    """Progressive chain vs stage 4 from scratch (fixed and growing patch) at equal training
    FLOPs and at equal training time, tested on held-out brain-anatomy subjects; and the
    chain's model in one pass, mirrored, and mirrored and post-processed (chosen on 2
    validation subjects). About 20 CPU minutes; the arms run two at a time, one thread each."""
    # deferred: torch (CLI start-up)
    from orchestrator.cli.bench.curriculum import bench_curriculum as run
    from orchestrator.cli.bench.curriculum_report import summary_lines

    with err.status("benchmarking the curriculum against scratch..."):
        doc = run(quick=quick, threads=threads, jobs=jobs,
                  progress=lambda line: err.print(line, highlight=False))
    if json_out:
        emit_json(doc)
        return
    for line in summary_lines(doc):
        out.print(line, highlight=False, soft_wrap=True)


@bench_app.command("status")
def bench_status(runs: Annotated[int, typer.Option("--runs", min=1, help="Runs to create.")] = 50,
                 json_out: Json = False) -> None:
    """`status` over many realistic runs on disk: collect_status and the CLI, per sacct case."""
    _bench(lambda: status_bench.bench_status(n_runs=runs), f"status over {runs} runs (about 20 s)", json_out)
