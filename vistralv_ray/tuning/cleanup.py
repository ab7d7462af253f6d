"""Give back the workers' placement groups of trials the scheduler stopped.

When ASHA stops a trial, Tune ends the trial's actor; the Train controller it started dies with it,
but the controller's worker placement group lives as long as the job that runs the sweep
(ray-project/ray#54305). Ray Train's own cleaner finds dead controllers through the state API, which
only runs with the dashboard; without it, every stopped trial would keep its workers' CPUs and GPUs
reserved until later trials could no longer start. This janitor removes, from the sweep's driver,
the placement groups that this job's actors created during the sweep and whose creator has died.
"""

from __future__ import annotations

import threading
import time

from vistralv_ray.logging import get_logger

log = get_logger(__name__)

LIVE_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


def _actor_placement_groups(job_id: str) -> list[tuple[bytes, bool]]:
    """(id, creator dead) of this job's live, non-detached placement groups that an actor created."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    driver = ray.ActorID.nil().binary()  # the creator of the driver's groups, Tune's trial groups among them
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = table.FromString(raw)
        by_actor = pg.creator_actor_id != driver
        live = table.PlacementGroupState.Name(pg.state) in LIVE_STATES
        if by_actor and live and not pg.is_detached and pg.creator_job_id.hex() == job_id:
            out.append((pg.placement_group_id, pg.creator_actor_dead))
    return out


class PlacementGroupJanitor:
    """Tracks the groups that appear during the sweep; removes those whose creating actor is dead.

    Reading the table is a GCS round trip, so a background thread does it (never Tune's own loop),
    every `interval_s` for `window_s` after a trial ended: its controller dies a little later.
    """

    def __init__(self, interval_s: float = 2.0, window_s: float = 60.0):
        import ray

        self.job_id = ray.get_runtime_context().get_job_id()
        self.before = {pg_id for pg_id, _ in self._scan()}
        self.removed = 0
        self.interval_s, self.window_s = interval_s, window_s
        self._until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="placement-group-janitor", daemon=True)

    def start(self) -> PlacementGroupJanitor:
        self._thread.start()
        return self

    def trial_ended(self) -> None:
        self._until = time.monotonic() + self.window_s

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            if time.monotonic() < self._until:
                self.collect()

    def _scan(self) -> list[tuple[bytes, bool]]:
        try:
            return _actor_placement_groups(self.job_id)
        except Exception as e:  # internal Ray APIs: degrade to a warning, never fail the sweep
            log.warning("cannot read the placement group table (%s): stopped trials may hold resources longer", e)
            return []

    def collect(self) -> int:
        """Remove the orphans; returns how many groups of the sweep still have a live creator."""
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        alive = 0
        for pg_id, creator_dead in self._scan():
            if pg_id in self.before:
                continue
            if not creator_dead:
                alive += 1
                continue
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg_id)))
                self.removed += 1
                log.info("gave back the worker placement group of a stopped trial (%s)", pg_id.hex())
            except Exception as e:  # e.g. Ray's own cleaner (with the dashboard) was first
                log.debug("could not remove placement group %s: %s", pg_id.hex(), e)
        return alive

    def settle(self, timeout_s: float = 30.0) -> None:
        """After the sweep: wait for the last stopped trials' controllers to die, then collect their groups."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        deadline = time.monotonic() + timeout_s
        while self.collect() and time.monotonic() < deadline:
            time.sleep(0.5)


def build_janitor_callback(janitor: PlacementGroupJanitor):
    """A Tune callback that tells the janitor when a trial ended (completed, stopped or failed)."""
    from ray.tune import Callback

    class PlacementGroupCleanup(Callback):
        def __init__(self, janitor: PlacementGroupJanitor):
            self.janitor = janitor

        def __getstate__(self) -> dict:
            # Tune saves its callbacks with the experiment state; a thread does not pickle, and a
            # restored sweep starts its own janitor.
            return {"janitor": None}

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.janitor is not None:
                self.janitor.trial_ended()

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.janitor is not None:
                self.janitor.trial_ended()

    return PlacementGroupCleanup(janitor)
