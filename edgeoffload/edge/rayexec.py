"""Run stateless tails on a Ray Serve cluster instead of the edge process's thread pool.

Why Ray Serve: one edge process has the cores of one machine. A Ray cluster spreads the tails
over several machines (or many processes of one) with what the edge server would otherwise
have to build itself: replicas placed by CPU and custom resources, autoscaling between bounds,
health checks that replace a dead replica, and request batching on the replica
(``@serve.batch``). The edge server keeps what only it can do: the sockets, Noise, admission,
metrics and the model repository.

What runs where:

* the **edge process** (the Ray *driver*) accepts devices, decodes each request's crossing
  tensors on its event loop and awaits :meth:`RayTailExecutor.run`, which calls the version's
  deployment handle;
* a **Ray Serve application** per hosted bundle version (``edgeoffload-<version>``) holds
  replicas (:class:`TailReplica`), each with one onnxruntime session of the tail, on any node
  of the cluster. The tail's bytes travel as the deployment's init arguments (through Ray's
  object store), so a remote node needs edgeoffload and onnxruntime installed but no shared
  filesystem and no copy of the bundle;
* a request whose replica dies (its node removed, the actor killed) is sent again, a bounded
  number of times (:class:`RetryPolicy`), to a surviving replica: a stateless tail is a pure
  function of its inputs, so running it twice is harmless. Then a typed
  :class:`~edgeoffload.errors.ExecutorError`.

Generation sessions (decoder bundles) stay on the local executor in the edge process. A
session's KV cache lives between requests: on Ray it would pin a conversation to one replica
(sticky routing that Serve does not give a handle call), be lost with that replica, and escape
the local :class:`~edgeoffload.edge.sessions.SessionStore` that already bounds the caches of
all sessions together (LRU eviction under ``kv_budget``, TTLs, replay on loss).

Ray is imported only inside functions here: a device install (no ``ray`` extra) imports
:mod:`edgeoffload.edge.server` without it, and asking for this executor without Ray installed
is a :class:`~edgeoffload.errors.MissingExtra` naming ``pip install 'edgeoffload[ray]'``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgeoffload._ort import make_session, run
from edgeoffload.edge.batcher import Arrays, StackedRuns
from edgeoffload.errors import (
    EdgeOffloadError,
    ExecutorError,
    ManifestError,
    MissingExtra,
    UsageError,
)

log = logging.getLogger("edgeoffload.edge.rayexec")

T = TypeVar("T")

APP_PREFIX = "edgeoffload-"
# Ray's exceptions that mean "the replica (or its node, or its worker) went away": the request
# may not have run, or ran and its answer was lost. Names, so that this module imports
# without Ray and the policy is testable without it.
REPLICA_LOST = frozenset(
    {
        "RayActorError",
        "ActorDiedError",
        "ActorUnavailableError",
        "WorkerCrashedError",
        "NodeDiedError",
        "ObjectLostError",
        "OwnerDiedError",
    }
)


def require_ray() -> None:
    """Raise :class:`MissingExtra` (exit code 12) when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise MissingExtra(
            "ray", "ray", what="the Ray Serve tail executor (serve --executor ray)"
        ) from None


# -- pure parts: batching and retries ------------------------------------------------------------


def run_batch(runs: StackedRuns, feeds: Sequence[Arrays]) -> list[Arrays]:
    """Run ``feeds``, one stacked run per compatible group (``serve.batch`` hands a replica
    whatever arrived; the local batcher groups before it runs), answers in ``feeds``' order."""
    groups: dict[Hashable, list[int]] = {}
    for i, feed in enumerate(feeds):
        groups.setdefault(runs.key(feed), []).append(i)
    results: list[Arrays] = [{} for _ in feeds]
    for group in groups.values():
        for i, out in zip(group, runs.run([feeds[i] for i in group]), strict=True):
            results[i] = out
    return results


@dataclass(frozen=True)
class RetryPolicy:
    """How often a request whose replica was lost is sent again, and how long to wait first
    (doubling from ``backoff_s``, at most ``max_backoff_s``): long enough for the router to
    hear that the replica is gone, short beside a device's timeout."""

    attempts: int = 3  # in all, the first one included
    backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def delay(self, failed: int) -> float:
        """Seconds to wait after the ``failed``-th failed attempt (1-based)."""
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** (failed - 1)))


def replica_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica went away (retry) rather than the tail failed."""
    return any(cls.__name__ in REPLICA_LOST for cls in type(exc).__mro__)


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool] = replica_lost,
    what: str = "the request",
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Await ``attempt()`` until it succeeds, at most ``policy.attempts`` times while it fails
    with a ``retryable`` error; other errors pass through at once."""
    for n in range(1, max(1, policy.attempts) + 1):
        try:
            return await attempt()
        except Exception as exc:
            if not retryable(exc):
                raise
            if n >= policy.attempts:
                raise ExecutorError(
                    f"{what} failed {n} time(s): its Ray replica was lost each time "
                    f"({type(exc).__name__})",
                    hint="check the Ray cluster (ray status): nodes or replicas keep dying",
                ) from exc
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(policy.delay(n))
    raise AssertionError("unreachable")  # pragma: no cover


# -- the replica (runs in a Ray worker) ---------------------------------------------------------


class TailReplica:
    """One replica of a version's deployment: an onnxruntime session of the tail.

    A plain class: :meth:`RayTailExecutor.deploy` wraps it with ``serve.deployment`` when it
    deploys, so that importing this module needs no Ray. Each call answers ``(outputs,
    node_id, batch)``: the node and the number of requests in the run that served it, a side
    channel for metrics and tests (which node served, whether requests were batched).
    """

    def __init__(self, model: bytes, threads: int, batch_max: int, batch_wait_s: float) -> None:
        import ray
        from ray import serve

        self.session = make_session(model, threads=threads)
        self.runs = StackedRuns(self.session)
        self.node_id: str = ray.get_runtime_context().get_node_id()
        self.batched = batch_max > 1 and StackedRuns.eligible(self.session)
        self._batch: Callable[[Arrays], Awaitable[tuple[Arrays, int]]] | None = None
        if self.batched:
            # serve.batch queues the calls of this replica and hands them over as one list.
            self._batch = serve.batch(max_batch_size=batch_max, batch_wait_timeout_s=batch_wait_s)(
                self._run_many
            )

    async def __call__(self, feed: Arrays) -> tuple[Arrays, str, int]:
        if self._batch is not None:
            outputs, batch = await self._batch(feed)
            return outputs, self.node_id, batch
        # Off the replica's event loop, so that health checks and new calls are still heard.
        return await asyncio.to_thread(run, self.session, feed), self.node_id, 1

    async def _run_many(self, feeds: list[Arrays]) -> list[tuple[Arrays, int]]:
        results = await asyncio.to_thread(run_batch, self.runs, feeds)
        return [(r, len(feeds)) for r in results]


# -- the executor (runs in the edge process) ----------------------------------------------------


@dataclass(frozen=True)
class RayExecutorConfig:
    """Where and how the tails run on Ray.

    ``replicas`` fixed replicas per version, or autoscaling between ``min_replicas`` and
    ``max_replicas`` when both are set. ``resources`` are custom Ray resources each replica
    needs (e.g. ``{"edge_gpu": 1}``), ``max_replicas_per_node`` spreads replicas over nodes.
    """

    address: str | None = None  # None: start a Ray of our own in this process
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    threads: int = 1  # intra-op threads of each replica's session
    batch_max: int = 0  # @serve.batch's max_batch_size; 0 or 1: no batching
    batch_wait_s: float = 0.002
    max_replicas_per_node: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    deploy_timeout_s: float = 120.0

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment`` (checked here: a UsageError, not Ray's)."""
        if self.cpus_per_replica <= 0:
            raise UsageError("cpus per replica must be > 0 (e.g. --ray-cpus-per-replica 1)")
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica}
        if self.resources:
            actor["resources"] = dict(self.resources)
        options: dict[str, Any] = {
            "ray_actor_options": actor,
            # Room for a full batch (plus one filling) per replica before the router waits.
            "max_ongoing_requests": max(8, 2 * self.batch_max),
            # A lost replica is noticed from its node's death at once; a hung one by this.
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 10.0,
        }
        if self.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        if self.min_replicas is not None and self.max_replicas is not None:
            if not 0 < self.min_replicas <= self.max_replicas:
                raise UsageError(
                    f"autoscaling bounds {self.min_replicas}..{self.max_replicas}: "
                    "need 1 <= min <= max"
                )
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": max(2, self.batch_max),
            }
        else:
            if self.replicas < 1:
                raise UsageError(f"{self.replicas} replicas: need at least 1")
            options["num_replicas"] = self.replicas
        return options


def app_name(version: str) -> str:
    return f"{APP_PREFIX}{version}"


class RayTailExecutor:
    """Stateless tails on Ray Serve, one application per hosted bundle version.

    :meth:`add` and :meth:`remove` are plain calls (the server's bookkeeping is synchronous);
    the deployments they start and delete run in threads, and :meth:`run` waits for its
    version's deployment to be ready. ``served_by`` counts answers by Ray node id,
    ``batch_sizes`` by the number of requests in the run that served them, ``retries`` the
    requests sent again by the error that lost them.
    """

    def __init__(self, config: RayExecutorConfig) -> None:
        require_ray()
        config.deployment_options()  # bad settings fail before anything starts
        self.config = config
        self.served_by: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()  # requests answered, by their run's size
        self.retries: Counter[str] = Counter()  # requests sent again, by Ray's error name
        self._models: dict[str, tuple[Path, str | None]] = {}  # added before start()
        self._deploys: dict[str, asyncio.Task[Any]] = {}  # version -> its handle, when ready
        self._removals: set[asyncio.Task[None]] = set()
        self._started = False
        self._owns_ray = False  # whether stop() shuts down the Ray (and Serve) we started
        self._joined_ray = False  # whether we called ray.init (else the caller owns it)

    async def start(self) -> None:
        """Connect to (or start) Ray and Serve, then deploy the versions added so far."""
        try:
            await asyncio.to_thread(self._connect)
        except Exception as exc:
            where = self.config.address or "a local Ray"
            raise ExecutorError(
                f"cannot start the Ray Serve executor on {where}: {_first_line(exc)}",
                hint="check the address (ray status on the head node), or leave --ray-address "
                "out to start a Ray inside the server",
            ) from exc
        self._started = True
        for version, (path, sha256) in self._models.items():
            self._deploy(version, path, sha256)
        self._models.clear()
        await self.wait_ready()

    def _connect(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
            if self.config.address is None:
                ray.init(include_dashboard=False, **quiet)
                self._owns_ray = True
            else:
                ray.init(address=self.config.address, **quiet)
            self._joined_ray = True
            log.info("ray: %s", "started locally" if self._owns_ray else self.config.address)
        # No HTTP proxy: requests come only through handles from this process.
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})

    def add(self, version: str, tail: Path, sha256: str | None = None) -> None:
        """Deploy a version's tail (its ONNX file here, checked against ``sha256`` when read,
        then shipped to the replicas); it serves once ready."""
        if not self._started:
            self._models[version] = (tail, sha256)
            return
        self._deploy(version, tail, sha256)

    def _deploy(self, version: str, tail: Path, sha256: str | None) -> None:
        task = asyncio.get_running_loop().create_task(
            asyncio.wait_for(
                asyncio.to_thread(self._deploy_blocking, version, tail, sha256),
                self.config.deploy_timeout_s,
            )
        )
        task.add_done_callback(functools.partial(_log_failure, version))
        self._deploys[version] = task

    def _deploy_blocking(self, version: str, tail: Path, sha256: str | None) -> Any:
        from ray import serve

        model = tail.read_bytes()  # in a thread: a tail may be hundreds of MB
        if sha256 is not None and hashlib.sha256(model).hexdigest() != sha256:
            raise ManifestError(f"{tail} changed after its bundle was loaded: not deploying it")
        c = self.config
        deployment = serve.deployment(name="tail", **c.deployment_options())(TailReplica)
        app = deployment.bind(model, c.threads, c.batch_max, c.batch_wait_s)
        handle = serve.run(app, name=app_name(version), route_prefix=None)
        log.info("ray: version %s deployed (%s)", version, app_name(version))
        return handle

    async def wait_ready(self) -> None:
        """Wait until every deployment started so far is ready (raises the first failure)."""
        for version in list(self._deploys):
            await self._handle(version)

    async def _handle(self, version: str) -> Any:
        task = self._deploys.get(version)
        if task is None:
            raise ExecutorError(f"version {version} is not deployed on Ray")
        try:
            return await asyncio.shield(task)
        except asyncio.TimeoutError:
            raise ExecutorError(
                f"version {version} was not ready on Ray after {self.config.deploy_timeout_s} s",
                hint="the cluster may lack the CPUs or resources its replicas ask for (ray status)",
            ) from None
        except EdgeOffloadError:
            raise
        except Exception as exc:
            raise ExecutorError(
                f"deploying version {version} on Ray failed: {_first_line(exc)}"
            ) from exc

    def remove(self, version: str) -> None:
        """Delete a version's deployment (in the background; its replicas stop)."""
        self._models.pop(version, None)
        task = self._deploys.pop(version, None)
        if task is None or not self._started:
            return
        task.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called from outside the server's loop: may block here
            self._delete_blocking(version)
            return
        removal = loop.create_task(asyncio.to_thread(self._delete_blocking, version))
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)

    @staticmethod
    def _delete_blocking(version: str) -> None:
        from ray import serve

        try:
            serve.delete(app_name(version))
            log.info("ray: version %s deleted", version)
        except Exception:  # the cluster may be gone; nothing to keep serving
            log.exception("ray: deleting version %s failed", version)

    async def run(self, version: str, feed: Arrays) -> Arrays:
        """Run ``version``'s tail on ``feed`` on some replica; its outputs by name."""
        handle = await self._handle(version)

        async def attempt() -> Arrays:
            outputs, node_id, batch = await handle.remote(feed)
            self.served_by[node_id] += 1
            self.batch_sizes[batch] += 1
            return dict(outputs)

        def count_retry(exc: BaseException) -> None:
            self.retries[type(exc).__name__] += 1
            log.warning("ray: replica lost (%s); sending the request again", type(exc).__name__)

        try:
            return await call_with_retries(
                attempt,
                policy=self.config.retry,
                what=f"a request for version {version}",
                on_retry=count_retry,
            )
        except EdgeOffloadError:
            raise
        except Exception as exc:
            # The tail raised on the replica (Ray wraps it in a RayTaskError): the typed
            # errors of edgeoffload come back as themselves, the rest as an ExecutorError.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, EdgeOffloadError):
                raise cause from None
            raise ExecutorError(f"the tail failed on a Ray replica: {_first_line(exc)}") from exc

    async def stop(self) -> None:
        """Delete this executor's applications; shut Serve and Ray down if it started them."""
        if not self._started:
            return
        self._started = False
        for task in self._deploys.values():
            task.cancel()
        versions = list(self._deploys)
        self._deploys.clear()
        await asyncio.gather(*self._removals, return_exceptions=True)
        await asyncio.to_thread(self._disconnect, versions)

    def _disconnect(self, versions: list[str]) -> None:
        import ray
        from ray import serve

        try:
            if self._owns_ray:
                serve.shutdown()  # type: ignore[no-untyped-call]
            else:  # a shared cluster: leave Serve (and others' applications) running
                for version in versions:
                    serve.delete(app_name(version))
        except Exception:
            log.exception("ray: stopping Serve failed")
        finally:
            if self._joined_ray:  # disconnects the driver; stops the cluster only if ours
                ray.shutdown()


def _log_failure(version: str, task: asyncio.Task[Any]) -> None:
    # Also retrieves the exception, which run() and wait_ready() raise again as ExecutorError.
    if not task.cancelled() and task.exception() is not None:
        log.error("ray: deploying version %s failed: %s", version, _first_line(task.exception()))


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
