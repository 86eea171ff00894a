"""The pocket pair: a small teacher/student model organism trained here, on a CPU (DESIGN.md 3).

* :mod:`pktlib.zoo.config`: presets (:data:`PRESETS`), the cache key and folder of a pair
  (:func:`pair_dir`, :func:`pair_is_current`), :class:`PocketPair`;
* :mod:`pktlib.zoo.tokenizer`: the byte-level BPE trained on the suite;
* :mod:`pktlib.zoo.build`: models, batches, the two training stages and :func:`build_pair` /
  :func:`pocket_pair`;
* :mod:`pktlib.zoo.cards`: checkpoint folders with their cards, and :func:`score_pair`;
* :mod:`pktlib.zoo.specialist`: a specialist teacher, teacher-chat trained further on one family
  (imported by name: ``from pktlib.zoo.specialist import build_specialist``).

The tasks the pair learns are the pocket suite, :mod:`pktlib.data.suite`.
"""
from pktlib.cache import cache_dir
from pktlib.data.suite import (FAMILIES, SPLIT_SIZES, SuiteConfig, base_corpus, chat_examples, generate_suite, suite_dir,
                          suite_file)
from pktlib.zoo.build import (TrainLog, base_batches, build_model, build_pair, chat_batches, pocket_pair,
                              train_base, train_chat, train_stage, with_replay)
from pktlib.zoo.cards import MAX_NEW_TOKENS, card_markdown, read_card, score_pair
from pktlib.zoo.config import (BUILD_VERSION, CHECKPOINTS, PRESETS, ModelConfig, PairConfig, PocketPair, TrainConfig,
                               for_this_machine, get_preset, native_bf16, pair_dir, pair_is_current)
from pktlib.zoo.tokenizer import train_tokenizer

__all__ = [
    "FAMILIES", "SPLIT_SIZES", "CHECKPOINTS", "MAX_NEW_TOKENS", "BUILD_VERSION", "SuiteConfig", "ModelConfig",
    "TrainConfig", "PairConfig", "PRESETS", "native_bf16", "for_this_machine", "get_preset", "PocketPair", "cache_dir", "suite_dir", "suite_file",
    "generate_suite", "base_corpus", "chat_examples", "train_tokenizer", "build_model", "TrainLog", "train_stage",
    "base_batches", "chat_batches", "with_replay", "train_base", "train_chat", "pair_dir", "pair_is_current",
    "build_pair", "pocket_pair", "score_pair", "read_card", "card_markdown",
]
