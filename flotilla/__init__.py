"""Flotilla: federated learning across fleets of devices."""

from flotilla.api import TrainResult, train
from flotilla.core.client import ClientSpec
from flotilla.core.dataset import FederatedDataset, from_torch_datasets
from flotilla.core.server_opt import ServerOptimizerSpec

__all__ = ["train", "TrainResult", "ClientSpec", "ServerOptimizerSpec", "FederatedDataset", "from_torch_datasets"]
__version__ = "0.1.0"
