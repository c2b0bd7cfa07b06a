"""The model card of a shipped MSD head, written from its ``msd_metrics.json`` so that every
figure in the card is the one ``msd_compare`` measured.

    model_cards/shapes_<family>_msd_head.md
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILY_NAMES = {"llava": "LLaVA", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL",
                "qwen3_vl": "Qwen3-VL", "llava_onevision": "LLaVA-OneVision"}
LAYERS = {"llava": "Llama decoder layer without its input norm (EAGLE's layer-0 layout)",
          "qwen2_vl": "Qwen2-VL decoder layer (M-RoPE, input norm kept, as in MSD's code)",
          "qwen2_5_vl": "Qwen2.5-VL decoder layer (M-RoPE, input norm kept)",
          "qwen3_vl": "Qwen3-VL decoder layer (QK-norm, interleaved M-RoPE, input norm kept)",
          "llava_onevision": "Qwen2 decoder layer (1-D RoPE, input norm kept)"}
DRAFTER_NAMES = {"msd_head": "MSD head (this model)", "draft_vlm": "1-layer draft VLM",
                 "text_only": "text-only draft LM"}


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [("| drafter | tree | tau | acceptance rate | draft tokens / step "
             "| draft forwards / step |"), "|---|---|---|---|---|---|"]
    for r in rows:
        tree = (f"chain k={r['k']}" if r["builder"] == "chain" else
                f"dynamic depth {r['depth']}, top_k {r['top_k']}, {r['total_tokens']} tokens")
        lines.append(f"| {DRAFTER_NAMES[r['drafter']]} | {tree} | **{r['tau']:.2f}** | "
                     f"{r['acceptance_rate']:.3f} | {r['tree_size']:.1f} | "
                     f"{r['draft_forwards']:.1f} |")
    return lines


def _training(train: dict[str, Any] | None) -> list[str]:
    if train is None:
        return ["- (no training record shipped)"]
    opt, msd, kinds = train["optim"], train["msd"], train.get("curriculum", {})
    return [
        ("- data: fresh training-split shapes scenes every step (the test split shares no scene)"
         ", teacher forcing on the target's features of the reference answers"),
        (f"- loss (MSD's): {msd['feature_weight']} x SmoothL1(head output, target feature) + "
         f"{msd['token_weight']} x CE(target probs, head log-probs) on the answer positions; "
         f"uniform noise of width {msd['noise']} on the input features"),
        (f"- curriculum (MSD's schedule over steps): text-only batches (the same questions and "
         f"answers without the image) for the first {msd['text_phase']:.0%} of the steps, then "
         f"the chance of a multimodal batch rises linearly to 1: "
         f"{kinds.get('text_only_batches', '?')} text-only and "
         f"{kinds.get('multimodal_batches', '?')} multimodal batches"),
        (f"- AdamW lr {opt['lr']}, weight decay {opt['weight_decay']} (matrices), "
         f"{opt['warmup_steps']} warmup steps then cosine to {opt['min_lr_ratio']} x lr, grad "
         f"clip {opt['grad_clip']}, {opt['steps']} steps x batch {opt['batch_size']}, seed "
         f"{opt['seed']}"),
        f"- head positions: {msd['positions']}",
        (f"- final training loss {train['final_loss']:.4f} (last batch: feature loss "
         f"{train['last_batch']['feature_loss']:.4f}, token loss "
         f"{train['last_batch']['token_loss']:.4f}, top-1 agreement "
         f"{train['last_batch']['top1']:.3f}); {train['train_seconds'] / 60:.1f} min on a shared "
         f"2-core CPU (torch threads: {train.get('threads', '?')})"),
        f"- command: `{train.get('command', '?')}`",
        (f"- unlike the published recipe: lr {opt['lr']} for {opt['steps']} steps instead of "
         "5e-5 with 2000 warmup steps over 40 epochs; noise not rescaled by 512 / sequence "
         "length; the "
         "curriculum draws per batch, not per sample; the text data are the shapes answers, "
         "not ShareGPT"),
    ]


def model_card(metrics: dict[str, Any]) -> str:
    family = metrics["family"]
    name = FAMILY_NAMES[family]
    params = metrics["head_parameters"]
    head_rows = [r for r in metrics["rows"] if r["drafter"] == "msd_head"]
    lines = [
        f"# shapes {name} msd_head", "",
        (f"An MSD (EAGLE-2 style) draft head for the shipped shapes {name} target: "
         f"`fc: Linear(2H -> H, bias)` over [token embedding ; target feature], then one "
         f"{LAYERS[family]}, shaped like one layer of the target. It drafts with the target's "
         "frozen `embed_tokens` and `lm_head`; at image positions its input is the target's "
         "projected visual embedding itself (MSD's modality decoupling)."), "",
        ("Toy model for tests, the offline demo and speculative-decoding experiments; it knows "
         "only the shapes task (`lmms_sd.data.shapes`)."), "",
        "## Use", "", "```python",
        "from lmms_sd.adapters import load_adapter",
        "from lmms_sd.assets import shipped_model",
        "from lmms_sd.drafters.msd_format import load_msd_head",
        f"target = load_adapter(shipped_model({family!r}, 'target'))",
        f"head = load_msd_head(shipped_model({family!r}, 'msd_head'), target.model)",
        "```", "",
        (f"or `python -m lmms_sd.demo --model {family}_msd` (lmms-eval with "
         f"`--model {family}_msd --model_args pretrained=<target>,draft=<this folder>`)."), "",
        "## Files", "",
        ("The published MSD / EAGLE layout (`lmms_sd.drafters.msd_format`): `config.json` and "
         "`pytorch_model.bin` holding `fc`, `layers.0.*` and a copy of the target's "
         "`embed_tokens.weight` (checked against the target at load); `train_record.json` is "
         "the training record."), "",
        "## Parameters", "",
        f"- trained: {params['trained']:,} (fc + one decoder layer), float32",
        (f"- stored beside them: the target's embed_tokens, {params['stored_embed_tokens']:,} "
         "values (frozen, not trained)"), "",
        "## Training", "",
        *_training(metrics.get("train")), "",
        "## Measured", "",
        (f"Greedy speculative decoding on {metrics['eval_items']} (mean answer "
         f"{metrics['mean_answer_tokens']:.1f} tokens). Every output was token-identical to the "
         "target's own greedy output. tau = emitted tokens per target decode step (accepted + "
         "1); acceptance rate = accepted draft tokens per drafted depth."), "",
        *_table(metrics["rows"]), "",
        f"MSD head, MSD's default tree: **tau {head_rows[0]['tau']:.2f}**.", "",
        f"- measured by: `{metrics['command']}`",
        (f"- environment: torch {metrics['environment']['torch']}, "
         f"{metrics['environment']['threads']} torch thread(s)"), "",
    ]
    return "\n".join(lines)


def write_card(metrics: dict[str, Any], out_dir: Path) -> Path:
    path = Path(out_dir) / f"shapes_{metrics['family']}_msd_head.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model_card(metrics))
    return path
