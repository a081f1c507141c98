"""Placement: which node of a group holds which data and parity block of a version.

A cluster is cut into groups of n = k + m nodes (``spec.form_groups``: nodes are sorted
by failure domain and dealt round-robin into groups, so one group's members come from
as many domains as possible; a domain holding more than m members of one group is
reported by ``ClusterSpec.domain_warnings``). Inside a group nodes are numbered by
group-local index 0..n-1 and everything below is a pure function of (n, m, block counts
B_0..B_{n-1}); node i's data for a version is cut into blocks 0..B_i-1.

Stripe s (s = 0, 1, 2, ...) rotates over the group; with r = (node - s) mod n:

    r <  m  ->  node holds parity row t = r of stripe s      (nodes s, s+1, .., s+m-1)
    r >= m  ->  node is data position p = r - m of stripe s   (nodes s+m, .., s+n-1)

    n=4, m=2      stripe 0   stripe 1   stripe 2   stripe 3   stripe 4 ...
    node 0          P0         D1         D0         P1         P0
    node 1          P1         P0         D1         D0         P1
    node 2          D0         P1         P0         D1         D0
    node 3          D1         D0         P1         P0         D1

So in every window of n consecutive stripes a node is a data node in exactly k stripes
and a parity holder in m. Node i's j-th data block goes to its j-th data stripe (in
increasing s): window w = j // k, the (j % k)-th of its k data stripes in that window.
A group needs S = num_stripes(...) stripes, the fewest that place every node's last
block. Where j >= B_i the slot is a *virtual zero block*: nothing is stored or sent, and
it counts as known zeros when encoding or decoding. Parity row t of every stripe s < S is
stored on node (s + t) mod n (also when all its data is virtual: then it is zero).

With equal counts B (a multiple of k) every node stores B data blocks and exactly
B*m/k parity blocks; a node never holds parity of a stripe where it holds data, so
losing any m nodes loses at most m shards of each stripe. m = 0 (no parity, k = n) is
allowed.

The route of the parity (issue 16): each data block crosses the network once. The
holder of parity row 0 of stripe s, node s mod n, is the stripe's *accumulator*
(:func:`contribution_targets`): every data node sends it its block of s, and it computes
all m parity rows of s, keeps row 0 and forwards row t to the holder of row t
(:meth:`GroupLayout.forwards`). A node sends B blocks of data and forwards (m-1) rows
for each of the B/k stripes it accumulates: (k+m-1)/k x its data in all, instead of
m x. The parity each holder stores is the same bytes as if it had combined the data
blocks itself (the field is linear); only its route differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

from snapshotd.wire.errors import InvalidRequestError


def _check_nm(n: int, m: int) -> None:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidRequestError(f"{name} must be an int, got {v!r}")
    if n < 1 or not 0 <= m < n:
        raise InvalidRequestError(f"need n >= 1 and 0 <= m < n (got n={n}, m={m})")


def _check_node(n: int, node: int) -> None:
    if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < n:
        raise InvalidRequestError(f"node {node!r} out of range (group-local indices 0..{n - 1})")


def _check_nonneg(name: str, v: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidRequestError(f"{name} must be an int >= 0, got {v!r}")


def stripe_parity_nodes(n: int, m: int, s: int) -> tuple[int, ...]:
    """Node holding parity row t of stripe s, for t = 0..m-1."""
    _check_nm(n, m)
    return tuple((s + t) % n for t in range(m))


def contribution_targets(n: int, m: int, s: int) -> tuple[tuple[int, int], ...]:
    """((t, node),): where the data nodes of stripe s send their blocks: the stripe's
    accumulator, the holder of parity row 0, which forwards rows 1..m-1 (none if m = 0)."""
    _check_nm(n, m)
    return ((0, s % n),) if m else ()


def stripe_data_nodes(n: int, m: int, s: int) -> tuple[int, ...]:
    """Node at data position p of stripe s, for p = 0..k-1."""
    _check_nm(n, m)
    return tuple((s + m + p) % n for p in range(n - m))


def position_in_stripe(n: int, m: int, node: int, s: int) -> tuple[str, int]:
    """("data", p) or ("parity", t): the role of ``node`` in stripe s."""
    _check_nm(n, m)
    _check_node(n, node)
    r = (node - s) % n
    return ("parity", r) if r < m else ("data", r - m)


def _window_start(n: int, m: int, node: int) -> tuple[int, int]:
    # In stripes 0..n-1 the node is data in the cyclic interval a, a+1, .., a+k-1 (mod n);
    # ``wrapped`` of them (those past n-1) are the stripes 0..wrapped-1.
    a = (node + 1) % n
    return a, max(0, a + (n - m) - n)


def _block_index(n: int, m: int, s: int, p: int) -> tuple[int, int]:
    """:func:`block_of` without the argument checks, for the planners' inner loops
    (callers pass values they derived themselves, already in range)."""
    node = (s + m + p) % n
    w, s0 = divmod(s, n)
    a = (node + 1) % n
    wrapped = a - m if a > m else 0
    return node, w * (n - m) + (s0 if s0 < wrapped else wrapped + (s0 - a))


def data_stripe_of(n: int, m: int, node: int, j: int) -> tuple[int, int]:
    """(s, p): the stripe and data position of ``node``'s j-th data block. O(1)."""
    _check_nm(n, m)
    _check_node(n, node)
    _check_nonneg("block index j", j)
    k = n - m
    w, q = divmod(j, k)
    a, wrapped = _window_start(n, m, node)
    s0 = q if q < wrapped else a + (q - wrapped)
    s = w * n + s0
    return s, (node - s) % n - m


def block_of(n: int, m: int, s: int, p: int) -> tuple[int, int]:
    """(node, j): the inverse of :func:`data_stripe_of`. O(1)."""
    _check_nm(n, m)
    _check_nonneg("stripe", s)
    k = n - m
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < k:
        raise InvalidRequestError(f"data position {p!r} out of range (0..{k - 1})")
    return _block_index(n, m, s, p)


def num_stripes(n: int, m: int, block_counts: Sequence[int]) -> int:
    """The fewest stripes that place blocks 0..B_i-1 of every node i (0 if no blocks)."""
    _check_nm(n, m)
    if len(block_counts) != n:
        raise InvalidRequestError(f"need {n} block counts (one per node), got {len(block_counts)}")
    last = -1
    k = n - m
    for i, b in enumerate(block_counts):
        if type(b) is not int or b < 0:
            _check_nonneg(f"block count of node {i}", b)
        if b:  # data_stripe_of(n, m, i, b - 1), inlined: every layout of every version runs this
            w, q = divmod(b - 1, k)
            a, wrapped = _window_start(n, m, i)
            s = w * n + (q if q < wrapped else a + (q - wrapped))
            if s > last:
                last = s
    return last + 1


def parity_stripes_of(n: int, m: int, node: int, S: int) -> list[tuple[int, int]]:
    """[(s, t)] in increasing s: the stripes s < S where ``node`` holds parity row t."""
    _check_nm(n, m)
    _check_node(n, node)
    _check_nonneg("number of stripes", S)
    out = []
    for base in range(0, S, n):
        row = sorted(((base + (node - t) % n, t) for t in range(m)))
        out.extend(st for st in row if st[0] < S)
    return out


@dataclass(frozen=True)
class GroupLayout:
    """The placement of one version in one group; build it with :func:`place_group`."""

    n: int
    m: int
    block_counts: tuple[int, ...]
    num_stripes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_counts", tuple(self.block_counts))
        need = num_stripes(self.n, self.m, self.block_counts)
        if self.num_stripes != need:
            raise InvalidRequestError(
                f"num_stripes {self.num_stripes!r} does not match the block counts (need {need})")

    @property
    def k(self) -> int:
        return self.n - self.m

    def stripe_nodes(self, s: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(data nodes by position p, parity nodes by row t) of stripe s."""
        return stripe_data_nodes(self.n, self.m, s), stripe_parity_nodes(self.n, self.m, s)

    def contribution_targets(self, s: int) -> tuple[tuple[int, int], ...]:
        """((t, node),): where the data blocks of stripe s go (:func:`contribution_targets`)."""
        return contribution_targets(self.n, self.m, s)

    def forwards(self, node: int) -> list[tuple[int, int, int]]:
        """[(s, t, holder)]: the parity rows ``node`` computes as the accumulator of
        stripe s and forwards to the holder of row t >= 1 (stripes with real data only)."""
        _check_node(self.n, node)
        return [(s, t, (s + t) % self.n) for s, t0 in self.parity_blocks(node) if t0 == 0
                and any(real for _nd, _j, real in self._stripe_row(s)) for t in range(1, self.m)]

    def data_block(self, s: int, p: int) -> tuple[int, int] | None:
        """(node, j) at data position p of stripe s, or None for a virtual zero block."""
        node, j = block_of(self.n, self.m, s, p)
        return (node, j) if j < self.block_counts[node] else None

    def stripe_blocks(self, s: int) -> tuple[tuple[int, int, bool], ...]:
        """((node, j, real), ...) by data position p of stripe s (``real`` False: a virtual
        zero block), for s in 0..num_stripes-1. The planners walk every stripe with it."""
        if not isinstance(s, int) or not 0 <= s < self.num_stripes:
            raise InvalidRequestError(f"stripe {s!r} out of range (0..{self.num_stripes - 1})")
        return self._stripe_table[s]

    @cached_property
    def _stripe_table(self) -> tuple[tuple[tuple[int, int, bool], ...], ...]:
        # Built once per layout (a recovery plan walks every stripe; a 4096-node job walks
        # about a million entries per planning pass).
        return tuple(self._stripe_row(s) for s in range(self.num_stripes))

    def _stripe_row(self, s: int) -> tuple[tuple[int, int, bool], ...]:
        # The arithmetic of _block_index for every data position of stripe s, inlined.
        n, m, counts = self.n, self.m, self.block_counts
        w, s0 = divmod(s, n)
        base = w * (n - m)
        row = []
        for p in range(n - m):
            node = (s + m + p) % n
            a = node + 1 if node + 1 < n else 0
            wrapped = a - m if a > m else 0
            j = base + (s0 if s0 < wrapped else wrapped + s0 - a)
            row.append((node, j, j < counts[node]))
        return tuple(row)

    def parity_blocks(self, node: int) -> list[tuple[int, int]]:
        """[(s, t)]: the parity blocks ``node`` stores, in increasing s."""
        return parity_stripes_of(self.n, self.m, node, self.num_stripes)

    def data_blocks(self, node: int) -> list[tuple[int, int, int]]:
        """[(j, s, p)]: where each of ``node``'s real data blocks goes."""
        _check_node(self.n, node)
        n, m, k = self.n, self.m, self.n - self.m
        a, wrapped = _window_start(n, m, node)
        out = []
        for j in range(self.block_counts[node]):
            w, q = divmod(j, k)
            s = w * n + (q if q < wrapped else a + (q - wrapped))
            out.append((j, s, (node - s) % n - m))
        return out

    def expected_contributions(self, node: int) -> list[tuple[int, int, int, int, int]]:
        """[(s, t, p, src_node, j)]: every real data block parity holder ``node`` must
        fold into its parity row t of stripe s (virtual zero blocks are left out)."""
        out = []
        row = self._stripe_row  # only this node's parity stripes: O(its share), not the whole table
        for s, t in self.parity_blocks(node):
            out.extend((s, t, p, src, j) for p, (src, j, real) in enumerate(row(s)) if real)
        return out


def place_group(n: int, m: int, block_counts: Sequence[int]) -> GroupLayout:
    """The layout of one group of n nodes, m parity rows, node i holding block_counts[i]."""
    counts = tuple(block_counts)
    return GroupLayout(n, m, counts, num_stripes(n, m, counts))
