"""Where the services are: the configured URLs, or embedded servers under the state directory.

`Infrastructure.start` resolves DATABASE_URL, NATS_URL and RAY_ADDRESS. Each one that is unset
is served by an embedded server: adopted from the runtime file if a previous supervisor left it
running (it crashed), started otherwise. `stop` stops what this supervisor owns, by PID.
"""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import psycopg
from psycopg import sql

from system.core import access
from system.core.settings import Settings
from system.local import servers
from system.local.processes import pid_alive, stop_pids
from system.local.runtime import Runtime, Service
from system.local.secret_files import redacted

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "mabrec"
STOP_SECONDS = 10.0  # for the embedded servers to stop, together, before they are killed


@dataclass
class Infrastructure:
    settings: Settings  # with database_url, nats_url and ray_address filled in
    services: list[Service] = field(default_factory=list)
    dashboard_url: str | None = None
    metrics_url: str | None = None  # the local Ray's metrics export, if this started (or adopted) it

    @classmethod
    def start(cls, settings: Settings, *, with_ray: bool = True) -> Infrastructure:
        """Blocking (it waits for servers to listen): run it in a thread from async code."""
        infra = cls(settings)
        infra.bring_up(with_ray=with_ray)
        return infra

    def bring_up(self, *, with_ray: bool = True) -> None:
        """Start (or adopt) the servers: `services` lists each as soon as it runs, so a stop
        from another thread meanwhile finds them. Stops what it started if it fails."""
        settings = self.settings
        previous = Runtime.load(settings.state_dir)
        try:
            if not settings.database_url:
                pg = self._adopt_or_start(previous, "postgres", lambda: servers.start_postgres(settings.state_dir))
                self.settings = replace(self.settings, database_url=_ensure_database(pg.url, EMBEDDED_DATABASE))
            if not settings.nats_url:
                nats = self._adopt_or_start(previous, "nats", lambda: servers.start_nats(settings.state_dir, settings))
                roles = servers.nats_role_urls(settings.state_dir, nats.url)
                self.settings = replace(
                    self.settings,
                    nats_url=nats.url,
                    nats_api_url=roles[access.API],
                    nats_shard_url=roles[access.SHARD],
                    nats_router_url=roles[access.ROUTER],
                )
            if with_ray and not settings.ray_address:
                dashboard = previous.dashboard_url if previous else None
                metrics = previous.metrics_url if previous else None

                def start_ray() -> Service:
                    nonlocal dashboard, metrics
                    service, dashboard, metrics = servers.start_ray(settings.state_dir, settings.dashboard)
                    return service

                ray = self._adopt_or_start(previous, "ray", start_ray)
                self.settings = replace(self.settings, ray_address=ray.url)
                self.dashboard_url = dashboard
                self.metrics_url = metrics
        except BaseException:
            self.stop()
            raise

    @classmethod
    def for_database(cls, settings: Settings) -> tuple[Settings, Infrastructure | None]:
        """For a command that needs only PostgreSQL: DATABASE_URL, else the running system's,
        else an embedded one started for the command (the returned Infrastructure: stop it)."""
        if settings.database_url:
            return settings, None
        runtime = Runtime.load(settings.state_dir)
        if runtime is not None and pid_alive(runtime.supervisor_pid):
            return replace(settings, database_url=runtime.database_url), None
        infra = cls.start(replace(settings, nats_url="nats://unused"), with_ray=False)
        return infra.settings, infra

    def _adopt_or_start(self, previous: Runtime | None, name: str, start: Callable[[], Service]) -> Service:
        service = previous.service(name) if previous else None
        if service is not None:
            log.info(
                "adopting running embedded server",
                extra={"service": name, "pid": service.pid, "url": redacted(service.url)},
            )
        else:
            service = start()
            log.info(
                "started embedded server", extra={"service": name, "pid": service.pid, "url": redacted(service.url)}
            )
        self.services.append(service)
        return service

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop the embedded servers together, signalled last started first (Ray, NATS, then
        PostgreSQL: each stops cleanly on its own), within `timeout` (then killed)."""
        services, self.services = [s for s in reversed(self.services) if s.owned and s.alive()], []
        for service in services:
            log.info("stopping embedded server", extra={"service": service.name, "pid": service.pid})
        stop_pids([(s.pid, signal.SIGTERM if s.name == "ray" else signal.SIGINT) for s in services], timeout)
        if any(s.name == "ray" for s in services):  # its sockets and session logs, in a private temp dir
            shutil.rmtree(servers.ray_tmpdir(self.settings.state_dir), ignore_errors=True)


def _ensure_database(server_url: str, name: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server_url.rsplit("/", 1)[0] + "/" + name
