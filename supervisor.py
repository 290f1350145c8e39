"""The supervisor: what `mabrec up` runs.

It prepares the infrastructure (embedded servers where no URL is configured), applies
migrations, loads the catalog on first start, joins Ray and creates the actors: shards, the
event router, and the API hosts. Then it runs the control loop, one `Supervisor.step` at a time
(as Ray Serve's controller does): make sure each actor is up (restoring or restarting it), tell
the API hosts the actors' health, share global popularity between shards, reload a changed
catalog. A sub-step's failure is logged with its name and never stops the loop. The actors are
detached: if the supervisor dies they go on serving, and a new `mabrec up` re-attaches to them.
SIGINT/SIGTERM stop everything cleanly: final checkpoints, NATS drained, embedded servers stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nats.js import JetStreamContext

from system.bus import stream
from system.core.catalog_file import SHIPPED
from system.core.errors import Unavailable
from system.core.health import ROUTER, Fleet, HealthMonitor, api_key, shard_key
from system.core.placement import default_shards, evacuated, moves, rebalanced
from system.core.settings import Settings
from system.core.sharding import SlotMap
from system.db.catalog_store import CatalogStore, load_file
from system.db.migrations import migrate
from system.db.pool import open_pool, short_lived_pool
from system.db.state_store import StateStore
from system.local import admin_token
from system.local.infra import Infrastructure
from system.local.processes import free_port, pid_alive, port_taken, stop_children
from system.local.runtime import Runtime
from system.local.servers import ray_env, ray_token
from system.resharding import Progress, move
from system.tasks import cancel_and_wait, gather_logged, start_task

log = logging.getLogger("mabrec.supervisor")

STEP_PERIOD = 1.0  # seconds between control-loop steps once everything is up (jittered)
STARTING_PERIOD = 0.1  # ... and while actors are still coming up
POPULARITY_PERIOD = 5.0
CATALOG_PERIOD = 2.0
DEPLOYMENT_PERIOD = 1.0
SUBSTEP_TIMEOUT = 30.0
CHANGE_RETRY, CHANGE_RETRY_MAX = 2.0, 60.0  # seconds before a failed change is tried again (doubling)


@dataclass
class FailedChange:
    """A deployment change that failed: what, why, how often in a row, and when it is tried again."""

    what: str
    why: str
    attempts: int
    at: float = field(default_factory=time.monotonic)

    @property
    def pause(self) -> float:
        return float(min(CHANGE_RETRY * 2 ** (self.attempts - 1), CHANGE_RETRY_MAX))

    @property
    def retry_at(self) -> float:
        return self.at + self.pause

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "why": self.why,
            "attempts": self.attempts,
            "retry_in_seconds": round(max(self.retry_at - time.monotonic(), 0.0), 1),
        }


class Supervisor:
    """The control loop over the actors (`system.core.health.Actors`: Ray in production, a fake
    in tests). A step never waits long: every call has a timeout, and only the health check
    calls an actor that is down (a hung shard must not stall popularity for everyone else)."""

    def __init__(
        self,
        settings: Settings,
        actors: Fleet,
        catalog_store: CatalogStore,
        state_store: StateStore,
        js: JetStreamContext,
        slot_map: SlotMap,
        **extra: Any,
    ) -> None:
        self.settings = settings
        self.actors = actors
        self.slot_owners: list[int] = slot_map.owners.tolist()  # pushed to the API hosts
        self.change: Progress | None = None  # a re-shard or rolling restart under way
        self.changes_done = 0
        self.failed: FailedChange | None = None  # the last change that failed, until one is done
        self._changing: asyncio.Task[None] | None = None
        self.catalog_store = catalog_store
        self.state_store = state_store
        self.js = js
        self.health = HealthMonitor(actors, settings.shards, settings.api_workers)
        self.extra = extra  # shown in the API's status (the Ray dashboard's address)
        self.told_version: int | None = None  # the catalog version the actors were last told about
        self.stream_last_seq = 0
        self.retention_lost = 0  # events retention trimmed before a checkpoint held them
        self.step_seconds = 0.0
        self.steps = 0
        self.substep_failures: Counter[str] = Counter()
        self._last_run: dict[str, float] = {}

    @property
    def shard_keys(self) -> list[str]:
        """The shards that are up and answering (as the last health check found them)."""
        return [w.key for w in self.health.shards if w.answering]

    @property
    def api_keys(self) -> list[str]:
        """The API hosts that are up and answering."""
        return [w.key for w in self.health.apis if w.answering]

    async def step(self) -> None:
        """One round of each loop of `run`, the watch's around the upkeep's (what tests drive)."""
        await self._substep("health", self.health.check)
        await self.upkeep()
        await self._substep("push_health", self.push_health)
        self.steps += 1

    async def watch(self) -> None:
        """One round of health: every actor checked, and what was found told to the API hosts.
        It never waits for PostgreSQL: with the database down, a hung shard is still found and
        `mabrec status` still current (each of the upkeep's reads waits out the pool's timeout)."""
        began = time.monotonic()
        await self._substep("health", self.health.check)
        await self._substep("push_health", self.push_health)
        self.step_seconds = time.monotonic() - began
        self.steps += 1

    async def upkeep(self) -> None:
        """One round of what reads PostgreSQL or the stream: the log's reach, a new catalog, the
        popularity, the deployment asked for."""
        await self._substep("stream", self.watch_stream)
        if self._due("catalog", CATALOG_PERIOD):
            await self._substep("catalog", self.watch_catalog)
        if self._due("popularity", POPULARITY_PERIOD):
            await self._substep("popularity", self.share_popularity)
        if self._due("deployment", DEPLOYMENT_PERIOD):
            await self._substep("deployment", self.reconcile)

    async def run(self) -> None:
        """Both loops forever (until cancelled): often while actors come up, then every second."""
        await asyncio.gather(self._every(self.watch), self._every(self.upkeep))

    async def _every(self, round_: Callable[[], Awaitable[None]]) -> None:
        while True:
            await round_()
            period = STEP_PERIOD if self.health.all_up else STARTING_PERIOD
            await asyncio.sleep(period * random.uniform(0.8, 1.2))  # jitter: no lockstep with other loops

    def _due(self, name: str, period: float) -> bool:
        now = time.monotonic()
        if now - self._last_run.get(name, -period) < period:
            return False
        self._last_run[name] = now
        return True

    async def _substep(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        try:
            await asyncio.wait_for(job(), SUBSTEP_TIMEOUT)
        except Exception:  # noqa: BLE001 - logged with its name; the loop must never die
            self.substep_failures[name] += 1
            log.exception("control loop step failed", extra={"step": name})

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.health.snapshot(),
            **self.extra,
            "stream_last_seq": self.stream_last_seq,
            "slot_owners": self.slot_owners,
            "change": self.change.as_dict() if self.change else None,
            "changes_done": self.changes_done,
            "change_failed": self.failed.as_dict() if self.failed else None,
            "retention_lost": self.retention_lost,
            "control_loop": {
                "steps": self.steps,
                "step_seconds": round(self.step_seconds, 4),
                "failures": dict(self.substep_failures),
            },
        }

    async def push_health(self) -> None:
        snapshot = self.snapshot()
        await gather_logged(
            {key: self.actors.call(key, "set_health", snapshot, timeout=5) for key in self.api_keys}, "pushing health"
        )

    async def watch_stream(self) -> None:
        """How far the event log goes, and whether it still reaches back to every checkpoint:
        retention that trimmed events no checkpoint holds yet has lost them (say so, loudly)."""
        state = (await self.js.stream_info(self.settings.stream)).state
        self.stream_last_seq = state.last_seq
        oldest = await self.state_store.oldest_checkpoint()
        lost = state.first_seq - 1 - oldest if state.messages else 0
        if lost > 0 and lost != self.retention_lost:
            log.error(
                "the event log no longer reaches the oldest checkpoint: events were lost to retention",
                extra={"first_seq": state.first_seq, "oldest_checkpoint": oldest, "lost": lost},
            )
        self.retention_lost = max(lost, 0)

    async def watch_catalog(self) -> None:
        """Tell every actor about a new catalog version. Each reloads only if its catalog is not
        that version (cheap when it is), so the first round also fixes actors that outlived a
        supervisor during a catalog load."""
        version = await self.catalog_store.version()
        if version == self.told_version:
            return
        log.info("catalog changed: telling the actors", extra={"version": version})
        calls = {key: self.actors.call(key, "reload_catalog", timeout=30) for key in self.shard_keys + self.api_keys}
        if self.health.router.up:
            calls[ROUTER] = self.actors.call(ROUTER, "reload", timeout=30)
        done = await gather_logged(calls, "reloading the catalog")
        if len(done) == len(self.health.watched):  # every actor up and told; else again next time
            self.told_version = version

    async def share_popularity(self) -> None:
        """Send every shard and API host all users' popularity, as the checkpoints have summed it
        in PostgreSQL: they rank with the whole population's evidence, not just their users'."""
        popularity = await self.state_store.popularity()
        keys, clicks, seen = popularity.keys, popularity.clicks, popularity.impressions
        await gather_logged(
            {
                key: self.actors.call(key, "set_popularity", keys, clicks, seen, timeout=5)
                for key in self.shard_keys + self.api_keys
            },
            "sharing popularity",
        )

    async def reconcile(self) -> None:
        """Make the deployment what it should be: the number of shards `mabrec scale` asked
        for, a rolling restart `mabrec restart --rolling` asked for. One change at a time, in a
        task of its own: the control loop goes on meanwhile (health checks above all). What is
        done is read from PostgreSQL each time (the slot map, routing paused or not) and from
        the shard actors watched, never assumed: a change that failed half-way (it leaves every
        slot served, see system/resharding.py) is tried again, after a pause that doubles with
        each failure, until it is done or an operator cancels it (`mabrec scale --cancel`)."""
        if self._changing is not None and not self._changing.done():
            return
        if self.failed is not None and time.monotonic() < self.failed.retry_at:
            return
        wanted = await self.state_store.deployment()
        layout = await self.state_store.slot_map()
        shards = len(self.health.shards)
        if wanted.routing_paused:  # paused, and no change of ours under way: a supervisor died in one
            what, change = "finishing an interrupted move", self._finish_interrupted_move()
        elif wanted.desired_shards and (
            wanted.desired_shards != shards or moves(layout, rebalanced(layout, wanted.desired_shards))
        ):
            what = f"re-shard {layout.shards} -> {wanted.desired_shards}"
            change = self._scale(wanted.desired_shards, what)
        elif wanted.restart_requested > wanted.restart_done:
            what, change = (
                f"rolling restart #{wanted.restart_requested}",
                self._rolling_restart(shards, wanted.restart_requested),
            )
        else:
            self.failed = None  # nothing left to do (done, or cancelled)
            return
        self._changing = start_task(self._attempt(what, change), "deployment change", forever=False)

    async def _attempt(self, what: str, change: Awaitable[None]) -> None:
        """Run a change; if it fails, say so (`mabrec status`) and when it is tried again."""
        try:
            await change
        except Exception as exc:  # noqa: BLE001 - said in the status and the log; tried again later
            attempts = self.failed.attempts + 1 if self.failed and self.failed.what == what else 1
            self.failed = FailedChange(what, repr(exc), attempts)
            log.error(
                "deployment change failed; it is tried again",
                extra={"change": what, "error": repr(exc), "attempts": attempts, "retry_in_s": self.failed.pause},
            )
        else:
            self.failed = None

    async def _scale(self, wanted: int, what: str) -> None:
        """To `wanted` shards, from wherever an earlier attempt left it: new shard actors first
        (with no slot), slots moved to balance them, then the emptied actors retired."""
        shards = len(self.health.shards)
        self.change = Progress(what)
        try:
            if wanted > shards:
                for shard in range(shards, wanted):
                    self.actors.spawn_shard(shard)
                self.health.resize(wanted)
                await self._wait_up(range(shards, wanted))
            current = await self.state_store.slot_map()
            await move(
                self.actors, self.state_store, current, rebalanced(current, wanted), max(shards, wanted),
                self.change, self._publish_map,
            )  # fmt: skip
            if wanted < shards:  # emptied: retire them
                retiring = [shard_key(s) for s in range(wanted, shards)]
                await gather_logged({key: self.actors.call(key, "stop", timeout=60) for key in retiring}, "retiring")
                for key in retiring:
                    self.actors.remove(key)
                self.health.resize(wanted)
            log.info("re-shard done", extra={"to": wanted, **self.change.as_dict()})
            self.changes_done += 1
        finally:
            self.change = None

    async def _rolling_restart(self, shards: int, request: int) -> None:
        """Each shard in turn: its slots go to the others, its actor is replaced (new code, new
        process), and its slots come back: no request finds its shard down."""
        self.change = Progress(f"rolling restart of {shards} shards")
        try:
            for shard in range(shards):
                current = await self.state_store.slot_map()
                if shards > 1:
                    await move(
                        self.actors, self.state_store, current, evacuated(current, shard), shards,
                        self.change, self._publish_map,
                    )  # fmt: skip
                old = self.health.shards[shard].status.get("started")
                self.actors.restart(shard_key(shard))
                self.health.starting(self.health.shards[shard])
                await self._wait_up([shard], replacing=old)
                if shards > 1:
                    await move(
                        self.actors, self.state_store, await self.state_store.slot_map(), current, shards,
                        self.change, self._publish_map,
                    )  # fmt: skip
            await self.state_store.restart_finished(request)
            log.info("rolling restart done", extra=self.change.as_dict())
            self.changes_done += 1
        finally:
            self.change = None

    async def _finish_interrupted_move(self) -> None:
        """Every shard owns exactly what the map says (releasing or taking what the interrupted
        move left half done), then routing resumes."""
        self.change = Progress("finishing an interrupted move")
        try:
            await self._wait_up(range(len(self.health.shards)))
            keys = [w.key for w in self.health.shards]
            done = await gather_logged({key: self.actors.call(key, "resync", timeout=120) for key in keys}, "resync")
            if len(done) != len(keys):
                raise Unavailable("some shards could not take the slots the map gives them; trying again")
            self.slot_owners = (await self.state_store.slot_map()).owners.tolist()
            await self.state_store.pause_routing(False)
            await self.actors.call(ROUTER, "resume", timeout=10)
            log.warning("an interrupted move is finished: routing resumed")
        finally:
            self.change = None

    async def _wait_up(self, shards: Iterable[int], replacing: float | None = None, timeout: float = 120) -> None:
        """Until these shards are restored and serving (by a new incarnation, when replacing one:
        `replacing` is when the old one started)."""
        deadline = time.monotonic() + timeout
        watched = [self.health.shards[s] for s in shards]
        while not all(w.up and w.status.get("started") != replacing for w in watched):
            if time.monotonic() > deadline:
                raise Unavailable(f"shards {[w.key for w in watched]} were not up within {timeout} s")
            await asyncio.sleep(0.1)
            await self.health.check()

    async def _publish_map(self, slot_map: SlotMap) -> None:
        """Slots changed hands: the API hosts route by the new map from now on."""
        self.slot_owners = slot_map.owners.tolist()
        await self.push_health()

    async def stop_actors(self) -> None:
        """Graceful: the API stops taking requests and flushes its events, the router stops,
        every shard takes its final checkpoint (each one asked, up or not)."""
        apis = {w.key: self.actors.call(w.key, "stop", timeout=15) for w in self.health.apis}
        await gather_logged(apis, "stopping the API")
        await gather_logged({ROUTER: self.actors.call(ROUTER, "stop", timeout=10)}, "stopping the router")
        shards = {w.key: self.actors.call(w.key, "stop", timeout=60) for w in self.health.shards}
        await gather_logged(shards, "final checkpoint")


async def prepare_database(settings: Settings) -> None:
    """Migrations, then the default (or configured) catalog on first start."""
    await migrate(settings.database_url or "")
    async with short_lived_pool(settings.database_url or "", "supervisor") as pool:
        store = CatalogStore(pool)
        if await store.version() == 0:
            path = settings.catalog_file or SHIPPED
            result = await load_file(store, path)
            log.info("catalog loaded", extra={"file": str(path), "movies": result.movies, "facets": result.facets})


STOP_GRACE = 10.0  # for final checkpoints and drains; past it (or at a second signal) the actors are killed
STOP_DEADLINE = 30.0  # from the first signal to the process's exit, whatever hangs


async def up(settings: Settings) -> int:
    """Run the whole system until SIGINT/SIGTERM. The first signal stops it gracefully (final
    checkpoints) within STOP_DEADLINE whatever hangs; a second one skips the grace; a signal
    while starting stops the start."""
    os.environ.update(ray_env(settings))  # Ray reads these when it is imported
    # The actors' log lines come with a prefix naming the actor: colored on a terminal only.
    os.environ.setdefault("RAY_COLOR_PREFIX", "1" if sys.stderr.isatty() else "0")
    previous = Runtime.load(settings.state_dir)
    if previous and previous.supervisor_pid != os.getpid() and pid_alive(previous.supervisor_pid):
        log.error("another supervisor runs from this state directory", extra={"pid": previous.supervisor_pid})
        print(
            f"mabrec up: mabrec is already running from {settings.state_dir} (pid {previous.supervisor_pid},"
            f" API at {previous.api_url}). Use that one, stop it first (Ctrl-C in its terminal, or"
            f" kill -INT {previous.supervisor_pid}), or start another with its own MABREC_STATE_DIR and MABREC_PORT.",
            file=sys.stderr,
            flush=True,
        )
        return 1
    held_by_us = previous is not None and urlsplit(previous.api_url).port == settings.port  # actors left running
    if settings.port and not held_by_us and port_taken(settings.host, settings.port):
        return _port_in_use(PortInUse.of(settings.host, settings.port))  # at once, before any server starts
    run = Run(settings, asyncio.current_task(), previous)
    loop = asyncio.get_running_loop()

    def handle_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, run.signalled, sig)

    handle_signals()
    try:
        return await run.main(handle_signals)
    except asyncio.CancelledError:
        if not run.stopping.is_set():
            raise
        log.info("stopped while starting")
        return 0
    except PortInUse as exc:
        return _port_in_use(exc)


class PortInUse(Exception):
    @classmethod
    def of(cls, host: str, port: int) -> PortInUse:
        return cls(
            f"port {port} on {host} is in use by another process: stop it, or set MABREC_PORT to a free port "
            "(0: any free port)"
        )


def _port_in_use(exc: PortInUse) -> int:
    log.error(str(exc))
    print(f"mabrec up: {exc}", file=sys.stderr, flush=True)
    return 1


class Run:
    """One `mabrec up`: its start, its serving, and its stop, with the signals that end them."""

    def __init__(self, settings: Settings, task: asyncio.Task[Any] | None, previous: Runtime | None) -> None:
        self.settings = settings
        self.task = task
        self.previous = previous  # the runtime file of the last `mabrec up` from this state dir, if any
        self.infra = Infrastructure(settings)
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self.serving = False  # up and serving: from then on, a signal stops rather than cancels

    def signalled(self, sig: int) -> None:
        if self.stopping.is_set():
            log.warning("second signal: stopping now, without waiting for final checkpoints")
            self.hurry.set()
            return
        self.stop(signal.Signals(sig).name)

    def stop(self, why: str) -> None:
        """Stop (once), within STOP_DEADLINE."""
        if self.stopping.is_set():
            return
        log.info("stopping", extra={"why": why, "deadline_s": STOP_DEADLINE})
        self.stopping.set()
        self._watchdog().start()
        if not self.serving and self.task is not None:
            self.task.cancel()  # still starting: stop where it is (what it started is stopped below)

    def _watchdog(self) -> threading.Timer:
        """The bound on a stop, whatever hangs (an actor call, a drain, a task that will not be
        cancelled): kill what this process started, by PID, and exit."""
        state_dir = self.settings.state_dir

        def expire() -> None:
            log.error("the stop took longer than its deadline: killing what is left", extra={"s": STOP_DEADLINE})
            self.infra.stop(timeout=2)
            stop_children(2)
            Runtime.remove(state_dir)
            logging.shutdown()
            os._exit(1)

        timer = threading.Timer(STOP_DEADLINE, expire)
        timer.daemon = True
        return timer

    async def main(self, handle_signals: Callable[[], None]) -> int:
        from actors import ray_api  # Ray is imported only by the commands that use it

        began = time.monotonic()
        settings = self.settings
        configured_token = settings.admin_token is not None
        # In a thread (it waits for servers to listen); if a signal cancels the start meanwhile,
        # the servers it started are stopped once it returns.
        bringing_up = asyncio.ensure_future(asyncio.to_thread(self.infra.bring_up))
        try:
            await asyncio.shield(bringing_up)
        except asyncio.CancelledError:
            try:
                await bringing_up
            except Exception as exc:  # noqa: BLE001 - stopping anyway; it stopped what it had started
                log.warning("starting the servers failed while the start was cancelled", extra={"error": repr(exc)})
            self.infra.stop()
            raise
        infra = self.infra
        settings = admin_token.ensure(infra.settings)
        control: asyncio.Task[None] | None = None
        try:
            await prepare_database(settings)
            pool = await open_pool(settings.database_url or "", name="supervisor")
            nc = await stream.connect(settings.nats_url or "", f"{settings.namespace}-supervisor")
            js = nc.jetstream()
            await stream.ensure_streams(js, settings)
            info = await js.stream_info(settings.stream)
            assert info.created is not None  # JetStream reports it for every stream
            state_store, catalog_store = StateStore(pool), CatalogStore(pool)
            await state_store.check_event_log(settings.stream, info.created, info.state.last_seq)
            # On the main thread, as Ray wants; the actors' logs join the supervisor's.
            dashboard = ray_api.connect(settings, settings.ray_address or "", actor_logs=True)
            handle_signals()  # ray.init installed its own SIGTERM handler: ours must win (checkpoints first)
            await ray_api.wait_for_nodes(settings.min_nodes, timeout=120)
            wanted = (await state_store.deployment()).desired_shards
            if not settings.shards_given:  # as `mabrec scale` (or the first start) left it, else one per CPU
                settings = dataclasses.replace(settings, shards=wanted or default_shards(ray_api.cluster_cpus()))
            slot_map = await state_store.ensure_slot_map(settings.shards)
            cluster = ray_api.Cluster(settings)
            if slot_map.shards != settings.shards:
                slot_map = await reshard_offline(cluster, state_store, slot_map, settings.shards)
            previous = self.previous
            port = settings.port or (urlsplit(previous.api_url).port if previous else None) or free_port()
            if not cluster.exists(api_key(0)) and port_taken(settings.host, port):  # (ours, left running: fine)
                raise PortInUse.of(settings.host, port)
            cluster.spawn(settings.shards, settings.api_workers, port)
            supervisor = Supervisor(
                settings, cluster, catalog_store, state_store, js, slot_map,
                ray_dashboard=infra.dashboard_url or dashboard,
            )  # fmt: skip

            def died(exc: BaseException | None) -> None:
                log.error("the control loop died: stopping")
                self.stop("the control loop died")

            control = start_task(supervisor.run(), "control loop", died)
            while not supervisor.health.all_up and not self.stopping.is_set():
                await asyncio.sleep(0.05)
            self.serving = True
            api_port = next((a.status.get("port") for a in supervisor.health.apis if a.status.get("port")), port)
            api_url = f"http://{settings.host}:{api_port}"
            metrics_url = infra.metrics_url or ray_api.metrics_url()  # Ray's metrics export here: mabrec's figures too
            Runtime(
                supervisor_pid=os.getpid(),
                api_url=api_url,
                database_url=settings.database_url or "",
                nats_url=settings.nats_url or "",
                ray_address=settings.ray_address or "",
                namespace=settings.namespace,
                dashboard_url=supervisor.extra["ray_dashboard"],
                services=infra.services,
                metrics_url=metrics_url,
            ).save(settings.state_dir)
            if not self.stopping.is_set():
                log.info(
                    "mabrec is ready",
                    extra={"api": api_url, "shards": settings.shards, "seconds": round(time.monotonic() - began, 2)},
                )
                dashboard_note = supervisor.extra["ray_dashboard"] or "off"
                if infra.dashboard_url:  # the local Ray we started: its dashboard asks for the token
                    dashboard_note += f" (token in {ray_token(settings.state_dir)})"
                admin_note = "" if configured_token else f"  admin token in {settings.state_dir / admin_token.FILE}"
                print(
                    f"mabrec is up: API {api_url}  docs {api_url}/docs  demo {api_url}/demo"
                    f"  Ray dashboard {dashboard_note}  metrics {api_url}/metrics and {metrics_url or '(Ray metrics off)'}"
                    f" (Prometheus text; for the dashboard's Metrics tab see the README's Observability){admin_note}",
                    file=sys.stderr,
                    flush=True,
                )
            await self.stopping.wait()
            await self._stop(supervisor, control)
            cluster.kill_all()
            await _bounded(nc.drain(), "draining NATS")
            await _bounded(pool.close(), "closing the PostgreSQL pool")
            return 0
        except (asyncio.CancelledError, PortInUse):
            raise  # a signal while starting, a port taken: said by the caller
        except BaseException:
            log.exception("mabrec up failed; stopping what it started")
            raise
        finally:
            if control is not None:
                control.cancel()
            ray_api.disconnect()  # before Ray's servers stop, or the driver waits on them
            Runtime.remove(settings.state_dir)
            infra.stop()  # blocking on purpose: the loop may be going down, the servers must not stay up

    async def _stop(self, supervisor: Supervisor, control: asyncio.Task[None]) -> None:
        """The graceful part: the control loop and any change under way stop (a move stops
        cleanly, routing unpaused), then the actors (final checkpoints). At most STOP_GRACE
        seconds, or until a second signal: then the actors are killed as they are."""
        log.info("shutting down")

        async def graceful() -> None:
            await cancel_and_wait(control)
            await cancel_and_wait(supervisor._changing)
            await supervisor.stop_actors()

        stopping = asyncio.ensure_future(graceful())
        hurried = asyncio.ensure_future(self.hurry.wait())
        await asyncio.wait([stopping, hurried], timeout=STOP_GRACE, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not stopping.done():
            log.error("the graceful stop did not finish: killing the actors", extra={"grace_s": STOP_GRACE})
            stopping.cancel()  # not waited for: the watchdog bounds whatever it still does
        elif exc := stopping.exception():
            log.error("the graceful stop failed: killing the actors", exc_info=exc)


async def _bounded(job: Awaitable[None], what: str, seconds: float = 5.0) -> None:
    try:
        await asyncio.wait_for(job, seconds)
    except Exception as exc:  # noqa: BLE001 - stopping anyway; said, and not waited for longer
        log.warning(f"{what} failed while stopping", extra={"error": repr(exc)})


async def reshard_offline(cluster: Any, store: StateStore, old: SlotMap, shards: int) -> SlotMap:
    """A changed shard count at start: stop the actors of the old layout if they still run
    (final checkpoints), then assign the slots evenly. Users move with their slots, and each
    slot keeps its checkpoint position, so nothing is lost or applied twice."""
    log.info("re-sharding", extra={"from": old.shards, "to": shards})
    running = [
        key
        for key in [ROUTER, *(api_key(a) for a in range(64)), *(shard_key(s) for s in range(old.shards))]
        if cluster.exists(key)
    ]
    await gather_logged({key: cluster.call(key, "stop", timeout=60) for key in running}, "stopping the old layout")
    cluster.kill_all()
    new = SlotMap.even(shards)
    await store.assign_slots(new)
    return new
