"""Who may call the daemon: the daemon token (every call) and job tokens (per job).

:class:`TokenInterceptor` refuses a gRPC call without the daemon token (health checks
excepted); the same-host hand-off channel asks it too (:meth:`TokenInterceptor.refusal`).
:class:`JobTokens` binds a job to the token its first registration carried, persisted as
SHA-256 digests in ``STATE_DIR/job_tokens.json`` (0600); the servicer checks it for every
request naming a job. Comparisons are constant-time. See docs/SECURITY.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading

import grpc

from snapshotd.wire.errors import InvalidRequestError, JobAccessDeniedError
from snapshotd.wire.limits import JOB_TOKEN_METADATA_KEY, MAX_JOB_TOKEN_BYTES, TOKEN_METADATA_KEY

log = logging.getLogger("snapshotd.service")  # the name operators filter refusals on


class JobTokens:
    """Which jobs are bound to a job token (SHA-256 of it), persisted in the state dir.

    Thread-safe. Only digests are stored, so the file does not give the tokens away;
    comparisons are constant-time.
    """

    FILE = "job_tokens.json"

    def __init__(self, state_dir: str, require: bool = False):
        self.path = os.path.join(state_dir, self.FILE)
        self.require = require
        self._lock = threading.Lock()
        self._bound: dict[str, str] = {}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    doc = json.load(f)
                self._bound = {str(j): str(h) for j, h in doc.get("jobs", {}).items()}
            except (OSError, ValueError, AttributeError) as exc:
                # Failing open would hand bound jobs to anyone: refuse to start instead.
                raise ValueError(f"job token file {self.path} is unreadable ({exc}); "
                                 "fix or delete it (deleting unbinds every job)") from None

    @staticmethod
    def _digest(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8")).hexdigest()

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"jobs": self._bound}, f)
        os.replace(tmp, self.path)

    def check(self, job_id: str, token: str | None, registering: bool = False) -> None:
        """Refuse a request for ``job_id`` that does not carry the job's token (and,
        with ``require``, a registration without any job token)."""
        if token is not None and len(token) > MAX_JOB_TOKEN_BYTES:
            raise InvalidRequestError(f"job token longer than {MAX_JOB_TOKEN_BYTES} bytes")
        with self._lock:
            want = self._bound.get(job_id)
        if want is None:
            if registering and self.require and not token:
                raise JobAccessDeniedError(
                    f"job {job_id!r}: this daemon requires a job token "
                    f"({JOB_TOKEN_METADATA_KEY}, client env SNAPSHOTD_JOB_TOKEN)")
            return
        if not token or not hmac.compare_digest(self._digest(token), want):
            raise JobAccessDeniedError(
                f"job {job_id!r} is bound to a job token; this request carries "
                f"{'none' if not token else 'a different one'}")

    def bind(self, job_id: str, token: str | None) -> None:
        """After a successful registration: an unbound job becomes bound to ``token``
        (the first registration carrying one claims the job; until then it was open)."""
        if not token:
            return
        with self._lock:
            if job_id not in self._bound:
                self._bound[job_id] = self._digest(token)
                self._save()

    def unbind(self, job_id: str) -> None:
        with self._lock:
            if self._bound.pop(job_id, None) is not None:
                self._save()


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuse every call without the right token (health checks excepted)."""

    def __init__(self, token: str, on_refused=None):
        # Compared with hmac.compare_digest (constant time) below.
        self._token = token.encode()
        self._on_refused = on_refused

    def refusal(self, got: str | bytes | None) -> str | None:
        """None when ``got`` is the token, else why not (also for the hand-off channel)."""
        got = (got or b"").encode() if isinstance(got, str) else (got or b"")
        if got and hmac.compare_digest(got, self._token):
            return None
        return "missing snapshotd token" if not got else "wrong snapshotd token"

    def refuse(self, method: str, msg: str) -> None:
        """Count and log a call refused for its token."""
        if self._on_refused is not None:
            self._on_refused()
        log.warning("%s: %s", method, msg)

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        msg = self.refusal(dict(details.invocation_metadata or ()).get(TOKEN_METADATA_KEY))
        if msg is None:
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        self.refuse(details.method, msg)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
