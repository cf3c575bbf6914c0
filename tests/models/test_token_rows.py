"""New tokens: a past concept's row is frozen bit for bit, ordinary words untouched."""

from __future__ import annotations

import torch
from streams import VOCAB

from conceptstream import api
from conceptstream.concepts.folder import read_concept
from conceptstream.models.loading import load_pipeline
from conceptstream.state import StateStore


def test_past_token_rows_and_vocabulary_unchanged_by_later_tasks(tmp_path, random_model_path, concept_dirs):
    state = tmp_path / "state"
    first, second = read_concept(concept_dirs[0]), read_concept(concept_dirs[1])
    api.learn(state, concept_dirs[0], method="ewc-dc", model=str(random_model_path), steps=3, progress=False,
              hparams={"fisher_passes": 1})
    rows1 = StateStore(state).load_tensors("tokens")
    api.learn(state, concept_dirs[1], model=str(random_model_path), steps=3, progress=False)
    rows2 = StateStore(state).load_tensors("tokens")
    assert set(rows2) == {first.token, second.token}
    assert torch.equal(rows1[first.token], rows2[first.token])  # bit for bit
    # the new token was actually trained: it moved away from its initialisation (the noun's mean row)
    base = load_pipeline(str(random_model_path))
    base_emb = base.text_encoder.get_input_embeddings().weight
    noun_ids = base.tokenizer(second.noun, add_special_tokens=False).input_ids
    assert not torch.allclose(rows2[second.token], base_emb[noun_ids].mean(0))
    stream = api.open_stream(state)
    emb = stream.pipe.text_encoder.get_input_embeddings().weight
    assert emb.shape[0] == VOCAB + 2
    assert torch.equal(emb[:VOCAB], base_emb[:VOCAB])  # ordinary words untouched
    tok = stream.pipe.tokenizer
    assert torch.equal(emb[tok.convert_tokens_to_ids(first.token)], rows1[first.token])
