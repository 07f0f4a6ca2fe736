"""One exception tree for everything edgeoffload raises on purpose.

Every error carries a documented process exit code (used by the CLI) and an optional hint that
tells the user what to do next. Stdlib only: this module sits in the lowest layer.

Exit codes (stable, documented in README.md):

====  =====================================================================
code  meaning
====  =====================================================================
0     success
1     any other EdgeOffloadError
2     command-line usage error (bad flag or value)
3     GraphError: the model file is not a usable ONNX graph, or a cut is invalid
4     PlanError: no cut satisfies the constraints, or the profiles do not fit;
      QualityError: quantised weights lose more than --max-quality-loss
5     ManifestError: a bundle is malformed or a file was modified after splitting;
      SignatureError: unsigned, signed by an untrusted publisher, or a bad signature
6     VersionMismatch: two parts (device/server) come from different bundles
7     VerificationError: tail(head(x)) differs from the full model
8     ProfileError: a profile file is malformed or was measured on another model
9     ConversionError: exporting a PyTorch / Hugging Face model failed
10    ProtocolError / AuthenticationFailed / PayloadError (wire protocol)
11    OffloadUnavailable / Overloaded (no server could answer); RolloutError
12    MissingExtra: the command needs an optional part that is not installed
====  =====================================================================
"""

from __future__ import annotations


class EdgeOffloadError(Exception):
    """Root of every error edgeoffload raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(EdgeOffloadError):
    """A command-line argument or API argument has an invalid value."""

    exit_code = 2


class GraphError(EdgeOffloadError):
    """The model is not a usable ONNX graph (unreadable, truncated, invalid, unsupported)."""

    exit_code = 3


class CutError(GraphError):
    """A requested cut does not exist or would cut through something that cannot be cut."""


class PlanError(EdgeOffloadError):
    """No plan satisfies the objective and constraints, or its inputs are inconsistent."""

    exit_code = 4


class QualityError(PlanError):
    """Quantised weights lose more quality than allowed (``split --max-quality-loss``): the
    teacher-forced top-1 agreement with the fp32 model is under the bound, or the quality
    could not be measured. No bundle is written."""


class ManifestError(EdgeOffloadError):
    """A bundle or its manifest is malformed, incomplete or fails hash verification."""

    exit_code = 5


class SignatureError(ManifestError):
    """A bundle's publisher signature does not let it be accepted (see edgeoffload.signing).

    Raised only where trusted publisher keys were given; the subclass says what failed.
    """


class Unsigned(SignatureError):
    """The bundle has no ``signature.json`` but only signed bundles are accepted."""


class UnknownPublisher(SignatureError):
    """The bundle is signed by a publisher key that is not trusted (the message names its
    fingerprint)."""


class BadSignature(SignatureError):
    """``signature.json`` is malformed, or its signature does not verify over the current
    ``manifest.json`` bytes (the manifest was modified after signing)."""


class VersionMismatch(EdgeOffloadError):
    """Two parts that must come from the same bundle do not (their hashes differ)."""

    exit_code = 6


class VerificationError(EdgeOffloadError):
    """A split model does not reproduce the full model's outputs."""

    exit_code = 7


class ProfileError(EdgeOffloadError):
    """A device/server/link profile is malformed or does not belong to this model."""

    exit_code = 8


class ConversionError(EdgeOffloadError):
    """Exporting a PyTorch or Hugging Face model to ONNX failed or did not validate."""

    exit_code = 9


class ProtocolError(EdgeOffloadError):
    """The peer broke the wire protocol (or we would have)."""

    exit_code = 10


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol does not allow in the current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class AuthenticationFailed(ProtocolError):
    """A handshake or transport message failed authentication.

    Deliberately opaque (like Fernet's InvalidToken): it never says which check failed.
    """

    def __init__(self, message: str = "authentication failed", *, hint: str | None = None):
        super().__init__(message, hint=hint)


class PayloadError(ProtocolError):
    """A tensor payload is malformed: dtype, shape or byte length do not match."""


class SessionError(ProtocolError):
    """A generation session message is not valid now: unknown or expired session, a step
    before prefill, a position that does not follow the last one, a KV-cache budget overrun.

    Only that session is affected; the connection and every other session go on.
    """


class SessionLost(SessionError):
    """The server no longer has the session (evicted, expired, or the server restarted).

    The client rebuilds it from its own token history; users see this only when that fails.
    """


class OffloadUnavailable(EdgeOffloadError):
    """No edge server could answer and the fallback policy is ``"error"``."""

    exit_code = 11


class ExecutorError(EdgeOffloadError):
    """The edge server's remote tail executor (Ray Serve, ``serve --executor ray``) could not
    run a request or deploy a version: replicas lost more often than the retry budget allows,
    a deployment that never became ready, or a tail that failed on a replica.

    The server answers the device ``internal`` for that request; other requests go on.
    """


class RolloutError(EdgeOffloadError):
    """A rollout (``edgeoffload fleet rollout``) could not start — the new version is missing
    or fails verification on a server, the fleet disagrees — or was rolled back; nothing is
    left half-changed: the message says which server and why."""

    exit_code = 11


class ServerBusy(OffloadUnavailable):
    """The edge server answered but could not serve this request (timeout, shutting down,
    internal error).

    The connection itself is fine; other requests on it are unaffected.
    """


class Overloaded(ServerBusy):
    """The edge server refused the request because it is at its concurrency limit.

    ``retry_after`` is the server's hint (seconds) of when a retry may be admitted, if it sent
    one; the client retries after it (with jitter) while its timeout allows.
    """

    def __init__(
        self, message: str, *, hint: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


# --- generation (sampling/tokenizer) ---


class SamplingError(EdgeOffloadError):
    """Sampling parameters are invalid, or a logits vector cannot be sampled from.

    A logits vector cannot be sampled from when its shape or dtype is wrong, when it holds NaN or
    +inf, or when every token is masked with -inf.
    """


class TokenizerError(EdgeOffloadError):
    """A tokenizer folder is missing or malformed, or its chat template failed to render."""


class MissingExtra(EdgeOffloadError):
    """The command needs an optional part of edgeoffload that this install lacks.

    A device install (``pip install edgeoffload``) carries no onnx; splitting, cut analysis,
    profiling, the zoo and the converters need an extra. The message names the missing module,
    the hint the ``pip install`` line that brings it.
    """

    exit_code = 12

    def __init__(self, module: str, extra: str, *, what: str) -> None:
        super().__init__(
            f"{what} needs {module}, which this install of edgeoffload does not have",
            hint=f"pip install 'edgeoffload[{extra}]'",
        )
        self.module = module
        self.extra = extra
