"""What a run reads for one split: the documents of ``data.source``, or the weighted `Mixture` of
``data.mix``, each random-access source through its token cache when ``data.token_cache`` is set;
``chat:`` sources as conversations rendered with the run's tokenizer (`data.chat_data`)."""

from __future__ import annotations

from data.chat_data import CHAT, CHAT_CACHE_ERROR, chat_source
from data.hf_sources import StreamedDocuments
from data.mixture import Mixture, parse_mix
from data.pipeline import Documents
from data.sources import Split, open_source
from data.token_cache import cached_tokens
from data.tokenizer import Tokenizer


def open_documents(source: str, mix: str, split: Split, tokenizer: Tokenizer, *, token_cache: bool = False,
                   eval_fraction: float = 0.05, data_dir: str | None = None,
                   cache_dir: str | None = None, seq_len: int = 0) -> Documents:
    """The ``split`` documents of ``source``, or of every source of ``mix`` (``SPEC:WEIGHT,...``) when it
    is set. With ``token_cache``, each random-access source is read as token ids from its cache
    (tokenized once, on the first open); a streamed source is tokenized as it is read. A ``chat:``
    source is rendered and tokenized here, in memory (``seq_len`` > 0: it must keep an assistant
    token within a training row); the token cache does not apply to it.
    ValueError (one line) as `open_source`, `chat_source` and `parse_mix`."""
    specs = parse_mix(mix) if mix else [(source, 1.0)]
    if token_cache and any(spec.startswith(CHAT) for spec, _ in specs):
        raise ValueError(CHAT_CACHE_ERROR)
    opened = []
    for spec, _ in specs:
        if spec.startswith(CHAT):
            opened.append(chat_source(spec[len(CHAT):], split, tokenizer, eval_fraction, seq_len))
            continue
        docs = open_source(spec, split, eval_fraction=eval_fraction, data_dir=data_dir,
                           cache_dir=cache_dir)
        if token_cache and not isinstance(docs, StreamedDocuments):
            docs = cached_tokens(docs, tokenizer, spec=spec, split=split, eval_fraction=eval_fraction,
                                 data_dir=data_dir, cache_dir=cache_dir)
        opened.append(docs)
    if not mix:
        return opened[0]
    return Mixture(tuple(opened), tuple(w for _, w in specs))
