"""Sampling: greedy, temperature, top-k and top-p draw from the intended distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference.sampling import SamplingConfig, filtered_logits, sample

LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32))
DRAWS = 20_000


def _frequencies(cfg: SamplingConfig, seed: int = 0) -> np.ndarray:
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, len(LOGITS)))
    # logits as an argument, not a closed-over constant: XLA would constant-fold the sort (slowly)
    tokens = jax.jit(lambda lg, k: sample(lg, k, cfg))(logits, jax.random.key(seed))
    return np.bincount(np.asarray(tokens), minlength=len(LOGITS)) / DRAWS


def _expected(probs: np.ndarray) -> np.ndarray:
    return probs / probs.sum()


def _close(freq: np.ndarray, probs: np.ndarray) -> bool:
    """Every frequency within 5 standard errors of its probability."""
    stderr = np.sqrt(probs * (1 - probs) / DRAWS) + 1e-12
    return bool(np.all(np.abs(freq - probs) <= 5 * stderr + 1e-9))


def test_greedy_is_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 11)), jnp.float32)
    got = sample(logits, jax.random.key(0), SamplingConfig(temperature=0.0))
    assert np.array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_reshapes_the_distribution(temperature):
    probs = _expected(np.exp(LOGITS / temperature))
    assert _close(_frequencies(SamplingConfig(temperature=temperature)), probs)


def test_low_temperature_approaches_greedy_and_high_flattens():
    assert _frequencies(SamplingConfig(temperature=0.01))[0] == 1.0
    hot = _frequencies(SamplingConfig(temperature=2.0))
    assert hot.max() - hot.min() < 0.4 - 0.04  # flatter than the original 0.40 .. 0.04


def test_top_k_never_leaves_the_k_best():
    freq = _frequencies(SamplingConfig(temperature=1.0, top_k=3))
    assert np.all(freq[3:] == 0)
    assert _close(freq, _expected(np.concatenate([np.exp(LOGITS[:3]), np.zeros(3)])))


@pytest.mark.parametrize("top_p, kept", [(0.39, 1), (0.41, 2), (0.64, 2), (0.66, 3), (0.89, 4),
                                         (1.0, 6)])
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(top_p, kept):
    filtered = np.asarray(filtered_logits(jnp.asarray(LOGITS[None]), SamplingConfig(1.0, 0, top_p)))
    assert np.isfinite(filtered[0]).sum() == kept
    freq = _frequencies(SamplingConfig(temperature=1.0, top_p=top_p))
    probs = np.exp(LOGITS)
    probs[kept:] = 0
    assert _close(freq, _expected(probs))


def test_sampling_is_reproducible_with_a_seed():
    cfg = SamplingConfig(temperature=1.0, top_k=4, top_p=0.9)
    assert np.array_equal(_frequencies(cfg, seed=7), _frequencies(cfg, seed=7))


def test_bad_sampling_settings_are_reported():
    assert SamplingConfig(temperature=-1).problems()
    assert SamplingConfig(top_p=0).problems() and SamplingConfig(top_p=1.5).problems()
    assert SamplingConfig(top_k=-2).problems()
    assert not SamplingConfig().problems()
