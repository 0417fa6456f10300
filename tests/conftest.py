import importlib.util

import pytest
import torch

# Tests run many tiny models; one intra-op thread is fastest for them and keeps the suite
# insensitive to other load on a 2-core machine (OpenMP threads spin badly when oversubscribed).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray for one test module (never a cluster another process runs here)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'flotilla[ray]')")
    import ray

    from flotilla.sim.ray_start import start_local

    start_local(ray, num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
