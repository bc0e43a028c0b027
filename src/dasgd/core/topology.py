"""Communication graphs between workers, and the broadcast trees that route gradients over them.

DASGD runs on any connected undirected graph: worker ``a`` may send to worker ``b`` iff ``(a, b)`` is an edge.
On a complete graph every worker sends its gradients straight to everyone else. On a sparse graph a gradient
must still reach every worker, exactly once, so each origin's messages are routed along a *broadcast tree*.

The tree of origin ``o`` is the breadth-first shortest-path tree rooted at ``o`` with deterministic tie-breaks:
neighbours are visited in increasing id, and a worker's parent is its smallest-id neighbour on the previous BFS
level. Every worker computes the same trees from the same edge list, with no coordination. The rule for a
worker ``w`` holding a message that originated at ``o`` (computed by ``w`` itself when ``w == o``, otherwise
received from ``parent(o, w)``) is: send it on to ``children(o, w)``, in the order received.

Why every worker receives each of ``o``'s messages exactly once:
    A BFS tree of a connected graph spans it, and each worker other than ``o`` is the child of exactly one
    worker. By induction on depth, if the parent receives a message once it forwards it once to each child,
    and nobody else ever sends ``o``'s messages to that worker, so the worker receives it once. Only the tree's
    ``n - 1`` links carry ``o``'s messages, the fewest possible (flooding with deduplication would use every
    link in both directions, ``2 |E|`` sends, and still need the duplicates thrown away).

Why in order:
    There is exactly one path from ``o`` to each worker. If every link is FIFO and every worker forwards
    ``o``'s messages in the order it received them, then by induction along that path each worker receives
    ``o``'s messages in the order ``o`` sent them. Messages from different origins share links, but FIFO
    links keep each origin's subsequence in order. Coalescing (summing a slow link's pending messages) keeps
    this property as long as it only merges consecutive messages of the same origin. So with FIFO links the
    per-origin gradient sets stay prefixes and :class:`dasgd.core.gradset.GradientSet` never needs extras.

Cost model: a complete graph never stores its edges or trees (``complete(10_000)`` is instant and tiny). For
other graphs the adjacency lists are built once, O(|E|); a breadth-first search from worker ``x`` (O(n + |E|))
yields three arrays at once: the tree rooted at ``x``, the hop distances from ``x``, and ``x``'s next hop
towards every origin. These are computed on demand and kept in a least-recently-used cache sized to about
256 MiB, so every search is kept for ``n`` up to about 4,700 workers and memory stays bounded beyond that.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np

from dasgd.errors import DasgdError

__all__ = [
    "SurvivorRoutes",
    "Topology",
    "TopologyError",
    "complete",
    "from_edges",
    "parse_topology",
    "random_regular",
    "read_edge_list",
    "ring",
    "torus",
]

_CACHE_BYTES = 256 * 2**20
"""Memory allowed for cached breadth-first searches, per topology."""

_REGULAR_ATTEMPTS = 100
"""Fresh pairings random_regular tries before giving up (a d >= 3 pairing is connected almost surely)."""

_ACCEPTED_FORMS = "complete, ring, torus, torus:RxC, random-regular:D, edges:PATH"


class TopologyError(DasgdError, ValueError):
    """A topology is malformed, disconnected, or cannot be built as specified."""


class _CompleteEdges(Sequence[tuple[int, int]]):
    """The sorted edge list of the complete graph on ``n`` workers, without storing its n(n-1)/2 pairs.

    Behaves like the equivalent tuple (length, indexing, iteration, membership, equality, hash) so callers
    need not know whether a topology's edges are materialised.
    """

    __slots__ = ("_n",)

    def __init__(self, n: int) -> None:
        self._n = n

    @property
    def n(self) -> int:
        return self._n

    def _row_start(self, a: int) -> int:
        # Index of edge (a, a + 1): rows 0..a-1 hold n-1, n-2, ..., n-a edges.
        return a * (self._n - 1) - a * (a - 1) // 2

    def __len__(self) -> int:
        return self._n * (self._n - 1) // 2

    @overload
    def __getitem__(self, index: int) -> tuple[int, int]: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[int, int], ...]: ...

    def __getitem__(self, index: int | slice) -> tuple[int, int] | tuple[tuple[int, int], ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        i = operator.index(index)
        size = len(self)
        if i < 0:
            i += size
        if not 0 <= i < size:
            raise IndexError("edge index out of range")
        lo, hi = 0, self._n - 2
        while lo < hi:  # largest row a with _row_start(a) <= i
            mid = (lo + hi + 1) // 2
            if self._row_start(mid) <= i:
                lo = mid
            else:
                hi = mid - 1
        return (lo, lo + 1 + i - self._row_start(lo))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = self._n
        return ((a, b) for a in range(n) for b in range(a + 1, n))

    def __contains__(self, edge: object) -> bool:
        if not isinstance(edge, tuple) or len(edge) != 2:
            return False
        a, b = edge
        return isinstance(a, int) and isinstance(b, int) and 0 <= a < b < self._n

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _CompleteEdges):
            return self._n == other._n
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(x == y for x, y in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        # Must agree with the equal tuple's hash; O(n^2), but nothing on a hot path hashes edge lists.
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"<all {len(self)} edges of the complete graph on {self._n} workers>"

    def __reduce__(self) -> tuple[type[_CompleteEdges], tuple[int]]:
        return (_CompleteEdges, (self._n,))


class _Search(NamedTuple):
    """One breadth-first search from worker ``x`` (arrays of length n, int32, -1 where undefined)."""

    parent: np.ndarray
    """``parent[v]``: v's parent in the tree rooted at x, i.e. ``Topology.parent(x, v)``."""
    depth: np.ndarray
    """``depth[v]``: hop distance between x and v (symmetric, so also ``Topology.depth(v, x)``)."""
    hop: np.ndarray
    """``hop[o]``: x's parent in the tree rooted at o, i.e. ``Topology.parent(o, x)``."""


def _search(adj: Sequence[tuple[int, ...]], n: int, x: int) -> _Search:
    """Breadth-first search from ``x`` with the module's tie-break rule.

    Frontiers are processed in increasing id, so the first discoverer of a worker is its smallest-id neighbour
    on the previous level: its parent. The same pass computes ``hop``: x's parent in the tree of origin o is
    its smallest-id neighbour u with dist(o, u) = dist(o, x) - 1, i.e. the smallest first step of a shortest
    path from x to o, which is the minimum over o's previous-level neighbours of their own smallest first step.
    """
    parent = [-1] * n
    depth = [-1] * n
    hop = [-1] * n
    depth[x] = 0
    frontier = list(adj[x])
    for v in frontier:
        depth[v] = 1
        parent[v] = x
        hop[v] = v
    d = 1
    while frontier:
        d += 1
        found: list[int] = []
        for u in frontier:
            hop_u = hop[u]
            for v in adj[u]:
                dv = depth[v]
                if dv < 0:
                    depth[v] = d
                    parent[v] = u
                    hop[v] = hop_u
                    found.append(v)
                elif dv == d and hop_u < hop[v]:
                    hop[v] = hop_u
        found.sort()
        frontier = found
    return _Search(
        np.array(parent, dtype=np.int32), np.array(depth, dtype=np.int32), np.array(hop, dtype=np.int32)
    )


def _components(adj: Sequence[tuple[int, ...]], n: int) -> list[list[int]]:
    """Connected components, each sorted, ordered by smallest member."""
    seen = [False] * n
    out: list[list[int]] = []
    for s in range(n):
        if seen[s]:
            continue
        seen[s] = True
        comp = [s]
        stack = [s]
        while stack:
            for v in adj[stack.pop()]:
                if not seen[v]:
                    seen[v] = True
                    comp.append(v)
                    stack.append(v)
        comp.sort()
        out.append(comp)
    return out


def _describe_components(comps: list[list[int]]) -> str:
    def members(c: list[int]) -> str:
        shown = ", ".join(map(str, c[:4]))
        return "{" + shown + (", ...}" if len(c) > 4 else "}")

    sizes = ", ".join(str(len(c)) for c in comps[:20]) + (", ..." if len(comps) > 20 else "")
    shown = "; ".join(members(c) for c in comps[:5]) + ("; ..." if len(comps) > 5 else "")
    return f"component sizes {sizes} (workers {shown})"


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise TopologyError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TopologyError(f"{what} must be an integer, got {value!r}") from None


@dataclass(frozen=True, eq=False, repr=False)
class Topology:
    """A connected undirected graph on workers ``0 .. n-1``, with per-origin broadcast-tree routing.

    Attributes:
        n: number of workers.
        edges: the undirected edges ``(a, b)`` with ``a < b``, sorted, without duplicates or self loops.
            A tuple, except for complete graphs built by :func:`complete`, where it is an equivalent lazy
            sequence (same length, indexing, iteration, equality) so that n = 10,000 costs no memory.
        name: how the topology was specified, e.g. ``"ring"`` or ``"torus:4x8"``.

    Build topologies with the module's functions (:func:`complete`, :func:`ring`, :func:`torus`,
    :func:`random_regular`, :func:`from_edges`, :func:`read_edge_list`, :func:`parse_topology`). Constructing one
    directly validates that ``edges`` is already canonical and that the graph is connected.

    Raises:
        TopologyError: if ``edges`` is not canonical or the graph is disconnected.
    """

    n: int
    edges: Sequence[tuple[int, int]]
    name: str
    _complete: bool = field(init=False, repr=False)
    _adj: tuple[tuple[int, ...], ...] = field(init=False, repr=False)
    _cached_search: Callable[[int], _Search] = field(init=False, repr=False)
    _memo: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = _as_int(self.n, "number of workers n")
        if n < 1:
            raise TopologyError(f"a topology needs at least 1 worker, got n = {n}")
        set_ = object.__setattr__  # frozen dataclass: fields are set once, here
        set_(self, "n", n)
        set_(self, "_memo", {})
        if isinstance(self.edges, _CompleteEdges):
            if self.edges.n != n:
                raise TopologyError(f"complete edge list is for {self.edges.n} workers, topology has {n}")
            set_(self, "_complete", True)
            set_(self, "_adj", ())
        else:
            edges = tuple(self._canonical_edge(e) for e in self.edges)
            for prev, cur in zip(edges, edges[1:], strict=False):
                if prev >= cur:
                    raise TopologyError(
                        f"topology {self.name!r}: edges must be sorted without duplicates, but {prev} comes "
                        f"before {cur}; build it with from_edges(), which sorts and merges"
                    )
            adj: list[list[int]] = [[] for _ in range(n)]
            for a, b in edges:
                adj[a].append(b)
                adj[b].append(a)
            set_(self, "edges", edges)
            set_(self, "_adj", tuple(tuple(sorted(a)) for a in adj))
            set_(self, "_complete", len(edges) == n * (n - 1) // 2)
            comps = _components(self._adj, n)
            if len(comps) > 1:
                raise TopologyError(
                    f"topology {self.name!r} is disconnected: {_describe_components(comps)}; "
                    "add edges joining them so every gradient can reach every worker"
                )
        capacity = max(16, _CACHE_BYTES // (12 * n))
        adj_ref, n_ref = self._adj, n
        set_(self, "_cached_search", lru_cache(maxsize=capacity)(lambda x: _search(adj_ref, n_ref, x)))

    def _canonical_edge(self, edge: object) -> tuple[int, int]:
        try:
            a, b = edge  # type: ignore[misc]
        except (TypeError, ValueError):
            raise TopologyError(
                f"topology {self.name!r}: an edge must be a pair (a, b), got {edge!r}"
            ) from None
        a = _as_int(a, "a worker id in an edge")
        b = _as_int(b, "a worker id in an edge")
        if not (0 <= a < b < self.n):
            raise TopologyError(
                f"topology {self.name!r}: edge ({a}, {b}) must have 0 <= a < b < n = {self.n}; "
                "build it with from_edges(), which orders pairs and reports bad ids"
            )
        return (a, b)

    def _check(self, w: int) -> None:
        if not 0 <= w < self.n:
            raise TopologyError(
                f"worker id {w} is out of range: topology {self.name!r} has workers 0..{self.n - 1}"
            )

    def neighbors(self, w: int) -> tuple[int, ...]:
        """The workers adjacent to ``w``, sorted."""
        self._check(w)
        if self._complete and not self._adj:
            return tuple(range(w)) + tuple(range(w + 1, self.n))
        return self._adj[w]

    def degree(self, w: int) -> int:
        """Number of workers adjacent to ``w``."""
        self._check(w)
        return self.n - 1 if self._complete else len(self._adj[w])

    def is_connected(self) -> bool:
        """Whether every worker can reach every other. Always True: construction rejects disconnected graphs."""
        return True

    def children(self, origin: int, w: int) -> tuple[int, ...]:
        """The workers ``w`` forwards ``origin``'s messages to (sorted); empty at a leaf of origin's tree."""
        self._check(origin)
        self._check(w)
        if self._complete:
            return self.neighbors(w) if w == origin else ()
        nbrs = self._adj[w]
        parent = self._cached_search(origin).parent
        return tuple(v for v in nbrs if parent[v] == w)

    def parent(self, origin: int, w: int) -> int | None:
        """The worker ``w`` receives ``origin``'s messages from; None when ``w`` is the origin."""
        self._check(origin)
        self._check(w)
        if w == origin:
            return None
        if self._complete:
            return origin
        return int(self._cached_search(origin).parent[w])

    def depth(self, origin: int, w: int) -> int:
        """Hops from ``origin`` to ``w`` in origin's tree (the shortest-path distance)."""
        self._check(origin)
        self._check(w)
        if w == origin:
            return 0
        if self._complete:
            return 1
        return int(self._cached_search(origin).depth[w])

    def routes(self, w: int) -> tuple[tuple[int, ...], ...]:
        """``children(o, w)`` for every origin ``o``, indexed by ``o``: worker ``w``'s whole forwarding table.

        Costs ``degree(w)`` breadth-first searches (not ``n``): ``v`` is a child of ``w`` in origin ``o``'s tree
        iff ``w`` is ``v``'s next hop towards ``o``, and one search from ``v`` gives that for every ``o``.
        """
        self._check(w)
        n = self.n
        if self._complete:
            out: list[tuple[int, ...]] = [()] * n
            out[w] = self.neighbors(w)
            return tuple(out)
        origin_parts: list[np.ndarray] = []
        child_parts: list[np.ndarray] = []
        for v in self._adj[w]:  # increasing v, so each origin's children come out sorted
            origins = np.flatnonzero(self._cached_search(v).hop == w)
            origin_parts.append(origins)
            child_parts.append(np.full(origins.size, v, dtype=np.int64))
        table: list[tuple[int, ...]] = [()] * n
        if not origin_parts:
            return tuple(table)
        origins = np.concatenate(origin_parts)
        kids = np.concatenate(child_parts)
        order = np.argsort(origins, kind="stable")
        origins, kids = origins[order], kids[order]
        cuts = np.flatnonzero(np.diff(origins)) + 1
        for group_o, group_kids in zip(np.split(origins, cuts), np.split(kids, cuts), strict=True):
            if group_o.size:
                table[int(group_o[0])] = tuple(group_kids.tolist())
        return tuple(table)

    def diameter(self) -> int:
        """Largest hop distance between two workers (0 for a single worker).

        O(n (n + |E|)) for graphs other than complete ones (about 30 s at n = 10,000), computed once.
        """
        if "diameter" not in self._memo:
            if self._complete:
                value = 0 if self.n == 1 else 1
            else:
                # Uncached searches: the diameter visits every root once, which would only flush the cache.
                value = max(int(_search(self._adj, self.n, x).depth.max()) for x in range(self.n))
            self._memo["diameter"] = value
        return self._memo["diameter"]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self.n == other.n and self.name == other.name and self.edges == other.edges

    def __hash__(self) -> int:
        return hash((self.n, self.name, len(self.edges)))

    def __repr__(self) -> str:
        return f"Topology(name={self.name!r}, n={self.n}, edges={len(self.edges)})"

    def __reduce__(self) -> tuple[type[Topology], tuple[int, Sequence[tuple[int, int]], str]]:
        # Rebuild from the defining fields; the caches hold a lambda and are recomputed on demand.
        return (Topology, (self.n, self.edges, self.name))


def complete(n: int) -> Topology:
    """Every worker linked to every other (TensAIR's all-to-all); the default. ``n >= 1``."""
    n = _as_int(n, "number of workers n")
    if n < 1:
        raise TopologyError(f"complete graph needs at least 1 worker, got n = {n}")
    return Topology(n, _CompleteEdges(n), "complete")


def ring(n: int) -> Topology:
    """Workers on a cycle, ``w`` linked to ``w - 1`` and ``w + 1`` (mod n). ``n >= 2``; n = 2 is one edge."""
    n = _as_int(n, "number of workers n")
    if n < 2:
        raise TopologyError(f"a ring needs at least 2 workers, got n = {n}; use complete for a single worker")
    return from_edges(n, ((w, (w + 1) % n) for w in range(n)), name="ring")


def torus(rows: int, cols: int) -> Topology:
    """A 2-D grid with wraparound: worker ``r * cols + c`` is linked to its four grid neighbours (mod sides).

    ``rows, cols >= 2``. A side of 2 would link the same pair twice (once each way round); the duplicate is
    merged, so those workers have degree 3 (or 2 on a 2x2 torus, which is a ring of 4).
    """
    rows = _as_int(rows, "torus rows")
    cols = _as_int(cols, "torus cols")
    if rows < 2 or cols < 2:
        raise TopologyError(f"torus:{rows}x{cols} is invalid: both sides must be >= 2 (use ring for one row)")
    edges = []
    for r in range(rows):
        for c in range(cols):
            w = r * cols + c
            edges.append((w, r * cols + (c + 1) % cols))
            edges.append((w, ((r + 1) % rows) * cols + c))
    return from_edges(rows * cols, edges, name=f"torus:{rows}x{cols}")


def _pair_stubs(n: int, degree: int, rng: np.random.Generator) -> set[tuple[int, int]] | None:
    """Random simple ``degree``-regular graph by stub pairing; None if this attempt got stuck.

    Shuffle all n * degree stubs and pair them off; keep the pairs that make a new simple edge and re-shuffle
    the rejected stubs. Not exactly uniform over regular graphs, which DASGD does not need.
    """
    stubs = np.repeat(np.arange(n, dtype=np.int64), degree)
    edges: set[tuple[int, int]] = set()
    stalled = 0
    while stubs.size:
        stubs = rng.permutation(stubs)
        left: list[int] = []
        pairs = stubs.reshape(-1, 2).tolist()
        for a, b in pairs:
            e = (a, b) if a < b else (b, a)
            if a == b or e in edges:
                left += (a, b)
            else:
                edges.add(e)
        if len(left) == stubs.size:
            stalled += 1
            if stalled > 20:  # the leftover stubs can only form loops or repeats: start over
                return None
        else:
            stalled = 0
        stubs = np.array(left, dtype=np.int64)
    return edges


def random_regular(n: int, degree: int, seed: int) -> Topology:
    """A connected simple graph in which every worker has exactly ``degree`` neighbours.

    Deterministic per ``seed`` (a seeded :class:`numpy.random.Generator`). Needs ``0 <= degree < n`` and
    ``n * degree`` even. Degree 2 is a random cycle; degrees above (n - 1) / 2 are built as the complement of a
    sparse regular graph (always connected); otherwise pairings are retried until one is connected.

    Raises:
        TopologyError: on impossible parameters, or if no connected pairing turned up in the allowed attempts.
    """
    n = _as_int(n, "number of workers n")
    degree = _as_int(degree, "degree")
    if not 0 <= degree < n:
        raise TopologyError(f"random-regular:{degree} on {n} workers needs 0 <= degree < n")
    if (n * degree) % 2:
        raise TopologyError(
            f"random-regular:{degree} on {n} workers is impossible: n * degree must be even "
            "(each edge uses two endpoints); change the degree or the number of workers"
        )
    name = f"random-regular:{degree}"
    if degree == n - 1:
        return Topology(n, _CompleteEdges(n), name)
    if degree < 2:
        raise TopologyError(
            f"random-regular:{degree} on {n} workers is disconnected (a {degree}-regular graph on more than "
            f"{degree + 1} workers always is); use degree >= 2"
        )
    rng = np.random.default_rng(seed)
    if degree == 2:
        order = rng.permutation(n).tolist()
        return from_edges(n, zip(order, order[1:] + order[:1], strict=True), name=name)
    for _ in range(_REGULAR_ATTEMPTS):
        if 2 * degree > n - 1:
            # Dense: with degree >= (n - 1) / 2 any two non-adjacent workers share a neighbour, so the
            # complement of any (n - 1 - degree)-regular graph is connected, and that one is sparse to pair.
            sparse = _pair_stubs(n, n - 1 - degree, rng)
            if sparse is not None:
                dense = [(a, b) for a in range(n) for b in range(a + 1, n) if (a, b) not in sparse]
                return from_edges(n, dense, name=name)
            continue
        pairs = _pair_stubs(n, degree, rng)
        if pairs is None:
            continue
        try:
            return from_edges(n, pairs, name=name)
        except TopologyError:
            continue  # disconnected pairing: draw another
    raise TopologyError(
        f"random-regular:{degree} on {n} workers: no connected pairing in {_REGULAR_ATTEMPTS} attempts "
        f"(seed {seed}); try another seed or degree"
    )


def from_edges(n: int, edges: Iterable[tuple[int, int]], name: str = "edges") -> Topology:
    """A topology from any undirected edge list: pairs in either order, repeats merged.

    Raises:
        TopologyError: on a worker id outside ``0..n-1``, a self loop, or a disconnected graph.
    """
    n = _as_int(n, "number of workers n")
    if n < 1:
        raise TopologyError(f"a topology needs at least 1 worker, got n = {n}")
    seen: set[tuple[int, int]] = set()
    for edge in edges:
        try:
            a, b = edge
        except (TypeError, ValueError):
            raise TopologyError(f"topology {name!r}: an edge must be a pair (a, b), got {edge!r}") from None
        a = _as_int(a, "a worker id in an edge")
        b = _as_int(b, "a worker id in an edge")
        for x in (a, b):
            if not 0 <= x < n:
                raise TopologyError(
                    f"topology {name!r}: edge ({a}, {b}) names worker {x}, but there are {n} workers "
                    f"(ids 0..{n - 1})"
                )
        if a == b:
            raise TopologyError(
                f"topology {name!r}: edge ({a}, {b}) is a self loop; a worker cannot link to itself"
            )
        seen.add((a, b) if a < b else (b, a))
    return Topology(n, tuple(sorted(seen)), name)


def read_edge_list(path: str | Path, n: int) -> Topology:
    """A topology from a text file with one edge ``a b`` per line (``#`` starts a comment; blank lines ok).

    Raises:
        TopologyError: naming the file (and line) if it cannot be read or holds a malformed edge, or if the
            graph is disconnected.
    """
    path = Path(path)
    n = _as_int(n, "number of workers n")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(f"cannot read edge list {str(path)!r}: {e}; give an existing text file") from None
    edges: list[tuple[int, int]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        parts = line.split()
        if len(parts) != 2:
            raise TopologyError(f"{where}: expected one edge 'a b' (two worker ids), got {raw.strip()!r}")
        try:
            a, b = int(parts[0]), int(parts[1])
        except ValueError:
            raise TopologyError(f"{where}: worker ids must be integers, got {raw.strip()!r}") from None
        for x in (a, b):
            if not 0 <= x < n:
                raise TopologyError(
                    f"{where}: worker id {x} is out of range for {n} workers (ids 0..{n - 1})"
                )
        if a == b:
            raise TopologyError(f"{where}: edge ({a}, {b}) is a self loop; a worker cannot link to itself")
        edges.append((a, b))
    return from_edges(n, edges, name=f"edges:{path}")


def _squarest(n: int) -> tuple[int, int]:
    """The factorisation rows x cols = n with rows <= cols and rows as large as possible."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


def parse_topology(text: str, n: int, seed: int = 0) -> Topology:
    """Build a topology on ``n`` workers from its textual form.

    Forms: ``complete``; ``ring``; ``torus`` (n factored as close to square as possible; n = 2 or 3 give the
    ring, the one-dimensional torus); ``torus:RxC`` (R * C must equal n); ``random-regular:D`` (uses ``seed``);
    ``edges:PATH`` (see :func:`read_edge_list`).

    Raises:
        TopologyError: on an unknown form (the message lists the accepted ones) or invalid parameters.
    """
    n = _as_int(n, "number of workers n")
    if n < 1:
        raise TopologyError(f"a topology needs at least 1 worker, got n = {n}")
    spec = text.strip()
    kind, sep, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "complete" and not sep:
        return complete(n)
    if kind == "ring" and not sep:
        return ring(n)
    if kind == "torus" and not sep:
        if n in (2, 3):
            return ring(n)
        rows, cols = _squarest(n)
        if rows < 2:
            raise TopologyError(
                f"torus on {n} workers: {n} has no factorisation rows x cols with both sides >= 2"
                f"{' (it is prime)' if n > 3 else ''}; use torus:RxC with a different worker count, or "
                "ring, random-regular:D or complete"
            )
        return torus(rows, cols)
    if kind == "torus" and sep:
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", arg)
        if not m:
            raise TopologyError(
                f"topology {spec!r}: expected torus:RxC with integers R and C, e.g. torus:4x8"
            )
        rows, cols = int(m.group(1)), int(m.group(2))
        if rows * cols != n:
            raise TopologyError(
                f"topology {spec!r} has {rows * cols} workers but the run has {n}; choose R and C with R*C = {n}"
            )
        return torus(rows, cols)
    if kind == "random-regular" and sep:
        try:
            degree = int(arg.strip())
        except ValueError:
            raise TopologyError(
                f"topology {spec!r}: expected random-regular:D with an integer degree D, e.g. random-regular:4"
            ) from None
        return random_regular(n, degree, seed)
    if kind == "edges" and sep and arg.strip():
        return read_edge_list(arg.strip(), n)
    raise TopologyError(f"unknown topology {spec!r}: expected one of {_ACCEPTED_FORMS}")


class SurvivorRoutes:
    """Broadcast trees on a topology with some workers dead: each origin's tree spans the live workers it
    can still reach, by the same shortest-path rule as :class:`Topology` (so with nobody dead the trees are
    the same).

    Why: a tree is fixed per origin, and on a sparse graph a dead worker cuts every tree that passed
    through it, so some survivors stop receiving some origins' gradients while others still get them. Those
    replicas then drift apart without bound (see docs/failures.md), not just fall behind. Routing around the
    dead restores full exchange among the survivors whenever they are still connected.
    """

    def __init__(self, topology: Topology, dead: frozenset[int]) -> None:
        self.topology = topology
        self.dead = dead
        self._adj = tuple(
            () if w in dead else tuple(v for v in topology.neighbors(w) if v not in dead)
            for w in range(topology.n)
        )
        self._search = lru_cache(maxsize=256)(lambda x: _search(self._adj, topology.n, x))

    def children(self, origin: int, w: int) -> tuple[int, ...]:
        """Where ``w`` forwards ``origin``'s messages (empty for a dead worker or an unreachable origin)."""
        if origin in self.dead or w in self.dead:
            return ()
        parent = self._search(origin).parent
        return tuple(v for v in self._adj[w] if parent[v] == w)

    def parent(self, origin: int, w: int) -> int | None:
        """Where ``w`` receives ``origin``'s messages from (None: ``w`` is the origin, or cannot be reached)."""
        if w == origin:
            return None
        p = int(self._search(origin).parent[w]) if origin not in self.dead else -1
        return p if p >= 0 else None

    def reachable(self, w: int) -> set[int]:
        """The live workers ``w`` can still reach (itself included)."""
        if w in self.dead:
            return {w}
        return {int(v) for v in np.flatnonzero(self._search(w).depth >= 0)}

    def components(self) -> list[list[int]]:
        """The live workers in groups that can reach each other, each sorted, ordered by smallest member."""
        return [c for c in _components(self._adj, self.topology.n) if c[0] not in self.dead]
