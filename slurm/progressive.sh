#!/usr/bin/env bash
# The whole progressive curriculum inside ONE allocation, for plain-sbatch users.
# From the repository's root:
#
#   CLUSTER=my-site DATA=/data/ATLAS_2 sbatch slurm/progressive.sh
#
# This script only sets up the environment; the logic is `orchestrator run-chain` (the
# same code as `orchestrator submit`): the stages run one after another, each as a job
# step over every task of the allocation (srun, given this job's --cpus-per-task) from the
# run's code snapshot; with several tasks (--ntasks-per-node=4 on a 4-GPU node, or
# --nodes=2) every stage runs as DDP, one rank a task, the plan's batch per rank; complete
# stages are skipped, an interrupted one resumes from its last.pt. Before the time limit
# (or on preemption) SLURM sends USR2: the stage stops at the next step with last.pt
# written and the job requeues itself, counted in `orchestrator status`, at most the
# profile's max_requeues times. `sbatch slurm/progressive.sh` again after a failure resumes.
# Check a site first with `orchestrator doctor --cluster my-site`.
#
# Options, as environment variables (sbatch passes your environment on):
#   CLUSTER     cluster profile (a name under envs/clusters/ or a file): its `setup:` lines
#               (module load, venv) run first, and `plan` uses it (default: none)
#   DATA        data tree: raw ATLAS-style NIfTI, or better its cache from
#               `orchestrator data cache DIR` (needed to plan; not once the plan exists)
#   RUN         run name (default: progressive); the run lives in $RUNS_DIR/$RUN
#   RUNS_DIR    folder of runs (default: runs)
#   CURRICULUM  curriculum YAML (default: stages/progressive.yaml)
#   TARGET_MEM  memory budget per stage in GB (default: probed on the node)
#   LCNN        1: also run the curriculum's LCNN runs after the 3D stages (default: 0)
#   ORCH        the orchestrator command: any command line, e.g. "python -m orchestrator"
#               (default: .venv/bin/orchestrator if it exists, else orchestrator on PATH)
#
# ---- Resources: edit for your site, or override: sbatch --time=2-00:00:00 ... -----------
# Where the job runs. Many sites require an account; a QoS is optional. Remove one '#'
# to use a line ('##SBATCH' is a comment).
##SBATCH --partition=gpu
##SBATCH --account=my_project
##SBATCH --qos=normal
##SBATCH --constraint=a100
# One GPU for the whole chain. Sites differ: --gpus=1 (SLURM >= 19.05 with cons_tres) or
# --gres=gpu:1 (older sites; a type if the site wants one: --gres=gpu:a100:1). Keep one.
#SBATCH --gpus=1
##SBATCH --gres=gpu:1
# Several GPUs, one DDP rank each (docs/scaling.md): e.g. 2 nodes of 4 GPUs. Then replace
# --gpus=1 above with --gpus-per-node=4 (or --gres=gpu:4) and use these two lines:
##SBATCH --nodes=2
##SBATCH --ntasks-per-node=4
# CPUs feed the data loader (up to 4 workers and the main process); memory holds the
# workers' volume caches (bounded from --mem: see README, "Host memory").
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
# The whole curriculum; when it runs out the job requeues and continues where it stopped.
#SBATCH --time=48:00:00
# ---- Requeue and logs: leave these as they are ------------------------------------------
#SBATCH --signal=USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --job-name=progressive
#SBATCH --output=logs/progressive-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
say() { printf '%s progressive.sh[%s]: %s\n' "$(date +%FT%T)" "${SLURM_JOB_ID:-local}" "$*"; }

# 1. The site's environment, before any Python: the profile's `setup:` lines.
if [ -n "${CLUSTER:-}" ]; then
    profile=$CLUSTER
    [ -f "$profile" ] || profile=envs/clusters/$CLUSTER.yaml
    [ -f "$profile" ] || { say "CLUSTER=$CLUSTER: no file $CLUSTER or $profile"; exit 2; }
    setup=$(awk -f slurm/profile-setup.awk "$profile")
    set +u  # module and activate scripts read unset variables
    eval "$setup"
    set -u
fi

# 2. The orchestrator command, the run and its plan (made on this node if missing).
if [ -z "${ORCH:-}" ]; then
    ORCH=orchestrator
    [ -x .venv/bin/orchestrator ] && ORCH=.venv/bin/orchestrator
fi
RUN=${RUN:-progressive}
RUNS_DIR=${RUNS_DIR:-runs}
PLAN="$RUNS_DIR/$RUN/plan.yaml"
if [ ! -f "$PLAN" ]; then
    : "${DATA:?set DATA to the data tree (no plan at $PLAN yet)}"
    say "planning $RUN"
    $ORCH plan --run "$RUN" --runs-dir "$RUNS_DIR" --data "$DATA" \
        --curriculum "${CURRICULUM:-stages/progressive.yaml}" \
        ${TARGET_MEM:+--target-mem "$TARGET_MEM"} ${CLUSTER:+--cluster "$CLUSTER"}
fi

# 3. Every stage, in order (srun per stage, snapshot, requeue accounting: run-chain).
say "run-chain $PLAN (restart ${SLURM_RESTART_COUNT:-0})"
exec $ORCH run-chain --plan "$PLAN" $([ "${LCNN:-0}" = 1 ] && echo --lcnn)
