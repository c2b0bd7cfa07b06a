"""Standalone use on the shipped shapes models: ``lmms_sd.load(...).generate(...)`` and
``lmms-sd generate``. Greedy answers must equal the target's own ``transformers`` ``generate``
on a prompt built here from the processor alone, and the lmms-eval classes' answers to the same
request. No figure of the shipped models is asserted (they are retrained from time to time)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lmms_sd
from lmms_sd import cli, cli_generate
from lmms_sd.adapters.loading import VLM_FAMILIES, load_processor
from lmms_sd.api import messages_and_images, open_model
from lmms_sd.assets import shipped_calibrator, shipped_model
from lmms_sd.data.shapes import make_items
from lmms_sd.methods import MODEL_NAMES

N = 12                                       # max_new_tokens everywhere: fast, still several steps
ITEM = make_items(1, seed=0, split="test")[0]  # a held-out shapes image and its question
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def shipped(family: str, role: str) -> str:
    return str(shipped_model(family, role))


def method_args(family: str, method: str) -> dict[str, Any]:
    """Per method, its draft and a small tree."""
    draft, head = shipped(family, "draft_vlm"), shipped(family, "msd_head")
    return {"sd": {"draft": draft, "tree": "chain", "tree.k": 3},
            "msd": {"draft": head, "tree": "dynamic", "tree.depth": 3, "tree.top_k": 3,
                    "tree.total_tokens": 8},
            "msd_calibrated": {"draft": head, "cal.calibrator": shipped_calibrator(family),
                               "cal.nodes": 8, "cal.max_depth": 4},
            "cascade": {"drafts": [draft, "mag"], "k_matrix": "2 1;0 2"}}[method]


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """Per family, the target's greedy tokens for ITEM from ``transformers`` alone: the chat
    template and processor applied here, ``model.generate`` with do_sample False."""
    out = {}
    for family in ("llava", "qwen2_vl"):
        path = shipped(family, "target")
        model, processor = VLM_FAMILIES[family][0].from_pretrained(path), load_processor(path)
        chat = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": ITEM.question}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[text], images=[ITEM.image], return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=N, do_sample=False)
        out[family] = ids[0, enc["input_ids"].shape[1]:].tolist()
    return out


@pytest.fixture(scope="module")
def msd() -> lmms_sd.Speculator:
    return lmms_sd.load(shipped("llava", "target"), "msd", **method_args("llava", "msd"))


# ---------------------------------------------------------------------------- the API

@pytest.mark.parametrize("family,method", [("llava", "sd"), ("llava", "msd_calibrated"),
                                           ("llava", "cascade"), ("qwen2_vl", "msd")])
def test_every_method_answers_as_the_target_alone(family: str, method: str, reference: dict):
    sd = lmms_sd.load(shipped(family, "target"), method, device="cpu",
                      **method_args(family, method))
    assert sd.family == family and sd.drafter is not None
    out = sd.generate(ITEM.image, ITEM.question, max_new_tokens=N, baseline=True)
    assert out.tokens == reference[family]
    assert out.text == sd.target.decode(reference[family]) and out.greedy_match is True
    assert len(out.origin) == len(out.tokens) and out.origin[0] == "target"
    assert out.stats.decode_steps >= 1 and out.speedup is not None and out.speedup > 0
    assert set(out.origin) <= {"draft", "target"}


def test_csd_keeps_cs_draftings_signature(reference: dict):
    """``lmms_sd.csd(draft_list, target_model, initial_input, k_matrix, max_length, leniency)``
    on one's own prompt: a draft VLM reviewed by MaG, then the exact target review."""
    from lmms_sd.adapters import load_adapter
    from lmms_sd.drafters.model import ModelDrafter
    from lmms_sd.drafters.ngram import MaGDrafter

    target = load_adapter(shipped("llava", "target"))
    drafts = [ModelDrafter(load_adapter(shipped("llava", "draft_vlm")),
                           vocab_size=target.vocab_size), MaGDrafter(target.vocab_size)]
    result = lmms_sd.csd(drafts, target, target.prepare(ITEM.question, [ITEM.image]),
                         [[2, 1], [0, 2]], max_length=N, leniency=2,
                         eos_token_ids=target.eos_token_ids)
    assert result.tokens == reference["llava"] and result.stats.draft_forwards > 0


def test_generation_statistics_and_json(msd: lmms_sd.Speculator, reference: dict):
    out = msd.generate(ITEM.image, ITEM.question, max_new_tokens=N)
    assert out.tokens == reference["llava"] and out.baseline is None and out.speedup is None
    steps = out.stats.steps
    assert out.tau == pytest.approx(sum(s.accepted + 1 for s in steps) / len(steps))
    # every emitted draft token was accepted; the budget may cut the last step's
    assert out.origin.count("draft") <= sum(s.accepted for s in steps)
    d = json.loads(json.dumps(out.to_dict()))
    assert d["text"] == out.text and d["tokens"] == out.tokens and d["greedy_match"] is None
    assert d["stats"]["origin"] == "".join(o[0] for o in out.origin)


def test_chat_messages_in_every_style_give_one_prompt(tmp_path: Path):
    path = tmp_path / "x.png"
    ITEM.image.save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    text = {"type": "text", "text": ITEM.question}
    parts = [[{"type": "image"}], [{"type": "image", "url": ITEM.image}],   # given; lmms-eval
             [{"type": "image", "image": str(path)}],                          # transformers
             [{"type": "image_url", "image_url": {"url": url}}]]               # OpenAI
    seen = []
    for p in parts:
        images = ITEM.image if p == [{"type": "image"}] else None
        messages, pictures = messages_and_images([{"role": "user", "content": p + [text]}], images)
        seen.append((messages, [list(i.getdata()) for i in pictures]))
    assert seen[0][0] == [{"role": "user", "content": [{"type": "image"}, text]}]
    assert all(s == seen[0] for s in seen)
    with pytest.raises(ValueError, match="more image parts"):
        messages_and_images([{"role": "user", "content": [{"type": "image"}, text]}], None)
    with pytest.raises(ValueError, match="fewer"):
        messages_and_images([{"role": "user", "content": ITEM.question}], [ITEM.image])
    with pytest.raises(NotImplementedError, match="'video'"):
        messages_and_images([{"role": "user", "content": [{"type": "video", "url": "v"}]}], None)


def lmms_request(chat: bool, gen_kwargs: dict) -> Any:
    from lmms_eval.api.instance import Instance

    args = ((ITEM.question, lambda doc: doc["messages"], gen_kwargs, 0, "t", "test") if chat
            else (ITEM.question, gen_kwargs, lambda doc: [doc["image"]], 0, "t", "test"))
    return Instance("generate_until", args, 0, metadata={"task": "t", "doc_id": 0, "repeats": 1})


@pytest.mark.parametrize("chat", [False, True])
def test_same_answer_as_the_lmms_eval_class(chat: bool, msd: lmms_sd.Speculator):
    """The same request (greedy, then sampled with the class's seed for doc 0) to the class and
    to the API: a string prompt for the simple class, its chat messages for the chat one."""
    from lmms_sd.lmms_eval.models import LlavaMSD, LlavaMSDChat

    args = {k: str(v) for k, v in method_args("llava", "msd").items()}
    model = (LlavaMSDChat if chat else LlavaMSD)(pretrained=shipped("llava", "target"), **args)
    messages = [{"role": "user", "content": [{"type": "image", "url": ITEM.image},
                                             {"type": "text", "text": ITEM.question}]}]
    model.task_dict = {"t": {"test": [{"image": ITEM.image, "messages": messages}]}}
    for sampling in ({}, {"do_sample": True, "temperature": 2.0, "top_p": 0.9}):
        gen_kwargs = {"until": ["\n\n"], "max_new_tokens": N, **sampling}
        (answer,) = model.generate_until([lmms_request(chat, gen_kwargs)])
        out = msd.generate(None if chat else ITEM.image, messages if chat else ITEM.question,
                           max_new_tokens=N, stop="\n\n", seed=0, **sampling)
        assert out.text == answer.text and len(out.tokens) == answer.token_counts.output_tokens


# ---------------------------------------------------------------------------- settings errors

def test_bad_settings_fail_before_decoding(msd: lmms_sd.Speculator):
    target, head = shipped("llava", "target"), shipped("llava", "msd_head")
    with pytest.raises(ValueError, match="unknown model_args key 'bogus' for MSDArgs"):
        lmms_sd.load(target, "msd", draft=head, bogus=1)
    with pytest.raises(ValueError, match="unknown parameter 'kk' for tree builder 'chain'"):
        lmms_sd.load(target, "msd", draft=head, tree="chain", **{"tree.kk": 2})
    with pytest.raises(ValueError, match="unknown method 'eagle'; choose from sd, msd"):
        lmms_sd.load(target, "eagle", draft=head)
    with pytest.raises(ValueError, match="needs draft="):
        lmms_sd.load(target, "sd")
    with pytest.raises(ValueError, match="needs cal.calibrator=PATH"):
        lmms_sd.load(target, "msd_calibrated", draft=head)
    with pytest.raises(ValueError, match="qwen2_vl_msd needs a qwen2_vl target"):
        open_model("qwen2_vl_msd", {"pretrained": target, "draft": head})
    with pytest.raises(ValueError, match="unknown model 'llava_eagle'; choose from llava_sd"):
        open_model("llava_eagle", {"pretrained": target})
    with pytest.raises(ValueError, match="num_beams=2"):
        msd.generate(ITEM.image, ITEM.question, num_beams=2)
    off = lmms_sd.load(target, "msd", sd=False)
    with pytest.raises(ValueError, match="with sd=off there is nothing to compare"):
        off.generate(ITEM.image, ITEM.question, max_new_tokens=2, baseline=True)


def test_model_names_are_the_lmms_eval_names():
    from lmms_sd.lmms_eval.registry import MANIFESTS

    assert sorted(MODEL_NAMES) == sorted(m.model_id for m in MANIFESTS)


# ---------------------------------------------------------------------------- the CLI

def test_show_marks_exactly_the_draft_tokens(msd: lmms_sd.Speculator):
    out = msd.generate(ITEM.image, ITEM.question, max_new_tokens=N)
    coloured = cli_generate.show(out, msd.target.decode, colour=True)
    assert ANSI.sub("", coloured) == out.text
    runs = "".join(o[0] for o in out.origin)
    assert coloured.count(cli_generate.GREEN) == len(re.findall("d+", runs))
    pieces = cli_generate.token_pieces(out.tokens, out.text, msd.target.decode)
    assert "".join(pieces) == out.text and len(pieces) == len(out.tokens)
    drafted = "".join(p for p, o in zip(pieces, out.origin) if o == "draft")
    inside = "".join(re.findall(re.escape(cli_generate.GREEN) + r"(.*?)\x1b\[0m", coloured))
    assert inside == drafted


def test_unknown_model_name_lists_the_valid_ones(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--model", "llava_eagle", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "llava_eagle" in err and "qwen2_vl_cascade" in err


def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli_generate.use_colour("auto", Terminal()) and not cli_generate.use_colour(
        "auto", io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not cli_generate.use_colour("auto", Terminal())
    assert cli_generate.use_colour("always", io.StringIO())
    assert not cli_generate.use_colour("never", Terminal())


def run_cli(*args: str) -> str:
    """``lmms-sd generate`` in a subprocess, its stdout a pipe (not a terminal)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmms_sd.cli", "generate", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def cli_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    image = tmp_path_factory.mktemp("cli") / "x.png"
    ITEM.image.save(image)
    model_args = f"pretrained={shipped('llava', 'target')},draft={shipped('llava', 'msd_head')}"
    return ["--model", "llava_msd", "--model-args", model_args + ",tree=chain,tree.k=3",
            "--image", str(image), "--prompt", ITEM.question, "--max-new-tokens", str(N)]


def test_cli_json_is_one_object_with_the_target_tokens(cli_args: list[str], reference: dict):
    (line,) = run_cli(*cli_args, "--json").splitlines()
    out = json.loads(line)
    assert out["model"] == "llava_msd" and out["tokens"] == reference["llava"]
    assert len(out["stats"]["origin"]) == len(out["tokens"]) and out["greedy"] is True


def test_cli_show_without_a_terminal_uses_brackets(cli_args: list[str], reference: dict,
                                                   msd: lmms_sd.Speculator):
    lines = run_cli(*cli_args, "--show", "--baseline").splitlines()
    assert not any(ANSI.search(line) for line in lines)
    shown = "\n".join(lines[:-2])
    assert shown.replace("[", "").replace("]", "") == msd.target.decode(reference["llava"])
    assert lines[-2].startswith("([...]: accepted draft tokens")
    assert "tau" in lines[-1] and "greedy output identical: yes" in lines[-1]
