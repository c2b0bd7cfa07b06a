"""EAGLE-3 training: the training-time-test steps are exactly the drafter's chain drafting,
the draft vocabulary is the most frequent answer tokens, and the CLI trains and saves a head."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from lmms_sd.core.interfaces import PromptInputs
from lmms_sd.drafters.eagle3 import Eagle3Drafter, bind_target_states
from lmms_sd.drafters.eagle3_format import load_eagle3_head, new_eagle3_head
from lmms_sd.train import eagle3 as train
from lmms_sd.train.data import IGNORE_INDEX, Batch

J = 3  # TTT steps checked


def test_ttt_steps_equal_chain_drafting_along_the_true_tokens(tiny_adapters) -> None:
    """Step j at slot p = the drafter's depth-j chain node after committing x_1..x_p, drafted
    along the true tokens x_{p+1}..x_{p+j} (an independent path: the drafter's cache, masks and
    positions)."""
    target = tiny_adapters["llava"]["target"]
    torch.manual_seed(0)
    head = new_eagle3_head(target.model, torch.arange(0, target.vocab_size, 2)).eval()
    prompt = target.prepare("Describe the image.", [])
    ids = torch.cat([prompt.input_ids, torch.tensor(target.hf_generate(prompt, 8))])
    batch = Batch(ids[None], torch.ones_like(ids)[None], ids[None].clone(), {})
    with torch.no_grad():
        tp = train.target_pass(target.model, batch, head.aux_layers)
        steps = train.ttt_outputs(head, ids[None], tp, J)
    view = copy.copy(target)
    bind_target_states(view, head)
    drafter = Eagle3Drafter(head)
    for p in (len(prompt.input_ids), len(ids) - J - 1):  # slot p: x_p committed last
        head_prompt = PromptInputs(ids[:p])
        pre = view.prefill(head_prompt, hidden=True, embeds=True)
        drafter.begin(head_prompt, pre)
        drafter.commit([int(ids[p])], pre.hidden[-1:])  # x_p with a_{p-1}
        logits = [drafter.root()]
        for j in range(1, J):
            parent = torch.tensor([j - 2]) if j > 1 else torch.tensor([-1])
            logits.append(drafter.expand(ids[p + j:p + j + 1], parent)[0])
        for j in range(J):
            want = head.logits(steps[j][0, p - 1])
            torch.testing.assert_close(logits[j], want, rtol=1e-4, atol=1e-4)


def test_the_draft_vocabulary_is_the_most_frequent_answer_tokens() -> None:
    ids = torch.tensor([[9, 9, 5, 5, 5, 7, 2], [9, 9, 7, 7, 3, 3, 3]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 2:] = ids[:, 2:]  # answers: 5 5 5 7 2 | 7 7 3 3 3 (prompt 9s never count)
    batch = Batch(ids, torch.ones_like(ids), labels, {})
    chosen = train.draft_vocabulary(lambda step: batch, 1, 3, 12)
    assert chosen.tolist() == [3, 5, 7]  # counts 3:3, 5:3, 7:3, then 2:1
    assert train.draft_vocabulary(lambda step: batch, 1, 5, 12).tolist() == [0, 2, 3, 5, 7]


def test_the_cli_trains_and_saves_a_head(tiny_paths, tiny_adapters, tmp_path: Path) -> None:
    out = tmp_path / "head"
    train.main(["--target", str(tiny_paths["llava"]["target"]), "--out", str(out),
                "--steps", "4", "--batch-size", "2", "--ttt-steps", "3", "--draft-vocab", "64",
                "--vocab-batches", "2", "--eval-items", "2", "--log-every", "2"])
    record = json.loads((out / "train_record.json").read_text())
    assert record["eagle3"]["ttt_steps"] == 3 and record["draft_vocab"]["size"] == 64
    assert record["curriculum"]["text_only_batches"] + record["curriculum"]["multimodal_batches"] == 4
    head = load_eagle3_head(out, tiny_adapters["llava"]["target"].model)
    assert head.draft_vocab_size == 64 and "eval" in record
