"""Rolling a model to a new version across a fleet: the plan file, and the operator's driver.

A rollout is written into each server's model repository (:mod:`edgeoffload.edge.repository`)
as two files of ``DIR/<model>/``:

- ``policy.json`` (the repository's): which versions the server loads — during a rollout both
  the old and the new number (``pinned``), at the end only the new one, so the old one drains
  and is unloaded once no device holds it;
- ``rollout.json`` (this module's): which version the server *offers* to devices (PROTOCOL.md
  §16) and to what share of them: ``{"target": 5, "share": 0.1, "phase": "canary"}``. A device
  is in the share when a hash of its public key and the model name falls below ``share``, so
  the devices of a 10 % canary stay in at 50 % and 100 %, and every server of the fleet picks
  the same devices. A rollback is a plan whose target is the old number at share 1.

Servers read ``rollout.json`` at every offer (cached by mtime); a malformed or absent plan
offers what the repository serves newest, as without a rollout — except that a malformed plan
offers nothing (a typo must not move devices). No model data is in these files.

:func:`run_rollout` is the operator's side (``edgeoffload fleet rollout``): it checks the new
version in every repository first (a version that fails verification is refused before
anything changes), loads it everywhere, widens the share step by step while watching each
server's ``/metrics`` (errors per answered request; a rise over the threshold rolls back), and
retires the old version. It talks to the servers only through their repositories and their
metrics endpoints: there is no admin channel in the protocol yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgeoffload.edge.repository import POLICY_FILE, ModelRepository
from edgeoffload.errors import EdgeOffloadError, RolloutError, UsageError

log = logging.getLogger("edgeoffload.edge.rollout")

PLAN_FILE = "rollout.json"
MAX_PLAN_BYTES = 1 << 16
Phase = Literal["loading", "canary", "rolling", "retiring", "done", "rolled_back"]
PHASES: tuple[str, ...] = ("loading", "canary", "rolling", "retiring", "done", "rolled_back")
# Error codes that count against a rollout (a refused or malformed request is the device's,
# an overloaded one is load, not the new version).
FAILURE_CODES = ("internal", "timeout", "protocol", "version_mismatch", "unknown_bundle")


@dataclass(frozen=True)
class RolloutPlan:
    """What servers offer during a rollout: ``target`` to ``share`` of the devices."""

    target: int
    share: float
    phase: Phase
    previous: int | None = None  # the version rolled from (for status and rollback)
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "share": self.share,
            "phase": self.phase,
            "previous": self.previous,
            "updated_at": self.updated_at,
        }

    @classmethod
    def parse(cls, data: object, source: str = PLAN_FILE) -> RolloutPlan:
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a JSON object")
        extra = set(data) - {"target", "share", "phase", "previous", "updated_at"}
        if extra:
            raise UsageError(f"{source}: unknown keys {sorted(extra)}")
        target, share, phase = data.get("target"), data.get("share"), data.get("phase")
        previous, updated = data.get("previous"), data.get("updated_at", 0.0)
        if type(target) is not int or target < 1:
            raise UsageError(f"{source}: 'target' must be a version number >= 1")
        if type(share) not in (int, float) or not 0.0 <= float(share) <= 1.0:  # type: ignore[arg-type]
            raise UsageError(f"{source}: 'share' must be a number in [0, 1]")
        if phase not in PHASES:
            raise UsageError(f"{source}: 'phase' must be one of {PHASES}")
        if previous is not None and (type(previous) is not int or previous < 1):
            raise UsageError(f"{source}: 'previous' must be a version number or null")
        if type(updated) not in (int, float):
            raise UsageError(f"{source}: 'updated_at' must be a number")
        return cls(target, float(share), phase, previous, float(updated))  # type: ignore[arg-type]


def in_share(device_key: bytes, model: str, share: float) -> bool:
    """Whether a device is among the first ``share`` of the fleet for ``model``: a stable
    hash of its key, the same on every server, so a canary's devices stay in as it widens."""
    if share >= 1.0:
        return True
    digest = hashlib.sha256(b"edgeoffload rollout\x00" + model.encode() + b"\x00" + device_key)
    return int.from_bytes(digest.digest()[:8], "big") < share * 2**64


_NO_PLAN = object()


class PlanReader:
    """``rollout.json`` of a model folder, re-read when its mtime changes.

    :meth:`plan` is None when there is no plan, and raises nothing: a malformed plan is logged
    once and read as "offer nothing" (:attr:`HOLD`).
    """

    HOLD = RolloutPlan(target=1, share=0.0, phase="canary")

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[int, RolloutPlan | None]] = {}

    def plan(self, model_dir: Path) -> RolloutPlan | None:
        path = model_dir / PLAN_FILE
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        except OSError:
            return self.HOLD
        cached = self._cache.get(model_dir)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            data = path.read_bytes()[:MAX_PLAN_BYTES]
            plan: RolloutPlan | None = RolloutPlan.parse(json.loads(data), str(path))
        except (OSError, ValueError, UsageError) as exc:
            log.error("%s is malformed, offering no update for this model: %s", path, exc)
            plan = self.HOLD
        self._cache[model_dir] = (stamp, plan)
        return plan


def write_json_atomic(path: Path, data: Mapping[str, object]) -> None:
    """Replace ``path`` whole (tmp + rename), so a server never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# -- the operator's side ------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetServer:
    """One server of a rollout: its repository folder and its metrics URL."""

    repository: Path
    metrics_url: str  # http://host:port/metrics
    token: str | None = None  # EDGEOFFLOAD_METRICS_TOKEN of that server, if set


@dataclass
class Scrape:
    """The counters of one server that a rollout watches."""

    loaded: set[str] = field(default_factory=set)  # bundle versions loaded and not unloaded
    results: dict[str, float] = field(default_factory=dict)  # answered, by bundle version
    failures: float = 0.0  # error replies with a FAILURE_CODES code


def scrape(server: FleetServer, timeout: float = 5.0) -> Scrape:
    """Read ``server``'s /metrics (prometheus text, parsed by prometheus_client)."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(server.metrics_url)
    if server.token:
        request.add_header("Authorization", f"Bearer {server.token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            text = response.read().decode()
    except OSError as exc:
        raise RolloutError(f"cannot read {server.metrics_url}: {exc}") from None
    out = Scrape()
    loaded: dict[str, float] = {}
    unloaded: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "edgeoffload_bundle_loaded_total":
                loaded[sample.labels["bundle"]] = sample.value
            elif sample.name == "edgeoffload_bundle_unloaded_total":
                unloaded[sample.labels["bundle"]] = sample.value
            elif sample.name == "edgeoffload_results_total":
                out.results[sample.labels["bundle"]] = sample.value
            elif (
                sample.name == "edgeoffload_errors_total"
                and sample.labels.get("code") in FAILURE_CODES
            ):
                out.failures += sample.value
    out.loaded = {v for v, n in loaded.items() if n > unloaded.get(v, 0.0)}
    return out


@dataclass(frozen=True)
class RolloutStep:
    """One step of a rollout as it happened (for the report and ``fleet status``)."""

    phase: str
    share: float
    seconds: float
    answered: float  # results of the new version during the step, all servers
    failures: float  # failure-coded errors during the step, all servers
    note: str = ""


@dataclass
class RolloutReport:
    model: str
    previous: int
    target: int
    outcome: Literal["done", "rolled_back"]
    steps: list[RolloutStep] = field(default_factory=list)
    seconds: float = 0.0


def _bundle_version(folder: Path, trusted: Sequence[bytes] | None) -> str:
    from edgeoffload.bundle import load_bundle

    try:
        bundle = load_bundle(folder) if trusted is None else load_bundle(folder, trusted=trusted)
    except EdgeOffloadError as exc:
        raise RolloutError(
            f"{folder} fails verification ({type(exc).__name__}: {exc}); nothing was changed",
            hint=exc.hint,
        ) from None
    if bundle.tail_path is None:
        raise RolloutError(f"{folder} has no tail to serve; nothing was changed")
    return bundle.manifest.version


def _serving_numbers(model_dir: Path) -> list[int]:
    """The version numbers the model's policy serves now (the repository's own reading)."""
    model = ModelRepository(model_dir.parent).scan().models.get(model_dir.name)
    if model is None or model.policy is None:
        why = "no such model folder" if model is None else model.problem
        raise RolloutError(f"{model_dir}: cannot tell what it serves ({why}); nothing was changed")
    return sorted(model.policy.select(model.numbers))


def _set_policy(servers: Sequence[FleetServer], model: str, numbers: Sequence[int]) -> None:
    for server in servers:
        policy = {"policy": "pinned", "versions": sorted(set(numbers))}
        write_json_atomic(server.repository / model / POLICY_FILE, policy)


def _set_plan(servers: Sequence[FleetServer], model: str, plan: RolloutPlan) -> None:
    for server in servers:
        write_json_atomic(server.repository / model / PLAN_FILE, plan.to_dict())


def run_rollout(
    servers: Sequence[FleetServer],
    model: str,
    target: int,
    *,
    shares: Sequence[float] = (0.1, 0.5, 1.0),
    watch: float = 10.0,
    max_failure_rate: float = 0.01,
    load_timeout: float = 120.0,
    retire_timeout: float = 600.0,
    trusted: Sequence[bytes] | None = None,
    progress: Callable[[str], None] = lambda line: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RolloutReport:
    """Move ``model`` to version ``target`` on every server (see the module docstring).

    Raises:
        RolloutError: before any change when ``target`` is missing or fails verification on a
            server, or when the fleet disagrees on what it serves; after a rollback (the
            report's steps are in the message) when the new version failed to load or its
            failure rate passed ``max_failure_rate``.
    """
    if not servers:
        raise UsageError("a rollout needs at least one server")
    if not shares or any(not 0 < s <= 1 for s in shares) or list(shares) != sorted(shares):
        raise UsageError("shares must be increasing fractions in (0, 1], e.g. 0.1 0.5 1")
    started = clock()
    versions = set()
    previous_sets = set()
    for server in servers:
        model_dir = server.repository / model
        if not (model_dir / str(target)).is_dir():
            raise RolloutError(f"{model_dir / str(target)} does not exist; nothing was changed")
        versions.add(_bundle_version(model_dir / str(target), trusted))
        previous_sets.add(tuple(n for n in _serving_numbers(model_dir) if n != target))
    if len(versions) != 1 or len(previous_sets) != 1:
        raise RolloutError(
            "the servers disagree: "
            + ("different bundles under that number; " if len(versions) != 1 else "")
            + ("they serve different versions now" if len(previous_sets) != 1 else ""),
            hint="give every server the same repository content before rolling out",
        )
    new_version = versions.pop()
    previous_numbers = previous_sets.pop()
    if not previous_numbers:
        raise RolloutError(f"nothing serves {model} now: start the servers with a version first")
    previous = max(previous_numbers)
    report = RolloutReport(model, previous, target, "done")

    def step(phase: str, share: float, since: float, before: list[Scrape], note: str = "") -> None:
        after = [scrape(s) for s in servers]
        answered = sum(a.results.get(new_version, 0.0) for a in after) - sum(
            b.results.get(new_version, 0.0) for b in before
        )
        failures = sum(a.failures for a in after) - sum(b.failures for b in before)
        report.steps.append(RolloutStep(phase, share, clock() - since, answered, failures, note))
        progress(
            f"{phase} {share:.0%}: {answered:.0f} answered by {target}, {failures:.0f} failures"
            + (f" ({note})" if note else "")
        )

    def roll_back(reason: str) -> RolloutError:
        progress(f"rolling back to {previous}: {reason}")
        # Keep the new version loaded while its devices move back; then it drains.
        _set_plan(servers, model, RolloutPlan(previous, 1.0, "rolled_back", target, time.time()))
        _retire(servers, model, previous, [target], retire_timeout, progress, clock, sleep)
        report.outcome = "rolled_back"
        report.seconds = clock() - started
        return RolloutError(f"rollout of {model} {target} rolled back: {reason}")

    # 1. Load the new version everywhere, offering it to nobody yet.
    _set_plan(servers, model, RolloutPlan(target, 0.0, "loading", previous, time.time()))
    _set_policy(servers, model, [*previous_numbers, target])
    since = clock()
    while True:
        scrapes = [scrape(s) for s in servers]
        if all(new_version in s.loaded for s in scrapes):
            break
        if clock() - since > load_timeout:
            raise roll_back(f"version {target} did not load on every server in {load_timeout} s")
        sleep(0.2)
    step("loading", 0.0, since, scrapes, "loaded on every server")

    # 2. Widen the share, watching each step.
    for share in shares:
        phase: Phase = "canary" if share < 1.0 and share == shares[0] else "rolling"
        _set_plan(servers, model, RolloutPlan(target, share, phase, previous, time.time()))
        before = [scrape(s) for s in servers]
        since = clock()
        sleep(watch)
        step(phase, share, since, before)
        last = report.steps[-1]
        total = last.answered + last.failures
        if total > 0 and last.failures / total > max_failure_rate:
            raise roll_back(
                f"{last.failures:.0f} failures for {last.answered:.0f} answers at {share:.0%}"
            )

    # 3. Retire the old version: stop loading it; it drains as its devices move.
    since = clock()
    before = [scrape(s) for s in servers]
    _retire(servers, model, target, previous_numbers, retire_timeout, progress, clock, sleep)
    step("retiring", 1.0, since, before, "old version unloaded everywhere")
    _set_plan(servers, model, RolloutPlan(target, 1.0, "done", previous, time.time()))
    report.seconds = clock() - started
    return report


def _retire(
    servers: Sequence[FleetServer],
    model: str,
    keep: int,
    old_numbers: Sequence[int],
    timeout: float,
    progress: Callable[[str], None],
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> list[Scrape]:
    """Serve only ``keep`` and wait (at most ``timeout`` s) until the old versions are unloaded
    everywhere: each drains as its last device moves (the repository's drain rule)."""
    _set_policy(servers, model, [keep])
    old_versions = set()
    for server in servers:
        for number in old_numbers:
            folder = server.repository / model / str(number)
            if folder.is_dir() and number != keep:
                old_versions.add(_bundle_version(folder, None))
    since = clock()
    while True:
        scrapes = [scrape(s) for s in servers]
        if not any(old_versions & s.loaded for s in scrapes):
            return scrapes
        if clock() - since > timeout:
            progress(f"the old version still holds devices after {timeout:g} s")
            return scrapes
        sleep(0.2)


def run_rollback(
    servers: Sequence[FleetServer],
    model: str,
    target: int,
    *,
    retire_timeout: float = 600.0,
    trusted: Sequence[bytes] | None = None,
    progress: Callable[[str], None] = lambda line: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RolloutReport:
    """Move every device back to ``target`` (an older version still in the repositories):
    load it beside what serves, offer it to all, then retire the others once they drained."""
    started = clock()
    for server in servers:
        _bundle_version(server.repository / model / str(target), trusted)
    current = sorted({n for s in servers for n in _serving_numbers(s.repository / model)})
    rolled_from = max((n for n in current if n != target), default=target)
    _set_policy(servers, model, sorted({*current, target}))
    _set_plan(servers, model, RolloutPlan(target, 1.0, "rolled_back", rolled_from, time.time()))
    report = RolloutReport(model, rolled_from, target, "rolled_back")
    since = clock()
    before = [scrape(s) for s in servers]
    after = _retire(servers, model, target, current, retire_timeout, progress, clock, sleep)
    report.steps.append(
        RolloutStep(
            "rolled_back",
            1.0,
            clock() - since,
            sum(a.results.get(v, 0.0) for a in after for v in a.loaded)
            - sum(b.results.get(v, 0.0) for b in before for v in b.loaded),
            sum(a.failures for a in after) - sum(b.failures for b in before),
            "other versions unloaded everywhere",
        )
    )
    report.seconds = clock() - started
    return report
