"""Text to image in small: which class a prompt names, the captions drawn for training, the text
encoder, and a vocabulary that is rebuilt exactly from the class names."""
from __future__ import annotations

import pytest
import torch

from fashion import CLASSES
from components.models.text import PAD, TextEncoder, Vocabulary, words

pytestmark = pytest.mark.usefixtures("one_thread")

FASHION = Vocabulary(CLASSES)


@pytest.mark.parametrize("prompt, cls", [
    ("a pair of sneakers", "Sneaker"), ("trainers", "Sneaker"), ("a running shoe", "Sneaker"),
    ("ankle boot", "Ankle boot"), ("Ankle Boots", "Ankle boot"), ("boots", "Ankle boot"),
    ("a T-shirt", "T-shirt/top"), ("tee", "T-shirt/top"), ("T-shirt/top", "T-shirt/top"),
    ("some jeans", "Trouser"), ("pants", "Trouser"), ("a sweater", "Pullover"), ("a jumper", "Pullover"),
    ("a gown", "Dress"), ("two dresses", "Dress"), ("a jacket", "Coat"), ("flip-flops", "Sandal"),
    ("a blouse", "Shirt"), ("a shirt", "Shirt"), ("a purse", "Bag"), ("a handbag", "Bag"),
    ("sneakers, I mean trainers", "Sneaker"),  # one class named twice is still one class
])
def test_prompt_names_its_class_through_synonyms_and_plurals(prompt, cls):
    assert FASHION.class_of(prompt) == CLASSES.index(cls)


def test_prompt_naming_no_class_lists_the_words_understood():
    with pytest.raises(ValueError) as info:
        FASHION.class_of("a photo of a cat")
    message = str(info.value)
    assert message.startswith("prompt: 'a photo of a cat' names no class this model knows; name one of: ")
    for understood in ["t-shirt/top, t-shirt, top, tee", "trouser, pants, jeans (Trouser)",
                       "sneaker, trainers, running shoe (Sneaker)", "ankle boot, ankle, boot (Ankle boot)"]:
        assert understood in message


@pytest.mark.parametrize("prompt", ["", "   ", "shirts-and-coats"])
def test_prompt_without_class_words_is_refused(prompt):
    with pytest.raises(ValueError, match=r"^prompt: .* names no class"):
        FASHION.class_of(prompt)


def test_prompt_naming_two_classes_is_refused():
    with pytest.raises(ValueError) as info:
        FASHION.class_of("a shirt and a coat")
    assert str(info.value) == "prompt: 'a shirt and a coat' names 2 classes (Shirt, Coat); ask for one class per prompt"


def test_prompt_must_be_text():
    with pytest.raises(ValueError, match="^prompt: expected text, got int"):
        FASHION.class_of(7)


def test_other_datasets_are_named_by_their_own_words():
    pets = Vocabulary(["cats", "dogs", "hot dogs"])
    assert pets.class_of("a dog") == 1
    assert pets.class_of("two hot dogs") == 2  # the longest phrase wins: "hot dog" is not "dog"
    assert pets.class_of("hot") == 2  # a word only one class's name has
    numbered = Vocabulary([f"class {i}" for i in range(10)])
    assert numbered.class_of("class 3") == 3
    with pytest.raises(ValueError, match="^prompt: 'a class' names no class"):
        numbered.class_of("a class")  # a word every class shares names none of them


def test_class_names_a_prompt_could_not_tell_apart_are_refused():
    with pytest.raises(ValueError, match="^classes: 'dogs' names both 'Dog' and 'dogs'; rename one of them"):
        Vocabulary(["Dog", "dogs"])
    with pytest.raises(ValueError, match="^classes: '\\?\\?' has no word"):
        Vocabulary(["??", "cats"])


def test_vocabulary_is_rebuilt_exactly_from_the_class_names():
    again = Vocabulary(list(CLASSES))
    assert again.index == FASHION.index and again.captions == FASHION.captions
    assert again.fingerprint() == FASHION.fingerprint()
    assert Vocabulary(CLASSES[:9]).fingerprint() != FASHION.fingerprint()
    assert [FASHION.canonical(k) for k in (7, 9)] == ["sneaker", "ankle boot"]


def test_encode_pads_and_drops_unknown_words():
    tokens = FASHION.encode(["a pair of sneakers", "ankle boot", "zebra"])
    assert tokens.shape == (3, 4) and tokens.dtype == torch.long
    assert (tokens[0] != PAD).all()
    assert tokens[1, 2:].eq(PAD).all() and tokens[2].eq(PAD).all()
    assert words("Sneakers, Dresses!") == ("sneaker", "dress")


def test_training_captions_are_drawn_from_the_labelled_class_only_and_all_of_them():
    encoder = TextEncoder(FASHION, 8)
    y = torch.arange(10).repeat(300)
    draw = encoder.random_captions(y, torch.Generator().manual_seed(0))  # (3000, L)
    assert torch.equal(draw, encoder.random_captions(y, torch.Generator().manual_seed(0)))
    for k in range(10):
        start, count = int(encoder.caption_start[k]), int(encoder.caption_count[k])
        own = {tuple(row) for row in encoder.caption_tokens[start:start + count].tolist()}
        drawn = {tuple(row) for row in draw[y == k].tolist()}
        assert drawn == own, CLASSES[k]
        assert count == len(FASHION.captions[k])


def test_encoder_averages_known_words_only():
    encoder = TextEncoder(FASHION, 8)
    plain, padded = encoder(FASHION.encode(["a pair of sneakers", "a pair of shiny sneakers"]))
    assert plain.shape == (8,) and torch.allclose(plain, padded)
    assert not torch.allclose(plain, encoder(FASHION.encode(["a pair of sandals"]))[0])


def test_weights_of_another_vocabulary_refuse_to_load():
    state = TextEncoder(FASHION, 8).state_dict()
    TextEncoder(Vocabulary(list(CLASSES)), 8).load_state_dict(state)  # same classes: loads
    other = list(CLASSES)
    other[8] = "Satchel"  # same vocabulary size, other words
    with pytest.raises(ValueError, match="trained with another text vocabulary"):
        TextEncoder(Vocabulary(other), 8).load_state_dict(state)
