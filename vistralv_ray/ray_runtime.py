"""Starting Ray, by one rule for every command that needs it.

`RAY_ADDRESS` (set by `ray job submit`, by the user, or by a command's `--address`) means "use that
cluster". Without it, a command starts its own embedded Ray (`address="local"`), sized by the
command, whatever a `ray start` left behind. A bare `ray.init()` would attach to the cluster named in
Ray's bootstrap address file (`<ray temp dir>/ray_current_cluster`), whether that cluster is still
running or died without `ray stop`, and then refuse the local sizing arguments (`num_cpus`, ...).
"""

from __future__ import annotations

import os

from vistralv_ray.logging import get_logger

log = get_logger(__name__)

ADDRESS_ENV = "RAY_ADDRESS"


def cluster_address() -> str | None:
    """The cluster to use, or None for an embedded local Ray."""
    return os.environ.get(ADDRESS_ENV) or None


def use_cluster(address: str | None) -> None:
    """A command's `--address`: from here on, this process (and what it starts) uses that cluster."""
    if address:
        os.environ[ADDRESS_ENV] = address


def init_ray(*, runtime_env: dict | None = None, log_to_driver: bool = False, what: str = "", **local) -> bool:
    """Join the cluster in RAY_ADDRESS, or start an embedded Ray with the `local` arguments.

    Returns True when this call connected or started Ray, False when Ray was already up in this
    process (the caller then leaves shutting it down to whoever started it).
    """
    import ray

    if ray.is_initialized():
        return False
    address = cluster_address()
    if address:
        log.info("Ray: using the cluster at %s (%s)%s", address, ADDRESS_ENV, f" for {what}" if what else "")
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
        except ConnectionError as e:
            hint = ""
            if "auth" in str(e).lower() and not os.environ.get("RAY_AUTH_MODE"):
                # Ray 2.60 picks up a `ray start` head's token by itself only for a cluster it found alone.
                hint = "; a head started with token authentication also needs RAY_AUTH_MODE=token"
            raise ConnectionError(f"{ADDRESS_ENV}={address}: cannot connect to that Ray cluster{hint}: {e}") from e
        return True
    sizing = ", ".join(f"{k}={v}" for k, v in local.items() if k in ("num_cpus", "num_gpus", "object_store_memory"))
    log.info(
        "Ray: starting an embedded local Ray%s%s; %s is not set, so a cluster started by `ray start` is not used "
        "(set %s or pass --address to use one)",
        f" for {what}" if what else "",
        f" ({sizing})" if sizing else "",
        ADDRESS_ENV,
        ADDRESS_ENV,
    )
    ray.init(address="local", runtime_env=runtime_env, log_to_driver=log_to_driver, **local)
    return True
