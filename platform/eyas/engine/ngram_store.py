"""A corpus n-gram store: the target's own training replies as one more drafter.

The data stage regenerates every reply with the target, so the training split is a sample of
what the target itself says (its stock phrases, list openings, sign-offs). The store keeps, for
every context of ``min_n`` .. ``max_n`` tokens seen there, the token that followed it most often.
Drafting backs off from the longest stored context that matches the end of the request (as an
n-gram language model does) and stops where none of ``min_n`` tokens matches. The engine verifies
that chain as one more branch of each draft tree, beside the head's tree and the context lookup
(``eyas.engine.lookup``), so it can only add accepted tokens; the offline evaluation scores it
with the same code. Retrieval drafting of this kind is REST's and SuffixDecoding's idea; here the
store comes for free from the data the head was trained on.

File: ``<draft>/ngram_store.npz`` (numpy, not safetensors: SGLang and vLLM load every
``*.safetensors`` of a draft directory as weights). Contexts are keyed by a 64-bit polynomial hash
of (n, tokens); a collision can only propose a wrong token, which verification rejects.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from eyas import storage

STORE_FILE = "ngram_store.npz"
FORMAT_VERSION = 1
_MULT = 0x9E3779B97F4A7C15  # odd 64-bit multiplier (the golden-ratio constant)
_MASK = (1 << 64) - 1


def suffix_keys(seq: np.ndarray, min_n: int, max_n: int) -> dict[int, np.ndarray]:
    """For each n in min_n..max_n, the keys of the n-token contexts ``seq[j-n+1 .. j]`` for every
    end j >= n-1: (len(seq) - n + 1,) uint64, key[i] for the context ending at j = i + n - 1.
    The hash reads a context from its last token backwards, so the query side (``NgramStore``)
    extends one running hash token by token instead of rehashing each length."""
    seq = seq.astype(np.uint64) + np.uint64(1)
    mult, out = np.uint64(_MULT), {}
    running = seq.copy()  # n = 1: the context's own last token
    for n in range(1, max_n + 1):
        if n > 1:  # add the token before: running[j] covers seq[j-n+1 .. j]
            running = running[1:] * mult + seq[: len(seq) - n + 1]
        if n >= min_n:
            out[n] = running * mult + np.uint64(n)
        if len(running) <= 1:
            break
    return out


@dataclass
class NgramStore:
    """keys (M,) uint64 sorted; next_tokens (M,) int32: the most frequent follower of each."""

    keys: np.ndarray
    next_tokens: np.ndarray
    min_n: int
    max_n: int

    @classmethod
    def build(cls, sequences: Iterable[Sequence[int]], min_n: int = 2, max_n: int = 6) -> NgramStore:
        """Count (context, next token) over every sequence (n-grams never cross sequences) and
        keep each context's most frequent next token (ties: the smallest id)."""
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram store: need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        keys, nexts = [], []
        for seq in sequences:
            arr = np.asarray(seq, dtype=np.int64)
            for n, k in suffix_keys(arr[:-1], min_n, max_n).items():
                keys.append(k)
                nexts.append(arr[n:])  # the token after the context ending at j is arr[j + 1]
        if not keys:
            return cls(np.zeros(0, np.uint64), np.zeros(0, np.int32), min_n, max_n)
        return cls(*_most_frequent(np.concatenate(keys), np.concatenate(nexts)), min_n, max_n)

    def __len__(self) -> int:
        return len(self.keys)

    def next_token(self, context: Sequence[int]) -> int | None:
        """The stored follower of the longest matching suffix of ``context`` (at least min_n
        tokens), or None."""
        found, running = None, 0
        for n in range(1, min(self.max_n, len(context)) + 1):
            running = (running * _MULT + int(context[-n]) + 1) & _MASK
            if n < self.min_n:
                continue
            key = np.uint64((running * _MULT + n) & _MASK)
            i = int(np.searchsorted(self.keys, key))
            if i == len(self.keys) or self.keys[i] != key:
                break  # no longer context can match either: each extends this one
            found = int(self.next_tokens[i])
        return found

    def propose(self, context: Sequence[int], max_tokens: int) -> list[int]:
        """A chain of up to ``max_tokens`` tokens, each the store's next token after the context
        extended by the chain so far; shorter where no context matches."""
        window, chain = list(context[-self.max_n:]), []
        while len(chain) < max_tokens:
            tok = self.next_token(window)
            if tok is None:
                break
            chain.append(tok)
            window = window[1:] + [tok] if len(window) >= self.max_n else window + [tok]
        return chain

    def save(self, uri: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, keys=self.keys, next_tokens=self.next_tokens,
                 meta=np.array([FORMAT_VERSION, self.min_n, self.max_n], dtype=np.int64))
        storage.write_bytes(uri, buf.getvalue())

    @classmethod
    def load(cls, uri: str) -> NgramStore:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as f:
            version, min_n, max_n = (int(x) for x in f["meta"])
            if version != FORMAT_VERSION:
                raise ValueError(f"{uri}: n-gram store format {version}, this eyas reads "
                                 f"{FORMAT_VERSION}; rebuild it (train.ngram_store_max_n)")
            return cls(f["keys"], f["next_tokens"], min_n, max_n)


def split_sequences(split_uri: str) -> Iterator[list[int]]:
    """The ``input_ids`` of every row of one feature split (``<features>/train``): whole
    conversations, prompt tokens included (replies often continue phrases of their prompts)."""
    import pyarrow.parquet as pq

    for uri in storage.list_files(split_uri, ".parquet"):
        fs, path = storage.resolve(uri)
        yield from pq.read_table(path, columns=["input_ids"], filesystem=fs).column(0).to_pylist()


def write_store(features_uri: str, draft_dir: str, max_n: int, min_n: int = 2) -> tuple[str, int]:
    """Build the store from the features' train split and write ``<draft_dir>/ngram_store.npz``;
    returns (its URI, the number of contexts)."""
    store = NgramStore.build(split_sequences(storage.join(features_uri, "train")), min_n, max_n)
    uri = storage.join(draft_dir, STORE_FILE)
    store.save(uri)
    return uri, len(store)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write <draft_dir>/ngram_store.npz from the train "
                                     "split of a features artifact (for a head trained without one)")
    parser.add_argument("features", help="the features artifact URI (its train/ split is read)")
    parser.add_argument("draft_dir", help="the exported draft directory")
    parser.add_argument("--max-n", type=int, default=6, help="longest context (default %(default)s)")
    args = parser.parse_args()
    uri, n = write_store(args.features, args.draft_dir, args.max_n)
    print(f"{uri}: {n:,} contexts")


def _most_frequent(keys: np.ndarray, nexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys (U,) and, per key, its most frequent next token (U,) int32."""
    order = np.lexsort((nexts, keys))
    keys, nexts = keys[order], nexts[order]
    starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]) | (nexts[1:] != nexts[:-1])])
    counts = np.diff(np.r_[starts, len(keys)])
    pk, px = keys[starts], nexts[starts]
    order = np.lexsort((px, -counts, pk))  # per key: highest count first, then smallest id
    pk, px = pk[order], px[order]
    first = np.r_[True, pk[1:] != pk[:-1]]
    return pk[first], px[first].astype(np.int32)


if __name__ == "__main__":
    main()
