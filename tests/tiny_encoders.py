"""Tiny random encoders of every supported model type, each with a tokenizer of its family's kind trained in-process
with `tokenizers` on real SST-2 text (no downloads): WordPiece for bert/distilbert/electra/mpnet, byte-level BPE for
roberta, Unigram (with Metaspace) for xlm-roberta/deberta-v2/albert, each with the family's special tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

VOCAB = 600
HIDDEN, LAYERS, HEADS, FFN = 32, 2, 2, 37
POSITIONS = 130  # bundle.max_length 128 (+2 where position ids start after the padding index)

# family -> (kind of tokenizer, special tokens in id order, cls, sep, pad, unk, mask, lowercase)
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
FAMILIES: dict[str, dict[str, Any]] = {
    "bert": {"kind": "wordpiece", "specials": BERT_SPECIALS},
    "distilbert": {"kind": "wordpiece", "specials": BERT_SPECIALS},
    "electra": {"kind": "wordpiece", "specials": BERT_SPECIALS},
    "mpnet": {"kind": "wordpiece", "specials": ROBERTA_SPECIALS},
    "roberta": {"kind": "bpe", "specials": ROBERTA_SPECIALS},
    "xlm-roberta": {"kind": "unigram", "specials": ROBERTA_SPECIALS},
    "deberta-v2": {"kind": "unigram", "specials": ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]},
    "albert": {"kind": "unigram", "specials": ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]},
    "modernbert": {"kind": "bpe", "specials": BERT_SPECIALS},
}


def _roles(specials: list[str]) -> dict[str, str]:
    """cls/sep/pad/unk/mask token of a family's special tokens."""
    pick = {
        "cls": ("[CLS]", "<s>"),
        "sep": ("[SEP]", "</s>"),
        "pad": ("[PAD]", "<pad>"),
        "unk": ("[UNK]", "<unk>"),
        "mask": ("[MASK]", "<mask>"),
    }
    return {role: next(t for t in specials if t in names) for role, names in pick.items()}


def train_tokenizer(kind: str, specials: list[str], texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    r = _roles(specials)
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=r["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer: Any = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=specials, unk_token=r["unk"])
    tok.train_from_iterator(texts, trainer)
    cls, sep = r["cls"], r["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return tok


def _config(model_type: str, vocab: int, pad: int) -> Any:
    import transformers as tf

    common = {"vocab_size": vocab, "pad_token_id": pad, "num_labels": 2}
    layers = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": FFN,
        "max_position_embeddings": POSITIONS,
    }
    builders: dict[str, Callable[[], Any]] = {
        "bert": lambda: tf.BertConfig(**common, **layers),
        "distilbert": lambda: tf.DistilBertConfig(
            **common, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, max_position_embeddings=POSITIONS
        ),
        "electra": lambda: tf.ElectraConfig(**common, **layers, embedding_size=16),
        "mpnet": lambda: tf.MPNetConfig(**common, **layers),
        "roberta": lambda: tf.RobertaConfig(**common, **layers, type_vocab_size=1),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**common, **layers, type_vocab_size=1),
        "deberta-v2": lambda: tf.DebertaV2Config(
            **common, **layers, type_vocab_size=0, relative_attention=True, pos_att_type=["p2c", "c2p"]
        ),
        "albert": lambda: tf.AlbertConfig(**common, **layers, embedding_size=16),
        "modernbert": lambda: tf.ModernBertConfig(
            **common, **layers, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3
        ),
    }
    return builders[model_type]()


def build(model_type: str, folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A random-weight `model_type` classifier with its family's tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    family = FAMILIES[model_type]
    tok = train_tokenizer(family["kind"], family["specials"], texts)
    r = _roles(family["specials"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token=r["cls"],
        sep_token=r["sep"],
        pad_token=r["pad"],
        unk_token=r["unk"],
        mask_token=r["mask"],
        bos_token=r["cls"],
        eos_token=r["sep"],
        model_max_length=POSITIONS - 2,
    )
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(_config(model_type, tok.get_vocab_size(), fast.pad_token_id))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder
