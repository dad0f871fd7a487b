"""What one submitit job runs: a stage of a plan, requeued on preemption or timeout."""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import submitit

from orchestrator.errors import PeerLost
from orchestrator.launch import node
from orchestrator.runs import state as run_state

logger = logging.getLogger(__name__)


class StageJob(submitit.helpers.Checkpointable):
    """Runs `run_stage(plan, stage)`; on USR2 or the time limit submitit calls
    `checkpoint()`, which requeues a fresh copy that resumes from the stage's last.pt."""

    def __init__(self, plan_path: str, stage: str) -> None:
        self.plan_path = str(plan_path)
        self.stage = stage

    def _run_dir(self) -> Path:
        return Path(self.plan_path).parent

    def __call__(self) -> dict[str, Any]:
        # deferred: the trainer loads torch and monai, which only the job's node needs
        from orchestrator.launch.replan import replan_on_start
        from orchestrator.training.trainer import run_stage

        logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # submitit's USR2 handler checkpoints and requeues at once, possibly mid-step; we
        # stop at the next step boundary first (last.pt written), then hand over to it.
        # SIGTERM (scancel, `scontrol requeue`, the end of KillWait) stops the same way.
        stop = node.stop_flag(self.plan_path)  # also stops at an epoch boundary near the time limit
        submitit_handler = stop.install(signal.SIGUSR2)
        stop.install(signal.SIGTERM)
        rank = node.export_distributed_env()
        if not rank:  # which code this job runs: the run's snapshot (launch/snapshot.py)
            run_state.update_stage(self._run_dir(), self.stage,
                                   code=str(Path(run_state.__file__).resolve().parents[2]))
        try:  # with WORLD_SIZE > 1, run_stage opens the DDP session itself
            replan_on_start(self.plan_path, self.stage)  # another GPU than planned: fit it
            result = run_stage(self.plan_path, self.stage, stop=stop)
        except BaseException as err:
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
            # a lost DDP peer was recorded with its line by the peer watch (distributed.py)
            who = f"rank {rank} ({os.environ.get('SLURMD_NODENAME', '?')}): " if rank else ""
            fields = {} if isinstance(err, PeerLost) else {
                "state": run_state.FAILED, "ended": run_state.now_iso(),
                "error": f"{who}{type(err).__name__}: {err}"[:500]}
            run_state.update_stage(self._run_dir(), self.stage, failed_job=job_id, **fields)
            raise
        finally:  # the debug executor runs the job in a process that lives on
            stop.restore()
        if result["interrupted"] and rank:  # DDP: rank 0 requeues or ends the job
            return result
        if result["interrupted"] and (stop.signum == signal.SIGUSR2 or stop.time_up) \
                and callable(submitit_handler):
            self._time_up = stop.time_up
            submitit_handler(signal.SIGUSR2, None)  # checkpoint() -> requeue -> exit
        elif result["interrupted"]:  # SLURM is ending or requeueing this job itself
            logging.shutdown()
            os._exit(128 + int(stop.signum or signal.SIGTERM))
        return result

    def checkpoint(self, *args: Any,  # type: ignore[override]  # submitit accepts None: no requeue
                   **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        if not node.count_requeue(self.plan_path, self.stage, getattr(self, "_time_up", False)):
            return None  # max_requeues reached: submitit ends the job, the stage is FAILED
        logger.info("%s: requeued; it resumes from last.pt", self.stage)
        return submitit.helpers.DelayedSubmission(StageJob(self.plan_path, self.stage))
