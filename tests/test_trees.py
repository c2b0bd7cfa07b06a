"""Draft trees and their builders: hand-built trees, growmaps, Sequoia's DP, and every builder
over a fake drafter (valid tree, configured size and depth, ranked distinct children, scores)."""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

from lmms_sd.core.sampling import SamplingConfig, logits_to_probs
from lmms_sd.core.tree import DraftTree
from lmms_sd.testing.fake_drafter import FakeDrafter
from lmms_sd.trees import make_builder
from lmms_sd.trees.chain import ChainBuilder
from lmms_sd.trees.dynamic import DynamicBuilder, DynamicConfig
from lmms_sd.trees.growmap import TreeShape, from_growmap, load_growmap, save_growmap, to_growmap
from lmms_sd.trees.opt import ChildCandidates, OptBuilder, OptConfig
from lmms_sd.trees.sequoia_dp import load_acceptance, sequoia_plan, shape_value
from lmms_sd.trees.static import StaticBuilder

GREEDY = SamplingConfig()
SAMPLE = SamplingConfig(temperature=1.0)
V = 24


def t(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


# ---------------------------------------------------------------- hand-built trees
def test_hand_built_tree_mask_depths_paths() -> None:
    # root -> a(0) -> c(2) -> d(3); root -> b(1)
    tree = DraftTree(t(5, 6, 7, 8), t(-1, -1, 0, 2))
    assert tree.depths.tolist() == [1, 1, 2, 3] and tree.depth == 3
    assert tree.ancestor_mask.long().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0],
                                                 [1, 0, 1, 0], [1, 0, 1, 1]]
    assert tree.paths == [[1], [0, 2, 3]] and tree.leaves == [1, 3]
    assert tree.children == [[0, 1], [2], [], [3], []]
    assert tree.slot_depths().tolist() == [0, 1, 1, 2, 3] and not tree.is_chain
    mask = tree.attention_mask(past_len=2)
    assert mask.shape == (5, 7) and mask[:, :3].all()  # the past and the root are seen by all
    assert mask[4, 2:].long().tolist() == [1, 1, 0, 1, 1]  # node 3 sees root, 0, 2, itself


def test_chain_tree_and_bad_parents() -> None:
    chain = DraftTree.chain(t(3, 1, 4))
    assert chain.is_chain and chain.paths == [[0, 1, 2]] and chain.depth == 3
    with pytest.raises(ValueError, match="topological"):
        DraftTree(t(1, 2), t(1, -1))  # a parent after its child


# ---------------------------------------------------------------- growmaps
SEQUOIA_2X4 = {  # Sequoia's L40_growmaps/2x4-tree.pt, as stored (mask and depth as tensors)
    "roots": [[0], [1, 2], [3, 4], [5, 6], [7, 8]],
    "branches": [[2], [1, 1], [1, 1], [1, 1], [0, 0]],
    "Successors": [[1, 2], [3], [4], [5], [6], [7], [8], [], []],
    "depth": torch.tensor([0, 1, 1, 2, 2, 3, 3, 4, 4]),
    "size": 9,
}


def sequoia_2x4() -> dict:
    m = torch.eye(9, dtype=torch.long)
    m[:, 0] = 1
    for i, parent in [(3, 1), (4, 2), (5, 3), (6, 4), (7, 5), (8, 6)]:
        m[i] |= m[parent]
    return {**SEQUOIA_2X4, "mask": m}


def test_growmap_reads_sequoia_file(tmp_path) -> None:
    torch.save(sequoia_2x4(), tmp_path / "2x4-tree.pt")
    shape = load_growmap(tmp_path / "2x4-tree.pt")
    assert shape == TreeShape.from_widths((2, 1, 1, 1))
    assert shape.parents == (-1, -1, 0, 1, 2, 3, 4, 5) and shape.depth == 4


@pytest.mark.parametrize("shape", [
    TreeShape.chain(5), TreeShape.from_widths((3, 2, 1)), TreeShape(()),
    sequoia_plan([0.5, 0.3, 0.1], budget=20, max_depth=5).shape,
], ids=["chain", "widths", "empty", "dp"])
def test_growmap_round_trip(shape: TreeShape, tmp_path) -> None:
    save_growmap(shape, tmp_path / "g.pt")
    assert load_growmap(tmp_path / "g.pt") == shape
    gm = to_growmap(shape)
    assert gm["size"] == shape.size + 1 and sum(map(sum, gm["branches"])) == shape.size
    assert gm["mask"].sum(1).tolist() == gm["depth"].add(1).tolist()  # ancestors + itself


@pytest.mark.parametrize("key,bad", [
    ("mask", lambda g: g["mask"].fill_(1)),
    ("depth", lambda g: g["depth"].add_(1)),
    ("branches", lambda g: g["branches"][1].reverse() or g["branches"][0].append(0)),
    ("Successors", lambda g: g["Successors"].__setitem__(0, [2, 1])),
])
def test_growmap_rejects_inconsistent_files(key: str, bad) -> None:
    gm = sequoia_2x4()
    bad(gm)
    with pytest.raises(ValueError, match="growmap"):
        from_growmap(gm)


def test_tree_shape_rejects_non_breadth_first() -> None:
    with pytest.raises(ValueError, match="breadth first"):
        TreeShape((-1, -1, 1, 0))


# ---------------------------------------------------------------- Sequoia's DP
def all_shapes(nodes: int, width: int, depth: int) -> list[TreeShape]:
    """Every shape with exactly ``nodes`` nodes, at most ``width`` children a node, depth <=
    ``depth`` (brute force, for tiny sizes)."""
    def forests(n: int, d: int) -> list[list]:  # ordered lists of subtrees with n nodes in all
        if n == 0:
            return [[]]
        if d == 0:
            return []
        out = []
        for k in range(1, n + 1):
            for kids in forests(k - 1, d - 1):
                for rest in forests(n - k, d):
                    if len(rest) < width and len(kids) <= width:
                        out.append([kids] + rest)
        return out

    shapes = []
    for forest in forests(nodes, depth):
        if len(forest) > width:
            continue
        parents, level = [], [(-1, forest)]
        while level:
            nxt = []
            for node, kids in level:
                for sub in kids:
                    nxt.append((len(parents), sub))
                    parents.append(node)
            level = nxt
        shapes.append(TreeShape(tuple(parents)))
    return shapes


@pytest.mark.parametrize("acceptance", [[0.6, 0.2, 0.1], [0.3, 0.3, 0.3], [0.9, 0.05]])
def test_dp_matches_brute_force(acceptance: list[float]) -> None:
    # the DP value is the best over every shape within budget and depth, and is the shape's value
    for budget, depth in [(4, 2), (6, 3), (5, 5)]:
        plan = sequoia_plan(acceptance, budget, depth)
        best = max(shape_value(s, acceptance) for n in range(budget + 1)
                   for s in all_shapes(n, len(acceptance), depth))
        assert plan.expected_accept == pytest.approx(best, abs=1e-9)
        assert shape_value(plan.shape, acceptance) == pytest.approx(plan.expected_accept)
        assert plan.shape.size <= budget and plan.shape.depth <= depth


def test_dp_degenerate_acceptance_gives_a_chain() -> None:
    # the first-ranked child is always accepted, others never: a chain as deep as allowed
    plan = sequoia_plan([1.0, 0.0, 0.0], budget=20, max_depth=6)
    assert plan.shape == TreeShape.chain(6) and plan.expected_accept == pytest.approx(6.0)
    short = sequoia_plan([1.0, 0.0], budget=3, max_depth=6)
    assert short.shape == TreeShape.chain(3)


def test_dp_widens_when_second_rank_is_likely() -> None:
    # a likely second-ranked child earns the root several children; more budget never hurts
    wide = sequoia_plan([0.45, 0.4, 0.1], budget=12, max_depth=4)
    assert len(wide.shape.children[0]) >= 2
    assert wide.expected_accept > shape_value(TreeShape.chain(4), [0.45, 0.4, 0.1])
    values = [sequoia_plan([0.45, 0.4, 0.1], b, 4).expected_accept for b in range(1, 16)]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))


def test_acceptance_vector_parsing(tmp_path) -> None:
    assert load_acceptance("0.5,0.25") == (0.5, 0.25) == load_acceptance("0.5;0.25")
    torch.save(torch.tensor([0.0, 0.6, 0.1, 0.05, 0.25]), tmp_path / "acc.pt")  # Sequoia layout
    assert load_acceptance(str(tmp_path / "acc.pt")) == pytest.approx((0.6, 0.1, 0.05))
    for bad in ["0.7,0.6", "-0.1", "a,b", ""]:
        with pytest.raises(ValueError, match="acceptance"):
            load_acceptance(bad)


# ---------------------------------------------------------------- builders over a fake drafter
def slot_dists(drafter: FakeDrafter, tree: DraftTree, sampling: SamplingConfig) -> torch.Tensor:
    """The processed draft distribution after each slot, recomputed from the fake drafter."""
    paths = [[]] + [tree.tokens[tree.path_to(i)].tolist() for i in range(len(tree))]
    logits = torch.stack([drafter.logits_after(drafter.committed + p) for p in paths])
    return logits_to_probs(logits, sampling)  # [N+1, V]


def check_tree(tree: DraftTree, drafter: FakeDrafter, sampling: SamplingConfig) -> None:
    """What every builder owes: distinct siblings of nonzero draft probability, scores for
    every node; deterministic children are the top tokens of their slot, in order."""
    q = slot_dists(drafter, tree, sampling)
    assert tree.scores is not None and tree.scores.shape == tree.tokens.shape
    assert bool(((tree.scores >= 0) & (tree.scores <= 1)).all())
    for slot, kids in enumerate(tree.children):
        toks = tree.tokens[kids].tolist()
        assert len(set(toks)) == len(toks), f"duplicate siblings under slot {slot}"
        assert all(q[slot, x] > 0 for x in toks)
        if not tree.sampled and kids:
            assert toks == q[slot].topk(len(kids)).indices.tolist(), f"slot {slot} not top-ranked"
            assert tree.scores[kids].diff().le(1e-7).all(), "children not ranked by score"
        if tree.sampled and kids:
            assert torch.allclose(tree.draft_probs[slot], q[slot])


def path_probs(tree: DraftTree, drafter: FakeDrafter, sampling: SamplingConfig) -> torch.Tensor:
    q = slot_dists(drafter, tree, sampling)
    par, tok = tree.parents.tolist(), tree.tokens.tolist()
    out: list[float] = []
    for i in range(len(tree)):
        out.append(float(q[par[i] + 1, tok[i]]) * (out[par[i]] if par[i] >= 0 else 1.0))
    return torch.tensor(out)


BUILDERS = [
    # (name, params, expected size, expected depth, expand-call sizes in greedy mode)
    ("chain", {"k": 5}, 5, 5, [1, 1, 1, 1]),
    ("static", {"acceptance": "1,0", "budget": 9, "depth": 4}, 4, 4, [1, 1, 1]),
    ("dynamic", {"depth": 3, "top_k": 4, "total_tokens": 20}, 19, None, [4, 4, 4]),
    ("opt", {"nodes": 12, "threshold": 0.0, "max_depth": 4}, 12, None, [12, 12, 12]),
]


@pytest.mark.parametrize("name,params,size,depth,calls", BUILDERS, ids=[b[0] for b in BUILDERS])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLE], ids=["greedy", "sampling"])
@pytest.mark.parametrize("seed", [0, 1])
def test_builder_contract(name: str, params: dict, size: int, depth: int | None,
                          calls: list[int], sampling: SamplingConfig, seed: int) -> None:
    # a valid tree of the configured size, one drafter forward per level, sound children
    drafter = FakeDrafter(vocab_size=V, seed=seed)
    tree = make_builder(name, **params)(drafter, sampling, torch.Generator().manual_seed(seed))
    assert len(tree) == size and (depth is None or tree.depth == depth)
    assert drafter.forwards == 1 + len(calls)
    if sampling.greedy or name in ("dynamic", "opt"):
        assert drafter.expand_sizes == calls and not tree.sampled
    check_tree(tree, drafter, sampling)


@pytest.mark.parametrize("name,params,size,depth,calls", BUILDERS, ids=[b[0] for b in BUILDERS])
def test_builders_under_top_p_top_k(name: str, params: dict, size: int, depth: int | None,
                                    calls: list[int]) -> None:
    # filtered draft distributions: no child of zero probability, never more nodes than asked
    sampling = SamplingConfig(temperature=0.7, top_p=0.6, top_k=3)
    for seed in range(3):
        drafter = FakeDrafter(vocab_size=V, seed=seed)
        tree = make_builder(name, **params)(drafter, sampling, torch.Generator().manual_seed(0))
        assert 0 < len(tree) <= size
        check_tree(tree, drafter, sampling)


@pytest.mark.parametrize("name,params", [(b[0], b[1]) for b in BUILDERS[:1] + BUILDERS[2:]],
                         ids=["chain", "dynamic", "opt"])
def test_scores_are_draft_path_probabilities(name: str, params: dict) -> None:
    drafter = FakeDrafter(vocab_size=V, seed=2)
    tree = make_builder(name, **params)(drafter, GREEDY)
    assert torch.allclose(tree.scores, path_probs(tree, drafter, GREEDY), rtol=1e-4)
    assert tree.expected_accept == pytest.approx(float(tree.scores.sum()))


# ---------------------------------------------------------------- static
def test_static_shape_follows_widths_greedy() -> None:
    drafter = FakeDrafter(vocab_size=V)
    shape = TreeShape.from_widths((3, 2, 1))
    tree = StaticBuilder(shape)(drafter, GREEDY)
    assert tree.parents.tolist() == list(shape.parents) and not tree.sampled
    assert drafter.expand_sizes == [3, 6]  # one expand call per level that has children
    assert torch.allclose(tree.scores, path_probs(tree, drafter, GREEDY), rtol=1e-4)
    check_tree(tree, drafter, GREEDY)


def test_static_sampled_children_and_rows() -> None:
    # sampling mode: children drawn without replacement, every parent slot's row filled
    shape = TreeShape.from_widths((4, 3, 1))
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for seed in range(5):
        drafter = FakeDrafter(vocab_size=V, seed=seed, scale=1.0)
        tree = StaticBuilder(shape)(drafter, SAMPLE, gen)
        assert tree.sampled and tree.parents.tolist() == list(shape.parents)
        check_tree(tree, drafter, SAMPLE)
        leaves = [i + 1 for i in tree.leaves]
        assert tree.draft_probs[leaves].abs().sum() == 0  # no children, no distribution
        seen.add(tuple(tree.tokens[:4].tolist()))
    assert len(seen) > 1  # really sampled


def test_static_sampled_first_child_follows_draft() -> None:
    # the first-sampled root child is distributed as the draft's root distribution
    drafter = FakeDrafter(vocab_size=6, scale=1.0)
    builder = StaticBuilder(TreeShape.from_widths((2,)))
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(6)
    for _ in range(2000):
        counts[int(builder(drafter, SAMPLE, gen).tokens[0])] += 1
    q = logits_to_probs(drafter.logits_after(drafter.committed), SAMPLE).double()
    assert chisquare(counts.numpy(), 2000 * (q / q.sum()).numpy()).pvalue > 1e-3


def test_static_prunes_children_beyond_the_draft_support() -> None:
    # top_k=2 leaves two tokens of nonzero probability: a slot gets at most two children
    sampling = SamplingConfig(temperature=1.0, top_k=2)
    for sample_children in (True, False):
        drafter = FakeDrafter(vocab_size=V)
        tree = StaticBuilder(TreeShape.from_widths((3, 3)), None, sample_children)(
            drafter, sampling, torch.Generator().manual_seed(0))
        assert len(tree) == 2 + 2 * 2 and tree.depth == 2
        check_tree(tree, drafter, sampling)


def test_static_rank_scores_match_the_dp(tmp_path) -> None:
    # with an acceptance vector, node scores are Sequoia's rank products: E[A] equals the DP's
    plan = sequoia_plan([0.6, 0.25, 0.1], budget=15, max_depth=5)
    tree = make_builder("static", acceptance="0.6,0.25,0.1", budget="15", depth="5")(
        FakeDrafter(vocab_size=V), GREEDY)
    assert tree.parents.tolist() == list(plan.shape.parents)
    assert tree.expected_accept == pytest.approx(plan.expected_accept, rel=1e-5)
    save_growmap(plan.shape, tmp_path / "plan.pt")
    from_file = make_builder("static", growmap=str(tmp_path / "plan.pt"))
    assert from_file.shape == plan.shape and from_file.rank_accept is None


# ---------------------------------------------------------------- dynamic (EAGLE-2)
def test_dynamic_defaults_are_msd() -> None:
    cfg = make_builder("dynamic").cfg
    assert (cfg.depth, cfg.top_k, cfg.total_tokens) == (5, 10, 59)


def test_dynamic_total_tokens_counts_the_root() -> None:
    # MSD / EAGLE-2 (cnets.py: self.total_tokens = total_tokens - 1): 59 drafts 58 nodes
    tree = make_builder("dynamic", total_tokens=59)(FakeDrafter(vocab_size=V, seed=2), GREEDY)
    assert len(tree) == 58
    with pytest.raises(ValueError, match="counts the root"):
        DynamicConfig(total_tokens=1)


def test_dynamic_keeps_the_global_best() -> None:
    # the kept nodes are the best of the whole candidate pool: keeping every candidate gives a
    # superset whose dropped nodes all score no better than the kept ones
    cfg = DynamicConfig(depth=3, top_k=4, total_tokens=15)
    drafter = FakeDrafter(vocab_size=V, seed=4)
    small = DynamicBuilder(cfg)(drafter, GREEDY)
    pool = DynamicBuilder(replace(cfg, total_tokens=10_000))(drafter, GREEDY)
    assert len(pool) == 4 + 3 * 4 * 4 and pool.depth == 4  # top_k + depth * top_k^2
    key = lambda tr, i: tuple(tr.tokens[tr.path_to(i)].tolist())
    kept = {key(small, i) for i in range(len(small))}
    all_paths = {key(pool, i): float(pool.scores[i]) for i in range(len(pool))}
    assert kept <= set(all_paths)
    dropped = [s for p, s in all_paths.items() if p not in kept]
    assert min(small.scores.tolist()) >= max(dropped) - 1e-7


def test_dynamic_frontier_is_the_best_of_each_level() -> None:
    # each expand call is fed the top_k nodes of the newest level by cumulative score
    drafter = FakeDrafter(vocab_size=V, seed=5)
    pool = DynamicBuilder(DynamicConfig(depth=2, top_k=3, total_tokens=1000))(drafter, GREEDY)
    level2 = [i for i in range(len(pool)) if pool.depths[i] == 2]
    best = sorted(level2, key=lambda i: -float(pool.scores[i]))[:3]
    expanded = {tuple(drafter.path(j)) for j in range(3, 6)}  # second expand call
    assert expanded == {tuple(pool.tokens[pool.path_to(i)].tolist()) for i in best}


# ---------------------------------------------------------------- OPT-Tree
def test_opt_defaults() -> None:
    cfg = make_builder("opt").cfg
    assert (cfg.nodes, cfg.threshold, cfg.max_depth) == (60, 0.5, 10)


def test_opt_early_stop_rule() -> None:
    # growth stops at the first layer whose gain in E[A] is below the threshold
    drafter = FakeDrafter(vocab_size=V, seed=6, scale=2.0)
    e = [0.0] + [OptBuilder(OptConfig(nodes=10, threshold=0.0, max_depth=d))(drafter, GREEDY)
                 .expected_accept for d in range(1, 8)]
    gains = [b - a for a, b in itertools.pairwise(e)]  # gains[j] = gain of layer j + 1
    assert all(g >= -1e-6 for g in gains)
    for threshold in (0.02, 0.1, 0.3, 5.0):
        drafter.expand_sizes.clear()
        tree = OptBuilder(OptConfig(nodes=10, threshold=threshold, max_depth=7))(drafter, GREEDY)
        layers = len(drafter.expand_sizes) + 1
        want = next((j + 1 for j, g in enumerate(gains) if g < threshold), 7)
        assert layers == want, (threshold, gains)
        assert tree.expected_accept == pytest.approx(e[layers], rel=1e-5)
        assert len(tree) <= 10


def test_opt_score_fn_replaces_the_draft_probability() -> None:
    # a score hook (here sqrt of the draft probability) sets the weights, the ranking and E[A]
    seen: list[ChildCandidates] = []

    def sqrt_score(c: ChildCandidates) -> torch.Tensor:
        seen.append(c)
        return c.probs.sqrt()

    drafter = FakeDrafter(vocab_size=V, seed=7)
    cfg = OptConfig(nodes=8, threshold=0.0, max_depth=3)
    plain = OptBuilder(cfg)(drafter, GREEDY)
    tree = OptBuilder(cfg, score_fn=sqrt_score)(drafter, GREEDY)
    assert torch.allclose(tree.scores, path_probs(tree, drafter, GREEDY).sqrt(), rtol=1e-4)
    assert tree.expected_accept > plain.expected_accept
    assert [c.depth for c in seen] == [1, 2, 3]
    assert seen[0].frontier.tolist() == [-1] and seen[1].frontier.tolist() == list(range(8))
    assert seen[1].dists.shape == (8, V) and seen[1].probs.shape == seen[1].tokens.shape
    check_tree(tree, drafter, GREEDY)


def test_opt_score_fn_may_reorder_children() -> None:
    # a scorer that prefers less likely tokens: siblings still come best score first
    drafter = FakeDrafter(vocab_size=V, seed=8)
    tree = OptBuilder(OptConfig(nodes=6, threshold=0.0, max_depth=2),
                      score_fn=lambda c: 1.0 - c.probs)(drafter, GREEDY)
    for kids in tree.children:
        assert tree.scores[kids].diff().le(1e-7).all()
    with pytest.raises(ValueError, match="score_fn"):
        OptBuilder(score_fn=lambda c: c.probs[:, :1])(drafter, GREEDY)


# ---------------------------------------------------------------- registry
def test_static_takes_sequoia_budget_and_depth_verbatim() -> None:
    # Sequoia's max_budget / max_depth count the root (tree_search.py: T[1][l] is the root alone)
    acc = "0.6,0.25,0.1"
    sequoia = make_builder("static", acceptance=acc, max_budget="12", max_depth="4")
    ours = make_builder("static", acceptance=acc, budget=11, depth=3)
    assert sequoia.shape == ours.shape
    assert sequoia.shape.size <= 11 and sequoia.shape.depth <= 3
    assert make_builder("static", acceptance=acc, budget=12, depth=4).shape.size == 12
    with pytest.raises(ValueError, match="not both"):
        make_builder("static", acceptance=acc, budget=11, max_budget=12)


def test_registry_converts_strings() -> None:
    b = make_builder("dynamic", depth="3", top_k="4", total_tokens="9")
    assert b.cfg == DynamicConfig(3, 4, 9)
    assert make_builder("opt", threshold="0.25").cfg.threshold == 0.25
    static = make_builder("static", acceptance="0.5", sample_children="false")
    assert static.sample_children is False
    assert isinstance(make_builder("chain", k=2), ChainBuilder)


@pytest.mark.parametrize("name,params,match", [
    ("beam", {}, "beam"),
    ("dynamic", {"depht": "3"}, "depht"),
    ("opt", {"nodes": "many"}, "opt.nodes"),
    ("opt", {"nodes": "1.5"}, "opt.nodes"),
    ("static", {"acceptance": "0.5", "sample_children": "maybe"}, "sample_children"),
    ("static", {}, "growmap"),
    ("chain", {"k": "0"}, "k"),
])
def test_registry_errors_name_the_culprit(name: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_builder(name, **params)


def test_fake_drafter_rejects_unexpanded_parents() -> None:
    drafter = FakeDrafter(vocab_size=V)
    drafter.root()
    drafter.expand(t(1, 2), t(-1, -1))
    with pytest.raises(ValueError, match="parent 5"):
        drafter.expand(t(3), t(5))
    assert math.isclose(float(drafter.logits_after([0, 1]).sum()),
                        float(drafter.expand(t(1), t(-1))[0].sum()))
