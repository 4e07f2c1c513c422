"""The token trie of a secret space: every secret's canonical tokenization is one path
in it, whatever the tokenizer merges."""

from __future__ import annotations

import pytest

from privtune.data.canaries import Canary, candidate_secrets, make_canaries
from privtune.measures.secret_tokens import SecretTokenSpace, TokenizationMismatch, token_texts
from privtune.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_token_texts_spell_what_the_tokens_encode(tokenizer):
    texts = token_texts(tokenizer)
    assert len(texts) == len(tokenizer)
    assert all(texts[i] == "" for i in tokenizer.all_special_ids)
    for line in ("The PIN for Ada Byron's account is 482915.", "  spaced  out 0.5%", "card 4111-1111"):
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        assert "".join(texts[i] for i in ids) == line


def test_every_secret_of_a_four_digit_space_is_one_path(tokenizer):
    canary = make_canaries(repetitions=(1,), n_reference=0, seed=4, secret_length=4)[0]
    space = SecretTokenSpace.build(tokenizer, canary, candidate_secrets(canary, 64))
    everyone = [canary.secret] + candidate_secrets(canary, canary.space_size - 1)
    paths = space.canonical_paths(tokenizer, everyone)
    assert len(set(paths)) == canary.space_size
    texts = token_texts(tokenizer)
    first_tokens, widths = set(), set()
    for secret, path in zip(everyone, paths):
        spelled = "".join(texts[t] for t in path)
        window = space.window[: space.secret_start] + secret + space.window[space.secret_end:]
        assert window.startswith(spelled) and len(spelled) >= space.secret_end
        first_tokens.add(texts[path[0]])
        widths.update(len(texts[t].strip()) for t in path)
    # Not one token per digit: digits merge, and the space before the secret is a token
    # of its own for some secrets and merged with the first digit for others.
    assert max(widths) >= 2 and " " in first_tokens and any(len(t) == 2 and t[0] == " " for t in first_tokens)


def test_a_tokenization_outside_the_trie_is_refused(tokenizer):
    canary = Canary("c", "The locker of Ada Byron is ", "42", length=2)
    space = SecretTokenSpace.build(tokenizer, canary, [])
    ids = tokenizer(canary.text("17"), add_special_tokens=True)["input_ids"]
    assert space.path_from_ids("17", ids)
    with pytest.raises(TokenizationMismatch, match="changes the tokens before"):
        space.path_from_ids("17", [ids[0] + 1] + ids[1:])
    with pytest.raises(TokenizationMismatch, match="does not spell"):
        space.path_from_ids("18", ids)


def test_a_prefix_the_secret_merges_into_leaves_no_context(tokenizer):
    # "t" + "he" is one word: the first token depends on the secret, so nothing is shared.
    canary = Canary("c", "t", "he", alphabet="aehnrt", length=2)
    with pytest.raises(TokenizationMismatch, match="no token before"):
        SecretTokenSpace.build(tokenizer, canary, ["an", "rn", "ee"])
