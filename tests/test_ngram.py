"""MaG (longest suffix match, then bigram) and the bigram table, on hand-made sequences."""
from __future__ import annotations

import json

import pytest
import torch

from lmms_sd.core.interfaces import Drafter, PromptInputs, StepOutput
from lmms_sd.drafters.bigram import BigramTable, PairCounter, main as bigram_main
from lmms_sd.drafters.ngram import MaGConfig, MaGDrafter, longest_suffix_match, mag_next_token


def _t(xs: list[int]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def _table(pairs: dict[int, int], vocab: int = 10, fallback: int = 7) -> BigramTable:
    nxt = torch.full((vocab,), -1, dtype=torch.long)
    for a, b in pairs.items():
        nxt[a] = b
    return BigramTable(nxt, fallback)


# ---------------------------------------------------------------- the matching rules
def test_longest_match_wins_over_a_more_recent_shorter_one():
    # suffix [1, 2] occurs at 0-1 (then 3); the more recent lone 2 at 4 is followed by 4
    seq = _t([1, 2, 3, 9, 2, 4, 5, 1, 2])
    assert longest_suffix_match(seq, 64) == (2, 2)
    assert mag_next_token(seq, None) == 3


def test_most_recent_occurrence_wins_among_equal_lengths():
    # 2 occurs at 1 and 4, both preceded by tokens != 9: length-1 tie -> the later one (then 8)
    seq = _t([5, 2, 7, 6, 2, 8, 9, 2])
    assert longest_suffix_match(seq, 64) == (1, 5)
    assert mag_next_token(seq, None) == 8


def test_earliest_rule_copies_the_first_occurrence_as_published():
    # the same sequence as above: the length-1 tie goes to the first 2 (at 1, then 7)
    seq = _t([5, 2, 7, 6, 2, 8, 9, 2])
    assert longest_suffix_match(seq, 64, earliest=True) == (1, 2)
    assert mag_next_token(seq, None, earliest=True) == 7
    drafter = MaGDrafter(10, cfg=MaGConfig(match="earliest"))
    drafter.begin(PromptInputs(seq), StepOutput(torch.zeros(1, 10)))
    assert int(drafter.root().argmax()) == 7
    with pytest.raises(ValueError, match="match"):
        MaGConfig(match="latest")


def test_max_match_caps_the_length_and_ties_go_to_the_most_recent():
    # [1, 2, 3] matches at 0-2 (then 4) with length 3; [2, 3] also at 5-6 (then 5)
    seq = _t([1, 2, 3, 4, 0, 2, 3, 5, 1, 2, 3])
    assert mag_next_token(seq, None, max_match=3) == 4
    assert mag_next_token(seq, None, max_match=2) == 5


def test_overlapping_match_in_a_run():
    # a run of 6s: the longest earlier occurrence overlaps the suffix; it continues with 6
    assert mag_next_token(_t([3, 6, 6, 6, 6]), None) == 6


def test_no_match_falls_back_to_the_bigram_table():
    seq = _t([1, 2, 3, 4])  # 4 never occurred before
    assert longest_suffix_match(seq, 64) is None
    assert mag_next_token(seq, _table({4: 9})) == 9


def test_no_bigram_entry_falls_back_to_the_tables_fallback():
    assert mag_next_token(_t([1, 2, 3, 4]), _table({5: 9}, fallback=6)) == 6


def test_no_table_falls_back_to_the_most_frequent_history_token():
    # no match for 8; 3 and 5 both occur twice -> the smaller id
    assert mag_next_token(_t([5, 3, 1, 3, 5, 8]), None) == 3


def test_empty_history():
    assert mag_next_token(_t([]), _table({}, fallback=4)) == 4
    assert mag_next_token(_t([]), None) == 0
    assert mag_next_token(_t([2]), _table({2: 1})) == 1  # a single token has no earlier match


# ---------------------------------------------------------------- as a Drafter
def _begin(drafter: MaGDrafter, prompt: list[int], image_mask: list[bool] | None = None) -> None:
    mask = torch.tensor(image_mask) if image_mask is not None else None
    prefill = StepOutput(torch.zeros(len(prompt), 10))
    drafter.begin(PromptInputs(_t(prompt), image_mask=mask), prefill)


def test_drafter_rows_are_one_hot_and_follow_the_tree_paths():
    d = MaGDrafter(10, _table({9: 0}))
    assert isinstance(d, Drafter)
    _begin(d, [1, 2, 3, 4, 2, 5])
    d.commit([1], None)                       # history 1 2 3 4 2 5 1 -> suffix [1] matches at 0
    root = d.root()
    assert root.shape == (10,) and int(root.argmax()) == 2
    assert root[2] == 0 and torch.isinf(root).sum() == 9
    # node 0: path [2] -> [1, 2] matches at 0-1 -> 3; node 1 (sibling, path [9]) -> bigram 9 -> 0;
    # node 2: child of node 0, path [2, 3] -> [1, 2, 3] at 0-2 -> 4
    rows = d.expand(_t([2, 9, 3]), _t([-1, -1, 0]))
    assert rows.argmax(-1).tolist() == [3, 0, 4]
    assert d.forwards == 0


def test_drafter_commit_extends_the_history_and_skips_image_tokens():
    d = MaGDrafter(10, None)
    _begin(d, [7, 7, 1, 6, 8], image_mask=[True, True, False, False, False])
    d.commit([1], None)  # text history 1 6 8 1 -> [1] at 0 -> 6 (the image 7s are gone)
    assert int(d.root().argmax()) == 6
    d.commit([6, 9], None)  # history 1 6 8 1 6 9: 9 unseen, no table -> most frequent: 1
    assert int(d.root().argmax()) == 1


def test_config_and_table_size_are_checked():
    with pytest.raises(ValueError, match="max_match"):
        MaGConfig(max_match=0)
    with pytest.raises(ValueError, match="covers 10 tokens"):
        MaGDrafter(5, _table({}))


# ---------------------------------------------------------------- the bigram table
def test_table_counts_pairs_within_sequences_with_the_tie_rule():
    seqs = [[1, 2, 1, 3], [1, 2], [4, 5, 4, 6], [0]]
    table = BigramTable.from_token_ids(seqs, vocab_size=8)
    # 1->2 twice, 1->3 once; 4->5 and 4->6 tie -> 5; 2->1 once; 3 ends a sequence; 5->4
    assert table.next_token.tolist() == [-1, 2, 1, -1, 5, 4, -1, -1]
    assert table.fallback == 1  # 1 occurs 3 times, more than any other
    assert table.lookup(3) == 1 and table.lookup(4) == 5


def test_flushing_in_chunks_gives_the_same_table():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 6, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 12, (40,), generator=g)]
    whole = BigramTable.from_token_ids(seqs, 6)
    small = PairCounter(6, flush_every=3)
    for s in seqs:
        small.add(s)
    chunked = small.table()
    assert torch.equal(whole.next_token, chunked.next_token) and whole.fallback == chunked.fallback
    # a brute-force count agrees
    for a in range(6):
        succ = [s[i + 1] for s in seqs for i in range(len(s) - 1) if s[i] == a]
        if succ:
            best = max(set(succ), key=lambda b: (succ.count(b), -b))
            assert whole.lookup(a) == best


def test_out_of_range_ids_are_an_error():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        BigramTable.from_token_ids([[1, 4]], vocab_size=4)


def test_save_load_round_trip_and_the_published_list_format(tmp_path):
    table = _table({1: 2, 3: 0}, vocab=5, fallback=3)
    table.save(tmp_path / "t.json")
    back = BigramTable.load(tmp_path / "t.json")
    assert torch.equal(back.next_token, table.next_token) and back.fallback == 3
    (tmp_path / "pub.json").write_text(json.dumps([0, 4, 0, 0, 2]))
    pub = BigramTable.load(tmp_path / "pub.json")
    assert pub.next_token.tolist() == [0, 4, 0, 0, 2] and pub.fallback == 0
    (tmp_path / "bad.json").write_text(json.dumps({"next": [1]}))
    with pytest.raises(ValueError, match="neither"):
        BigramTable.load(tmp_path / "bad.json")


def test_build_command_with_a_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "the", "cat", "sat", "on", "mat", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    hf_tok.save_pretrained(tmp_path / "tok")
    corpus = "the cat sat on the mat\n\nthe dog sat on the cat\nthe cat\n"
    (tmp_path / "corpus.txt").write_text(corpus)
    out = tmp_path / "table.json"
    assert bigram_main(["build", "--tokenizer", str(tmp_path / "tok"), "--corpus",
                        str(tmp_path / "corpus.txt"), "--out", str(out), "--no-progress"]) == 0
    table = BigramTable.load(out)
    ids = {w: i for i, w in enumerate(words)}
    # the -> cat (3x), mat, dog; cat -> sat (1x; line ends are not pairs); sat -> on; on -> the
    assert table.lookup(ids["the"]) == ids["cat"]
    assert table.lookup(ids["cat"]) == ids["sat"]
    assert table.lookup(ids["on"]) == ids["the"]
    assert int(table.next_token[ids["mat"]]) == -1  # only ever at a line end
    assert table.fallback == ids["the"]
    # the table knows its tokenizer: the same one passes, another one is refused
    table.check_vocab(hf_tok, len(words))
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {w: i for i, w in enumerate(reversed(words))}, unk_token="[UNK]")), unk_token="[UNK]")
    with pytest.raises(ValueError, match="another tokenizer"):
        table.check_vocab(other, len(words))


def test_published_list_is_checked_by_size_against_the_target_vocabulary():
    # a plain list has no fingerprint: it must cover the tokenizer's base vocabulary and fit
    # the target's logit rows (a Llama table on Qwen2-VL is refused)
    class Tok:
        vocab_size = 6

        def get_vocab(self) -> dict[str, int]:
            return {str(i): i for i in range(6)}

    _table({}, vocab=6, fallback=0).check_vocab(Tok(), vocab_size=8)
    for size in (5, 9):
        with pytest.raises(ValueError, match="another tokenizer"):
            _table({}, vocab=size, fallback=0).check_vocab(Tok(), vocab_size=8)
