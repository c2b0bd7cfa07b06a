"""Real checkpoints as users pass them: hub ids in an offline cache, the published formats,
real vocabularies, dtype auto, device_map, and the flash-attention tree path."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lmms_sd.adapters import HFAdapter, check_same_vocab, load_adapter
from lmms_sd.adapters.loading import resolve_dtype
from lmms_sd.drafters.model import ModelDrafter
from lmms_sd.testing import real_format as rf
from lmms_sd.testing.hub_cache import put_in_cache, use_cache
from lmms_sd.testing.tiny import tiny_image

FIXTURES = Path(__file__).parent / "fixtures" / "real"
HUB_IDS = {"llava": "llava-hf/llava-1.5-7b-hf", "vicuna": "lmsys/vicuna-7b-v1.5",
           "llava_head": "lucylyn/MSD-LLaVA1.5-7B", "qwen7b": "Qwen/Qwen2-VL-7B-Instruct",
           "qwen2b": "Qwen/Qwen2-VL-2B-Instruct", "qwen_head": "lucylyn/MSD-Qwen2VL-7B-Instruct"}
SIZE_KEYS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "image_size", "projection_dim", "depth", "embed_dim",
             "num_heads", "max_window_layers", "mm_hidden_size", "rope_scaling", "vocab_size",
             "tie_word_embeddings"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real_format")
    out = {"llava": rf.build_llava_hf(FIXTURES, root / "llava"),
           "vicuna": rf.build_vicuna(root / "vicuna"),
           "qwen7b": rf.build_qwen2_vl(FIXTURES, root / "qwen7b"),
           "qwen2b": rf.build_qwen2_vl(FIXTURES, root / "qwen2b", rows=rf.ROWS["qwen2-vl-2b"],
                                       tie=True, seed=3)}
    out["llava_head"] = rf.build_msd_head(FIXTURES, out["llava"], root / "llava_head")
    out["qwen_head"] = rf.build_msd_head(FIXTURES, out["qwen7b"], root / "qwen_head")
    return out


@pytest.fixture(scope="module")
def cache(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf_cache")
    for name, repo in HUB_IDS.items():
        put_in_cache(built[name], repo, root)
    put_in_cache(built["vicuna"], HUB_IDS["vicuna"], root, revision="v1.5-tag")
    return root


@pytest.fixture(scope="module")
def adapters(built: dict[str, Path]) -> dict[str, HFAdapter]:
    return {k: load_adapter(built[k], role="draft") for k in ("llava", "vicuna", "qwen7b",
                                                              "qwen2b")}


# ---------------------------------------------------------------------------- the formats

def _same_but_sizes(real: Any, tiny: Any, path: str = "") -> None:
    if isinstance(real, dict):
        assert set(real) <= set(tiny), f"{path}: keys {set(real) - set(tiny)} missing"
        for key, value in real.items():
            if key not in SIZE_KEYS:
                _same_but_sizes(value, tiny[key], f"{path}.{key}")
    else:
        assert real == tiny, f"{path}: {real!r} != {tiny!r}"


@pytest.mark.parametrize("name, repo", [("llava", "llava-1.5-7b-hf"),
                                        ("qwen7b", "Qwen2-VL-7B-Instruct"),
                                        ("llava_head", "MSD-LLaVA1.5-7B"),
                                        ("qwen_head", "MSD-Qwen2VL-7B-Instruct")])
def test_tiny_checkpoints_keep_the_published_configs(built: dict, name: str, repo: str) -> None:
    tiny = json.loads((built[name] / "config.json").read_text())
    _same_but_sizes(rf.fixture(FIXTURES, repo), tiny)


@pytest.mark.parametrize("name, repo", [("llava", "llava-1.5-7b-hf"),
                                        ("qwen7b", "Qwen2-VL-7B-Instruct")])
def test_real_special_ids_and_chat_templates(adapters: dict, name: str, repo: str) -> None:
    tok, real = adapters[name].tokenizer, rf.fixture(FIXTURES, repo, "tokenizer_config.json")
    for i, spec in real["added_tokens_decoder"].items():
        assert tok.convert_tokens_to_ids(spec["content"]) == int(i)
    for key in ("eos_token", "pad_token", "bos_token"):
        assert getattr(tok, key) == real[key], key
    template = rf.fixture(FIXTURES, repo, "chat_template.json")["chat_template"]
    assert adapters[name].processor.chat_template == template
    config = rf.fixture(FIXTURES, repo)
    assert adapters[name].vocab_size == config["vocab_size"]


def test_llava_processor_without_the_additional_token_key(adapters: dict, monkeypatch) -> None:
    """The old llava-hf processor config lacks num_additional_image_tokens: one placeholder
    per CLIP feature (16 here) only with the loader's fix."""
    from lmms_sd.adapters import loading
    folder = Path(adapters["llava"].model.name_or_path)
    assert "num_additional_image_tokens" not in json.loads(
        (folder / "processor_config.json").read_text())
    prompt = adapters["llava"].prepare("Hi", [tiny_image(0, 56, 56)])
    adapters["llava"].prefill(prompt)
    assert int(prompt.image_mask.sum()) == 16
    monkeypatch.setattr(loading, "_llava_processor_fixes", lambda folder: {})
    broken = loading.load_processor(folder)
    ids = broken(text=["<image>"], images=[tiny_image(0, 56, 56)])["input_ids"][0]
    assert sum(i == 32000 for i in ids) == 15


# ---------------------------------------------------------------------------- hub ids

def test_hub_ids_resolve_offline_with_revisions(cache: Path, monkeypatch) -> None:
    use_cache(monkeypatch, cache)
    for ref in ("lmsys/vicuna-7b-v1.5", "lmsys/vicuna-7b-v1.5@v1.5-tag"):
        assert load_adapter(ref, role="draft").vocab_size == 32000
    assert load_adapter(HUB_IDS["vicuna"], revision="v1.5-tag", role="draft").vocab_size == 32000
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        load_adapter("llava-hf/llava-1.5-13b-hf")
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        load_adapter(HUB_IDS["vicuna"], revision="v9")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_adapter("/models/llava-1.5-7b-hf")


def _requests(n: int, chat: bool) -> list:
    from lmms_eval.api.instance import Instance
    docs = [{"q": "Describe the image.", "seed": 0}, {"q": "What is in the picture?", "seed": 1}]

    def visual(doc: dict) -> list:
        return [tiny_image(doc["seed"], 56, 56)]

    def messages(doc: dict) -> list:
        return [{"role": "user", "content": [{"type": "image", "url": visual(doc)[0]},
                                             {"type": "text", "text": doc["q"]}]}]

    gen = {"until": ["\n\n"], "max_new_tokens": 12, "do_sample": False}
    out = []
    for i in range(n):
        args = ((docs[i]["q"], messages, dict(gen), i, "t", "test") if chat else
                (docs[i]["q"], dict(gen), visual, i, "t", "test"))
        out.append(Instance("generate_until", args, 0, metadata={"task": "t", "doc_id": i,
                                                                  "repeats": 1}))
    return out, docs


RUNS = [("LlavaMSDChat", {"pretrained": HUB_IDS["llava"], "msd_model_path": HUB_IDS["llava_head"],
                          "tree": "dynamic", "tree.depth": 3, "tree.top_k": 3,
                          "tree.total_tokens": 8}),
        ("LlavaSD", {"pretrained": HUB_IDS["llava"], "draft": HUB_IDS["vicuna"] + "@v1.5-tag",
                     "device_map": "auto", "tree": "chain", "tree.k": 3}),
        ("Qwen2VLSDChat", {"pretrained": HUB_IDS["qwen7b"], "draft": HUB_IDS["qwen2b"],
                           "tree": "dynamic", "tree.depth": 3, "tree.top_k": 2,
                           "tree.total_tokens": 6}),
        ("Qwen2VLMSD", {"pretrained": HUB_IDS["qwen7b"], "msd_model_path": HUB_IDS["qwen_head"],
                        "tree": "chain", "tree.k": 3})]


@pytest.mark.parametrize("cls_name, args", RUNS, ids=[r[0] for r in RUNS])
def test_model_classes_run_from_hub_ids_offline(cache: Path, monkeypatch, tmp_path: Path,
                                                cls_name: str, args: dict) -> None:
    from lmms_sd.lmms_eval import models
    use_cache(monkeypatch, cache)
    cls = getattr(models, cls_name)
    model = cls(**{k: str(v) for k, v in args.items()}, baseline="true",
                stats_path=str(tmp_path / "s.jsonl"))
    reqs, docs = _requests(2, chat=not cls.is_simple)
    model.task_dict = {"t": {"test": docs}}
    out = model.generate_until(reqs)
    records = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["text_match"] for r in records)
    assert all(o.token_counts.output_tokens > 0 for o in out)
    assert model.target.dtype == torch.float32  # dtype=auto on the CPU
    if "device_map" in args:  # on the CPU accelerate places everything there (no split)
        assert model.target.model.device.type == "cpu"
    if "msd_model_path" in args:
        assert model.drafter.head.fc.weight.dtype == model.target.dtype


def test_heads_follow_the_target_dtype_unless_told(built: dict) -> None:
    from lmms_sd.lmms_eval import models
    model = models.LlavaMSD(pretrained=str(built["llava"]), msd_model_path=str(built["llava_head"]),
                            dtype="bfloat16")
    assert model.target.dtype == model.drafter.head.fc.weight.dtype == torch.bfloat16
    model = models.LlavaMSD(pretrained=str(built["llava"]), msd_model_path=str(built["llava_head"]),
                            dtype="bfloat16", draft_dtype="float32")
    assert model.drafter.head.fc.weight.dtype == torch.float32


def test_dtype_auto() -> None:
    llava = rf.fixture(FIXTURES, "llava-1.5-7b-hf")
    qwen = rf.fixture(FIXTURES, "Qwen2-VL-7B-Instruct")
    assert resolve_dtype("auto", llava, "cpu") == torch.float32
    assert resolve_dtype("auto", llava, "cuda:0") == torch.float16
    assert resolve_dtype("auto", qwen, "cuda") == torch.bfloat16
    assert resolve_dtype("auto", {}, "cuda") == torch.float32
    assert resolve_dtype("bfloat16", qwen, "cpu") == torch.bfloat16


def test_gpu_share_per_process() -> None:
    from lmms_sd.lmms_eval.base import gpu_share
    assert gpu_share(0, 1, 4) == [0, 1, 2, 3]
    assert [gpu_share(r, 4, 8) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="at least one GPU per process"):
        gpu_share(0, 4, 2)


# ---------------------------------------------------------------------------- vocabularies

def test_llava_hf_target_with_a_vicuna_draft(adapters: dict) -> None:
    target, draft = adapters["llava"], adapters["vicuna"]
    check_same_vocab(target, draft)  # <image>, <pad> are added ids after Vicuna's 32000
    drafter = ModelDrafter(draft, text_only=True, vocab_size=target.vocab_size)
    prompt = target.prepare("Hi", [tiny_image(0, 56, 56)])
    drafter.begin(prompt, target.prefill(prompt))
    drafter.commit([5], None)
    row = drafter.root()
    assert row.shape == (32064,)
    assert torch.isinf(row[32000:]).all() and torch.isfinite(row[:32000]).all()


def test_qwen2_vl_7b_and_2b_rows(adapters: dict) -> None:
    big, small = adapters["qwen7b"], adapters["qwen2b"]
    assert (big.vocab_size, small.vocab_size) == (152064, 151936)
    check_same_vocab(big, small)
    check_same_vocab(small, big)  # 7B's extra rows are padding: dropped from its logits
    drafter = ModelDrafter(big, vocab_size=small.vocab_size)
    prompt = small.prepare("Hi", [])
    drafter.begin(prompt, small.prefill(prompt))
    drafter.commit([5], None)
    assert drafter.root().shape == (151936,)


def test_draft_ids_beyond_the_target_are_refused(adapters: dict) -> None:
    with pytest.raises(ValueError, match="ids the target's 32000 logit rows do not cover"):
        check_same_vocab(adapters["vicuna"], adapters["llava"])
    with pytest.raises(ValueError, match="beyond the target's 32000 logit rows"):
        ModelDrafter(adapters["llava"], vocab_size=32000)
    with pytest.raises(ValueError, match="tokenizers differ on"):
        check_same_vocab(adapters["llava"], adapters["qwen2b"])


def test_extra_ids_must_be_added_tokens(adapters: dict) -> None:
    """A draft whose tokenizer goes on with ordinary tokens past Vicuna's 32000 (a different,
    larger vocabulary) is refused even where the target has the logit rows."""
    from types import SimpleNamespace

    from transformers import PreTrainedTokenizerFast
    bigger = PreTrainedTokenizerFast(tokenizer_object=rf._filled_bpe(["<unk>", "<s>", "</s>"],
                                                                     32010))
    draft = SimpleNamespace(tokenizer=bigger, vocab_size=32010)
    target = SimpleNamespace(tokenizer=adapters["vicuna"].tokenizer, vocab_size=32064)
    with pytest.raises(ValueError, match="not added tokens"):
        check_same_vocab(target, draft)


# ---------------------------------------------------------------------------- flash-attention

def _no_4d_masks(calls: list) -> Any:
    """An attention kernel like flash-attention: causal (bottom-right) only, and a 4-D mask is
    an error instead of being silently ignored."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            raise RuntimeError("a 4-D tree mask reached a kernel that ignores it")
        calls.append(query.shape[2])
        q, k = query.shape[2], key.shape[2]
        causal = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
        return sdpa_attention_forward(module, query, key, value, causal[None, None], **kwargs)
    return attention


@pytest.fixture()
def flash_like(tiny_paths: dict, monkeypatch) -> tuple[HFAdapter, HFAdapter, list]:
    """(target, draft VLM) on a flash-like kernel, registered as ``no_masks_kernel``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    from lmms_sd.adapters import base
    calls: list = []
    AttentionInterface.register("no_masks_kernel", _no_4d_masks(calls))
    flash_masks = ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"]  # None when causal
    AttentionMaskInterface.register("no_masks_kernel", flash_masks)
    monkeypatch.setattr(base, "NO_TREE_MASK", ("flash", "no_masks_kernel"))
    out = [load_adapter(tiny_paths["llava"][r]) for r in ("target", "draft_vlm")]
    for adapter in out:
        adapter.decoder.set_attn_implementation("no_masks_kernel")
    return out[0], out[1], calls


def test_tree_steps_under_flash_attention_go_through_sdpa(flash_like, tiny_adapters, monkeypatch):
    from lmms_sd.adapters import base
    from lmms_sd.core.generate import GenerationConfig, generate
    from lmms_sd.trees import make_builder
    target, draft, calls = flash_like
    prompt = target.prepare("What is in the image?", [tiny_image(0)])
    reference = tiny_adapters["llava"]["target"].hf_generate(prompt, 16)
    cfg = GenerationConfig(max_new_tokens=16, eos_token_ids=target.eos_token_ids)
    builder = make_builder("dynamic", depth=3, top_k=3, total_tokens=8)
    result = generate(target, prompt, cfg, ModelDrafter(draft, vocab_size=target.vocab_size),
                      builder)
    assert result.tokens == reference
    assert calls and max(calls) > 1, "the kernel ran the prefill and causal steps"
    assert target.decoder.config._attn_implementation == "no_masks_kernel"
    monkeypatch.setattr(base, "NO_TREE_MASK", ("flash",))  # the routing removed
    with pytest.raises(RuntimeError, match="4-D tree mask"):
        generate(target, prompt, cfg, ModelDrafter(draft, vocab_size=target.vocab_size), builder)


def test_file_arguments_resolve_from_hub_repos(tmp_path: Path, monkeypatch) -> None:
    """bigram=, tree.growmap=, cal.calibrator= take ORG/NAME/path/in/repo (``@REV`` too)."""
    from lmms_sd.adapters.hub import resolve_file
    from lmms_sd.drafters.bigram import BigramTable
    repo = tmp_path / "repo"
    (repo / "bigram_models").mkdir(parents=True)
    table = BigramTable(torch.tensor([1, 2, 0, -1]), fallback=2)
    table.save(repo / "bigram_models" / "t.json")
    put_in_cache(repo, "lfsszd/tables", tmp_path / "cache")
    put_in_cache(repo, "lfsszd/tables", tmp_path / "cache", revision="v2")
    use_cache(monkeypatch, tmp_path / "cache")
    for ref in ("lfsszd/tables/bigram_models/t.json", "lfsszd/tables@v2/bigram_models/t.json"):
        loaded = BigramTable.load(resolve_file(ref))
        assert torch.equal(loaded.next_token, table.next_token) and loaded.fallback == 2
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        resolve_file("lfsszd/tables/bigram_models/other.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_file("/tables/t.json")
