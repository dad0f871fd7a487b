"""Which stage plans to run, and when a stage's plan is final, with base-filter floors.

A 3D stage keeps at least the base filters of the stage it starts from (planning/floors.py
says why), so its plan depends on that stage's final plan: the curriculum is a chain. Run
in that order, the chain takes the sum of its stages' planning times, while planning every
stage at once without floors and re-planning the narrow ones afterwards pays for two
plans of each narrow stage. This schedule does neither: each stage is planned with the
floor its predecessor's plan gives once that is final, and before that with a guess (the
predecessor's plan so far, or its YAML's filters), so the stages still run in parallel.

A plan made with floor g serves a stage whose floor turns out to be f when the rungs up
to the chosen one are the same on both ladders (`candidate_ladder(spec, m, g)` and `(...,
f)`): the search saw the same configurations and stops at the same one. That holds for
every stage whose chosen configuration keeps the full input at no fewer filters than
either floor, which is where a roomy budget puts every stage, so a guess is rarely
wasted. A guess waits while a stage it descends from is being planned (the LCNN goes
first): at 4 GB stage 4 then starts with stage 3's exact floor, which is its own.

The schedule is pure bookkeeping (tests/test_floors.py runs it with a made-up planner);
planning/pool.py runs its jobs in worker processes or in this one.
"""
from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from orchestrator.config import StagePlan, StageSpec
from orchestrator.planning.estimator import Candidate
from orchestrator.planning.floors import fresh_tensors
from orchestrator.planning.planner import Shortfall

Result = StagePlan | Shortfall | BaseException
Ladder = Callable[[StageSpec, int], list[Candidate]]  # (spec, floor) -> its ladder
Job = tuple[int, int]  # (stage index, floor)

EXACT, INFORMED, GUESSED = 0, 1, 2  # how a job's floor was chosen, best first


@dataclass
class _Stage:
    spec: StageSpec
    init_from: str | None
    src: int | None  # the 3D stage whose filters are this 3D stage's floor
    chain: int = 1  # stages in the longest chain of floors through this one
    results: dict[int, Result] = field(default_factory=dict)  # floor -> what planning gave
    final: StagePlan | Shortfall | None = None


class FloorSchedule:
    """The stages' planning jobs, best next first, and the plans they settle into.

    `next_job(busy)` names a (stage, floor) to plan (None when nothing useful is left to
    start); `record(job, result)` takes what it gave; `finished` says when every stage's
    plan is final, and `plans()` returns them, floors applied and explained. A job that
    raised is recorded as its exception and raised again only if its plan is the one
    needed.
    """

    def __init__(self, stages: list[tuple[StageSpec, str | None]], ladder: Ladder,
                 on_final: Callable[[str], None] | None = None) -> None:
        self.ladder, self.on_final = ladder, on_final
        index = {spec.name: k for k, (spec, _) in enumerate(stages)}
        self.stages: list[_Stage] = []
        for spec, init_from in stages:
            j = index.get(init_from or "")
            src = j if j is not None and spec.kind == stages[j][0].kind == "seg3d" else None
            self.stages.append(_Stage(spec, init_from, src))
        for k, st in enumerate(self.stages):  # a chain through k: its sources, k, its sinks
            above, j = 0, st.src
            while j is not None:
                above, j = above + 1, self.stages[j].src
            below = max((_depth_below(self.stages, i, k) for i in range(len(self.stages))),
                        default=0)
            st.chain = above + 1 + below

    @property
    def finished(self) -> bool:
        return all(st.final is not None for st in self.stages)

    def plans(self) -> list[StagePlan | Shortfall]:
        return [st.final for st in self.stages if st.final is not None]

    # -- floors -------------------------------------------------------------------------

    def exact_floor(self, k: int) -> int | None:
        """The stage's floor, once the stage it starts from is final (0: none)."""
        st = self.stages[k]
        if st.src is None:
            return 0
        src = self.stages[st.src].final
        if src is None:
            return None
        if isinstance(src, Shortfall):  # the plan fails anyway: find the stage's own need
            return 0
        return min(src.base_filters, st.spec.base_filters)

    def floor(self, k: int) -> tuple[int, int]:
        """(floor to plan stage k with now, how it was chosen: EXACT/INFORMED/GUESSED).

        Before its predecessor is final, the floor is the predecessor's plan so far
        (INFORMED) or, with none yet, the predecessor's own floor (GUESSED): a stage that
        had to be floored ends at its floor on a tight budget, and on a roomy one a floor
        guessed too low changes nothing (the ladders match where the plan stops)."""
        exact = self.exact_floor(k)
        if exact is not None:
            return exact, EXACT
        st = self.stages[k]
        assert st.src is not None
        g, _ = self.floor(st.src)
        so_far = self.valid(st.src, g)
        if isinstance(so_far, StagePlan):
            return min(so_far.base_filters, st.spec.base_filters), INFORMED
        return min(g, st.spec.base_filters), GUESSED

    def valid(self, k: int, f: int) -> Result | None:
        """A result of stage k that is its plan with floor f (planned with f, or with a
        floor whose ladder matches f's up to the configuration it chose)."""
        st = self.stages[k]
        if f in st.results:
            return st.results[f]
        for g, r in st.results.items():
            if isinstance(r, BaseException):
                continue
            lf, lg = self.ladder(st.spec, f), self.ladder(st.spec, g)
            if isinstance(r, Shortfall):
                if lf == lg:
                    return r
                continue
            if self.serves(k, r, g, f):
                return r
        return None

    def serves(self, k: int, plan: StagePlan, g: int, f: int) -> bool:
        """Whether `plan`, made for stage k with floor g, is also its plan with floor f: the
        two ladders are the same up to the configuration it chose."""
        spec = self.stages[k].spec
        lg, lf = self.ladder(spec, g), self.ladder(spec, f)
        chosen = Candidate(tuple(plan.input_size_vox), plan.base_filters, plan.checkpointing)
        if chosen not in lg:  # a plan made otherwise (tests): cannot show the floors agree
            return False
        i = lg.index(chosen)
        return lf[:i + 1] == lg[:i + 1]

    # -- jobs ---------------------------------------------------------------------------

    def next_job(self, busy: AbstractSet[Job] = frozenset()) -> Job | None:
        """The most useful plan to start: stages of the longest chain of floors first (the
        critical path), then exact floors before informed guesses before guesses; a stage
        already being planned with another floor last."""
        options = []
        for k, st in enumerate(self.stages):
            if st.final is not None:
                continue
            f, how = self.floor(k)
            got = self.valid(k, f)
            if isinstance(got, Shortfall) and f > 0 and how == EXACT:
                f, got = 0, self.valid(k, 0)  # nothing at the floor: the narrower plan
            if got is None and (k, f) not in busy:
                # a stage already being planned (with a guess that may yet serve) is planned
                # again only by a worker with nothing else to do
                again = any(j == k for j, _ in busy)
                # and a guess waits while a stage it descends from is being planned, if
                # there is other work (that stage's result makes the guess informed or
                # exact), except for the stage right after the chain's head: the first
                # stage is quick to plan and the floor it gives is the lowest, which the
                # next stage's plan almost always clears
                early = how == GUESSED and self._ancestor_busy(k, busy)
                options.append(((again or early, -st.chain, how, k), (k, f)))
        return min(options)[1] if options else None

    def _ancestor_busy(self, k: int, busy: AbstractSet[Job]) -> bool:
        """Whether a stage k descends from (through `src`) is being planned, other than
        its direct predecessor where that is the chain's head."""
        running, src = {j for j, _ in busy}, self.stages[k].src
        j = src
        while j is not None:
            if j in running and not (j == src and self.stages[j].src is None):
                return True
            j = self.stages[j].src
        return False

    def record(self, job: Job, result: Result) -> None:
        k, f = job
        self.stages[k].results[f] = result
        self._settle()

    def _settle(self) -> None:
        for k, st in enumerate(self.stages):  # a stage starts from an earlier one
            if st.final is not None:
                continue
            f = self.exact_floor(k)
            got = None if f is None else self.valid(k, f)
            if got is None:
                continue
            if isinstance(got, BaseException):
                raise got
            assert f is not None
            st.final = self._explained(k, f, got)
            if st.final is None:
                continue
            if self.on_final:
                self.on_final(st.spec.name)

    def _explained(self, k: int, f: int, got: StagePlan | Shortfall) -> StagePlan | Shortfall | None:
        """The final plan of stage k with floor f: the floor's reason where it bound, or
        the narrower plan marked FRESH START where nothing at the floor fits (None while
        that plan is still to be made)."""
        st = self.stages[k]
        if f == 0:
            return got
        assert st.src is not None  # a floor comes from the stage it starts from
        src = self.stages[st.src].final
        assert isinstance(src, StagePlan)
        if isinstance(got, StagePlan):
            if self.serves(k, got, f, 0):  # the floor did not change the plan
                return got
            return got.model_copy(update={"reasons": [
                *got.reasons, f"base filters kept >= {f}, those of {src.name}: the hand-off "
                "widens, it cannot narrow"]})
        narrow = self.valid(k, 0)
        if narrow is None:
            return None
        if isinstance(narrow, BaseException):
            raise narrow
        if isinstance(narrow, Shortfall):
            return narrow
        fresh = fresh_tensors(src, narrow)
        why = (f"FRESH START of {len(fresh['tensors'])} tensors ({100 * fresh['fraction']:.0f}% "
               f"of the parameters {src.name} could hand over): base filters "
               f"{narrow.base_filters} < {f} of {src.name}, and nothing at {f} filters fits "
               "the budget (checkpointing and the smallest input tried)")
        return narrow.model_copy(update={"reasons": [*narrow.reasons, why],
                                         "fresh_tensors": fresh})


def _depth_below(stages: list[_Stage], i: int, k: int) -> int:
    """How many steps of `src` lead from stage i up to stage k (0 if none do)."""
    steps = 0
    j: int | None = i
    while j is not None and j != k:
        steps, j = steps + 1, stages[j].src
    return steps if j == k else 0
