#!/usr/bin/env bash
# The whole progressive curriculum inside ONE allocation, for plain-sbatch users:
#
#   DATA=/data/ATLAS_2 sbatch slurm/progressive.sh
#
# Each stage runs through the same stage runner and hand-off as `orchestrator submit`,
# one after another. Before the time limit (or on preemption) SLURM sends USR2: the
# running stage stops at the next step boundary with last.pt written, and the job
# requeues itself. `sbatch slurm/progressive.sh` again after any interruption resumes
# where it stopped: complete stages are skipped, the current one resumes from last.pt.
#
# Options, as environment variables (sbatch passes your environment on):
#   DATA          ATLAS-style data tree (needed to plan; not once runs/$RUN/plan.yaml exists)
#   RUN           run name (default: progressive); the run lives in $RUNS_DIR/$RUN
#   RUNS_DIR      folder of runs (default: runs, relative to the submit directory)
#   CURRICULUM    curriculum YAML (default: stages/progressive.yaml)
#   TARGET_MEM    memory budget per stage in GB (default: probed on the node)
#   CLUSTER       cluster profile whose `setup:` lines run first (default: none)
#   LCNN          1: also run the curriculum's LCNN runs after the 3D stages (default: 0)
#   ORCH          the orchestrator command (default: .venv/bin/orchestrator)
# Resources: edit the #SBATCH lines below, or override them on the command line
# (sbatch --time=... --gpus=... slurm/progressive.sh).
#
#SBATCH --job-name=progressive
#SBATCH --output=logs/progressive-%j.out
#SBATCH --time=48:00:00
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --signal=USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
RUN=${RUN:-progressive}
RUNS_DIR=${RUNS_DIR:-runs}
CURRICULUM=${CURRICULUM:-stages/progressive.yaml}
ORCH=${ORCH:-.venv/bin/orchestrator}
PY=$(dirname "$ORCH")/python
PLAN="$RUNS_DIR/$RUN/plan.yaml"
EXIT_INTERRUPTED=75
say() { printf '%s progressive.sh[%s]: %s\n' "$(date +%FT%T)" "${SLURM_JOB_ID:-local}" "$*"; }

if [ -n "${CLUSTER:-}" ]; then  # the profile's environment lines (module load, venv, ...)
    setup=$("$PY" -c 'import sys; from orchestrator.config import resolve_cluster
print("\n".join(resolve_cluster(sys.argv[1])[0].setup))' "$CLUSTER")
    eval "$setup"
fi

if [ ! -f "$PLAN" ]; then
    : "${DATA:?set DATA to the data tree (no plan at $PLAN yet)}"
    say "planning $RUN"
    "$ORCH" plan --run "$RUN" --runs-dir "$RUNS_DIR" --curriculum "$CURRICULUM" --data "$DATA" \
        ${TARGET_MEM:+--target-mem "$TARGET_MEM"} ${CLUSTER:+--cluster "$CLUSTER"}
fi

stages=$("$PY" -c 'import sys; from orchestrator.config import load_plan
print(" ".join(s.name for s in load_plan(sys.argv[1]).stages if s.kind == "seg3d" or sys.argv[2] == "1"))' \
    "$PLAN" "${LCNN:-0}")
say "stages: $stages (restart ${SLURM_RESTART_COUNT:-0})"

for stage in $stages; do
    say "stage $stage"
    rc=0
    # srun makes the stage a job step, so SLURM's USR2 reaches it (not only this shell)
    srun --ntasks=1 --kill-on-bad-exit=1 "$ORCH" run-stage --plan "$PLAN" --stage "$stage" || rc=$?
    if [ "$rc" -eq "$EXIT_INTERRUPTED" ]; then
        say "$stage interrupted with last.pt written: requeueing this job"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    elif [ "$rc" -ne 0 ]; then
        say "$stage failed (exit $rc); see the lines above; sbatch this script again to resume"
        exit "$rc"
    fi
done
say "all stages complete: $ORCH status $RUN --runs-dir $RUNS_DIR"
