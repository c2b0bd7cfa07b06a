"""GPU check of real-checkpoint paths: a LLaVA-1.5-7B-shaped random-weight target.

    bash bench/gpu_check.sh                        # on a GPU machine, after install.sh --gpu
    python -m lmms_sd.bench.gpu_check --dry-run --out DIR   # CPU, tiny shapes, seconds

1. kernels   the target (llava-hf/llava-1.5-7b-hf's config, random weights, bf16) under each
             of ``--attn`` (sdpa, flash_attention_2): autoregressive greedy baseline, then
             a self-draft chain (the target drafting for itself: long accepted blocks), a
             random MSD head with MSD's tree (depth 5, top_k 10, 59 tokens) and a 4-chain,
             MaG chains; greedy mismatches against the baseline and tokens/s. One sampled
             MaG request checks that draft and target tensors share a device.
2. loading   a 2-layer LLaVA-7B-shaped checkpoint saved in llava-hf's format, loaded with
             ``load_adapter(..., dtype="auto", device_map="auto")``: dtype, placement, decoding.
Writes ``gpu_check.json`` and ``gpu_check.md``. Random weights: tau says how far chains run,
not what a trained draft accepts.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters.llava import LlavaAdapter
from ..adapters.loading import load_adapter
from ..core.generate import GenerationConfig, generate
from ..core.sampling import SamplingConfig
from ..drafters.model import ModelDrafter
from ..drafters.msd import MSDDrafter
from ..drafters.msd_format import new_msd_head
from ..drafters.ngram import MaGDrafter
from ..testing import real_format as rf
from ..trees import make_builder

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "real"
TREES = {"chain4": ("chain", {"k": 4}), "msd_tree": ("dynamic", {"depth": 5, "top_k": 10,
                                                                 "total_tokens": 59})}


def llava_config(tiny: bool) -> dict[str, Any]:
    """llava-hf/llava-1.5-7b-hf's config.json; ``tiny``: the test sizes of ``real_format``."""
    config = rf.fixture(FIXTURES, "llava-1.5-7b-hf")
    if tiny:
        config["text_config"].update(rf.LM_SIZES)
        config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=56, projection_dim=32)
    return config


def processor(config: dict[str, Any]) -> Any:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    size = config["vision_config"]["image_size"]
    images = CLIPImageProcessorPil(size={"shortest_edge": size},
                                   crop_size={"height": size, "width": size})
    template = rf.fixture(FIXTURES, "llava-1.5-7b-hf", "chat_template.json")["chat_template"]
    return LlavaProcessor(image_processor=images, tokenizer=rf.llama_tokenizer(True),
                          patch_size=config["vision_config"]["patch_size"],
                          vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template)


def random_target(config: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    """LlavaForConditionalGeneration with random weights, built on ``device`` in ``dtype``."""
    from transformers import AutoConfig, LlavaForConditionalGeneration
    config = json.loads(json.dumps(config))
    name = str(dtype).removeprefix("torch.")  # the sub-configs' torch_dtype would win
    config["torch_dtype"] = config["text_config"]["torch_dtype"] = name
    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def prompts(adapter: LlavaAdapter, n: int, size: int) -> list:
    from ..testing.tiny import tiny_image
    questions = ["Describe the image in detail.", "What is in the picture?",
                 "Tell me a story about this image.", "List every object you can see."]
    return [adapter.prepare(questions[i % 4], [tiny_image(i, size, size)]) for i in range(n)]


def decode_all(target: LlavaAdapter, items: list, cfg: GenerationConfig, drafter: Any = None,
               builder: Any = None) -> dict[str, Any]:
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0, outs, steps, accepted = time.perf_counter(), [], 0, 0
    for prompt in items:
        res = generate(target, prompt, cfg, drafter, builder)
        outs.append(res.tokens)
        steps += res.stats.decode_steps
        accepted += sum(st.accepted for st in res.stats.steps)
    wall = time.perf_counter() - t0
    tokens = sum(len(o) for o in outs)
    return {"outputs": outs, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "tau": round((accepted + steps) / max(steps, 1), 2)}


def kernel_rows(target: LlavaAdapter, items: list, new_tokens: int, attn: str) -> list[dict]:
    """The baseline and each drafter under the attention kernel ``attn``."""
    target.model.set_attn_implementation(attn)
    cfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=())
    self_draft = LlavaAdapter(target.model, target.processor)  # same weights, its own cache
    head = new_msd_head(target.model)
    methods = {"self_draft chain4": (lambda: ModelDrafter(self_draft), "chain4"),
               "msd_head chain4": (lambda: MSDDrafter(head), "chain4"),
               "msd_head msd_tree": (lambda: MSDDrafter(head), "msd_tree"),
               "mag chain4": (lambda: MaGDrafter(target.vocab_size), "chain4")}
    base = decode_all(target, items, cfg)
    rows = [{"attn": attn, "method": "ar", **_public(base), "mismatches": 0}]
    for name, (make, tree) in methods.items():
        kind, params = TREES[tree]
        got = decode_all(target, items, cfg, make(), make_builder(kind, **params))
        mismatches = sum(a != b for a, b in zip(got["outputs"], base["outputs"]))
        rows.append({"attn": attn, "method": name, **_public(got), "mismatches": mismatches,
                     "speedup": round(base["wall_s"] / got["wall_s"], 3)})
    sampled = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=(), seed=0,
                               sampling=SamplingConfig(temperature=0.8, top_p=0.9))
    res = generate(target, items[0], sampled, MaGDrafter(target.vocab_size),
                   make_builder("chain", k=4))
    rows.append({"attn": attn, "method": "mag chain4 sampled (devices)",
                 "tokens": len(res.tokens), "mismatches": None})
    rows[0]["outputs"] = base["outputs"]
    return rows


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "outputs"}


def loading_row(config: dict[str, Any], device: str, new_tokens: int) -> dict[str, Any]:
    """Save a 2-layer llava-hf-format checkpoint, load it with dtype/device_map auto, decode."""
    config = json.loads(json.dumps(config))
    config["text_config"]["num_hidden_layers"] = 2
    config["vision_config"]["num_hidden_layers"] = 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llava"
        model = random_target(config, device, torch.float16)
        rf._write(model, config, folder, "llava")  # the published config: torch_dtype float16
        del model
        proc = processor(config)
        proc.save_pretrained(folder)
        t0 = time.perf_counter()
        adapter = load_adapter(folder, device=device, dtype="auto",
                               device_map="auto" if device != "cpu" else None)
        load_s = time.perf_counter() - t0
        items = prompts(adapter, 2, config["vision_config"]["image_size"])
        cfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=())
        base = decode_all(adapter, items, cfg)
        kind, params = TREES["msd_tree"]
        got = decode_all(adapter, items, cfg, MSDDrafter(new_msd_head(adapter.model)),
                         make_builder(kind, **params))
        return {"dtype": str(adapter.dtype), "device": str(adapter.device),
                "device_map": getattr(adapter.model, "hf_device_map", None),
                "load_s": round(load_s, 2),
                "mismatches": sum(a != b for a, b in zip(got["outputs"], base["outputs"]))}


def markdown(report: dict[str, Any]) -> str:
    cols = ["attn", "method", "wall_s", "tokens_per_s", "speedup", "tau", "mismatches"]
    lines = [report["header"], "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(str(row.get(c, "-")) for c in cols) + " |")
    lines += ["", f"loading: {json.dumps(report['loading'])}",
              f"AR outputs equal across kernels: {report.get('kernels_agree')}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, float32")
    ap.add_argument("--attn", nargs="+", default=["sdpa", "flash_attention_2"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    attns = ["sdpa", "eager"] if args.dry_run else args.attn
    if "flash_attention_2" in attns:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            attns = [a for a in attns if a != "flash_attention_2"]
            print("flash_attn is not installed: flash_attention_2 skipped")
    config = llava_config(args.dry_run)
    model = random_target(config, device, dtype)
    target = LlavaAdapter(model, processor(config))
    items = prompts(target, args.prompts, config["vision_config"]["image_size"])
    rows: list[dict] = []
    for attn in attns:
        rows += kernel_rows(target, items, args.new_tokens, attn)
    bases = [r.pop("outputs") for r in rows if "outputs" in r]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    report = {"header": f"LLaVA-1.5-7B-shaped random target ({'tiny' if args.dry_run else '7B'}),"
                        f" {dtype}, {args.prompts} prompts x {args.new_tokens} new tokens, greedy;"
                        f" {gpu}, {platform.machine()}, torch {torch.__version__}",
              "rows": rows, "kernels_agree": all(b == bases[0] for b in bases),
              "loading": None}
    del target, model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    report["loading"] = loading_row(llava_config(args.dry_run), device, 16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
