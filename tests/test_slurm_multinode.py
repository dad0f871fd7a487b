"""Stages across the two nodes of the local SLURM (issue 24): DDP over n1 and n2.

`slurm/local-cluster.sh up` gives two nodes, n1 and n2, each its own slurmd with its own
address. A stage whose profile says `nodes: 2` runs one rank on each; the ranks meet at
n1 on a port the OS gives rank 0. These tests run it, requeue it, take a node away
under it, break one node's environment, and run `slurm/progressive.sh` over both nodes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_runner import invoke
from conftest import REPO
from tiny_plans import quick_tiny_plan
from waiting import wait_for

from orchestrator.launch.sacct import sacct_states
from orchestrator.launch.submit import submit_plan
from orchestrator.runs.state import read_state
from orchestrator.runs.status import collect_status
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.distributed import DDP_REPORT, RENDEZVOUS_DIR, weights_digest

pytestmark = pytest.mark.slurm
S1 = "stage1_basic_cnn"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
TWO_NODES = "local-2node"


def _ended(job_id: str) -> str | None:
    state = (sacct_states([job_id]) or {}).get(job_id)
    return state if state in TERMINAL else None


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
    return (proc.stdout + proc.stderr).strip()


def _scene() -> str:
    """SLURM's view, for a failure's message: the nodes with their reasons, the queue with
    each job's reason, and the last lines of the node daemons' and the controller's logs."""
    parts = [f"$ sinfo -N\n{_run('sinfo', '-N', '-h', '-o', '%N %P %t %E')}",
             f"$ squeue\n{_run('squeue', '-h', '-o', '%i %T %D %N %R')}"]
    for log in ("slurmd-n1.log", "slurmd-n2.log", "slurmctld.log"):
        path = Path("/var/log/slurm") / log
        if path.exists():
            parts.append(f"--- {path} (last 8 lines)\n"
                         + "\n".join(path.read_text(errors="replace").splitlines()[-8:]))
    return "\n".join(parts)


def _queued() -> set[str]:
    return set(_run("squeue", "-h", "-o", "%i").split())


def _both_nodes_answer() -> bool:
    states = _run("sinfo", "-N", "-h", "-p", "debug", "-o", "%t").split()
    return len(states) == 2 and set(states) <= {"idle", "mix", "alloc"}


@pytest.fixture(autouse=True)
def _two_nodes_up_and_jobs_cancelled():
    """Each test starts with both nodes answering (or fails at once, saying why, rather than
    wait for a job that cannot start), and leaves none of its jobs behind to hold the
    nodes of the next."""
    wait_for(_both_nodes_answer, 60, "both nodes idle, mixed or allocated", every_s=1,
             explain=_scene)
    before = _queued()
    yield
    left = sorted(_queued() - before)
    if left:
        subprocess.run(["scancel", *left], timeout=15, check=False)


def _wait_done(job_id: str, timeout_s: float = 300) -> str:
    return wait_for(lambda: _ended(job_id), timeout_s, f"job {job_id} to end", every_s=1,
                    explain=_scene)


def _entry(plan, stage: str = S1) -> dict:
    return read_state(plan.run_dir)["stages"].get(stage, {})


def _explain(plan, stage: str = S1) -> str:
    entry = _entry(plan, stage)
    logs = sorted(Path(entry["stderr"]).parent.glob("*_log.err")) if entry.get("stderr") else []
    return f"{entry}\n" + "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs)


def _final_digest(plan, stage: str = S1) -> str:
    return weights_digest(load_checkpoint(plan.run_dir / stage / "checkpoints" / "final.pt")["model"])


def _step_nodes(job_id: str) -> dict[str, tuple[str, str]]:
    out = subprocess.run(["sacct", "-j", job_id, "-n", "-P", "-o", "JobID,NodeList,NTasks"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return {row.split("|")[0]: tuple(row.split("|")[1:]) for row in out.split()}


def _epochs(plan, stage: str = S1) -> list[int]:
    rows = (plan.run_dir / stage / "metrics.csv").read_text().splitlines()[1:]
    return [int(r.split(",")[0]) for r in rows]


def _job_processes(job_id: str, node: str) -> list[int]:
    """Pids of the job's task processes (and their children) that run as `node`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (f"SLURM_JOB_ID={job_id}".encode() in env and f"SLURMD_NODENAME={node}".encode() in env
                and any(e.startswith(b"SLURM_PROCID=") for e in env)):
            found.append(int(pid))
    return found


def test_a_two_node_stage_equals_two_tasks_on_one_node(tmp_path: Path, tiny_data: Path) -> None:
    two, two_path = quick_tiny_plan(tmp_path / "runs", tiny_data, run="two-nodes", cluster=TWO_NODES,
                                    stage_updates={"max_epochs": 2})
    one, one_path = quick_tiny_plan(tmp_path / "runs", tiny_data, run="one-node", cluster="local-ddp",
                                    stage_updates={"max_epochs": 2})
    (job2,) = submit_plan(two, two_path, "slurm", only=[S1])
    (job1,) = submit_plan(one, one_path, "slurm", only=[S1])  # 4 CPUs in all: both run at once
    assert (job2.parameters["nodes"], job2.parameters["tasks_per_node"]) == (2, 1)
    assert _wait_done(job2.job_id) == "COMPLETED", _explain(two)
    assert _wait_done(job1.job_id) == "COMPLETED", _explain(one)

    # SLURM ran the step as one task on each node, and the other on one node
    assert _step_nodes(job2.job_id)[f"{job2.job_id}.0"] == ("n[1-2]", "2")
    assert _step_nodes(job1.job_id)[f"{job1.job_id}.0"][1] == "2"
    assert "," not in _step_nodes(job1.job_id)[f"{job1.job_id}.0"][0]
    report = json.loads((two.run_dir / S1 / DDP_REPORT).read_text())
    assert report["in_sync"] and report["world_size"] == 2 and report["backend"] == "gloo"
    assert [(r["rank"], r["node"]) for r in report["ranks"]] == [(0, "n1"), (1, "n2")]
    # each rank trained on its own share of the epoch's patches (per-rank batch 2)
    s0, s1 = (set(r["samples_last_epoch"]) for r in report["ranks"])
    per_rank = two.stage(S1).spec.iterations_per_epoch * two.stage(S1).batch_size
    assert len(s0) == len(s1) == per_rank and not s0 & s1 and s0 | s1 == set(range(2 * per_rank))
    digest = _final_digest(two)
    assert [r["weights_sha256"] for r in report["ranks"]] == [digest, digest]
    # rank 0 alone wrote: one row per epoch, one attempt, the nodes of this attempt
    entry = _entry(two)
    assert entry["state"] == "COMPLETED" and entry["attempts"] == 1 and entry["nodes"] == ["n1", "n2"]
    assert _epochs(two) == [1, 2]
    # the job imported the run's code snapshot, not the checkout (launch/snapshot.py)
    code = two.run_dir.resolve() / "code"
    assert entry["code"] == str(code) and (code / "orchestrator" / "launch" / "job.py").exists()
    assert not list(two.run_dir.rglob("*.tmp*"))
    assert not list((two.run_dir / S1 / RENDEZVOUS_DIR).iterdir())  # the address is gone with the job
    # the same samples, the same all-reduce of two gradients, one thread each: bitwise equal
    assert _final_digest(one) == digest
    run = collect_status(tmp_path / "runs", "two-nodes", sacct_states)["runs"][0]
    assert run["stages"][0]["nodes"] == ["n1", "n2"]


def test_requeue_of_a_two_node_stage_resumes_on_both_nodes(tmp_path: Path, tiny_data: Path) -> None:
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data, run="requeue", cluster=TWO_NODES,
                                 stage_updates={"max_epochs": 3, "iterations_per_epoch": 12})
    (job,) = submit_plan(plan, path, "slurm", only=[S1])
    wait_for(lambda: _entry(plan).get("epoch", 0) >= 1 or _ended(job.job_id), 300,
             "the first epoch", every_s=0.5, explain=_scene)
    assert _ended(job.job_id) is None, _explain(plan)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=10)
    assert _wait_done(job.job_id, 420) == "COMPLETED", _explain(plan)
    entry = _entry(plan)
    assert entry["attempts"] == 2 and entry["start"].startswith("resumed from"), entry
    assert _epochs(plan) == [1, 2, 3]  # every epoch once
    report = json.loads((plan.run_dir / S1 / DDP_REPORT).read_text())
    assert report["in_sync"] and [r["node"] for r in report["ranks"]] == ["n1", "n2"]


def _restart_node() -> None:
    # `up` starts what is not running: n2's slurmd (the node stays 'completing' until then)
    up = subprocess.run(["bash", "slurm/local-cluster.sh", "up"], cwd=REPO, timeout=300, text=True,
                        capture_output=True, env={**os.environ, "LOCAL_SLURM_TIMEOUT_S": "120"})
    assert up.returncode == 0, up.stdout + up.stderr
    wait_for(lambda: set(subprocess.run(["sinfo", "-h", "-n", "n2", "-o", "%t"], capture_output=True,
                                        text=True, timeout=10).stdout.split()) == {"idle"},
             120, "n2 back and idle", every_s=1)


def test_a_lost_node_ends_the_stage_within_the_bound_and_resume_completes(
        tmp_path: Path, tiny_data: Path) -> None:
    bound_s = 20.0
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data, run="lost", cluster=TWO_NODES,
                                 stage_updates={"max_epochs": 3, "iterations_per_epoch": 10},
                                 peer_timeout_s=bound_s)
    (job,) = submit_plan(plan, path, "slurm", only=[S1])
    wait_for(lambda: _entry(plan).get("epoch", 0) >= 1 or _ended(job.job_id), 300,
             "the first epoch", every_s=0.5, explain=_scene)
    assert _ended(job.job_id) is None, _explain(plan)
    slurmd = int(Path("/run/slurmd-n2.pid").read_text().split()[0])
    on_n2 = _job_processes(job.job_id, "n2")
    assert on_n2, "no rank found on n2"
    try:
        t0 = time.monotonic()
        os.kill(slurmd, signal.SIGKILL)  # the node goes: its daemon and its rank
        for pid in on_n2:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _entry(plan).get("state") == "FAILED", bound_s + 30,
                 "the stage to end", every_s=0.2)
        took = time.monotonic() - t0
        error = _entry(plan)["error"]
        assert took < bound_s + 5, (took, error)
        assert error.startswith("rank 1 (node n2) was lost") and "orchestrator resume" in error, error
        # the survivor on n1 is gone, with its children: nothing left behind on that node
        wait_for(lambda: not _job_processes(job.job_id, "n1"), 15, "no process of the job on n1")
        last = load_checkpoint(plan.run_dir / S1 / "checkpoints" / "last.pt")  # whole
        assert last["progress"]["epoch"] >= 1
        assert not list(plan.run_dir.rglob("*.tmp*"))
    finally:
        _restart_node()
    res = invoke("resume", plan.run, "--runs-dir", str(tmp_path / "runs"))
    assert res.exit_code == 0, res.output
    new_job = _entry(plan)["slurm_job_id"]
    assert new_job != job.job_id
    assert _wait_done(new_job, 420) == "COMPLETED", _explain(plan)
    assert _epochs(plan) == [1, 2, 3]
    assert _entry(plan)["start"].startswith("resumed from")


def test_a_rank_that_cannot_start_ends_the_job_naming_its_node_and_log(
        tmp_path: Path, tiny_data: Path) -> None:
    broken = tmp_path / "broken-on-n2"
    broken.mkdir()
    # what a broken venv on one node does: Python dies there before any of our code runs
    (broken / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('SLURMD_NODENAME') == 'n2' and os.environ.get('SLURM_PROCID'):\n"
        "    sys.stderr.write('broken environment on n2 (test)\\n'); sys.stderr.flush(); os._exit(3)\n")
    bound_s = 15.0
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data, run="broken", cluster=TWO_NODES,
                                 peer_timeout_s=bound_s, setup=[f"export PYTHONPATH={broken}"])
    t0 = time.monotonic()
    (job,) = submit_plan(plan, path, "slurm", only=[S1])
    assert _wait_done(job.job_id, 180) == "FAILED", _explain(plan)
    assert time.monotonic() - t0 < bound_s + 90
    error = _entry(plan)["error"]
    assert error.startswith("rank 1 (node n2) did not join the stage within 15 s"), error
    log = Path(error.split("its log: ")[1])
    assert log.name == f"{job.job_id}_1_log.err" and "broken environment on n2" in log.read_text()
    ours = [line for line in Path(_entry(plan)["stderr"]).read_text().strip().splitlines()
            if not line.startswith("srun: ")]  # srun adds its own line on the task's exit
    assert str(log) in ours[-1], ours[-3:]


def test_progressive_sh_runs_every_stage_over_both_nodes(tmp_path: Path, tiny_data: Path) -> None:
    plan, _ = quick_tiny_plan(tmp_path / "runs", tiny_data, run="prog2")
    env = {**os.environ, "RUN": "prog2", "RUNS_DIR": str(tmp_path / "runs")}
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus=0",
                          "--cpus-per-task=1", "--mem=2G", "--time=15",
                          f"--output={tmp_path}/progressive-%j.out", "slurm/progressive.sh"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
                         check=True).stdout.strip().split(";")[0]
    state = _wait_done(job, 420)
    log = "\n".join(p.read_text() for p in sorted(tmp_path.glob("progressive-*.out")))
    assert state == "COMPLETED", log[-3000:]
    assert "DDP over this allocation's 2 tasks" in log and "all stages complete" in log
    run = collect_status(tmp_path / "runs", "prog2", sacct_states)["runs"][0]
    three_d = [s for s in run["stages"] if s["name"] != "lcnn"]
    assert all(s["state"] == "COMPLETED" and s["nodes"] == ["n1", "n2"] for s in three_d), three_d
    for s in three_d:
        report = json.loads((plan.run_dir / s["name"] / DDP_REPORT).read_text())
        assert report["in_sync"] and [r["node"] for r in report["ranks"]] == ["n1", "n2"], s["name"]
    # each stage was a job step over both nodes
    steps = _step_nodes(job)
    assert sum(1 for k, v in steps.items() if k.split(".")[-1].isdigit() and v == ("n[1-2]", "2")) == 4
    handoff = json.loads((plan.run_dir / "stage4_hybrid_full" / "handoff.json").read_text())
    assert handoff["from"] == "stage3_hybrid_small"
