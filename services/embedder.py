"""Sentence embeddings with a BERT-family sentence-transformers model (all-MiniLM-L6-v2): mean
pooling over the real tokens, then L2 normalization, as the model card prescribes.

The folder's tokenizer.json pads and truncates every input to 128 tokens; the tokenizer here is
called with its own padding (to the longest in the batch) and the pooling is masked, so a
text's vector does not depend on what else is in the batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from services.engine.errors import ModelLoadError

MAX_TEXTS = 256  # per call


class Embedder:
    def __init__(self, model_dir: str | Path, threads: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a sentence-transformers model folder")
        if threads:
            torch.set_num_threads(threads)
        st_cfg = path / "sentence_bert_config.json"
        self.max_length = (
            int(json.loads(st_cfg.read_text()).get("max_seq_length", 256))
            if st_cfg.is_file()
            else 256
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        self.dim = int(self.model.config.hidden_size)
        self.name = path.name

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32, each row of norm 1."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state  # [B, T, dim]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)
