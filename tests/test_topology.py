"""Topologies and their broadcast trees, checked against hand-worked graphs and an independent BFS oracle."""

from __future__ import annotations

import itertools
import pickle
import random
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dasgd.core.topology import (
    Topology,
    TopologyError,
    complete,
    from_edges,
    parse_topology,
    random_regular,
    read_edge_list,
    ring,
    torus,
)

# ---------------------------------------------------------------------------------------------------------------
# Independent oracle: plain adjacency sets, all-pairs distances by repeated BFS, the tie-break rule written
# directly from its definition ("parent = smallest-id neighbour one level closer to the origin").


def oracle_adj(n: int, edges: list[tuple[int, int]]) -> list[set[int]]:
    adj: list[set[int]] = [set() for _ in range(n)]
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    return adj


def oracle_dist(adj: list[set[int]]) -> list[list[int]]:
    n = len(adj)
    out = []
    for s in range(n):
        dist = [-1] * n
        dist[s] = 0
        q = deque([s])
        while q:
            u = q.popleft()
            for v in adj[u]:
                if dist[v] < 0:
                    dist[v] = dist[u] + 1
                    q.append(v)
        out.append(dist)
    return out


def oracle_parent(adj: list[set[int]], dist: list[list[int]], o: int, v: int) -> int | None:
    if v == o:
        return None
    return min(u for u in adj[v] if dist[o][u] == dist[o][v] - 1)


# ---------------------------------------------------------------------------------------------------------------
# Hand-drawn graphs.


def test_ring_of_five_by_hand() -> None:
    r = ring(5)
    assert r.n == 5 and r.name == "ring"
    assert r.edges == ((0, 1), (0, 4), (1, 2), (2, 3), (3, 4))
    assert [r.neighbors(w) for w in range(5)] == [(1, 4), (0, 2), (1, 3), (2, 4), (0, 3)]
    assert all(r.degree(w) == 2 for w in range(5))
    # Tree of origin 0: level 1 = {1, 4}; level 2: 2 hangs off 1, 3 hangs off 4.
    assert [r.children(0, w) for w in range(5)] == [(1, 4), (2,), (), (), (3,)]
    assert [r.parent(0, w) for w in range(5)] == [None, 0, 1, 4, 0]
    assert [r.depth(0, w) for w in range(5)] == [0, 1, 2, 2, 1]
    # Tree of origin 2: level 1 = {1, 3}; level 2: 0 hangs off 1, 4 hangs off 3.
    assert [r.children(2, w) for w in range(5)] == [(), (0,), (1, 3), (4,), ()]
    assert r.diameter() == 2
    # Worker 1's forwarding table, worked out from the five trees above and their rotations.
    assert r.routes(1) == ((2,), (0, 2), (0,), (), ())


def test_ties_go_to_the_smallest_parent() -> None:
    # Ring of 4 from 0: worker 2 is two hops away through 1 or 3; its parent must be 1.
    r4 = ring(4)
    assert r4.parent(0, 2) == 1
    assert r4.children(0, 1) == (2,) and r4.children(0, 3) == ()
    # Ring of 6 from 0: worker 3 is reached through 2 or 4; parent 2.
    assert ring(6).parent(0, 3) == 2
    # Diamond with a tail: 0-1, 0-2, 1-3, 2-3, 3-4.
    g = from_edges(5, [(0, 1), (0, 2), (1, 3), (2, 3), (3, 4)])
    assert g.parent(0, 3) == 1
    assert [g.children(4, w) for w in range(5)] == [(), (0,), (), (1, 2), (3,)]
    assert [g.depth(4, w) for w in range(5)] == [3, 2, 2, 1, 0]
    assert g.diameter() == 3


def test_torus_3x4_is_4_regular() -> None:
    t = torus(3, 4)
    assert t.name == "torus:3x4" and t.n == 12
    assert [t.degree(w) for w in range(12)] == [4] * 12
    assert len(t.edges) == 24
    # Worker 0 = (row 0, col 0): right 1, left 3 (wrap), down 4, up 8 (wrap).
    assert t.neighbors(0) == (1, 3, 4, 8)
    assert t.neighbors(5) == (1, 4, 6, 9)
    assert t.diameter() == 1 + 2


@pytest.mark.parametrize("cols", [2, 3, 5])
def test_torus_with_a_side_of_two_has_no_duplicate_edges(cols: int) -> None:
    t = torus(2, cols)
    assert len(set(t.edges)) == len(t.edges)
    # Rows contribute a ring of `cols` each (1 edge if cols == 2), columns one edge each.
    row_edges = 1 if cols == 2 else cols
    assert len(t.edges) == 2 * row_edges + cols
    assert {t.degree(w) for w in range(t.n)} == {(1 if cols == 2 else 2) + 1}


def test_ring_of_two_is_one_edge() -> None:
    r = ring(2)
    assert r.edges == ((0, 1),) and r.name == "ring"
    assert r.children(0, 0) == (1,) and r.diameter() == 1


def test_complete_graph_is_lazy_and_exact() -> None:
    c = complete(6)
    assert c.edges == tuple(itertools.combinations(range(6), 2))
    assert tuple(c.edges) == tuple(itertools.combinations(range(6), 2))
    assert c.edges[7] == list(itertools.combinations(range(6), 2))[7]
    assert c.edges[-1] == (4, 5) and c.edges[2:4] == ((0, 3), (0, 4))
    assert (2, 5) in c.edges and (5, 2) not in c.edges
    assert hash(c.edges) == hash(tuple(itertools.combinations(range(6), 2)))
    for o, w in itertools.product(range(6), repeat=2):
        others = tuple(x for x in range(6) if x != w)
        assert c.children(o, w) == (others if o == w else ())
        assert c.parent(o, w) == (None if o == w else o)
        assert c.depth(o, w) == (0 if o == w else 1)
    assert c.diameter() == 1 and complete(1).diameter() == 0
    # Same answers from an explicit complete edge list (the general code path).
    e = from_edges(6, itertools.combinations(range(6), 2))
    for o, w in itertools.product(range(6), repeat=2):
        assert e.children(o, w) == c.children(o, w)
        assert e.parent(o, w) == c.parent(o, w)
    assert e.routes(3) == c.routes(3)


def test_complete_graph_of_ten_thousand_is_cheap() -> None:
    c = complete(10_000)
    assert len(c.edges) == 10_000 * 9_999 // 2
    assert c.edges[len(c.edges) - 1] == (9_998, 9_999)
    kids = c.children(123, 123)
    assert len(kids) == 9_999 and 123 not in kids and kids[0] == 0 and kids[-1] == 9_999
    assert c.children(123, 7) == () and c.parent(123, 7) == 123
    table = c.routes(42)
    assert len(table) == 10_000
    assert table[42] == tuple(x for x in range(10_000) if x != 42) and table[0] == ()


def test_sparse_graph_of_ten_thousand_answers_on_demand() -> None:
    r = ring(10_000)
    assert r.children(0, 0) == (1, 9_999)
    assert r.depth(0, 5_000) == 5_000
    # 5,000 is reached both ways round; the tie goes to 4,999 (smaller than 5,001).
    assert r.parent(0, 5_000) == 4_999
    assert r.children(0, 4_999) == (5_000,) and r.children(0, 5_001) == ()
    table = r.routes(1)
    assert table[0] == (2,) and table[1] == (0, 2) and table[2] == (0,)
    # Antipodal ties: from 5,002, worker 2 is 5,000 hops either way and hangs off 1 (< 3); from 5,000, worker 0
    # is 5,000 hops either way and hangs off 1 (< 9,999); from 5,001, worker 1 itself is the far point.
    assert table[5_002] == (2,) and table[5_000] == (0,) and table[5_001] == ()


def test_equality_hash_and_pickle() -> None:
    t = torus(3, 3)
    assert t == torus(3, 3) and hash(t) == hash(torus(3, 3))
    assert t != ring(9)
    for topo in (t, complete(50), random_regular(12, 3, seed=5)):
        back = pickle.loads(pickle.dumps(topo))
        assert back == topo and back.children(0, 0) == topo.children(0, 0)


# ---------------------------------------------------------------------------------------------------------------
# random_regular


def _connected(n: int, edges: tuple[tuple[int, int], ...]) -> bool:
    return all(d >= 0 for d in oracle_dist(oracle_adj(n, list(edges)))[0])


@pytest.mark.parametrize(("n", "d"), [(10, 3), (20, 4), (7, 4), (9, 6), (11, 8), (50, 5), (8, 2), (6, 5)])
def test_random_regular_degrees(n: int, d: int) -> None:
    g = random_regular(n, d, seed=3)
    assert g.name == f"random-regular:{d}"
    assert [g.degree(w) for w in range(n)] == [d] * n
    edges = tuple(g.edges)
    assert all(a < b for a, b in edges) and len(set(edges)) == len(edges) == n * d // 2
    assert _connected(n, edges)


def test_random_regular_is_deterministic_per_seed() -> None:
    a = random_regular(40, 3, seed=11)
    assert a.edges == random_regular(40, 3, seed=11).edges
    assert a.edges != random_regular(40, 3, seed=12).edges


def test_random_regular_rejects_impossible_parameters() -> None:
    with pytest.raises(TopologyError, match="must be even"):
        random_regular(7, 3, seed=0)
    with pytest.raises(TopologyError, match="degree < n"):
        random_regular(5, 5, seed=0)
    with pytest.raises(TopologyError, match="disconnected"):
        random_regular(6, 1, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# from_edges / read_edge_list / parse_topology


def test_from_edges_merges_duplicates_and_validates() -> None:
    g = from_edges(3, [(1, 0), (0, 1), (2, 1)], name="tri")
    assert g.edges == ((0, 1), (1, 2)) and g.name == "tri"
    with pytest.raises(TopologyError, match="self loop"):
        from_edges(3, [(0, 1), (1, 1)])
    with pytest.raises(TopologyError, match="worker 3"):
        from_edges(3, [(0, 1), (1, 3)])
    with pytest.raises(TopologyError, match="pair"):
        from_edges(3, [(0, 1, 2)])  # type: ignore[list-item]


def test_disconnected_graph_is_rejected_with_its_components() -> None:
    with pytest.raises(TopologyError) as info:
        from_edges(6, [(0, 1), (1, 2), (3, 4)], name="islands")
    msg = str(info.value)
    assert "islands" in msg and "disconnected" in msg
    assert "component sizes 3, 2, 1" in msg
    assert "{0, 1, 2}" in msg and "{3, 4}" in msg and "{5}" in msg
    assert "add edges" in msg


def test_direct_construction_requires_canonical_edges() -> None:
    assert Topology(3, ((0, 1), (1, 2)), "path").diameter() == 2
    with pytest.raises(TopologyError, match="from_edges"):
        Topology(3, ((1, 2), (0, 1)), "unsorted")
    with pytest.raises(TopologyError, match="from_edges"):
        Topology(3, ((1, 0), (1, 2)), "reversed")
    with pytest.raises(TopologyError, match="disconnected"):
        Topology(3, ((0, 1),), "short")


def test_worker_ids_are_checked() -> None:
    with pytest.raises(TopologyError, match="out of range"):
        ring(5).children(0, 5)
    with pytest.raises(TopologyError, match="out of range"):
        complete(5).neighbors(-1)


def test_read_edge_list(tmp_path: Path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("# a path plus a chord\n0 1\n\n1 2  # middle\n2 3\n3 1\n")
    g = read_edge_list(path, 4)
    assert g.edges == ((0, 1), (1, 2), (1, 3), (2, 3))
    assert g.name == f"edges:{path}"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("0 1\n1 2 3\n", ":2: expected one edge"),
        ("0 1\n# c\n1 x\n", ":3: worker ids must be integers"),
        ("0 1\n1 9\n", ":2: worker id 9 is out of range"),
        ("0 0\n", ":1: edge (0, 0) is a self loop"),
    ],
)
def test_read_edge_list_errors_name_file_and_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(TopologyError) as info:
        read_edge_list(path, 3)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_read_edge_list_missing_and_disconnected(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read edge list"):
        read_edge_list(tmp_path / "nope.txt", 3)
    path = tmp_path / "split.txt"
    path.write_text("0 1\n2 3\n")
    with pytest.raises(TopologyError, match=r"split\.txt.*disconnected: component sizes 2, 2"):
        read_edge_list(path, 4)


def test_parse_topology_forms(tmp_path: Path) -> None:
    assert parse_topology("complete", 5).edges == tuple(itertools.combinations(range(5), 2))
    assert parse_topology(" ring ", 5).edges == ring(5).edges
    assert parse_topology("torus", 12).name == "torus:3x4"
    assert parse_topology("torus", 16).name == "torus:4x4"
    assert parse_topology("torus", 3).edges == ((0, 1), (0, 2), (1, 2))
    assert parse_topology("torus:2x6", 12).name == "torus:2x6"
    assert parse_topology("random-regular:3", 10, seed=4).edges == random_regular(10, 3, seed=4).edges
    path = tmp_path / "e.txt"
    path.write_text("0 1\n1 2\n")
    assert parse_topology(f"edges:{path}", 3).edges == ((0, 1), (1, 2))


@pytest.mark.parametrize(
    ("text", "n", "needle"),
    [
        ("star", 5, "expected one of complete, ring, torus, torus:RxC, random-regular:D, edges:PATH"),
        ("complete:3", 5, "expected one of"),
        ("edges:", 5, "expected one of"),
        ("torus", 7, "torus:RxC"),
        ("torus", 13, "prime"),
        ("torus:3x3", 10, "R*C = 10"),
        ("torus:3by3", 9, "torus:RxC"),
        ("random-regular:four", 10, "integer degree"),
        ("random-regular:3", 7, "must be even"),
        ("ring", 1, "at least 2"),
    ],
)
def test_parse_topology_errors(text: str, n: int, needle: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(text, n)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# Property tests on random connected graphs.


@st.composite
def connected_graphs(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]]]:
    n = draw(st.integers(1, 11))
    # A random spanning tree (node i hangs off an earlier node) guarantees connectivity; extra edges add
    # cycles and ties; a random relabelling stops the ids from following the tree.
    edges = [(draw(st.integers(0, i - 1)), i) for i in range(1, n)]
    if n >= 2:
        pair = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1])
        edges += draw(st.lists(pair, max_size=2 * n))
    perm = draw(st.permutations(range(n)))
    return n, [(perm[a], perm[b]) for a, b in edges]


@settings(max_examples=150, deadline=None)
@given(connected_graphs())
def test_trees_match_the_oracle(graph: tuple[int, list[tuple[int, int]]]) -> None:
    n, edges = graph
    topo = from_edges(n, edges)
    adj = oracle_adj(n, edges)
    dist = oracle_dist(adj)
    assert topo.diameter() == max(max(row) for row in dist)
    for w in range(n):
        assert topo.neighbors(w) == tuple(sorted(adj[w]))
    for o, w in itertools.product(range(n), repeat=2):
        assert topo.depth(o, w) == dist[o][w]
        assert topo.parent(o, w) == oracle_parent(adj, dist, o, w)
        expected = tuple(sorted(v for v in adj[w] if oracle_parent(adj, dist, o, v) == w))
        assert topo.children(o, w) == expected
    for w in range(n):
        assert topo.routes(w) == tuple(topo.children(o, w) for o in range(n))


@settings(max_examples=150, deadline=None)
@given(connected_graphs())
def test_flooding_along_children_delivers_exactly_once(graph: tuple[int, list[tuple[int, int]]]) -> None:
    n, edges = graph
    topo = from_edges(n, edges)
    links = set(edges) | {(b, a) for a, b in edges}
    for origin in range(n):
        deliveries = [0] * n
        pending = deque([origin])
        while pending:
            w = pending.popleft()
            for child in topo.children(origin, w):
                assert (w, child) in links  # only real links carry messages
                deliveries[child] += 1
                pending.append(child)
        assert deliveries == [0 if w == origin else 1 for w in range(n)]


@settings(max_examples=100, deadline=None)
@given(connected_graphs(), st.integers(0, 2**32 - 1))
def test_fifo_links_keep_each_origins_order(graph: tuple[int, list[tuple[int, int]]], seed: int) -> None:
    # Every origin sends 3 messages; links are FIFO queues served in a random interleaving, emissions are
    # interleaved with deliveries. Every worker must see every origin's messages once each, in order.
    n, edges = graph
    topo = from_edges(n, edges)
    rng = random.Random(seed)
    per_origin = 3
    queues: dict[tuple[int, int], deque[tuple[int, int]]] = {}
    received: list[list[list[int]]] = [[[] for _ in range(n)] for _ in range(n)]  # [worker][origin]
    emitted = [0] * n

    def forward(w: int, origin: int, seq: int) -> None:
        for child in topo.children(origin, w):
            queues.setdefault((w, child), deque()).append((origin, seq))

    while True:
        busy = [link for link, q in queues.items() if q]
        can_emit = [o for o in range(n) if emitted[o] < per_origin]
        if not busy and not can_emit:
            break
        if can_emit and (not busy or rng.random() < 0.3):
            o = rng.choice(can_emit)
            forward(o, o, emitted[o])
            emitted[o] += 1
        else:
            src, dst = rng.choice(busy)
            origin, seq = queues[(src, dst)].popleft()
            received[dst][origin].append(seq)
            forward(dst, origin, seq)
    for w, o in itertools.product(range(n), repeat=2):
        assert received[w][o] == ([] if w == o else list(range(per_origin)))


@pytest.mark.parametrize("topo", [torus(4, 5), random_regular(60, 3, seed=1), ring(31)], ids=str)
def test_larger_graphs_against_the_oracle(topo: Topology) -> None:
    edges = list(topo.edges)
    adj = oracle_adj(topo.n, edges)
    dist = oracle_dist(adj)
    assert topo.diameter() == max(max(row) for row in dist)
    for w in range(topo.n):
        table = topo.routes(w)
        for o in range(topo.n):
            expected = tuple(sorted(v for v in adj[w] if oracle_parent(adj, dist, o, v) == w))
            assert table[o] == expected == topo.children(o, w)
