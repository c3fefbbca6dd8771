"""Test setup: 8 emulated CPU devices, configured before JAX initialises its backend."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def eight_devices() -> list:
    """The 8 CPU devices; a test that needs them fails (never skips) with fewer."""
    devices = jax.devices()
    assert len(devices) == 8, f"tests need 8 emulated CPU devices, found {len(devices)}"
    return devices
