"""Real lmms-eval prompt paths, offline: real task configs and their ``doc_to_visual`` /
``doc_to_text`` / ``doc_to_messages`` functions, built by lmms-eval's own task classes over a
local parquet of synthetic docs, decoded by our simple and chat classes on the tiny models. We
check the prompt the target sees: one placeholder run per image, the images in the doc's order,
and the text where the task put it. Also ``image_aspect_ratio: pad`` and video / audio inputs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from lmms_sd.core.interfaces import PromptInputs
from lmms_sd.testing.tiny import tiny_image
from test_lmms_eval_plugin import make_model, model_class

PNG = {"image": tiny_image(10, 48, 32)}
TASKS: dict[str, tuple[list[dict], list[str]]] = {  # yaml -> (docs, image fields in order)
    "chartqa/chartqa.yaml": ([{"question": "Which bar is highest?", "answer": "A", **PNG}],
                             ["image"]),
    "textvqa/textvqa_val.yaml": ([{"question": "what brand is it?", "answers": ["x"] * 10,
                                   "ocr_tokens": ["x"], "question_id": 1, **PNG}], ["image"]),
    # MathVerse asks for top_p: 0 with do_sample: false (greedy); MathVista's utils need the
    # Levenshtein package, which is not installed here
    "mathverse/mathverse_testmini_vision_only.yaml": ([{
        "sample_index": "1", "problem_index": "1", "problem_version": "Vision Only",
        "question": "What is the area of the triangle?", "answer": "6",
        "question_type": "free-form", "query_wo": "What is the area of the triangle?",
        "query_cot": "What is the area of the triangle? Think step by step.",
        "metadata": "{}", "question_for_eval": "q", **PNG}], ["image"]),
    "llava-in-the-wild/llava-in-the-wild.yaml": ([{
        "question": "Describe the scene.", "question_id": 0, "caption": "c",
        "category": "detail", "gpt_answer": "g", **PNG}], ["image"]),
    "muirbench/muirbench.yaml": ([{
        "question": "Which image shows the dog?", "options": ["first", "second", "third"],
        "answer": "B", "task": "t", "idx": "0", "image_relation": "r", "image_type": "x",
        "image_list": [tiny_image(11), tiny_image(12, 40, 32), tiny_image(13)]}], ["image_list"]),
    "mmmu/mmmu_val.yaml": ([{
        "id": "validation_Art_1", "question": "Compare <image 1> with <image 2>. Which is older?",
        "options": "['the first', 'the second']", "question_type": "multiple-choice",
        "answer": "A", "image_1": tiny_image(14), "image_2": tiny_image(15, 32, 48),
        **{f"image_{i}": None for i in range(3, 8)}}], ["image_1", "image_2"]),
}


def build_task(yaml: str, docs: list[dict], chat: bool, tmp: Path) -> Any:
    """lmms-eval's own task object for ``yaml``, over ``docs`` written to a local parquet, with
    max_new_tokens cut to 4 as ``--gen_kwargs max_new_tokens=4`` would."""
    import datasets
    import lmms_eval
    from lmms_eval.api.task import ConfigurableMessagesTask, ConfigurableTask
    from lmms_eval.utils import load_yaml_config

    cfg = load_yaml_config(str(Path(lmms_eval.__file__).parent / "tasks" / yaml), mode="full")
    split = cfg.get("test_split") or cfg["validation_split"]
    path = tmp / f"{cfg['task']}.parquet"
    datasets.Dataset.from_list(docs).to_parquet(str(path))
    cfg.update(dataset_path="parquet", dataset_name=None,
               dataset_kwargs={"data_files": {split: str(path)}})
    cfg["generation_kwargs"] = {**(cfg.get("generation_kwargs") or {}), "max_new_tokens": 4}
    task = (ConfigurableMessagesTask if chat else ConfigurableTask)(config=cfg,
                                                                    model_name="llava_sd")
    task.build_all_requests(limit=len(docs), rank=0, world_size=1)
    return task


def segments(model: Any, prompt: PromptInputs) -> list[tuple[str, Any]]:
    """The prompt as ("image", placeholder count) and ("text", decoded text) runs."""
    ids, image = prompt.input_ids.tolist(), model.target.image_token_id
    out: list[tuple[str, Any]] = []
    for tok in ids:
        kind = "image" if tok == image else "text"
        if out and out[-1][0] == kind:
            out[-1][1].append(tok)
        else:
            out.append((kind, [tok]))
    return [(k, len(v) if k == "image" else model.target.decode(v)) for k, v in out]


def seen_prompts(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[PromptInputs]:
    seen: list[PromptInputs] = []
    prefill = model.target.prefill

    def spy(prompt: PromptInputs, **kw: Any):
        seen.append(prompt)
        return prefill(prompt, **kw)

    monkeypatch.setattr(model.target, "prefill", spy)
    return seen


@pytest.fixture(scope="module")
def models(tiny_paths: dict) -> dict[str, Any]:
    """Per family, the simple speculative class (chain of 2, baseline on); tests flip
    ``is_simple`` to make it the chat class, which differs in that flag alone."""
    return {f: make_model(f, pretrained=tiny_paths[f]["target"], draft=tiny_paths[f]["draft_vlm"],
                          baseline=True, tree="chain", **{"tree.k": 2}) for f in tiny_paths}


def expected_pixels(model: Any, images: list[Image.Image]) -> torch.Tensor:
    """The image processor on the doc's images, in order: an independent view of pixel_values."""
    kwargs = model.target.processor.image_processor([im.convert("RGB") for im in images],
                                                    return_tensors="pt")
    return kwargs["pixel_values"]


# every task on LLaVA; on Qwen2-VL one single-image task and the interleaved multi-image one
CASES = [("llava", y) for y in TASKS] + [("qwen2_vl", "chartqa/chartqa.yaml"),
                                         ("qwen2_vl", "mmmu/mmmu_val.yaml")]


@pytest.mark.parametrize(("family", "yaml"), CASES)
def test_real_task_prompts_reach_the_target(models: dict, family: str, yaml: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENAI_API_KEY", "none")  # MathVerse's judge client, never called here
    docs, fields = TASKS[yaml]
    model = models[family]
    images = [im for f in fields for im in (docs[0][f] if f == "image_list" else [docs[0][f]])]
    seen = seen_prompts(model, monkeypatch)
    runs = {}
    for chat in (False, True):  # simple first: mmmu's doc_to_messages flips a global flag
        task = build_task(yaml, docs, chat, tmp_path)
        monkeypatch.setattr(model, "is_simple", not chat)
        model.task_dict = {task.config.task: task.dataset}
        out = model.generate_until(task.instances)
        assert len(out) == 1 and 0 < out[0].token_counts.output_tokens <= 4
        prompt = seen[-1]
        runs[chat] = segments(model, prompt)
        assert [k for k, _ in runs[chat]].count("image") == len(images), runs[chat]
        got = prompt.model_kwargs["pixel_values"].float()
        assert torch.allclose(got, expected_pixels(model, images).float()), "image order"
    question = docs[0]["question"].split("<image")[0].strip()
    for chat, runs_ in runs.items():
        text = "".join(v for k, v in runs_ if k == "text")
        assert question.capitalize() in text or question in text, (chat, runs_)
    if yaml.startswith("mmmu"):  # chat: text, image 1, text, image 2, text (interleaved)
        kinds = [k for k, _ in runs[True]]
        first, second = kinds.index("image"), len(kinds) - 1 - kinds[::-1].index("image")
        assert "Compare" in "".join(v for k, v in runs[True][:first] if k == "text")
        assert "with" in "".join(v for k, v in runs[True][first:second] if k == "text")
        assert "image 1" in runs[False][-1][1]  # simple: images first, the raw question after
    else:  # a single user turn: images first, then the text, in both classes
        assert runs[False] == runs[True]


def pad_reference(model: Any, image: Image.Image) -> torch.Tensor:
    """transformers' LlavaImageProcessorPil with do_pad (LLaVA's expand2square) and the tiny
    processor's other settings."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ip = model.target.processor.image_processor
    ref = LlavaImageProcessorPil(size=ip.size, crop_size=ip.crop_size, image_mean=ip.image_mean,
                                 image_std=ip.image_std, do_pad=True)
    return ref([image], return_tensors="pt")["pixel_values"]


def one_request(gen_kwargs: dict, image: Image.Image) -> list:
    from lmms_eval.api.instance import Instance

    args = ("Describe.", {"max_new_tokens": 2, **gen_kwargs}, lambda doc: [image], 0, "t", "test")
    return [Instance("generate_until", args, 0, metadata={"task": "t", "doc_id": 0, "repeats": 1})]


def test_image_aspect_ratio_pad_from_gen_kwargs_and_model_args(
        models: dict, tiny_paths: dict, monkeypatch: pytest.MonkeyPatch):
    image = tiny_image(20, 48, 24)
    model = models["llava"]
    model.task_dict = {"t": {"test": [{}]}}
    seen = seen_prompts(model, monkeypatch)
    model.generate_until(one_request({"image_aspect_ratio": "pad"}, image))
    padded = pad_reference(model, image)
    assert torch.allclose(seen[-1].model_kwargs["pixel_values"], padded)
    model.generate_until(one_request({"image_aspect_ratio": "original"}, image))
    assert not torch.allclose(seen[-1].model_kwargs["pixel_values"], padded)
    monkeypatch.setattr(model, "settings", dataclasses.replace(model.settings,
                                                               image_aspect_ratio="pad"))
    model.generate_until(one_request({"image_aspect_ratio": "original"}, image))  # model arg wins
    assert torch.allclose(seen[-1].model_kwargs["pixel_values"], padded)
    with pytest.raises(ValueError, match="image_aspect_ratio='anyres'"):
        make_model("llava", pretrained=tiny_paths["llava"]["target"], sd="off",
                   image_aspect_ratio="anyres")


def test_image_aspect_ratio_pad_changes_nothing_for_qwen2_vl(models: dict,
                                                             monkeypatch: pytest.MonkeyPatch):
    image = tiny_image(21, 48, 24)
    model = models["qwen2_vl"]
    model.task_dict = {"t": {"test": [{}]}}
    seen = seen_prompts(model, monkeypatch)
    texts = [model.generate_until(one_request({"image_aspect_ratio": a}, image))[0].text
             for a in ("original", "pad")]
    assert texts[0] == texts[1]
    assert torch.equal(seen[0].model_kwargs["pixel_values"], seen[1].model_kwargs["pixel_values"])


@pytest.mark.parametrize("chat", [False, True])
def test_video_and_audio_requests_fail_naming_the_task(models: dict, chat: bool,
                                                       monkeypatch: pytest.MonkeyPatch):
    from lmms_eval.api.instance import Instance

    model = models["llava"]
    monkeypatch.setattr(model, "is_simple", not chat)
    model.task_dict = {"videomme": {"test": [{}]}}
    video = {"type": "video", "url": "clip.mp4"}
    args = (("q", lambda doc: [{"role": "user", "content": [video]}], {}, 0, "videomme", "test")
            if chat else ("q", {}, lambda doc: ["clip.mp4"], 0, "videomme", "test"))
    request = Instance("generate_until", args, 0, metadata={"task": "videomme", "doc_id": 0,
                                                            "repeats": 1})
    with pytest.raises(NotImplementedError, match="videomme doc 0: only image inputs"):
        model.generate_until([request])
