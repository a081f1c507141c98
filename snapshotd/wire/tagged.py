"""JSON for plain Python values with their types kept (tuples, lists, non-string dict
keys): DCP's ``planner_data`` written by the client's DCP codec and read back by the
client and by the daemon's durable tier. No pickle: anything else is refused."""

from __future__ import annotations

from snapshotd.wire.errors import InvalidRequestError


def encode(x, where: str):
    """``x`` as JSON-safe data: tuples {"t": [...]}, lists {"l": [...]}, dicts
    {"d": [[k, v], ...]}; None, bool, int, float and str as themselves."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, tuple):
        return {"t": [encode(v, where) for v in x]}
    if isinstance(x, list):
        return {"l": [encode(v, where) for v in x]}
    if isinstance(x, dict):
        return {"d": [[encode(k, where), encode(v, where)] for k, v in x.items()]}
    raise InvalidRequestError(f"{where}: a {type(x).__name__} cannot be stored without pickle "
                              "(supported: None, bool, int, float, str, list, tuple, dict)")


def decode(x):
    """The value :func:`encode` was given."""
    if not isinstance(x, dict):
        return x
    if "t" in x:
        return tuple(decode(v) for v in x["t"])
    if "l" in x:
        return [decode(v) for v in x["l"]]
    return {decode(k): decode(v) for k, v in x["d"]}
