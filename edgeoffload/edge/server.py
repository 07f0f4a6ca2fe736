"""The edge server: hosts bundles' tails and answers devices over the encrypted protocol.

One asyncio event loop owns the sockets (websockets.asyncio); tails run in a bounded thread
pool of onnxruntime sessions (ORT releases the GIL while it computes). Safety defaults:
binds 127.0.0.1, admits only allow-listed device keys, ``compression=None`` (ciphertext does
not compress, and no decompression-bomb surface), and the limits of README "Threat model":

* before authentication (:mod:`edgeoffload.edge.limits`): caps on connections in total, per
  source address and unauthenticated (the oldest unauthenticated one is evicted), a per-address
  rate of new connections, a websocket message limit of the hello's size until the Noise
  handshake succeeds (then ``max_message``, derived from the largest declared crossing tensor),
  and the handshake deadline;
* after it: fair admission per device (:mod:`edgeoffload.edge.admission`) with a bounded
  queue whose refusals carry a retry-after, one answer per request id, a revoked key's
  connections closed within ``revocation_check`` seconds (plus the allow-list's own check);
* ``GET /healthz`` and ``/readyz`` say only up/ready; details are on ``/metrics``, which can
  require a bearer token; a graceful drain on shutdown.

Bundle versions come from the command line and/or a model repository
(:mod:`edgeoffload.edge.repository`, ``DIR/<model>/<number>/``): :meth:`EdgeServer.sync` loads
new versions off the event loop (serving never pauses), publishes them to new handshakes, and
*drains* versions that leave the policy: no new handshake picks them, their connections,
requests and sessions finish on them, and they are unloaded once none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from edgeoffload._ort import make_session, run
from edgeoffload.bundle import Bundle, load_bundle
from edgeoffload.core import codec as codec_mod
from edgeoffload.core.decoder import DecoderLayout, KVState, select_next
from edgeoffload.core.sampling import SamplingParams, sample_token
from edgeoffload.edge.admission import FairAdmission, Grant
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.batcher import Arrays, Batcher, StackedRuns
from edgeoffload.edge.limits import ConnectionLimits, Limits
from edgeoffload.edge.metrics import LiveState, ServerStats
from edgeoffload.edge.peer import Peer
from edgeoffload.edge.rayexec import RayExecutorConfig, RayTailExecutor
from edgeoffload.edge.repository import (
    HostedVersion,
    ModelRepository,
    RepositoryState,
    RepositoryWatcher,
)
from edgeoffload.edge.sessions import Session, SessionStore
from edgeoffload.edge.stepbatch import Step, StepLayout, StepRuns
from edgeoffload.edge.updates import UpdateService
from edgeoffload.errors import (
    AuthenticationFailed,
    EdgeOffloadError,
    Overloaded,
    PayloadError,
    ProtocolError,
    SamplingError,
    ServerBusy,
    SessionError,
    SessionLost,
    UsageError,
)
from edgeoffload.keys import KeyPair, fingerprint
from edgeoffload.protocol._state import check_feed, grant_max_tokens
from edgeoffload.protocol.connection import (
    CLOSE_AUTH,
    CLOSE_PROTOCOL,
    CLOSE_SHUTDOWN,
    CLOSE_VERSION,
    MAX_HELLO_BYTES,
    HostedBundle,
    ReplayGuard,
)
from edgeoffload.protocol.connection import ServerConnection as ProtocolConnection
from edgeoffload.protocol.events import (
    CloseRequested,
    ErrorReply,
    Event,
    FetchRequest,
    HandshakeComplete,
    InvalidRequest,
    Ping,
    RunRequest,
    SessionEnd,
    SessionFeed,
    SessionOpen,
    StatusRequest,
)
from edgeoffload.protocol.load import BundleLoad, ServerLoad
from edgeoffload.protocol.tensors import decode_checked
from edgeoffload.protocol.wire import truncate_utf8

log = logging.getLogger("edgeoffload.edge.server")

MIN_MAX_MESSAGE = 1 << 20
# Tails that take less than this run on the event loop itself when nothing else is in flight:
# a round trip through the worker pool costs ~0.1-0.3 ms, more than such a tail.
INLINE_TAIL_MS = 0.5
WRITE_LIMIT = 1 << 22  # see device.link.WRITE_LIMIT
CHUNK_OVERHEAD = 16 / 65535
# Decoder bundles are split at one decode step; their messages may carry a whole prompt or a
# replay of a lost session: room for this many positions' crossing tensors.
DECODER_MESSAGE_TOKENS = 2048
DECODER_MESSAGE_BYTES = 8 << 20  # -> a 16 MiB message limit (devices split longer prompts)
COMPACT_EVERY = 0.25  # seconds: how long a session stepped in a batch may borrow its array


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    threads: int = 1  # intra-op threads per tail session run
    workers: int = 0  # concurrent tail runs; 0 = number of CPUs
    max_inflight: int = 0  # requests accepted at once (running + queued); 0 = 64 x workers
    max_queued_bytes: int = 256 << 20  # message bytes the queued requests may hold together
    per_device: int = 4  # requests one device key may have accepted (allow-list quota= wins)
    queue_wait: float = 2.0  # seconds a request may wait for a worker before "overloaded"
    max_batch: int = 64  # largest value of the crossing tensors' leading (batch) symbolic dim
    # Dynamic batching of stateless tails (edge.batcher): requests of one bundle stacked along
    # the batch axis, up to this many rows per run; 0 = off. With it on, admission grants
    # seats (workers x batch_max), and at most ``workers`` batches run at once.
    batch_max: int = 0
    batch_delay_ms: float = 2.0  # the most a request is held to grow a batch
    limits: Limits = field(default_factory=Limits)  # connections before authentication
    revocation_check: float = 0.5  # seconds between sweeps for revoked keys' connections
    metrics_token: str | None = None  # when set, /metrics wants "Authorization: Bearer <it>"
    handshake_timeout: float = 5.0
    idle_timeout: float = 120.0
    request_timeout: float = 60.0
    drain_timeout: float = 30.0
    # Generation sessions (decoder bundles): tail KV caches kept per conversation.
    kv_budget: int = 1 << 30  # bytes of KV cache for all sessions together (LRU eviction)
    session_ttl: float = 600.0  # seconds a session may stay unused
    max_context: int = 4096  # positions one session may hold
    # Model repository (``repository=``): seconds between polls of the tree's fingerprint.
    repository_interval: float = 1.0
    # A draining version whose connections are still open after this many seconds has them
    # closed (and its idle sessions dropped); requests in flight still finish. 0: never.
    version_drain_timeout: float = 600.0
    # Where stateless tails run: "local" (this process's worker pool) or "ray" (Ray Serve,
    # edge.rayexec: replicas on a Ray cluster; generation sessions stay local either way).
    # Admission is unchanged: ``workers`` (x batch_max) bounds the requests sent at once.
    executor: str = "local"
    ray_address: str | None = None  # None: start a Ray inside this process
    ray_replicas: int = 1  # per bundle version (fixed, unless both bounds below are set)
    ray_min_replicas: int | None = None  # autoscaling bounds
    ray_max_replicas: int | None = None
    ray_cpus_per_replica: float = 1.0
    ray_max_replicas_per_node: int | None = None  # e.g. 1: spread replicas over nodes
    ray_resources: dict[str, float] = field(default_factory=dict)  # custom, per replica


@dataclass
class _Hosted:
    bundle: Bundle
    info: HostedBundle
    session: Any
    codec: codec_mod.CodecSpec
    max_tensor_bytes: int
    declared_bytes: int = 1  # the crossing tensors' bytes at the split-time dims
    tail_ms: float = float("inf")  # moving average of decode + tail time
    runs: int = 0
    inflight: int = 0  # this bundle's requests admitted and not answered
    max_dims: dict[str, int] = field(default_factory=dict)  # symbolic dim -> largest accepted
    decoder: DecoderLayout | None = None  # set for decoder bundles (served as sessions)
    tail_state: tuple[tuple[str, str], ...] = ()  # the tail's KV pairs
    # Where it came from: a repository's model folder and version number (None: given as is).
    model: str | None = None
    number: int | None = None
    fingerprint: bytes | None = None  # of its version folder's files when it was loaded
    state: str = "serving"  # or "draining": no new handshakes, unloaded once idle
    draining_since: float = 0.0
    peers: set[Peer] = field(default_factory=set)  # authenticated connections on it
    batcher: Batcher[Arrays, Arrays] | None = None  # batching on, a symbolic batch dim
    steps: Batcher[Step, int] | None = None  # batching on, a decoder tail that pads exactly

    def new_kv(self, max_tokens: int) -> KVState:
        assert self.decoder is not None
        specs = {s.name: s for s in self.decoder.state_specs}
        return KVState(self.tail_state, specs, max_tokens=max_tokens)

    @property
    def kv_bytes_per_token(self) -> int:
        assert self.decoder is not None
        return self.decoder.kv_bytes_per_token([i for i, _ in self.tail_state])


def _respond(
    connection: ServerConnection, status: HTTPStatus, body: str, content_type: str
) -> Response:
    response = connection.respond(status, body)
    del response.headers["Content-Type"]  # respond() set text/plain; replace, not add
    response.headers["Content-Type"] = content_type
    return response


def _request_kind(event: Event) -> str | None:
    """The kind a device message is counted as (None: not a request, e.g. a close)."""
    if isinstance(event, RunRequest):
        return "run"
    if isinstance(event, SessionOpen):
        return "open"
    if isinstance(event, SessionFeed):
        return event.kind  # prefill or step
    if isinstance(event, SessionEnd):
        return "end"
    if isinstance(event, Ping):
        return "ping"
    if isinstance(event, InvalidRequest):
        return "invalid"
    return None


def _declared_bytes(bundle: Bundle) -> int:
    """Bytes of the crossing tensors at the bundle's split-time dims (x2 for other dims)."""
    total = 0
    dims = bundle.manifest.dims
    for spec in bundle.manifest.crossing:
        size = spec.nbytes(dims)
        total += size if size is not None else 0
    return total


class EdgeServer:
    """Serve the tails of ``bundles`` to allow-listed devices."""

    def __init__(
        self,
        bundles: Sequence[Bundle],
        *,
        identity: KeyPair,
        allow: AllowList,
        config: ServerConfig | None = None,
        repository: Path | str | None = None,
        trusted: Sequence[bytes] | None = None,
    ) -> None:
        """Serve ``bundles`` (loaded now) and, with ``repository``, the versions its policy
        selects (loaded by :meth:`start`, then kept in sync while running). ``trusted``:
        publisher keys whose signature every repository version must carry (None: hashes
        only)."""
        self.config = config or ServerConfig()
        self.identity = identity
        self.allow = allow
        self.stats = ServerStats()
        cpus = os.cpu_count() or 1
        self.workers = self.config.workers or cpus
        self.max_inflight = self.config.max_inflight or 64 * self.workers
        # With batching, a grant is a seat in a batch, not a thread: workers x batch_max may
        # be admitted at once (fairness and per-device limits as before) while the batchers
        # keep at most ``workers`` batches in the pool. With Ray, the replicas run the
        # stateless tails: as many of them as may exist count as workers, if more than ours.
        runners = self.workers
        if self.config.executor == "ray":
            runners = max(runners, self.config.ray_max_replicas or self.config.ray_replicas)
        seats = runners * max(1, self.config.batch_max)
        self.admission = FairAdmission(
            workers=seats,
            max_waiting=max(0, self.max_inflight - seats),
            per_device=self.config.per_device,
            queue_wait=self.config.queue_wait,
            max_waiting_bytes=self.config.max_queued_bytes,
        )
        self.limits = ConnectionLimits(self.config.limits)
        self._peers: dict[bytes, set[Peer]] = {}  # authenticated connections by device key
        self._revocation_task: asyncio.Task[None] | None = None
        self._compaction_task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="edgeoffload-tail")
        self.ray_executor = self._ray_executor() if self.config.executor != "local" else None
        # Every version held (serving or draining), and the serving ones: ``bundles`` is the
        # mapping each connection's handshake looks versions up in (changed in place only).
        self._hosted: dict[str, _Hosted] = {}
        self.bundles: dict[str, HostedBundle] = {}
        self.max_message = MIN_MAX_MESSAGE
        self.trusted = None if trusted is None else tuple(trusted)
        self.repository = ModelRepository(repository) if repository is not None else None
        if self.repository is not None:
            self.repository.check_root()
        self._watcher: RepositoryWatcher | None = None
        self._sync_lock = asyncio.Lock()
        self._refused: dict[tuple[str, int], bytes] = {}  # version folder -> its fingerprint
        self._drain_task: asyncio.Task[None] | None = None
        for bundle in bundles:
            self.add_bundle(bundle)
        self._replay = ReplayGuard()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: Server | None = None
        self._closing = False
        self._static = identity
        self.sessions = SessionStore(
            ttl=self.config.session_ttl, budget_bytes=self.config.kv_budget
        )
        self.updates = UpdateService(self)  # head updates: offers, fetch (PROTOCOL.md §16)
        self.clock: Callable[[], float] = time.monotonic
        self.stats.watch(
            LiveState(
                inflight=lambda: self._inflight,
                max_inflight=lambda: self.max_inflight,
                connections_open=lambda: len(self._server.connections) if self._server else 0,
                sessions=lambda: len(self.sessions),
                kv_bytes=lambda: self.sessions.nbytes,
                draining=lambda: int(self._closing),
                versions_serving=lambda: len(self.bundles),
                versions_draining=lambda: len(self._hosted) - len(self.bundles),
            )
        )

    def _ray_executor(self) -> RayTailExecutor:
        """The Ray Serve executor the config asks for (MissingExtra without Ray installed)."""
        c = self.config
        if c.executor != "ray":
            raise UsageError(
                f"unknown executor {c.executor!r}", hint="use 'local' (default) or 'ray'"
            )
        return RayTailExecutor(
            RayExecutorConfig(
                address=c.ray_address,
                replicas=c.ray_replicas,
                min_replicas=c.ray_min_replicas,
                max_replicas=c.ray_max_replicas,
                cpus_per_replica=c.ray_cpus_per_replica,
                threads=c.threads,
                batch_max=min(c.batch_max, c.max_batch),
                batch_wait_s=c.batch_delay_ms / 1e3,
                max_replicas_per_node=c.ray_max_replicas_per_node,
                resources=dict(c.ray_resources),
            )
        )

    def add_bundle(self, bundle: Bundle) -> None:
        """Host ``bundle`` now (its tail session is created on this thread) and serve it."""
        self._publish(self._prepare(bundle))

    def _prepare(
        self,
        bundle: Bundle,
        model: str | None = None,
        number: int | None = None,
        fingerprint: bytes | None = None,
    ) -> _Hosted:
        """Create the tail's session and the bookkeeping; touches nothing shared, so that a
        repository version is prepared on a worker thread while the server serves."""
        manifest = bundle.manifest
        if bundle.tail_path is None:
            raise UsageError(
                f"bundle {bundle.path} is all-local (no tail): nothing to serve",
                hint="split with a cut that leaves work for the server",
            )
        session = make_session(bundle.tail_path, threads=self.config.threads)
        info = HostedBundle(manifest.identity, manifest.version)
        hosted = _Hosted(
            bundle,
            info,
            session,
            codec_mod.CodecSpec.parse(manifest.codec),
            max(_declared_bytes(bundle), 1),
            declared_bytes=max(_declared_bytes(bundle), 1),
            # The leading axis of a crossing tensor is its batch (ONNX layouts: NCHW, [batch,
            # sequence, hidden]); other symbolic dims are bounded by max_message's byte limit.
            max_dims={
                spec.shape[0]: self.config.max_batch
                for spec in manifest.crossing
                if spec.shape and isinstance(spec.shape[0], str)
            },
            model=model,
            number=number,
            fingerprint=fingerprint,
        )
        # With the Ray executor, stateless tails batch on their replicas (edge.rayexec).
        local = self.config.executor == "local"
        if (
            local
            and self.config.batch_max > 0
            and not manifest.state
            and StackedRuns.eligible(session)
        ):
            hosted.batcher = Batcher(
                StackedRuns(session),
                self._executor,
                slots=self.workers,
                max_batch=min(self.config.batch_max, self.config.max_batch),
                max_delay=self.config.batch_delay_ms / 1e3,
                on_batch=self.stats.batch,
            )
        if manifest.state:
            state = {e["input"]: e["output"] for e in manifest.state}
            hosted.decoder = DecoderLayout.of(manifest.graph_inputs, manifest.graph_outputs, state)
            hosted.tail_state = tuple(
                (e["input"], e["output"]) for e in manifest.state if e["side"] == "server"
            )
            # A prompt's prefill (or a replay) carries many positions in one message; the
            # crossing specs' sequence dims are symbolic, so the declared size is a floor.
            hosted.max_tensor_bytes = max(
                hosted.max_tensor_bytes * DECODER_MESSAGE_TOKENS, DECODER_MESSAGE_BYTES
            )
            if self.config.batch_max > 0:
                hosted.steps = self._step_batcher(hosted)
        return hosted

    def _step_batcher(self, hosted: _Hosted) -> Batcher[Step, int] | None:
        """Batched decode steps for a decoder tail whose padded batches are exact (checked on
        the tail now, edge.stepbatch); None, with the reason logged, otherwise."""
        assert hosted.decoder is not None
        manifest = hosted.bundle.manifest
        specs = {s.name: s for s in hosted.decoder.state_specs}
        tail_specs = [specs[past] for past, _ in hosted.tail_state]
        layout = StepLayout.of(manifest.crossing, tail_specs)
        why: str | None
        if isinstance(layout, str):
            why = layout
        else:
            runs = StepRuns(hosted.session, layout, hosted.tail_state, hosted.decoder.logits)
            why = runs.check(specs, manifest.crossing)
        if why is not None:
            log.warning("%s: decode steps run one by one: %s", hosted.info.version, why)
            return None
        return Batcher(
            runs,
            self._executor,
            slots=self.workers,
            max_batch=self.config.batch_max,
            max_delay=self.config.batch_delay_ms / 1e3,
            on_batch=self.stats.batch,
        )

    def _publish(self, hosted: _Hosted) -> None:
        """Serve a prepared version: new handshakes may pick it from now on."""
        version = hosted.info.version
        self._hosted[version] = hosted
        self.bundles[version] = hosted.info
        # Room for the declared tensors twice over (other symbolic dims), framing and tags.
        # It only grows: connections keep the limit of their handshake (it fits their
        # version), new connections get the limit of everything hosted so far.
        needed = math.ceil(2 * hosted.max_tensor_bytes * (1 + CHUNK_OVERHEAD)) + 65536
        self.max_message = max(self.max_message, needed)
        tail = hosted.bundle.tail_path
        if self.ray_executor is not None and hosted.decoder is None and tail is not None:
            manifest_tail = hosted.bundle.manifest.tail
            self.ray_executor.add(version, tail, manifest_tail.sha256 if manifest_tail else None)
        self.stats.bundle_loaded(version)
        where = "" if hosted.model is None else f" (model {hosted.model} version {hosted.number})"
        log.info(
            "hosting %s version %s from %s%s",
            hosted.info.identity,
            version,
            hosted.bundle.path,
            where,
        )

    def remove_bundle(self, version: str) -> bool:
        """Stop offering ``version`` to new handshakes and unload it once its connections,
        requests and sessions are gone (see :meth:`sync`); False if it is not hosted."""
        hosted = self._hosted.get(version)
        if hosted is None:
            return False
        if hosted.state != "draining":
            hosted.state = "draining"
            hosted.draining_since = self.clock()
            self.bundles.pop(version, None)
            log.info(
                "draining version %s: %d connection(s), %d request(s), %d session(s) left",
                version,
                len(hosted.peers),
                hosted.inflight,
                self.sessions.count(version),
            )
        self._maybe_unload(hosted)
        if version in self._hosted and self._server is not None and self._drain_task is None:
            # Called from outside the server's loop (no running loop): no timeout watch.
            with contextlib.suppress(RuntimeError):
                self._drain_task = asyncio.get_running_loop().create_task(self._watch_drains())
        return True

    def _maybe_unload(self, hosted: _Hosted) -> None:
        """Unload a draining version once no connection and no request is left on it."""
        version = hosted.info.version
        if hosted.state != "draining" or self._hosted.get(version) is not hosted:
            return
        if hosted.peers or hosted.inflight:
            return
        # With no connection left its sessions are out of reach (a draining version takes no
        # new handshake, so no device can come back to them): they go with it.
        dropped = self.sessions.drop_version(version)
        if self.sessions.count(version):
            return  # a feed is still running (it holds a request, so this is rare)
        if dropped:
            log.info("version %s: dropped %d unreachable session(s)", version, dropped)
        del self._hosted[version]
        hosted.session = None  # the onnxruntime session goes with its last reference
        if self.ray_executor is not None:
            self.ray_executor.remove(version)  # its Ray Serve application, if it has one
        self.stats.bundle_unloaded(version)
        log.info(
            "unloaded version %s%s after %.1f s of draining",
            version,
            "" if hosted.model is None else f" (model {hosted.model} version {hosted.number})",
            self.clock() - hosted.draining_since,
        )

    async def _watch_drains(self) -> None:
        """While versions drain: retire the ones past ``version_drain_timeout`` (close their
        connections; requests in flight finish first) and unload the idle ones."""
        try:
            while any(h.state == "draining" for h in self._hosted.values()):
                await asyncio.sleep(min(0.5, self.config.repository_interval))
                now = self.clock()
                timeout = self.config.version_drain_timeout
                for hosted in list(self._hosted.values()):
                    if hosted.state != "draining":
                        continue
                    if timeout and now - hosted.draining_since > timeout and hosted.peers:
                        log.warning(
                            "version %s drained for %.0f s: closing its %d connection(s)",
                            hosted.info.version,
                            now - hosted.draining_since,
                            len(hosted.peers),
                        )
                        self.sessions.drop_version(hosted.info.version)
                        for peer in list(hosted.peers):
                            peer.spawn(peer.close(CLOSE_VERSION, "bundle version retired"))
                    self._maybe_unload(hosted)
        finally:
            self._drain_task = None

    # -- the model repository --------------------------------------------------------------------

    def hosted_versions(self) -> list[HostedVersion]:
        """Every version held, serving or draining (a snapshot; read-only)."""
        return [self._view(h) for h in self._hosted.values()]

    def latest_for(self, version: str) -> HostedVersion | None:
        """The version a device holding ``version`` should move to: the newest *serving*
        version of the same repository model.

        None when ``version`` is not hosted or not from the repository, when it is itself the
        newest serving one, or when nothing of its model serves. A *draining* ``version``
        gets the newest serving version even when its number is lower (a rollback by a
        pinned policy: the device cannot reconnect on a draining version).
        """
        hosted = self._hosted.get(version)
        if hosted is None or hosted.model is None or hosted.number is None:
            return None
        serving = [
            h
            for h in self._hosted.values()
            if h.model == hosted.model and h.state == "serving" and h.number is not None
        ]
        if not serving:
            return None
        newest = max(serving, key=lambda h: h.number or 0)
        if newest is hosted:
            return None
        if hosted.state == "serving" and (newest.number or 0) <= hosted.number:
            return None
        return self._view(newest)

    def _view(self, hosted: _Hosted) -> HostedVersion:
        return HostedVersion(
            model=hosted.model,
            number=hosted.number,
            identity=hosted.info.identity,
            version=hosted.info.version,
            state="draining" if hosted.state == "draining" else "serving",
            inflight=hosted.inflight,
            sessions=self.sessions.count(hosted.info.version),
            path=hosted.bundle.path,
            connections=len(hosted.peers),
        )

    async def sync(self, force: bool = False) -> RepositoryState | None:
        """Bring the hosted versions in line with the repository (no-op without one).

        Loads the versions the policies select that are not hosted yet (hashes, signature and
        the onnxruntime session on a worker thread: serving goes on meanwhile), publishes them,
        and drains the repository versions the policies no longer select. A version that fails
        to load is logged and refused until its folder's files change (or ``force``, SIGHUP);
        the versions that serve keep serving. Returns the scanned state.
        """
        if self.repository is None:
            return None
        async with self._sync_lock:
            repository = self.repository
            loop = asyncio.get_running_loop()
            state = await loop.run_in_executor(None, repository.scan)
            if state.problem is not None:
                log.error("model repository: %s; keeping every version it serves", state.problem)
                return state
            if force:
                self._refused.clear()
            for key, fp in list(self._refused.items()):  # files changed: try again
                model_state = state.models.get(key[0])
                if model_state is None or model_state.versions.get(key[1]) != fp:
                    del self._refused[key]
            for name, model in state.models.items():
                if model.policy is None:
                    continue  # malformed policy: keep what it serves (logged by the scan)
                mine = self._repository_versions(name)
                for number, hosted in mine.items():
                    now_fp = model.versions.get(number)
                    if now_fp is not None and now_fp != hosted.fingerprint:
                        hosted.fingerprint = now_fp  # warned once per change
                        log.warning(
                            "model %s version %s changed on disk after it was loaded; the "
                            "loaded version %s goes on serving (publish a new number instead)",
                            name,
                            number,
                            hosted.info.version,
                        )
                serving = {n for n, h in mine.items() if h.state == "serving"}
                failed = {n for (m, n) in self._refused if m == name}
                want = model.desired(failed=failed, serving=serving) or frozenset()
                for number in sorted(want - serving):
                    if self._closing:
                        return state
                    back = mine.get(number)
                    if back is not None:  # draining, asked for again: serve it again
                        self._undrain(back)
                        continue
                    await self._load_version(
                        model.name, number, model.version_path(number), model.versions[number]
                    )
                mine = self._repository_versions(name)
                serving = {n for n, h in mine.items() if h.state == "serving"}
                failed = {n for (m, n) in self._refused if m == name}
                want = model.desired(failed=failed, serving=serving) or frozenset()
                for number in sorted(serving - want):
                    self.remove_bundle(mine[number].info.version)
            for hosted in list(self._hosted.values()):  # model folders that were deleted
                if hosted.model is not None and hosted.model not in state.models:
                    self.remove_bundle(hosted.info.version)
            return state

    def _repository_versions(self, model: str) -> dict[int, _Hosted]:
        return {
            h.number: h for h in self._hosted.values() if h.model == model and h.number is not None
        }

    def _undrain(self, hosted: _Hosted) -> None:
        hosted.state = "serving"
        self.bundles[hosted.info.version] = hosted.info
        log.info(
            "version %s (model %s version %s) is wanted again: serving it, no reload",
            hosted.info.version,
            hosted.model,
            hosted.number,
        )

    async def _load_version(self, model: str, number: int, path: Path, fingerprint: bytes) -> None:
        """Load, verify and publish one repository version; refuse it (logged) on failure."""
        loop = asyncio.get_running_loop()
        try:
            hosted = await loop.run_in_executor(
                None, self._load_and_prepare, path, model, number, fingerprint
            )
        except EdgeOffloadError as exc:
            self._refuse(model, number, fingerprint, f"{type(exc).__name__}: {exc.message}")
            return
        except Exception as exc:  # e.g. onnxruntime refusing the tail: never take the server down
            self._refuse(model, number, fingerprint, f"{type(exc).__name__}: {exc}")
            return
        version = hosted.info.version
        if version in self._hosted:
            other = self._hosted[version]
            self._refuse(
                model,
                number,
                fingerprint,
                f"it is version {version}, already hosted from {other.bundle.path}",
            )
            return
        self._publish(hosted)

    def _load_and_prepare(self, path: Path, model: str, number: int, fingerprint: bytes) -> _Hosted:
        bundle = load_bundle(path, trusted=self.trusted)  # hashes; with trusted keys, signature
        return self._prepare(bundle, model, number, fingerprint)

    def _refuse(self, model: str, number: int, fingerprint: bytes, why: str) -> None:
        self._refused[model, number] = fingerprint
        self.stats.bundle_refused()
        log.error(
            "model %s version %s refused: %s; the versions it serves go on serving "
            "(retried when its files change, or on SIGHUP)",
            model,
            number,
            why,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the repository's versions (if any), then listen, then watch the repository.
        With the Ray executor: connect to Ray first, and listen once every version's
        deployment is ready."""
        if self.ray_executor is not None:
            await self.ray_executor.start()  # deploys the bundles given to the constructor
        if self.repository is not None:
            fingerprint = await asyncio.to_thread(self.repository.fingerprint)
            await self.sync()
        if self.ray_executor is not None:
            await self.ray_executor.wait_ready()
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            compression=None,
            # Until the Noise handshake succeeds a peer may send only a hello; _handle raises
            # the limit to max_message afterwards (checked per frame by websockets).
            max_size=MAX_HELLO_BYTES,
            max_queue=4,
            create_connection=self._guarded_connection(),
            process_request=self._process_request,
            open_timeout=self.config.handshake_timeout,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=5,
            write_limit=WRITE_LIMIT,
        )
        self._revocation_task = asyncio.create_task(self._sweep_revoked())
        if self.config.batch_max > 0:  # batched steps lend sessions views of their arrays
            self._compaction_task = asyncio.create_task(self._compact_sessions())
        if self.repository is not None:
            self._watcher = RepositoryWatcher(
                self.repository, self.sync, interval=self.config.repository_interval
            )
            self._watcher.start(fingerprint)
        log.info("listening on %s:%d", self.config.host, self.port)

    def request_sync(self) -> None:
        """Sync with the repository soon, retrying refused versions (SIGHUP's handler)."""
        if self._watcher is not None:
            self._watcher.poke()

    def _guarded_connection(self) -> type[ServerConnection]:
        """The websocket connection class, with the front door's checks at TCP accept."""
        limits = self.limits

        class GuardedConnection(ServerConnection):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                peername = transport.get_extra_info("peername")
                address = str(peername[0]) if peername else "?"
                admitted, evicted = limits.opened(self, address)
                for conn in evicted:
                    assert isinstance(conn, ServerConnection)
                    conn.transport.abort()
                if not admitted:
                    assert isinstance(transport, asyncio.Transport)
                    transport.abort()

            def connection_lost(self, exc: Exception | None) -> None:
                limits.closed(self)
                super().connection_lost(exc)

        return GuardedConnection

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        sock = next(iter(self._server.sockets))
        return int(sock.getsockname()[1])

    async def shutdown(self) -> None:
        """Drain: refuse new work, let in-flight requests finish (bounded), then close everyone.

        The socket keeps listening while draining, so that /readyz and /healthz can say so
        (new websocket upgrades get 503, new requests on open connections ``shutting_down``).
        """
        if self._server is None:
            return
        self._closing = True
        if self._revocation_task is not None:
            self._revocation_task.cancel()
        if self._compaction_task is not None:
            self._compaction_task.cancel()
        if self._watcher is not None:
            await self._watcher.stop()
        if self._drain_task is not None:
            self._drain_task.cancel()
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout)
        except asyncio.TimeoutError:
            log.warning("drain timeout: %d request(s) still running", self._inflight)
        self._server.close(close_connections=False)
        for conn in list(self._server.connections):
            await conn.close(CLOSE_SHUTDOWN, "server shutting down")
        await self._server.wait_closed()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.ray_executor is not None:  # after the drain: no request needs it any more
            await self.ray_executor.stop()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.wait_closed()

    # -- HTTP ------------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Plain-HTTP endpoints beside the websocket: /healthz (alive), /readyz (503 while
        draining, so a load balancer stops sending devices), /metrics (Prometheus; the
        details, behind a bearer token when ``metrics_token`` is set). Unauthenticated
        endpoints say only up/ready: load and bundles are not for anyone who asks. A
        websocket upgrade while draining is refused with 503."""
        # Ready: not draining, and at least one version serves (a repository may hold none).
        ready = not self._closing and bool(self.bundles)
        body = {"ready": ready, "status": "draining" if self._closing else "ok"}
        if request.path == "/healthz":
            return _respond(connection, HTTPStatus.OK, json.dumps(body) + "\n", "application/json")
        if request.path == "/readyz":
            status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            return _respond(connection, status, json.dumps(body) + "\n", "application/json")
        if request.path == "/metrics":
            if not self._metrics_allowed(request):
                return _respond(
                    connection, HTTPStatus.UNAUTHORIZED, "bearer token required\n", "text/plain"
                )
            data, content_type = self.stats.exposition()
            return _respond(connection, HTTPStatus.OK, data.decode(), content_type)
        if self._closing:
            return _respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, "draining\n", "text/plain")
        return None

    def _metrics_allowed(self, request: Request) -> bool:
        token = self.config.metrics_token
        if not token:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    # -- one device ------------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        self.stats.connection()
        hosted: _Hosted | None = None
        peer = Peer(
            ws,
            ProtocolConnection(
                static=self._static,
                is_allowed=self.allow.allows,
                bundles=self.bundles,
                replay_guard=self._replay,
                max_message=self.max_message,
                offers=self.updates.offer,
            ),
            count_error=self.stats.error,
        )
        try:
            greeting = await peer.handshake(self.config.handshake_timeout)
            if greeting is None:
                return
            if isinstance(greeting, ErrorReply):
                self.stats.handshake("version")
                await peer.close(CLOSE_VERSION, greeting.code)
                return
            assert isinstance(greeting, HandshakeComplete)
            self.stats.handshake("ok")
            found = self._hosted.get(greeting.version)
            del greeting  # an idle connection should not keep its handshake alive
            if found is None:  # unloaded while the handshake was answered
                await peer.close(CLOSE_VERSION, "bundle version unloaded")
                return
            hosted = found
            hosted.peers.add(peer)  # holds its version until the connection ends
            self.limits.authenticated(ws)
            ws.protocol.max_message_size = self.max_message  # the full limit, from now on
            self._peers.setdefault(peer.public_key, set()).add(peer)
            peer.generation = self.allow.generation
            while True:
                # A device at its limit of requests in flight is not read from until one
                # finishes: TCP back-pressure, not a refusal per extra request.
                key = peer.public_key
                await self.admission.wait_for_room(key, limit=self.allow.quota(key))
                events = await peer.receive(self.config.idle_timeout)
                if events is None or not await self._dispatch(peer, hosted, events):
                    return
                await asyncio.sleep(0)  # the requests just spawned count in before the next read
                del events  # nor its last request's plaintext (measured: ~0.6 MiB per connection)
        except AuthenticationFailed:
            if peer.connection.transport is None:
                self.stats.handshake("auth")
            self.stats.error("auth")
            await peer.close(CLOSE_AUTH, "authentication failed")
        except ProtocolError as exc:
            self.stats.error("protocol")
            log.info("protocol error from %s: %s", ws.remote_address, exc)
            await peer.close(CLOSE_PROTOCOL, truncate_utf8(str(exc), 120))  # reasons <= 123 B
        except asyncio.TimeoutError:
            self.stats.error("timeout")
            await peer.close(CLOSE_PROTOCOL, "timeout")
        except ConnectionClosed:
            pass
        finally:
            self._forget_peer(peer)
            await peer.finish()
            if hosted is not None:
                hosted.peers.discard(peer)
                self._maybe_unload(hosted)

    def _forget_peer(self, peer: Peer) -> None:
        peers = self._peers.get(peer.public_key)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del self._peers[peer.public_key]

    async def _compact_sessions(self) -> None:
        """Every COMPACT_EVERY seconds, give sessions that stopped stepping their own copy
        of their cache (edge.stepbatch), so that no idle session keeps a batch's array.
        On the event loop: a session is busy (skipped) whenever a worker runs its feed."""
        while True:
            await asyncio.sleep(COMPACT_EVERY)
            self.sessions.compact_idle(self.clock(), COMPACT_EVERY)

    async def _sweep_revoked(self) -> None:
        """Close the connections and sessions of keys the allow-list no longer holds.

        Runs every ``revocation_check`` seconds; the allow-list notices a change of its file
        within its own ``check_interval``, so a revoked key is cut off within their sum.
        """
        seen = self.allow.generation
        while True:
            await asyncio.sleep(self.config.revocation_check)
            try:
                self.allow.check()
            except Exception:  # the list fails closed by itself; never stop sweeping
                log.exception("allow-list check failed")
            if self.allow.generation != seen:
                seen = self.allow.generation
                self.revoke_unlisted()

    def revoke_unlisted(self) -> int:
        """Close every authenticated connection (and session) of a key no longer allowed;
        the number of connections closed."""
        closed = 0
        for key in [k for k in self._peers if not self.allow.allows(k)]:
            dropped = self.sessions.drop_owner(key)
            peers = self._peers.pop(key)
            for peer in peers:
                peer.spawn(peer.close(CLOSE_AUTH, "device key revoked"))
            closed += len(peers)
            log.warning(
                "device %s revoked: %d connection(s) closed, %d session(s) dropped",
                fingerprint(key),
                len(peers),
                dropped,
            )
        return closed

    async def _dispatch(self, peer: Peer, hosted: _Hosted, events: list[Event]) -> bool:
        """Handle the events of one transport message; False when the device closed."""
        if peer.generation != self.allow.generation:  # the list changed: is this key still in?
            peer.generation = self.allow.generation
            if not self.allow.allows(peer.public_key):
                self.stats.error("auth")
                await peer.close(CLOSE_AUTH, "device key revoked")
                return False
        for event in events:
            kind = _request_kind(event)
            if kind is not None:
                self.stats.request(hosted.info.version, kind)
            if isinstance(event, RunRequest) and hosted.decoder is not None:
                await peer.reply_error(
                    event.request_id,
                    "session",
                    "this bundle is a decoder: generate through a session (open/prefill/step)",
                )
            elif isinstance(event, RunRequest | SessionOpen | SessionEnd | SessionFeed):
                if not peer.claim(event.request_id):
                    await peer.reply_error(
                        event.request_id,
                        "duplicate_id",
                        f"request id {event.request_id} is already being served or was "
                        "answered on this connection",
                    )
                elif isinstance(event, RunRequest):
                    peer.spawn(
                        self._settle(
                            peer, event.request_id, self._serve_request(peer, hosted, event)
                        )
                    )
                else:
                    peer.spawn(
                        self._settle(
                            peer, event.request_id, self._serve_session(peer, hosted, event)
                        )
                    )
            elif isinstance(event, InvalidRequest):
                await peer.reply_error(event.request_id, "payload", event.message)
            elif isinstance(event, Ping):
                await peer.send(ProtocolConnection.send_pong, event.request_id, event.payload)
            elif isinstance(event, StatusRequest):
                await peer.send(
                    ProtocolConnection.send_status,
                    event.request_id,
                    self.load(hosted),
                    self.bundle_loads(),
                )
            elif isinstance(event, FetchRequest):  # in line: one piece at a time (§16.3)
                await self.updates.serve_fetch(peer, event)
            elif isinstance(event, CloseRequested):
                await peer.close()
                return False
        return True

    def load(self, hosted: _Hosted, *, answering: int = 0) -> ServerLoad:
        """This server's load report (PROTOCOL.md §14.2) for a reply on ``hosted``'s
        connection; ``answering`` requests (the one the reply answers) are not counted."""
        inflight = max(0, self._inflight - answering)
        return ServerLoad(
            inflight=inflight,
            queued=max(0, inflight - self.workers),
            workers=self.workers,
            kv_free=max(0, self.sessions.budget_bytes - self.sessions.nbytes),
            draining=self._closing,
            tail_ms=hosted.tail_ms if hosted.runs else None,
        )

    def bundle_loads(self) -> list[BundleLoad]:
        return [
            BundleLoad(h.info.identity, h.info.version, h.inflight, h.tail_ms if h.runs else None)
            for h in self._hosted.values()
        ]

    @staticmethod
    async def _settle(peer: Peer, request_id: int, work: Coroutine[Any, Any, bool]) -> None:
        """Serve one request; its id is then free again unless it was answered with a result."""
        answered = False
        try:
            answered = await work
        finally:
            peer.settle(request_id, answered=answered)

    async def _admit(
        self, peer: Peer, hosted: _Hosted, request_id: int, cost_ms: float, nbytes: int
    ) -> Grant | None:
        """Wait for a worker under fair admission (module :mod:`~edgeoffload.edge.admission`),
        or answer ``shutting_down`` / ``overloaded`` with a retry-after; None when refused."""
        self.stats.admission()
        if self._closing:
            await peer.reply_error(request_id, "shutting_down", "server is shutting down")
            return None
        self._inflight += 1
        hosted.inflight += 1
        self._idle.clear()
        try:
            return await self.admission.acquire(
                peer.public_key, cost_ms, limit=self.allow.quota(peer.public_key), nbytes=nbytes
            )
        except Overloaded as exc:
            self._release(hosted, None)
            retry_ms = round((exc.retry_after or 0.0) * 1e3) or None
            await peer.reply_error(request_id, "overloaded", exc.message, retry_ms=retry_ms)
            return None
        except BaseException:
            self._release(hosted, None)
            raise

    def _release(
        self, hosted: _Hosted, grant: Grant | None, actual_ms: float | None = None
    ) -> None:
        if grant is not None:
            self.admission.release(grant, actual_ms=actual_ms)
        self._inflight -= 1
        hosted.inflight -= 1
        if self._inflight == 0:
            self._idle.set()
        if hosted.state == "draining":
            self._maybe_unload(hosted)

    def _estimate_ms(
        self, hosted: _Hosted, tensors: Sequence[tuple[str, codec_mod.EncodedTensor]]
    ) -> float:
        """A request's cost before it runs: the bundle's recent tail time scaled by the
        request's declared (decoded) size against the bundle's split-time size."""
        per_request = hosted.tail_ms if hosted.runs else 1.0
        declared = 0
        for _, t in tensors:
            try:
                declared += math.prod(t.shape) * np.dtype(t.dtype).itemsize
            except TypeError:
                return per_request  # the tensor check will refuse it
        # Shapes are a peer's ints (up to 32 of 2^64): beyond the message limit the tensor
        # check refuses the request, and the float division must not overflow meanwhile.
        declared = min(declared, self.max_message)
        return per_request * max(1.0, declared / hosted.declared_bytes)

    async def _serve_request(self, peer: Peer, hosted: _Hosted, request: RunRequest) -> bool:
        rid = request.request_id
        grant = await self._admit(
            peer,
            hosted,
            rid,
            self._estimate_ms(hosted, request.tensors),
            sum(t.wire_bytes for _, t in request.tensors),
        )
        if grant is None:
            return False
        server_ms: float | None = None
        try:
            started = time.perf_counter()
            if self.ray_executor is not None:
                # On a Ray Serve replica (edge.rayexec; it batches there): decoded here, so
                # that a bad request fails alone and the replicas get plain arrays.
                feed = self._decode(hosted, request.tensors)
                outputs = await asyncio.wait_for(
                    self.ray_executor.run(hosted.info.version, feed), self.config.request_timeout
                )
                tail_s = time.perf_counter() - started
            elif hosted.batcher is not None:
                # Decoding a checked tensor is a view of the message for the lossless codec
                # (a short dequantization otherwise): done here, so a bad request fails alone.
                feed = self._decode(hosted, request.tensors)
                outputs = await asyncio.wait_for(
                    hosted.batcher.run(feed), self.config.request_timeout
                )
                tail_s = time.perf_counter() - started
            elif hosted.tail_ms < INLINE_TAIL_MS and self.admission.admitted == 1:
                # A tail this short costs less than the hop to a worker thread and back.
                outputs, tail_s = self._run_tail(hosted, request)
            else:
                loop = asyncio.get_running_loop()
                outputs, tail_s = await asyncio.wait_for(
                    loop.run_in_executor(self._executor, self._run_tail, hosted, request),
                    self.config.request_timeout,
                )
            server_ms = (time.perf_counter() - started) * 1e3
            hosted.tail_ms = 0.8 * hosted.tail_ms + 0.2 * server_ms if hosted.runs else server_ms
            hosted.runs += 1
            encoded = [
                (name, codec_mod.encode(a, codec_mod.CodecSpec())) for name, a in outputs.items()
            ]
            await peer.send(
                ProtocolConnection.send_result,
                rid,
                encoded,
                server_ms,
                self.load(hosted, answering=1),
            )
            self.stats.result(
                hosted.info.version, tail_s=tail_s, total_s=time.perf_counter() - started
            )
            return True
        except PayloadError as exc:
            await peer.reply_error(rid, "payload", exc.message)
        except asyncio.TimeoutError:
            await peer.reply_error(rid, "timeout", "the tail did not finish in time")
        except ConnectionClosed:
            pass
        except EdgeOffloadError as exc:
            await peer.reply_error(rid, "internal", exc.message)
        except Exception:  # an ORT failure must not take the server down
            log.exception("tail failed for request %d", rid)
            await peer.reply_error(rid, "internal", "the tail failed on the server")
        finally:
            self._release(hosted, grant, server_ms)
        return False

    # -- generation sessions ---------------------------------------------------------------------

    async def _serve_session(
        self, peer: Peer, hosted: _Hosted, event: SessionOpen | SessionEnd | SessionFeed
    ) -> bool:
        """Open, feed or end a session; every failure is an error reply for this request only."""
        rid = event.request_id
        owner = peer.public_key
        version = hosted.info.version
        try:
            if hosted.decoder is None:
                raise SessionError("this bundle is not a decoder: it has no sessions")
            if isinstance(event, SessionOpen):
                params = SamplingParams.from_dict(event.sampling)
                granted = grant_max_tokens(event.max_tokens, self.config.max_context)
                opened = self.sessions.open(
                    owner=owner,
                    version=version,
                    sampling=params,
                    make_kv=lambda: hosted.new_kv(granted),
                    now=self.clock(),
                )
                await peer.send(ProtocolConnection.send_opened, rid, opened.session_id, granted)
                return True
            if isinstance(event, SessionEnd):
                self.sessions.close(event.session, owner=owner, version=version, now=self.clock())
                await peer.send(ProtocolConnection.send_ended, rid, event.session)
                return True
            return await self._serve_feed(peer, hosted, event)
        except SessionLost as exc:
            await peer.reply_error(rid, "session_lost", exc.message)
        except (SessionError, SamplingError) as exc:
            await peer.reply_error(rid, "session", exc.message)
        except PayloadError as exc:
            await peer.reply_error(rid, "payload", exc.message)
        except ServerBusy as exc:
            await peer.reply_error(rid, "overloaded", exc.message)
        except ConnectionClosed:
            pass
        return False

    async def _serve_feed(self, peer: Peer, hosted: _Hosted, event: SessionFeed) -> bool:
        rid = event.request_id
        session = self.sessions.get(
            event.session, owner=peer.public_key, version=hosted.info.version, now=self.clock()
        )
        check_feed(event.kind, event.session, event.pos, length=session.length, busy=session.busy)
        new_tokens = sum(c.n for c in event.chunks)
        session.kv.check_room(new_tokens)
        growth = new_tokens * hosted.kv_bytes_per_token
        if session.kv.nbytes + growth > self.sessions.budget_bytes:
            self.sessions.make_room(session, growth)  # raises: alone over the budget
        session.busy = True  # while it waits for a worker too: one feed at a time
        try:
            grant = await self._admit(
                peer,
                hosted,
                rid,
                hosted.tail_ms if hosted.runs else 1.0,
                sum(t.wire_bytes for c in event.chunks for _, t in c.tensors),
            )
        except BaseException:
            session.busy = False
            raise
        if grant is None:
            session.busy = False
            return False
        server_ms: float | None = None
        try:
            started = time.perf_counter()
            one = len(event.chunks) == 1 and event.chunks[0].n == 1
            if hosted.steps is not None and event.kind == "step" and one:
                # One position: may step together with other sessions (edge.stepbatch).
                saved = (dict(session.kv.arrays), session.kv.length)
                step = Step(
                    session.kv, self._decode(hosted, event.chunks[0].tensors), session.sampling
                )
                token = await asyncio.wait_for(hosted.steps.run(step), self.config.request_timeout)
                tail_s = time.perf_counter() - started
            else:
                loop = asyncio.get_running_loop()
                token, saved, tail_s = await asyncio.wait_for(
                    loop.run_in_executor(self._executor, self._run_feed, hosted, session, event),
                    self.config.request_timeout,
                )
            try:  # evict others only for growth that really happened
                self.sessions.make_room(session, 0)
            except BaseException:
                session.kv.arrays, session.kv.length = saved
                raise
            server_ms = (time.perf_counter() - started) * 1e3
            hosted.tail_ms = 0.8 * hosted.tail_ms + 0.2 * server_ms if hosted.runs else server_ms
            hosted.runs += 1
            await peer.send(
                ProtocolConnection.send_token,
                rid,
                session.session_id,
                session.length,
                token,
                server_ms,
                self.load(hosted, answering=1),
            )
            self.stats.result(
                hosted.info.version, tail_s=tail_s, total_s=time.perf_counter() - started
            )
            return True
        except asyncio.TimeoutError:
            # The worker may still finish and grow the cache: the session is not trustworthy.
            self.sessions.drop(session.session_id)
            await peer.reply_error(rid, "timeout", "the tail did not finish in time")
        except (SessionError, PayloadError, SamplingError, ServerBusy):
            raise
        except EdgeOffloadError as exc:
            await peer.reply_error(rid, "internal", exc.message)
        except Exception:  # an ORT failure must not take the server down
            log.exception("tail failed for session %d", session.session_id)
            self.sessions.drop(session.session_id)
            await peer.reply_error(rid, "internal", "the tail failed on the server")
        finally:
            session.busy = False
            session.last_used = self.clock()
            self._release(hosted, grant, server_ms)
        return False

    def _run_feed(
        self, hosted: _Hosted, session: Session, event: SessionFeed
    ) -> tuple[int, Any, float]:
        """Run the tail over every chunk (all or nothing), then sample the next token; also
        the seconds it took."""
        assert hosted.decoder is not None
        started = time.perf_counter()
        kv = session.kv
        saved = (dict(kv.arrays), kv.length)
        try:
            outputs: dict[str, Any] = {}
            for chunk in event.chunks:
                feed = self._decode(hosted, chunk.tensors)
                outputs = kv.run(hosted.session, feed, chunk.n)
            logits = select_next(outputs[hosted.decoder.logits])
            token = sample_token(logits, session.sampling, kv.length)
            return token, saved, time.perf_counter() - started
        except BaseException:
            kv.arrays, kv.length = saved  # a failed feed leaves the session as it was
            raise

    def _run_tail(
        self, hosted: _Hosted, request: RunRequest
    ) -> tuple[dict[str, np.ndarray], float]:
        """Decode the request's tensors and run the tail; also the seconds it took."""
        started = time.perf_counter()
        outputs = run(hosted.session, self._decode(hosted, request.tensors))
        return outputs, time.perf_counter() - started

    def _decode(
        self, hosted: _Hosted, tensors: Sequence[tuple[str, codec_mod.EncodedTensor]]
    ) -> dict[str, np.ndarray]:
        """The device's crossing tensors, checked against the bundle's declaration, decoded."""
        return decode_checked(
            tensors,
            hosted.bundle.manifest.crossing,
            lambda dtype: codec_mod.codec_for_dtype(hosted.codec, dtype).name,
            max_bytes=self.max_message,
            max_dims=hosted.max_dims,
        )
