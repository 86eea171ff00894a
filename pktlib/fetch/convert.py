"""Converting a verified GGUF file once into a Hugging Face checkpoint (float32 safetensors, the
tokenizer with its chat template) with a card giving provenance, licence and quantisation."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Mapping

import gguf
import torch
import transformers
from tqdm.auto import tqdm

from pktlib import __version__
from pktlib.errors import PktError
from pktlib.models import load_model, spec
from pktlib.records import atomic_dir, write_json

__all__ = ["gguf_info", "convert_gguf"]


def gguf_info(path: str | os.PathLike) -> dict:
    """Metadata of a GGUF file that a card reports: name, file type, tensor types, chat template."""
    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = None
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "file_type": file_type,
        "file_type_name": file_type_name,
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
        "n_tensors": len(reader.tensors),
        "chat_template": field("tokenizer.chat_template"),
    }


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, *, card: Mapping | None = None,
                 progress: bool = True) -> Path:
    """Convert a GGUF file into a Hugging Face checkpoint folder (written atomically).

    The weights are dequantised by transformers (the same code that loads a ``.gguf`` through
    :func:`pktlib.models.load_model`) and saved as float32 safetensors, so the checkpoint's
    logits equal those of loading the GGUF file. The tokenizer is saved with the file's chat
    template (``tokenizer.chat_template``; :class:`PktError` if the file has none). ``card``
    (provenance) is completed with the file's metadata, the model's shape and the versions of
    the converting libraries, and written as ``card.json`` and a ``README.md`` model card.
    """
    gguf_file = Path(gguf_file)
    info = gguf_info(gguf_file)
    template = info.pop("chat_template")
    if not template:
        raise PktError(f"{gguf_file}: the GGUF file has no tokenizer.chat_template")
    t0 = time.time()
    with tqdm(total=3, desc=f"convert {gguf_file.stem}", unit="stage", disable=not progress,
              file=sys.stderr) as bar:
        bar.set_postfix_str("dequantising the weights and the tokenizer")
        model, tok = load_model(gguf_file, dtype="float32")
        if getattr(model, "hf_quantizer", None) is not None:  # packed blocks cannot be saved as safetensors
            raise PktError(f"{gguf_file}: transformers kept the weights quantized; cannot convert")
        bar.update(1)
        tok.chat_template = template
        # The GGUF tokenizer comes without a length limit; the model's context is the real one.
        tok.model_max_length = int(model.config.max_position_embeddings)
        s = spec(model)
        n_params = sum(p.numel() for p in model.parameters())
        full = {
            **dict(card or {}),
            "source": {**dict((card or {}).get("source", {})), "gguf_file": gguf_file.name,
                       "gguf_metadata": info},
            "conversion": {"dtype": "float32", "seconds": None, "transformers": transformers.__version__,
                           "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
                           "torch": torch.__version__, "pktlib": __version__,
                           "note": "weights are the GGUF file's quantised values dequantised to float32 "
                                   "(not the upstream bf16 weights)"},
            "architecture": s.to_dict(),
            "parameters": n_params,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        }
        with atomic_dir(out_dir) as tmp:
            bar.set_postfix_str("saving safetensors")
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            bar.update(1)
            full["conversion"]["seconds"] = round(time.time() - t0, 1)
            write_json(tmp / "card.json", full)
            (tmp / "README.md").write_text(_card_markdown(full), encoding="utf-8")
            umask = os.umask(0)
            os.umask(umask)
            for f in tmp.iterdir():  # safetensors writes 0600 files; a cache is readable like any other file
                os.chmod(f, 0o666 & ~umask)
            bar.update(1)
    return Path(out_dir)


def _dist_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _card_markdown(card: Mapping) -> str:
    src, conv, arch = card.get("source", {}), card.get("conversion", {}), card.get("architecture", {})
    meta = src.get("gguf_metadata", {})
    licence = card.get("licence", "unknown")
    upstream = card.get("upstream")
    lines = ["---", f"license: {licence.lower()}"]
    if upstream:
        lines.append(f"base_model: {upstream}")
    lines += ["library_name: transformers", "tags: [gguf-dequantised, pktlib]", "---", "",
              f"# {card.get('name', 'converted GGUF model')}", "",
              f"A float32 Hugging Face checkpoint converted by pktlib from a {card.get('quantisation', '')} GGUF file. "
              "Its weights are the quantised values dequantised, not the upstream weights.", "",
              "| field | value |", "| --- | --- |"]
    rows = [("upstream model", upstream), ("licence", licence), ("quantisation", card.get("quantisation")),
            ("GGUF file type", f"{meta.get('file_type_name')} ({meta.get('file_type')})"),
            ("GGUF tensor types", ", ".join(f"{k} x{v}" for k, v in meta.get("tensor_types", {}).items())),
            ("name in the GGUF file", meta.get("name")),
            ("GGUF sha256", src.get("gguf_sha256")), ("GGUF bytes", f"{src.get('gguf_size', 0):,}"),
            ("obtained from", src.get("index")), ("packages", ", ".join(p["requirement"] for p in src.get("packages", []))),
            ("architecture", f"{arch.get('arch')}: {arch.get('n_layers')} layers, hidden {arch.get('hidden_size')}, "
                             f"FFN {arch.get('intermediate_size')}, {arch.get('n_heads')} heads / "
                             f"{arch.get('n_kv_heads')} KV heads, vocabulary {arch.get('vocab_size')}"),
            ("parameters", f"{card.get('parameters', 0):,}"),
            ("converted with", f"transformers {conv.get('transformers')}, gguf {conv.get('gguf')}, "
                               f"torch {conv.get('torch')}, pktlib {conv.get('pktlib')}"),
            ("conversion seconds", conv.get("seconds"))]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    if src.get("packages"):
        lines += ["", "Wheel sha256s (pinned in `pktlib.fetch.MODELS`):", ""]
        lines += [f"- `{p['requirement']}`: `{p['sha256']}`" for p in src["packages"]]
    return "\n".join(lines) + "\n"
