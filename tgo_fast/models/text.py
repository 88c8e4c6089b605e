"""Tiny offline tokenizers and text encoders for the random-init model defaults.

No download: the CLIP tokenizer is a byte-level BPE trained with the ``tokenizers`` library on an
embedded caption vocabulary (the same normaliser / pre-tokeniser / ``</w>`` convention as OpenAI
CLIP's), the T5 tokenizer a SentencePiece-style Unigram over the same words plus single characters.
Both are written to a temporary directory and loaded through ``from_pretrained`` so they are the
real ``transformers`` classes, save and reload like any hub tokenizer, and work in the diffusers
pipelines. Text encoders are random-init, deterministic from ``seed``.

    >>> tokenizer, encoder = tiny_clip_text(seed=0, hidden_size=32, projection_dim=32)
    >>> tokenizer_2, encoder_2 = tiny_t5_text(seed=1, d_model=32, max_length=32)
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

__all__ = ["CAPTION_WORDS", "prompt_length", "tiny_clip_tokenizer", "tiny_clip_text", "tiny_t5_tokenizer", "tiny_t5_text", "seeded_init"]

# Words of short image captions: procedural shapes/colours/positions and everyday subjects.
CAPTION_WORDS = tuple(
    """
    a an the of on in at with and or to by from near under over above below behind beside between
    is are this that it its one two three four five some many few small large big tiny huge little
    red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver
    dark light bright pale colorful
    circle circles square squares triangle triangles rectangle star stars dot dots line lines stripe
    stripes ring cross shape shapes blob grid pattern gradient
    top bottom left right center middle corner edge side upper lower background foreground
    photo picture image painting drawing illustration render sketch art style digital oil watercolor
    portrait landscape close up view of high quality detailed sharp blurry simple abstract
    cat dog bird horse fish flower tree house car boat mountain river sea sky sun moon city street
    man woman child person face hand apple table chair window door road forest field garden beach
    """.split()
)

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI CLIP's word splitter: specials, contractions, letter runs, single digits, other symbol runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def prompt_length(requested: int | None, tokenizer, pipeline_default: int) -> int:
    """The T5-style prompt length (``max_sequence_length``): ``requested``, or the pipeline's default capped by the
    tokenizer's own length."""
    length = min(tokenizer.model_max_length, pipeline_default) if requested is None else requested
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"max_sequence_length must be a positive int, got {length!r}")
    return length


def seeded_init(seed: int, build):
    """Call ``build()`` under ``torch.manual_seed(seed)`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@functools.lru_cache(maxsize=None)
def _clip_vocab_and_merges(vocab_size: int) -> tuple[dict[str, int], tuple[str, ...]]:
    """Byte-level BPE in CLIP's layout: 256 bytes, 256 bytes + ``</w>``, merge results, then specials."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(CAPTION_WORDS)] * 4, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in merges)

    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split(" ")) for m in merges]
    vocab: dict[str, int] = {}
    for token in tokens + [_CLIP_BOS, _CLIP_EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def tiny_clip_tokenizer(max_length: int = 77, vocab_size: int = 1000) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` (bos/eos/pad as in CLIP) over a byte-level BPE learned from :data:`CAPTION_WORDS`."""
    vocab, merges = _clip_vocab_and_merges(vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def tiny_clip_text(
    seed: int,
    hidden_size: int,
    projection_dim: int,
    *,
    with_projection: bool = True,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    max_length: int = 77,
) -> tuple[CLIPTokenizer, CLIPTextModel | CLIPTextModelWithProjection]:
    """Tiny CLIP text tower: ``(tokenizer, CLIPTextModelWithProjection)`` (or ``CLIPTextModel`` when
    ``with_projection=False``), random-init deterministically from ``seed``, in eval mode."""
    tokenizer = tiny_clip_tokenizer(max_length)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return tokenizer, seeded_init(seed, lambda: model_class(config)).eval()


@functools.lru_cache(maxsize=None)
def _t5_unigram_json() -> str:
    """SentencePiece-style Unigram: specials, whole words (``▁word``), then single-character fallbacks."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + word, -2.0) for word in sorted(set(CAPTION_WORDS))]
    pieces += [("▁", -4.0)] + [(chr(code), -8.0) for code in range(33, 127)]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=2))
    unigram.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    unigram.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    unigram.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return unigram.to_str()


def tiny_t5_tokenizer(max_length: int = 32) -> T5TokenizerFast:
    """A T5 tokenizer (pad 0, eos 1, unk 2, eos appended) over :data:`CAPTION_WORDS` + ASCII characters."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "tokenizer.json").write_text(_t5_unigram_json(), encoding="utf-8")
        config = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 0}
        Path(tmp, "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return T5TokenizerFast.from_pretrained(tmp, model_max_length=max_length)


def tiny_t5_text(
    seed: int, d_model: int, *, max_length: int = 32, num_layers: int = 2, num_heads: int = 2
) -> tuple[T5TokenizerFast, T5EncoderModel]:
    """Tiny T5 encoder (FLUX's ``text_encoder_2``): ``(tokenizer, T5EncoderModel)`` from ``seed``, eval mode."""
    tokenizer = tiny_t5_tokenizer(max_length)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, seeded_init(seed, lambda: T5EncoderModel(config)).eval()
