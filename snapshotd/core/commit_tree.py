"""The tree a commit travels across a job's groups, and whom a node watches (pure).

The groups of a job are numbered as :attr:`snapshotd.core.spec.ClusterSpec.groups` lists
them, 0 .. G-1. They form a :data:`FANOUT`-ary tree by index: group 0 is the root, the
parent of group ``g > 0`` is ``(g - 1) // FANOUT`` and its children are
``FANOUT * g + 1 .. FANOUT * g + FANOUT`` (those below G). Its depth is about
``log_FANOUT(G)`` levels (:func:`depth`; 512 groups: 5), the hops a report travels up
and the commit word down.

:mod:`snapshotd.core.protocol` sends a group's "subtree complete" report to every member
of the parent group and the commit word to every member of each child group; the
daemon's heartbeats (``snapshotd.node.cluster.membership``) watch the same nodes:
:func:`watched`. Every function is O(group size x FANOUT), never O(nodes).
"""

from __future__ import annotations

from typing import Sequence

FANOUT = 4  # children per group: more is fewer hops, more commit words per node


def parent(g: int, count: int) -> int | None:
    """The parent group of group ``g`` of ``count`` groups (None for the root, group 0)."""
    if not 0 <= g < count:
        raise ValueError(f"group {g} is not one of 0..{count - 1}")
    return None if g == 0 else (g - 1) // FANOUT


def children(g: int, count: int) -> range:
    """The child groups of group ``g`` (empty for a leaf)."""
    if not 0 <= g < count:
        raise ValueError(f"group {g} is not one of 0..{count - 1}")
    return range(min(FANOUT * g + 1, count), min(FANOUT * g + FANOUT + 1, count))


def depth(count: int) -> int:
    """Levels below the root: how many hops a report travels from the deepest group."""
    d, last = 0, 0
    while last < count - 1:
        last = FANOUT * last + FANOUT
        d += 1
    return d


def neighbours(groups: Sequence[Sequence[str]], g: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the parent group's members, every child group's members, in group order)."""
    p = parent(g, len(groups))
    up = tuple(groups[p]) if p is not None else ()
    down = tuple(n for c in children(g, len(groups)) for n in groups[c])
    return up, down


def watched(groups: Sequence[Sequence[str]], me: str) -> tuple[str, ...]:
    """The nodes ``me`` heartbeats: its own group first, then the parent's and the
    children's members (the peers its commit messages go to and come from)."""
    g = next((i for i, grp in enumerate(groups) if me in grp), None)
    if g is None:
        raise ValueError(f"{me!r} is in no group")
    up, down = neighbours(groups, g)
    return tuple(n for n in tuple(groups[g]) + up + down if n != me)
