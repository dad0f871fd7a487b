"""`orchestrator run-chain`: a plan's stages one after another inside one allocation.

What `slurm/progressive.sh` runs, with what `submit` gives every job:
- the run's code snapshot (launch/snapshot.py): each stage runs `python -m orchestrator
  run-stage` from runs/<run>/code/, so a job requeued hours later runs the submitted code;
- each stage a job step over every task of the allocation (`srun --ntasks=$SLURM_NTASKS
  --cpus-per-task=$SLURM_CPUS_PER_TASK`: since SLURM 22.05 a step does not inherit the
  job's CPUs), so `--signal=USR2@...` reaches it; with several tasks (several GPUs, or
  several nodes) the stage runs as DDP, one rank a task, as a submitted job does;
- requeue accounting: a stage stopped by USR2 or near the time limit (exit 75, last.pt
  written) is counted in state.json and the job requeues itself, until the profile's
  `max_requeues`; a requeue from outside (`scontrol requeue`, preemption) is counted when
  the job comes back (SLURM_RESTART_COUNT grew).
Complete stages are skipped; the interrupted one resumes from its last.pt. A stage that
fails ends the chain: the last line names it and its log (logs/<run>/chain/).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.config import Plan, StagePlan, load_plan
from orchestrator.launch.node import count_requeue
from orchestrator.launch.snapshot import snapshot_code
from orchestrator.launch.submit import logs_dir
from orchestrator.runs import state as run_state

EXIT_INTERRUPTED = 75  # run-stage: stopped with last.pt written (training/interrupt.py)
Say = Callable[[str], None]


def _say(text: str) -> None:
    job = os.environ.get("SLURM_JOB_ID", "local")
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} run-chain[{job}]: {text}", flush=True)


def _final(plan: Plan, sp: StagePlan) -> Path:
    return plan.run_dir / sp.name / "checkpoints" / "final.pt"


def stage_command(plan_path: Path, stage: str) -> list[str]:
    """The stage's command: a job step over the allocation's tasks under SLURM (one DDP
    rank a task), a plain process elsewhere.

    Not `--kill-on-bad-exit` with several ranks: a rank that fails tells the others
    (training/distributed.py), and the writer records the line that names it; killed at
    once, it could not."""
    cmd = [sys.executable, "-m", "orchestrator", "run-stage", "--plan", str(plan_path),
           "--stage", stage]
    if not os.environ.get("SLURM_JOB_ID"):
        return cmd
    env = os.environ
    cpus = env.get("SLURM_CPUS_PER_TASK")
    tasks, nodes = env.get("SLURM_NTASKS", "1"), env.get("SLURM_JOB_NUM_NODES", "1")
    many = int(tasks) > 1
    return ["srun", f"--ntasks={tasks}", f"--nodes={nodes}", f"--kill-on-bad-exit={0 if many else 1}",
            *(["--label"] if many else []),
            *([f"--cpus-per-task={cpus}"] if cpus else []), *cmd]


class _Signals:
    """The chain's own signals: remembered, and passed on to the running stage."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.child: subprocess.Popen | None = None
        for signum in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = self.received if self.received == signal.SIGTERM else signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def _run_stage(plan: Plan, plan_path: Path, sp: StagePlan, code: Path, sig: _Signals) -> tuple[int, Path]:
    """Run one stage, its output both to ours and to its log; (exit code, log path)."""
    log = logs_dir(plan) / "chain" / f"{sp.name}.{os.environ.get('SLURM_JOB_ID', 'local')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(code), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "ORCH_RANK_LOGS": json.dumps([str(log)])}  # every rank writes here (srun --label)
    with open(log, "a", encoding="utf-8") as fh:
        proc = subprocess.Popen(stage_command(plan_path, sp.name), cwd=code, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        sig.child = proc
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            fh.write(line)
            fh.flush()
        rc = proc.wait()
        sig.child = None
    return rc, log


def _count_outside_requeue(plan: Plan, plan_path: Path, todo: list[StagePlan], say: Say) -> bool:
    """A job that came back (SLURM_RESTART_COUNT grew since we last saw it) was requeued by
    someone else: count it on the stage it stopped. False: max_requeues reached."""
    job = os.environ.get("SLURM_JOB_ID")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    seen = run_state.read_state(plan.run_dir).get("chain") or {}
    counted = True
    if job and todo and seen.get("job_id") == job and restart > int(seen.get("restarts_seen", 0)):
        stage = todo[0].name
        say(f"job requeued from outside (restart {restart}); {stage} resumes from last.pt")
        counted = count_requeue(str(plan_path), stage, time_up=False)
    run_state.update_run(plan.run_dir, chain={"job_id": job, "restarts_seen": restart})
    return counted


def _requeue_self(plan: Plan, plan_path: Path, sp: StagePlan, say: Say) -> int:
    job = os.environ["SLURM_JOB_ID"]
    if not count_requeue(str(plan_path), sp.name, time_up=False):
        return -1
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    run_state.update_run(plan.run_dir, chain={"job_id": job, "restarts_seen": restart + 1})
    say(f"{sp.name} stopped with last.pt written: requeueing job {job}")
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    return 0


def run_chain(plan_path: Path, include_lcnn: bool = False, say: Say = _say) -> int:
    """Run the plan's stages in order in this allocation; returns the exit code.

    0: every stage complete, or the job requeued itself to continue. 75: interrupted
    outside SLURM (run again to resume). Otherwise a stage failed (or ran out of
    requeues): the last line said which, and where its log is.

    Raises:
        ConfigError: the plan is missing or invalid.
    """
    plan_path = Path(plan_path).resolve()
    plan = load_plan(plan_path)
    stages = [s for s in plan.stages if include_lcnn or s.kind != "lcnn"]
    code = Path(snapshot_code(plan)["code"])  # once per run; a requeued job reuses it
    todo = [sp for sp in stages if not _final(plan, sp).exists()]
    if not run_state.read_state(plan.run_dir).get("executor"):
        run_state.update_run(plan.run_dir, executor="chain", plan=str(plan_path),
                             submitted=run_state.now_iso())
    for sp in todo:
        entry = run_state.read_state(plan.run_dir)["stages"].get(sp.name, {})
        if entry.get("state") in (None, run_state.FAILED, run_state.CANCELLED):
            run_state.update_stage(plan.run_dir, sp.name, state=run_state.PENDING, error=None,
                                   slurm_job_id=None, executor="chain")
    if not _count_outside_requeue(plan, plan_path, todo, say):
        return _failed(plan, todo, todo[0], "max_requeues reached", None, say)
    ranks = int(os.environ.get("SLURM_NTASKS", "1")) if os.environ.get("SLURM_JOB_ID") else 1
    if ranks > 1:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "?")
        say(f"each stage runs as DDP over this allocation's {ranks} tasks ({nodes}); the plan's "
            f"batch is per task: {ranks} x batch per step")
    placed = [sp.placement for sp in todo if sp.placement is not None]
    if placed:  # a mixed-GPU plan, all in one allocation: the largest type any stage needs
        big = max(placed, key=lambda pl: pl.mem_gb)
        types = sorted({pl.gpu_type for pl in placed})
        say(f"the plan places stages on {', '.join(types)}; one allocation runs them all, so "
            f"it needs the largest, {big.gpu_type} ({big.mem_gb:g} GB: sbatch "
            f"--gres=gpu:{big.gpu_type}:N); a stage that gets another GPU plans itself again")
    say(f"stages: {' '.join(sp.name for sp in stages)}; to run: "
        f"{' '.join(sp.name for sp in todo) or 'none'}")
    sig = _Signals()
    for i, sp in enumerate(todo):
        job = os.environ.get("SLURM_JOB_ID")
        run_state.update_stage(plan.run_dir, sp.name, slurm_job_id=job, job_id=job or "local")
        say(f"stage {sp.name}")
        rc, log = _run_stage(plan, plan_path, sp, code, sig)
        if rc == 0 and _final(plan, sp).exists():
            continue
        if sig.received in (signal.SIGTERM, signal.SIGINT):  # SLURM ends or requeues the job
            say(f"{sp.name} stopped by {signal.Signals(sig.received).name}; last.pt written")
            return 128 + int(sig.received)
        if rc == EXIT_INTERRUPTED and job:
            if _requeue_self(plan, plan_path, sp, say) == 0:
                return 0
            return _failed(plan, todo[i + 1:], sp, "max_requeues reached", log, say)
        if rc == EXIT_INTERRUPTED:
            say(f"{sp.name} interrupted with last.pt written; run again to resume")
            return EXIT_INTERRUPTED
        return _failed(plan, todo[i + 1:], sp, f"exit {rc}", log, say, rc)
    say(f"all stages complete: orchestrator status {plan.run} --runs-dir {plan.runs_dir}")
    return 0


def _failed(plan: Plan, rest: list[StagePlan], sp: StagePlan, why: str, log: Path | None,
            say: Say, rc: int = 1) -> int:
    """Record the failure (and cancel what depended on it); the last line names it."""
    entry = run_state.read_state(plan.run_dir)["stages"].get(sp.name, {})
    if entry.get("state") != run_state.FAILED:
        run_state.update_stage(plan.run_dir, sp.name, state=run_state.FAILED,
                               ended=run_state.now_iso(), error=f"{why}; log: {log}",
                               stderr=str(log) if log else None)
    for other in rest:
        if other.name != sp.name:
            run_state.update_stage(plan.run_dir, other.name, state=run_state.CANCELLED,
                                   error=f"stage {sp.name} failed")
    reason = entry.get("error") if why == "max_requeues reached" and entry.get("error") else why
    say(f"stage {sp.name} failed ({reason}); log: {log or '-'}; "
        "`sbatch slurm/progressive.sh` again resumes it")
    return rc if rc not in (0, EXIT_INTERRUPTED) else 1
