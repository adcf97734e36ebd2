"""Sentence embeddings with a BERT-family sentence-transformers model (all-MiniLM-L6-v2): mean
pooling over the real tokens, then L2 normalization, as the model card prescribes.

The folder's tokenizer.json pads and truncates every input to 128 tokens; the tokenizer here is
called with its own padding (to the longest in the batch) and the pooling is masked, so a
text's vector does not depend on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Executor
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


class BatchingEmbedder:
    """Concurrent callers' texts share forward passes: while one batch runs (on the executor,
    one at a time), the calls arriving meanwhile queue and go together as the next one, up to
    MAX_TEXTS texts. A lone call waits for nothing; under load, a router's many one-text calls
    cost a few batched passes instead of one pass each (a single text costs about four
    times a batched one on a CPU). Make it inside the event loop that uses it."""

    def __init__(self, embedder: Embedder, pool: Executor) -> None:
        self.embedder = embedder
        self.pool = pool
        self._pending: list[tuple[list[str], asyncio.Future]] = []
        self._runner: asyncio.Task | None = None

    async def embed(self, texts: list[str]) -> np.ndarray:
        if len(texts) > MAX_TEXTS:
            raise ValueError(f"at most {MAX_TEXTS} texts per call")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((texts, fut))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, n = [], 0
            while self._pending and n + len(self._pending[0][0]) <= MAX_TEXTS:
                batch.append(self._pending.pop(0))
                n += len(batch[-1][0])
            texts = [t for ts, _ in batch for t in ts]
            try:
                vecs = await loop.run_in_executor(self.pool, self.embedder.embed, texts)
            except Exception as e:  # every waiter of this batch gets the error, no other
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            at = 0
            for ts, fut in batch:
                if not fut.done():  # a cancelled caller's rows are dropped
                    fut.set_result(vecs[at : at + len(ts)])
                at += len(ts)
