"""A streamed source (`data.hf_sources.StreamedDocuments`) as grain datasets: stream ``index`` of
``count`` reads every ``count``-th example from ``index`` (whole files per stream when the files divide
evenly, `datasets.distributed.split_dataset_by_node`), epoch after epoch when repeating; its iterator
state is ``datasets``' own ``state_dict`` (shards and rows read), which resumes exactly.

Apart from `data.sources` because grain imports JAX, which reading a source must not."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import grain

from data.hf_sources import StreamedDocuments, text_of


def stream_documents(source: StreamedDocuments, index: int, count: int, repeat: bool) -> grain.IterDataset:
    """Stream ``index`` of ``count`` of ``source``'s documents (endless when ``repeat``)."""
    return _Streamed(source, index, count, repeat)


class _Streamed(grain.IterDataset):
    def __init__(self, source: StreamedDocuments, index: int, count: int, repeat: bool) -> None:
        super().__init__()
        self.source, self.index, self.count, self.repeat = source, index, count, repeat

    def __iter__(self) -> _StreamedIterator:
        return _StreamedIterator(self)


class _StreamedIterator(grain.DatasetIterator):
    """Documents of one stream, epoch after epoch when repeating. State: the epoch, the documents
    given in it, and ``datasets``' position (shards and rows read), which resumes exactly."""

    def __init__(self, spec: _Streamed) -> None:
        super().__init__()
        self.spec = spec
        self.epoch, self.given = 0, 0
        self._restart(None)

    def _restart(self, hf_state: dict | None) -> None:
        # datasets takes over a second to import: only runs with hf-stream: sources pay for it.
        from datasets.distributed import split_dataset_by_node

        self._dataset = split_dataset_by_node(self.spec.source.base(), rank=self.spec.index,
                                              world_size=self.spec.count)
        if hf_state is not None:
            self._dataset.load_state_dict(hf_state)
        self._examples: Iterator[dict] = iter(self._dataset)

    def __next__(self) -> str:
        source = self.spec.source
        while True:
            try:
                example = next(self._examples)
            except StopIteration:
                if not self.spec.repeat:
                    raise
                if not self.given:
                    raise ValueError(f"data: {source.name} has no documents for stream "
                                     f"{self.spec.index} of {self.spec.count}") from None
                self.epoch, self.given = self.epoch + 1, 0
                self._restart(None)
                continue
            if source.field not in example:
                raise ValueError(f"{source.name} has no field {source.field!r}")
            text = text_of(example[source.field], f"{source.name}: {source.field!r}")
            if source.keeps(text):
                self.given += 1
                return text

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "given": self.given,
                "hf": copy.deepcopy(self._dataset.state_dict())}

    def set_state(self, state: dict[str, Any]) -> None:
        self._examples.close()  # type: ignore[attr-defined]  (a generator)
        self.epoch, self.given = state["epoch"], state["given"]
        self._restart(state["hf"])

    def close(self) -> None:
        self._examples.close()  # type: ignore[attr-defined]  (ends datasets' file readers now)
        super().close()
