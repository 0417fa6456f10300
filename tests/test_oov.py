"""Closed-vocabulary word LM and the per-user OOV adapter (issue 18)."""

import random

import pytest
import torch

from flotilla.core.flat import FlatModel
from flotilla.oov.data import windows
from flotilla.oov.model import WordLM, personal_model
from flotilla.oov.personal import adapt, personal_ids, score
from flotilla.oov.vocab import UNK, Vocab, exact_match_at_k, oov_rate, tokenize, top_words, user_oov_words

BASE = ["the", "king", "queen", "and", "my", "lord", "good", "night"]
SEQ = 6


def base_model(vocab: Vocab, seed=0) -> WordLM:
    torch.manual_seed(seed)
    return WordLM(vocab.spellings(), dim=16, hidden=16, char_dim=8, filters=8)


def user_text(name: str, n: int = 240, seed: int = 0) -> list[str]:
    """Base words at random, with the user's own name always after "good": a learnable OOV."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        out += ["good", name] if rng.random() < 0.3 else [rng.choice(BASE)]
    return out


def test_vocabulary_is_deterministic_and_ties_are_broken_by_the_word():
    texts = [tokenize("Good night, good lord! The king; the queen."), tokenize("And my lord, the KING o'er")]
    vocab = top_words(texts, 4)
    assert vocab == ["the", "good", "king", "lord"]  # counts 3, 2, 2, 2: ties alphabetically
    assert top_words(reversed(texts), 4) == vocab
    assert top_words([list(reversed(t)) for t in texts], 4) == vocab
    assert "o'er" in tokenize("And my lord, the KING o'er")


def test_user_oov_words_come_from_the_users_own_text_only():
    known = set(BASE)
    assert user_oov_words(["romeo", "the", "verona", "romeo", "abel", "verona"], known, 2) == ["romeo", "verona"]


def test_oov_rate_on_a_hand_example():
    known = {"the", "king"}
    assert oov_rate(["the", "king", "romeo", "the"], known) == 0.25
    assert oov_rate(["the", "king", "romeo", "the"], known | {"romeo"}) == 0.0
    with pytest.raises(ValueError, match="empty"):
        oov_rate([], known)


def test_exact_match_at_3_on_a_hand_example():
    # ids: 0 <unk>, 1..5 words.  Position 0's top-3 words (unk excluded) are 1, 2, 3.
    logits = torch.tensor(
        [
            [9.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 3: hit (<unk> is top-1 but is no word)
            [9.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 4: miss (4th word)
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # target 5: hit
            [9.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target <unk>: never a hit
        ]
    )
    hits = exact_match_at_k(logits, torch.tensor([3, 4, 5, UNK]), k=3)
    assert hits.tolist() == [True, False, True, False]


def test_adapter_words_are_predicted_only_for_their_own_user_and_never_uploaded():
    vocab = Vocab(BASE)
    base = base_model(vocab)
    federated = FlatModel(base)
    uploaded = federated.flat.clone()
    names = list(federated.names)
    alice_train, bob_train = user_text("romeo", seed=1), user_text("hermia", seed=2)
    fit = dict(seq_len=SEQ, steps=60, lr=0.05, batch_size=16, seed=0)
    alice = adapt(base, vocab, alice_train, 3, **fit)
    bob = adapt(base, vocab, bob_train, 3, **fit)
    assert alice.adapter.words == ["romeo"] and bob.adapter.words == ["hermia"]

    # Alice's model learned her word: it is in her top 3 where it comes next.
    x, y = windows(personal_ids(user_text("romeo", seed=3), vocab, alice.adapter.words), SEQ)
    assert score(alice, x, y, len(vocab)).emr_oov > 0.5
    # Scored on Bob's text, Alice's model can only output the base words and her own.
    x, y = windows(personal_ids(bob_train, vocab, alice.adapter.words), SEQ)
    with torch.no_grad():
        top = alice(x).topk(3, dim=-1).indices
    assert alice(x).shape[1] == len(vocab) + 1
    spoken = {(["<unk>", *BASE, *alice.adapter.words])[i] for i in top.unique().tolist()}
    assert "hermia" not in spoken
    # Bob's model predicts "hermia" on his text; the federated model has no id for either name.
    x, y = windows(personal_ids(user_text("hermia", seed=4), vocab, bob.adapter.words), SEQ)
    assert score(bob, x, y, len(vocab)).emr_oov > 0.5
    assert base(x.clamp(max=len(vocab) - 1)).shape[1] == len(vocab)

    # Nothing of either adapter is in the federated model: same names, same vector, bit for bit.
    assert federated.names == names and all("adapter" not in n for n in names)
    assert torch.equal(federated.flat, uploaded)
    assert FlatModel(base_model(vocab)).numel == federated.numel
    assert all(p.grad is None for p in alice.base.parameters())


def test_personal_model_starts_from_the_base_predictions_on_base_words():
    vocab = Vocab(BASE)
    base = base_model(vocab)
    model = personal_model(base_model(vocab), ["romeo"])
    x = torch.randint(1, len(vocab), (2, SEQ))
    with torch.no_grad():
        ours, theirs = model(x), base(x)
    assert torch.allclose(ours[:, : len(vocab)], theirs)  # the extra word only adds a column
    assert ours.shape[1] == len(vocab) + 1
