"""The federated dataset: what a client's data looks like to the training core.

Clients are numbered ``0 .. num_clients-1`` (``client_names`` keeps the human ids, e.g. a
Shakespeare role).  A client's examples are a list of integer indices into one shared store;
``fetch(indices)`` turns indices into a batch ``(x, y)``.  Keeping data as one store plus
per-client index tensors means no per-client objects, no DataLoader worker processes, and
batches made by a single gather, which is what makes simulation fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset, default_collate

Batch = tuple[torch.Tensor, torch.Tensor]


class FederatedDataset:
    """Per-client train/test example indices over a shared ``fetch`` function."""

    def __init__(
        self,
        name: str,
        fetch: Callable[[torch.Tensor], Batch],
        train_indices: Sequence[torch.Tensor],
        test_indices: Sequence[torch.Tensor] | None = None,
        client_names: Sequence[str] | None = None,
        fetch_test: Callable[[torch.Tensor], Batch] | None = None,
    ):
        if len(train_indices) == 0:
            raise ValueError(f"dataset {name!r} has no clients")
        if test_indices is not None and len(test_indices) != len(train_indices):
            raise ValueError(f"dataset {name!r}: {len(train_indices)} train splits but {len(test_indices)} test splits")
        self.name = name
        self.fetch = fetch
        self.fetch_test = fetch_test or fetch
        self.train_indices = [torch.as_tensor(i, dtype=torch.long) for i in train_indices]
        self.test_indices = (
            [torch.as_tensor(i, dtype=torch.long) for i in test_indices]
            if test_indices is not None
            else [torch.empty(0, dtype=torch.long)] * len(train_indices)
        )
        self.client_names = (
            list(client_names) if client_names is not None else [str(i) for i in range(len(train_indices))]
        )
        self._train_sizes = torch.tensor([len(i) for i in self.train_indices])
        self._train_sizes_list = self._train_sizes.tolist()  # num_train without tensor indexing (hot path)

    @property
    def num_clients(self) -> int:
        return len(self.train_indices)

    def num_train(self, client: int) -> int:
        return self._train_sizes_list[client]

    def num_test(self, client: int) -> int:
        return len(self.test_indices[client])

    @property
    def train_sizes(self) -> torch.Tensor:
        return self._train_sizes

    def train_batches(
        self,
        client: int,
        batch_size: int,
        generator: torch.Generator,
        epochs: int = 1,
        steps: int | None = None,
    ) -> Iterator[Batch]:
        """Shuffled mini-batches of one client's training data.

        With ``steps`` set, yields exactly that many batches (reshuffling each pass);
        otherwise ``epochs`` full passes.  The last batch of a pass may be smaller.
        """
        idx = self.train_indices[client]
        n = len(idx)
        if n == 0:
            return
        done = 0
        passes = 0
        while True:
            if steps is None and passes >= epochs:
                return
            order = idx[torch.randperm(n, generator=generator)]
            for start in range(0, n, batch_size):
                if steps is not None and done >= steps:
                    return
                yield self.fetch(order[start : start + batch_size])
                done += 1
            passes += 1

    def test_batches(self, client: int, batch_size: int) -> Iterator[Batch]:
        idx = self.test_indices[client]
        for start in range(0, len(idx), batch_size):
            yield self.fetch_test(idx[start : start + batch_size])


def from_torch_datasets(
    train: Mapping[str, Dataset],
    test: Mapping[str, Dataset] | None = None,
    name: str = "custom",
) -> FederatedDataset:
    """Wrap ``client id -> torch Dataset`` mappings (the user's own data) as a FederatedDataset.

    Items are collated with PyTorch's default collate; each item must be an ``(x, y)`` pair.
    """
    names = list(train)
    if test is not None and set(test) - set(train):
        unknown = sorted(set(test) - set(train))[:5]
        raise ValueError(f"test data names clients with no training data: {unknown}")

    def build(mapping: Mapping[str, Dataset] | None) -> tuple[list[torch.Tensor], list[Dataset], list[int]]:
        indices, datasets, offsets, offset = [], [], [], 0
        for cid in names:
            ds = mapping.get(cid) if mapping is not None else None
            n = len(ds) if ds is not None else 0
            indices.append(torch.arange(offset, offset + n))
            datasets.append(ds)
            offsets.append(offset)
            offset += n
        return indices, datasets, offsets

    train_idx, train_ds, train_off = build(train)
    test_idx, test_ds, test_off = build(test) if test is not None else (None, [], [])

    def fetcher(datasets: list[Dataset], offsets: list[int]) -> Callable[[torch.Tensor], Batch]:
        offsets_t = torch.tensor(offsets)

        def fetch(indices: torch.Tensor) -> Batch:
            owners = torch.searchsorted(offsets_t, indices, right=True) - 1
            items = [datasets[o][int(i) - offsets[o]] for o, i in zip(owners.tolist(), indices.tolist())]
            x, y = default_collate(items)
            return x, y

        return fetch

    return FederatedDataset(
        name,
        fetcher(train_ds, train_off),
        train_idx,
        test_idx,
        names,
        fetch_test=fetcher(test_ds, test_off) if test is not None else None,
    )


def as_federated(data) -> FederatedDataset:
    """Accept a FederatedDataset, a ``{client: Dataset}`` mapping, or a ``(train, test)`` pair of them."""
    from collections.abc import Mapping

    if isinstance(data, FederatedDataset):
        return data
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, Mapping) for d in data):
        return from_torch_datasets(data[0], data[1])
    if isinstance(data, Mapping):
        return from_torch_datasets(data)
    raise TypeError(
        f"data: expected a FederatedDataset, a {{client: Dataset}} mapping or a (train, test) pair, got {type(data).__name__}"
    )
