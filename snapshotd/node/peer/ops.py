"""The one codec between the peer operations' dict form and their protobuf messages.

The schema is proto/peer.proto (``snapshotd.peer``). The cluster code still speaks dicts
(``{"op": "fetch", "job": ..., "v": ..., "kind": "data", "j": ...}``); this module
names every operation's fields once -- dict key, protobuf field, type -- in
:data:`REQUESTS` and :data:`REPLIES`, and converts both ways by that table. An unknown
op, an unknown key, a value of the wrong type or out of its field's range is a
:class:`PeerProtocolError` (on the sender: nothing is sent; on the receiver: the
message is refused). Pure: no I/O.

Request dict -> ``PeerRequest``: :func:`request_from_dict`; back: :func:`request_to_dict`.
Reply dict -> ``PeerReply``: :func:`reply_from_dict` (the reply's form is the request
op's, see :data:`REPLY_OF`); back: :func:`reply_to_dict`. A decoded dict holds exactly
the fields that were sent (singular fields have presence), repeated and map fields
always (empty when not sent).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

from snapshotd.wire._proto import peer_pb2 as ppb
from snapshotd.wire.errors import PeerProtocolError

_KINDS = {"data": ppb.BLOCK_KIND_DATA, "parity": ppb.BLOCK_KIND_PARITY}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}


def _int(value) -> int:
    if isinstance(value, bool):
        raise TypeError("a bool is not an integer here")
    return operator.index(value)


def _str(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected str, not {type(value).__name__}")
    return value


def _seq(value) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, not {type(value).__name__}")
    return list(value)


def _map(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Field:
    """One field: its ``key`` in the dict form, its ``name`` in the message, how to put a
    dict value into the message and how to read it back."""

    key: str
    name: str
    put: Callable  # (message, name, value) -> None; raises TypeError/ValueError
    get: Callable  # (message, name) -> dict value
    singular: bool = True  # has presence: read back only when set


def _put_scalar(conv):
    def put(msg, name, value):
        setattr(msg, name, conv(value))
    return put


def _get_scalar(msg, name):
    return getattr(msg, name)


def _put_kind(msg, name, value):
    if value not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, not {value!r}")
    setattr(msg, name, _KINDS[value])


def _get_kind(msg, name):
    value = getattr(msg, name)
    if value not in _KIND_NAMES:
        raise ValueError(f"unknown block kind {value}")
    return _KIND_NAMES[value]


def _put_ints(msg, name, value):
    getattr(msg, name).extend(_int(x) for x in _seq(value))


def _get_ints(msg, name):
    return list(getattr(msg, name))


def _put_versions(msg, name, value):
    target = getattr(msg, name)
    for job, v in _map(value).items():
        target[_str(job)] = _int(v)


def _get_versions(msg, name):
    return dict(getattr(msg, name))


_SUMMARY_FIELDS = (("committed", "committed_version"), ("world_size", "world_size"),
                   ("local_world_size", "local_world_size"))


def _put_jobs(msg, name, value):
    target = getattr(msg, name)
    for job, summary in _map(value).items():
        entry = target[_str(job)]
        unknown = set(_map(summary)) - {k for k, _ in _SUMMARY_FIELDS}
        if unknown:
            raise ValueError(f"job summary has unknown keys {sorted(unknown)}")
        for key, field in _SUMMARY_FIELDS:
            if key in summary:
                setattr(entry, field, _int(summary[key]))


def _get_jobs(msg, name):
    return {job: {key: getattr(s, field) for key, field in _SUMMARY_FIELDS if s.HasField(field)}
            for job, s in getattr(msg, name).items()}


def _f(key: str, name: str, kind: str) -> Field:
    if kind == "str":
        return Field(key, name, _put_scalar(_str), _get_scalar)
    if kind == "int":
        return Field(key, name, _put_scalar(_int), _get_scalar)
    if kind == "kind":
        return Field(key, name, _put_kind, _get_kind)
    if kind == "ints":
        return Field(key, name, _put_ints, _get_ints, singular=False)
    if kind == "versions":
        return Field(key, name, _put_versions, _get_versions, singular=False)
    if kind == "jobs":
        return Field(key, name, _put_jobs, _get_jobs, singular=False)
    raise AssertionError(kind)


JOB, VERSION = _f("job", "job", "str"), _f("v", "version", "int")
_BLOCK_AT = (_f("kind", "kind", "kind"), _f("j", "block_index", "int"), _f("s", "stripe", "int"),
             _f("t", "row", "int"))

# op -> its fields (dict key <-> PeerRequest.<op> field). The oneof member is the op name.
REQUESTS: dict[str, tuple[Field, ...]] = {
    "announce": (JOB, VERSION, _f("node", "node", "str"), _f("block_count", "block_count", "int"),
                 _f("ranks", "ranks", "ints"), _f("sizes", "manifest_sizes_bytes", "ints")),
    "contrib": (JOB, VERSION, _f("s", "stripe", "int"), _f("t", "row", "int"),
                _f("p", "position", "int"), _f("counts", "block_counts", "ints")),
    "vote": (JOB, VERSION, _f("ranks", "ranks", "ints")),
    "ping": (_f("committed", "committed_versions", "versions"),),
    "round": (JOB, VERSION),
    "fetch": (JOB, VERSION) + _BLOCK_AT,
    "jobs": (),
    "suspect": (JOB, VERSION) + _BLOCK_AT,
    "fence": (JOB,),
    "rank_manifest": (JOB, VERSION, _f("rank", "rank", "int")),
    "rank_block": (JOB, VERSION, _f("rank", "rank", "int"), _f("j", "block_index", "int")),
}

# reply form -> its fields (dict key <-> PeerReply.<form> field). "ack" is {"ok": True}.
REPLIES: dict[str, tuple[Field, ...]] = {
    "ack": (),
    "ping": (_f("committed", "committed_versions", "versions"),),
    "jobs": (_f("jobs", "jobs", "jobs"),),
    "round": (_f("size", "doc_bytes", "int"),),
}

# op -> the form of its reply
REPLY_OF: dict[str, str] = {op: (op if op in REPLIES else "ack") for op in REQUESTS}

_BY_KEY = {op: {f.key: f for f in fields} for op, fields in REQUESTS.items()}
_REPLY_BY_KEY = {form: {f.key: f for f in fields} for form, fields in REPLIES.items()}


def _fill(msg, fields: dict[str, Field], d: dict, skip: tuple[str, ...], what: str) -> None:
    for key, value in d.items():
        if key in skip:
            continue
        field = fields.get(key)
        if field is None:
            raise PeerProtocolError(f"{what} has no field {key!r}")
        try:
            field.put(msg, field.name, value)
        except (TypeError, ValueError, OverflowError) as e:
            raise PeerProtocolError(f"{what}: field {key!r}: {e}") from None


def _read(msg, fields: tuple[Field, ...], what: str) -> dict:
    out = {}
    try:
        for f in fields:
            if not f.singular or msg.HasField(f.name):
                out[f.key] = f.get(msg, f.name)
    except ValueError as e:
        raise PeerProtocolError(f"{what}: {e}") from None
    return out


def request_op(req: ppb.PeerRequest) -> str:
    """The op a request carries; PeerProtocolError when none (an op this side lacks)."""
    if not isinstance(req, ppb.PeerRequest):
        raise PeerProtocolError(f"a request must be a PeerRequest, not {type(req).__name__}")
    op = req.WhichOneof("op")
    if op is None:
        raise PeerProtocolError("request carries no operation this node knows")
    return op


def request_from_dict(d: dict) -> ppb.PeerRequest:
    """``{"op": name, key: value, ...}`` -> ``PeerRequest``, checked against the table."""
    if not isinstance(d, dict):
        raise PeerProtocolError(f"header must be a dict, not {type(d).__name__}")
    op = d.get("op")
    fields = _BY_KEY.get(op) if isinstance(op, str) else None
    if fields is None:
        raise PeerProtocolError(f"unknown op {op!r}")
    req = ppb.PeerRequest()
    msg = getattr(req, op)
    msg.SetInParent()  # an op without fields ("jobs") is still that op
    _fill(msg, fields, d, ("op",), f"op {op!r}")
    return req


def request_to_dict(req: ppb.PeerRequest) -> dict:
    op = request_op(req)
    return {"op": op, **_read(getattr(req, op), REQUESTS[op], f"op {op!r}")}


def reply_from_dict(op: str, d: dict) -> ppb.PeerReply:
    """The handler's reply dict to request ``op`` -> ``PeerReply`` (its form: REPLY_OF[op])."""
    if not isinstance(d, dict):
        raise PeerProtocolError(f"reply must be a dict, not {type(d).__name__}")
    form = REPLY_OF[op]
    rep = ppb.PeerReply()
    msg = getattr(rep, form)
    msg.SetInParent()
    skip: tuple[str, ...] = ()
    if form == "ack":
        if d.get("ok", True) is not True:
            raise PeerProtocolError(f"reply to {op!r}: 'ok' must be True")
        skip = ("ok",)
    _fill(msg, _REPLY_BY_KEY[form], d, skip, f"reply to {op!r}")
    return rep


def reply_to_dict(rep: ppb.PeerReply) -> dict:
    form = rep.WhichOneof("body")
    if form is None:
        raise PeerProtocolError("reply carries no body this node knows")
    if form == "ack":
        return {"ok": True}
    return _read(getattr(rep, form), REPLIES[form], f"reply {form!r}")
