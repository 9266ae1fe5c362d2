"""Which out-of-date models a retrain run dispatches to workers together: a model built on another (an ldm
on its autoencoder) only once that model is trained, and not at all when it failed."""
from flows.dispatch import next_wave

BASES = {"vae": [], "kl_ae": [], "ldm": ["kl_ae"]}


def test_a_model_waits_for_the_model_it_is_built_on():
    assert next_wave(["vae", "kl_ae", "ldm"], BASES, failed=set()) == (["vae", "kl_ae"], {})
    assert next_wave(["ldm"], BASES, failed=set()) == (["ldm"], {})  # its autoencoder is trained


def test_a_model_built_on_a_failed_one_is_not_trained():
    wave, blocked = next_wave(["ldm"], BASES, failed={"kl_ae"})
    assert wave == [] and blocked == {"ldm": "not trained: kl_ae, which it is built on, failed"}


def test_an_unchanged_base_lets_its_model_go_in_the_first_wave():
    assert next_wave(["vae", "ldm"], BASES, failed=set()) == (["vae", "ldm"], {})
