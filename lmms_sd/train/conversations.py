"""Real conversation data for draft-head training: LLaVA and ShareGPT JSON, their batches.

The layouts (read from the sources, 2025 snapshots):
  LLaVA  llava_v1_5_mix665k.json (haotian-liu/LLaVA, llava/train/train.py ``LazySupervisedDataset``;
         MSD's EAGLE/eagle/ge_data/ge_data_all_llava15.py): a list of
         ``{"id", "image": "coco/train2017/000000033471.jpg", "conversations": [{"from": "human",
         "value": "<image>\\nWhat are the colors of the bus in the image?"}, {"from": "gpt",
         "value": "The bus in the image is white and red."}, ...]}``; the image path is relative to
         the image folder, entries without ``"image"`` are text-only, and some ids are ints (MSD's
         ge_data/convert.py turns them into strings first).
  ShareGPT ShareGPT_V4.3_unfiltered_cleaned_split.json (SafeAILab/EAGLE
         eagle/ge_data/ge_data_all_*.py, read in its MSD copy):
         ``{"id", "conversations": [{"from": "human" | "gpt" | ..., "value"}]}``. EAGLE's ge_data
         drops a first turn that is not from the human and asserts that the roles then alternate.

Both read through ``load_conversations``. Roles: human/user -> user, gpt/assistant/chatgpt/bard/
bing -> assistant; anything else is an error naming the entry. ``<image>`` marks where an image
goes in a user turn (the newline the LLaVA data puts beside it is dropped: the chat template
writes its own); with no placeholder at all the images open the first user turn, as the adapters
place them. Images load lazily (PIL, RGB) from the folder.

``ConversationCollator`` renders the chat template turn by turn and labels the assistant turns
only, each as the template writes it through its end token (``data.assistant_continuation``);
``ConversationStream`` serves shuffled, sharded, epoch-based batches reproducible from a seed.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .data import (
    IGNORE_INDEX,
    VISION_KEYS,
    Batch,
    ShapesCollator,
    _pad,
    assistant_continuation,
)

IMAGE_PLACEHOLDER = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str  # the data's value, ``<image>`` placeholders included


@dataclass(frozen=True)
class Conversation:
    """One entry: alternating user / assistant turns (user first) and its image files."""

    id: str
    turns: tuple[Turn, ...]
    images: tuple[Path, ...] = ()

    def load_images(self) -> list[Image.Image]:
        for path in self.images:
            if not path.is_file():
                raise FileNotFoundError(f"entry {self.id!r}: image file {str(path)!r} is missing")
        return [Image.open(path).convert("RGB") for path in self.images]

    def messages(self) -> list[dict[str, Any]]:
        """Chat-template messages; ``{"type": "image"}`` where the placeholders were."""
        placed = any(IMAGE_PLACEHOLDER in t.text for t in self.turns)
        out = []
        for i, turn in enumerate(self.turns):
            content = _content(turn.text)
            if self.images and not placed and i == 0:
                content = [{"type": "image"}] * len(self.images) + content
            out.append({"role": turn.role, "content": content})
        return out


def _content(text: str) -> list[dict[str, Any]]:
    """Text and image parts in order; the newlines touching a placeholder are dropped."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        piece = piece.lstrip("\n") if i > 0 else piece
        piece = piece.rstrip("\n") if i < len(pieces) - 1 else piece
        if i > 0:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


# ---------------------------------------------------------------------------- parsing

def parse_entry(entry: dict[str, Any], image_folder: Path | None, *,
                drop_images: bool = False) -> Conversation:
    """One LLaVA / ShareGPT entry; ValueError naming the entry for anything malformed."""
    name = str(entry.get("id", "<no id>"))
    raw = entry.get("conversations")
    if not raw:
        raise ValueError(f"entry {name!r} has an empty conversation")
    turns = []
    for k, turn in enumerate(raw):
        role = ROLE_NAMES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"entry {name!r}, turn {k}: unknown role {turn.get('from')!r}; "
                             f"known: {sorted(ROLE_NAMES)}")
        text = turn.get("value") or ""
        if role == "assistant" and not text.strip():
            raise ValueError(f"entry {name!r}, turn {k}: empty assistant turn")
        turns.append(Turn(role, text.replace(IMAGE_PLACEHOLDER, "") if drop_images else text))
    if turns[0].role != "user":  # EAGLE's ge_data: a conversation starts with the human
        turns = turns[1:]
    for k, turn in enumerate(turns):
        if turn.role != ("user", "assistant")[k % 2]:
            raise ValueError(f"entry {name!r}: roles do not alternate user/assistant at turn {k}")
    if not any(t.role == "assistant" for t in turns):
        raise ValueError(f"entry {name!r} has no assistant turn to learn from")
    images = [] if drop_images else entry.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    if images and image_folder is None:
        raise ValueError(f"entry {name!r} has images but no image folder was given")
    placed = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if any(IMAGE_PLACEHOLDER in t.text for t in turns if t.role == "assistant"):
        raise ValueError(f"entry {name!r} has an {IMAGE_PLACEHOLDER} in an assistant turn")
    if placed != len(images) and (placed or not images):
        raise ValueError(f"entry {name!r} has {placed} {IMAGE_PLACEHOLDER} placeholders but "
                         f"{len(images)} images")
    return Conversation(name, tuple(turns), tuple(Path(image_folder) / p for p in images))


def load_conversations(path: str | Path, image_folder: str | Path | None = None, *,
                       drop_images: bool = False, check_images: bool = True) -> list[Conversation]:
    """All entries of a LLaVA / ShareGPT ``.json`` (a list) or ``.jsonl`` file.

    drop_images: read the entries as text-only (the images and their placeholders removed).
    check_images: fail now, naming the entry, when an image file is missing (not hours later)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    entries = ([json.loads(line) for line in text.splitlines() if line.strip()]
               if path.suffix == ".jsonl" else json.loads(text))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of conversations")
    folder = Path(image_folder) if image_folder is not None else None
    out = [parse_entry(e, folder, drop_images=drop_images) for e in entries]
    if check_images:
        for conv in out:
            missing = [str(p) for p in conv.images if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{path}: entry {conv.id!r}: image file(s) {missing} "
                                        "are missing")
    return out


# ---------------------------------------------------------------------------- batches

@dataclass(frozen=True)
class EncodedImage:
    """One image's processor outputs and how many placeholder tokens it fills."""

    n_tokens: int
    tensors: dict[str, Tensor]  # pixel_values (+ image_grid_thw for Qwen2-VL), this image only


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: Tensor         # [T] long
    labels: Tensor            # [T] long, IGNORE_INDEX outside the assistant turns
    mm_types: Tensor | None   # [T] long, the processor's mm_token_type_ids (Qwen2-VL) or None
    images: tuple[EncodedImage, ...]


class ConversationCollator:
    """Conversations -> a ``Batch`` for a LLaVA / Qwen2-VL processor (see the module docstring).

    Token ids, turn by turn: the first prompt segment (system + first user turn + generation
    prompt) goes through the processor exactly as ``adapter.prepare`` sends it; a later segment
    with images goes through the processor without special tokens; every other piece (the
    answers, text-only user turns) is tokenised in context: the ids that ``previous + piece``
    adds to ``previous`` when that is a prefix (a sentencepiece tokenizer would otherwise give
    a piece tokenised alone a spurious leading "▁"), else the piece alone.
    max_length: rows are cut to it, never through an image: the cut moves before the first
    image that does not fit, and that image and the later ones are dropped."""

    def __init__(self, processor: Any, max_length: int | None = None):
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.shapes = ShapesCollator(processor)  # the EOS and the padding checks
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.max_length = max_length
        self.image_token_id: int = self.tokenizer.convert_tokens_to_ids(processor.image_token)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def continuation_ids(self, previous: str, piece: str) -> list[int]:
        """The ids of ``piece`` as tokenised after ``previous`` (see the class docstring)."""
        if previous:
            before, joint = self._ids(previous), self._ids(previous + piece)
            if joint[:len(before)] == before:
                return joint[len(before):]
        return self._ids(piece)

    def _processed(self, text: str, images: list[Image.Image], first: bool
                   ) -> tuple[Tensor, Tensor | None, list[EncodedImage]]:
        enc = self.processor(text=[text], images=images or None, add_special_tokens=first,
                             return_tensors="pt")
        ids = enc["input_ids"][0]  # [t]
        types = enc["mm_token_type_ids"][0] if "mm_token_type_ids" in enc else None
        if not images:
            return ids, types, []
        grid = enc.get("image_grid_thw")  # [n, 3] for Qwen2-VL
        rows = grid.prod(-1).tolist() if grid is not None else [1] * len(images)
        tokens = ([r // self.processor.image_processor.merge_size ** 2 for r in rows]
                  if grid is not None else [int((ids == self.image_token_id).sum()) // len(images)]
                  * len(images))
        pixels = enc["pixel_values"].split(rows)
        out = []
        for i, (n, px) in enumerate(zip(tokens, pixels)):
            tensors = {"pixel_values": px}
            if grid is not None:
                tensors["image_grid_thw"] = grid[i:i + 1]
            out.append(EncodedImage(n, tensors))
        return ids, types, out

    def encode(self, conv: Conversation) -> EncodedConversation:
        messages, images = conv.messages(), conv.load_images()
        pieces: list[tuple[Tensor, bool, Tensor | None]] = []  # (ids, labelled, types)
        encoded: list[EncodedImage] = []
        done, emitted, used_images, start = "", "", 0, 0  # template text consumed, last piece
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            answer = "".join(c["text"] for c in message["content"] if c["type"] == "text")
            try:
                cont = assistant_continuation(self.processor, self.shapes.eos, messages[:j], answer)
            except ValueError as err:
                raise ValueError(f"entry {conv.id!r}, turn {j}: {err}") from err
            if not cont.prompt.startswith(done):
                raise ValueError(f"entry {conv.id!r}: the chat template rewrites earlier turns "
                                 f"when a turn is added; it cannot be rendered turn by turn")
            segment = cont.prompt[len(done):]
            n_images = sum(c["type"] == "image" for m in messages[start:j] for c in m["content"])
            if not done or n_images:
                seg_images = images[used_images:used_images + n_images]
                ids, types, new = self._processed(segment, seg_images, first=not done)
                encoded += new
                used_images += n_images
            else:
                ids, types = torch.tensor(self.continuation_ids(emitted, segment)), None
            answer_ids = torch.tensor(self.continuation_ids(segment, cont.text))
            pieces += [(ids, False, types), (answer_ids, True, None)]
            done, emitted, start = cont.prompt + cont.text[:cont.used], cont.text, j + 1
        return self._truncate(conv, pieces, encoded)

    def _truncate(self, conv: Conversation, pieces: list[tuple[Tensor, bool, Tensor | None]],
                  images: list[EncodedImage]) -> EncodedConversation:
        ids = torch.cat([p[0] for p in pieces]).long()  # [T]
        labels = torch.cat([p[0] if p[1] else torch.full_like(p[0], IGNORE_INDEX)
                            for p in pieces]).long()
        typed = any(p[2] is not None for p in pieces)
        types = (torch.cat([p[2] if p[2] is not None else torch.zeros_like(p[0])
                            for p in pieces]).long() if typed else None)
        slots = (ids == self.image_token_id).nonzero().flatten().tolist()
        if len(slots) != sum(im.n_tokens for im in images):
            raise ValueError(f"entry {conv.id!r}: {len(slots)} image tokens for "
                             f"{sum(im.n_tokens for im in images)} image features")
        keep, kept, first_slot = len(ids), [], 0
        if self.max_length is not None and len(ids) > self.max_length:
            keep = self.max_length
            for im in images:
                if slots[first_slot + im.n_tokens - 1] >= keep:
                    keep = min(keep, slots[first_slot])
                    break
                kept.append(im)
                first_slot += im.n_tokens
        else:
            kept = list(images)
        cut = None if types is None else types[:keep]
        return EncodedConversation(ids[:keep], labels[:keep], cut, tuple(kept))

    def __call__(self, conversations: Sequence[Conversation]) -> Batch:
        rows = [self.encode(c) for c in conversations]
        batch = _pad([r.input_ids for r in rows], [r.labels for r in rows],
                     self.tokenizer.pad_token_id)
        images = [im for r in rows for im in r.images]
        if not images:
            return batch  # text-only: no vision inputs at all
        batch.vision = {k: torch.cat([im.tensors[k] for im in images])
                        for k in VISION_KEYS if k in images[0].tensors}
        if any(r.mm_types is not None for r in rows):
            types = torch.zeros_like(batch.input_ids)  # [B, T]
            for i, r in enumerate(rows):
                if r.mm_types is not None:
                    types[i, :len(r.mm_types)] = r.mm_types
            batch.vision["mm_token_type_ids"] = types
        return batch


class ConversationStream:
    """Batches of conversations for one process: each epoch a fresh shuffle of all of them
    (reproducible from ``seed``), dealt round-robin to the ``world_size`` processes, so ranks see
    disjoint conversations whose union is the whole set. Every rank has the same number of
    batches per epoch, each of exactly ``batch_size`` conversations (a short shard wraps)."""

    def __init__(self, conversations: Sequence[Conversation], batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"{batch_size}, {rank}, {world_size}")
        if len(conversations) < world_size:
            raise ValueError(f"{len(conversations)} conversations cannot feed {world_size} "
                             "processes")
        self.conversations = list(conversations)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self._epoch, self._shard = -1, []

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.conversations) / self.world_size) / self.batch_size)

    def shard(self, epoch: int) -> list[Conversation]:
        """This rank's conversations in ``epoch``, in order."""
        if epoch != self._epoch:
            order = list(range(len(self.conversations)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch = epoch
            self._shard = [self.conversations[i] for i in order[self.rank::self.world_size]]
        return self._shard

    def batch(self, index: int) -> list[Conversation]:
        """This rank's ``index``-th batch (0-based, counting across epochs)."""
        epoch, k = divmod(index, self.batches_per_epoch)
        shard = self.shard(epoch)
        return [shard[(k * self.batch_size + i) % len(shard)] for i in range(self.batch_size)]

