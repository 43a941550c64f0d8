"""Many hosts: joining a run through ``jax.distributed`` (gloo collectives on CPU).

Every process of a multi-host fit runs the same program on its own devices; placed
arrays span all of them (:mod:`hbjax.parallel.blocks`). Call :func:`initialize_distributed`
before any other JAX work.
"""

from __future__ import annotations

import dataclasses
import socket
import time

import jax

from .blocks import ShardingError


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where to find the other processes of a multi-host run.

    Attributes:
        coordinator: ``HOST:PORT`` of process 0's coordinator service.
        num_processes: number of processes.
        process_id: this process, ``0 <= process_id < num_processes``.
        timeout_seconds: how long to wait for the others before giving up.
    """

    coordinator: str
    num_processes: int
    process_id: int
    timeout_seconds: int = 60

    @classmethod
    def from_flags(
        cls,
        coordinator: str | None,
        num_processes: int | None,
        process_id: int | None,
        timeout_seconds: int = 60,
    ) -> DistributedConfig | None:
        """From command-line flags: ``None`` when none is given.

        Raises:
            ShardingError: some of the three are given, not all (named).
        """
        given = (coordinator, num_processes, process_id)
        if all(v is None for v in given):
            return None
        if any(v is None for v in given):
            raise ShardingError(
                "a multi-host run needs all of --coordinator HOST:PORT, --num-processes N and "
                "--process-id I."
            )
        return cls(coordinator, num_processes, process_id, timeout_seconds=timeout_seconds)


def _check_port_free(host: str, port: int) -> None:
    """Process 0 will serve on ``host:port``: refuse early when it cannot."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ShardingError(
            f"process 0 cannot serve the coordinator on {host}:{port} ({exc.strerror}); "
            "choose a free port."
        ) from None


def _wait_for_coordinator(host: str, port: int, deadline: float, config: DistributedConfig) -> None:
    """Wait (bounded) until process 0's coordinator accepts connections."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ShardingError(
                    f"no coordinator answered at {host}:{port} within "
                    f"{config.timeout_seconds} s (process {config.process_id} of "
                    f"{config.num_processes}); start process 0 with the same --coordinator, "
                    "or raise --timeout."
                ) from None
            time.sleep(0.2)


def initialize_distributed(config: DistributedConfig) -> None:
    """Join a multi-host run through ``jax.distributed`` (gloo collectives on CPU).

    Must be called before any other JAX work in the process.

    Raises:
        ShardingError: a bad address or process id, or a coordinator that cannot be
            reached within ``timeout_seconds``.
    """
    host, _, port = config.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ShardingError(
            f"coordinator must be HOST:PORT (e.g. 127.0.0.1:9876); got {config.coordinator!r}."
        )
    if config.num_processes < 1:
        raise ShardingError(f"num-processes must be >= 1; got {config.num_processes}.")
    if not 0 <= config.process_id < config.num_processes:
        raise ShardingError(
            f"process-id must be in [0, {config.num_processes - 1}]; got {config.process_id}."
        )
    deadline = time.monotonic() + config.timeout_seconds
    if config.process_id == 0:
        _check_port_free(host, int(port))
    else:  # JAX aborts the process (no exception) if the coordinator never answers
        _wait_for_coordinator(host, int(port), deadline, config)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            config.coordinator,
            num_processes=config.num_processes,
            process_id=config.process_id,
            initialization_timeout=config.timeout_seconds,
        )
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the user's setup
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShardingError(
            f"could not join the run at {config.coordinator} as process {config.process_id} "
            f"of {config.num_processes} within {config.timeout_seconds} s ({first[:200]}); "
            "check that every process uses the same coordinator and that process 0 is running."
        ) from None


__all__ = ["DistributedConfig", "initialize_distributed"]
