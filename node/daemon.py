"""``eidetica-node run``: the node process.

Opens the data directory (which locks it: one node per directory), enables sync,
registers the configured transports (each wrapped to count traffic), starts listening,
serves the control API on the data directory's unix socket (and, if asked, health and
metrics on TCP), and runs until SIGINT or SIGTERM. Stopping flushes sync (bounded, so a
container's stop timeout is met) and closes the transports and storage in that order.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import trio

from dag import DataDirLockedError, Instance, SigningKey
from sync import SyncConfig, Transport, enable_sync
from sync.transport import TaskStatus
from transports.hostport import join_host_port, parse_host_port

from . import runtime
from .api import InfoResult
from .config import NodeConfig
from .control import serve_control, serve_metrics, tcp_socket
from .errors import AlreadyRunningError, ConfigError
from .metrics import CountingTransport, Metrics, counting
from .netaddr import is_wildcard_host, local_ipv4_addresses
from .service import NodeService

log = logging.getLogger(__name__)

# Docker and systemd wait 10 s after SIGTERM before killing: flush for less than that.
SHUTDOWN_FLUSH_S = 8.0
STOP_GRACE_S = 0.1


def open_instance(config: NodeConfig) -> Instance:
    try:
        instance = Instance.open(config.data_dir)
    except DataDirLockedError:
        raise AlreadyRunningError(config.data_dir) from None
    workers = config.signature_process_count()
    if workers:
        try:
            instance.use_signature_processes(workers)
        except Exception as exc:  # slower, not broken: threads check the signatures instead
            log.warning("cannot start signature worker processes (%s); checking signatures on threads", exc)
    return instance


def _libp2p(config: NodeConfig, key: SigningKey) -> Transport:
    from transports.addresses import AnnounceError
    from transports.libp2p import Libp2pTransport

    try:
        return Libp2pTransport(
            key,
            listen=list(config.p2p_listen),
            relays=list(config.relays),
            relay_service=config.relay_service,
            hole_punching=config.hole_punching,
            announce=config.announce,
        )
    except AnnounceError as exc:
        raise ConfigError(f"--announce: {exc}") from None
    except (ValueError, TypeError) as exc:  # multiaddr parse errors are ValueError subclasses
        raise ConfigError(f"bad --p2p-listen address in {', '.join(config.p2p_listen)}: {exc}") from None


def _http(config: NodeConfig) -> Transport:
    from transports.http import HttpTransport

    try:
        host, port = parse_host_port(config.http_bind)
    except ValueError:
        raise ConfigError(f"--http-bind must be host:port, not {config.http_bind!r}") from None
    advertise = list(config.http_advertise) or None
    if advertise is None and is_wildcard_host(host) and port != 0:
        advertise = [f"{ip}:{port}" for ip in local_ipv4_addresses()]
    try:
        return HttpTransport(bind=config.http_bind, advertise=advertise)
    except ValueError as exc:
        raise ConfigError(f"bad --http-advertise address: {exc}") from None


def build_transports(config: NodeConfig, instance: Instance, metrics: Metrics) -> dict[str, CountingTransport]:
    """The enabled transports, by the name their addresses carry (``p2p:...``, ``http:...``)."""
    transports: dict[str, CountingTransport] = {}
    if config.p2p:
        transports["p2p"] = counting("p2p", _libp2p(config, instance.device_key), metrics)
    if config.http:
        transports["http"] = counting("http", _http(config), metrics)
    return transports


async def _stop_on_signal(service: NodeService) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: flushing sync and stopping", signal.Signals(signum).name)
            service.request_stop()
            return


async def run_node(
    config: NodeConfig,
    *,
    on_ready: Callable[[InfoResult], None] | None = None,
    handle_signals: bool = True,
    settle_heap: bool = False,
    task_status: TaskStatus[NodeService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the node until SIGINT/SIGTERM (if ``handle_signals``) or the ``stop`` command.

    Stopping leaves the sync block normally, so the engine is still running while it
    flushes; cancelling this task from outside stops at once, without that flush.
    ``settle_heap`` applies :func:`node.runtime.settle_heap` once listening: for a
    process that is nothing but this node.
    """
    instance = open_instance(config)
    try:
        metrics = Metrics()
        transports = build_transports(config, instance, metrics)
        metrics_sock = tcp_socket(config.metrics_bind) if config.metrics_bind else None
        sync_config = SyncConfig(display_name=config.name, flush_timeout_s=SHUTDOWN_FLUSH_S)
        try:
            async with enable_sync(instance, config=sync_config) as sync:
                service = NodeService(instance, sync, config, metrics, transports)
                for name, transport in transports.items():
                    sync.register_transport(name, transport)
                await sync.accept_connections()
                if settle_heap:
                    runtime.settle_heap()
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve_control, service, config.control_socket)
                    if metrics_sock is not None:
                        host, port = metrics_sock.getsockname()[:2]
                        service.metrics_address = join_host_port(host, port)
                        await nursery.start(serve_metrics, service, metrics_sock)
                        metrics_sock = None  # serve_metrics owns it now
                    if on_ready is not None:
                        on_ready(await service.info())
                    log.info("node %s ready on %s", instance.device_id, ", ".join(service.addresses()) or "no address")
                    task_status.started(service)
                    if handle_signals:
                        nursery.start_soon(_stop_on_signal, service)
                    await service.stopping.wait()
                    await trio.sleep(STOP_GRACE_S)  # the stop command's own answer goes out first
                    nursery.cancel_scope.cancel()
        finally:
            if metrics_sock is not None:
                metrics_sock.close()
    finally:
        instance.close()
    log.info("node stopped")


__all__ = ["SHUTDOWN_FLUSH_S", "build_transports", "run_node"]
