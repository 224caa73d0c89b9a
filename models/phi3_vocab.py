"""Phi-3's real tokenizer without the hub: its vocabulary as llama.cpp keeps it.

llama.cpp's tokenizer tests carry ``models/ggml-vocab-phi-3.gguf``: Phi-3-mini's
32,064 vocabulary entries (SentencePiece pieces with their scores and types,
the 11 added chat tokens, 53 padding entries), its special token ids and its
chat template, converted from ``microsoft/Phi-3-mini-4k-instruct``, and beside
it the reference token ids of 47 test strings. The ``llama-cpp-python`` source
package on PyPI vendors that folder, so the file comes from the package
registry where the hub is out of reach. transformers turns it into a fast
tokenizer (``gguf_file=``; needs the ``gguf`` package) that gives every one
of those reference encodings.

:func:`fetch` downloads the pinned source archive once from the package
index (PyPI's simple API, about 75 MB; ``PIP_INDEX_URL`` names another) and
keeps the three files, checked against their SHA-256, in
``.cache/phi3-vocab/`` (or ``MMPHI_PHI3_VOCAB``); :func:`tokenizer_folder`
writes the tokenizer as a Hugging Face folder in the weights cache. Use it
with any preset in place of the hub's tokenizer::

    python -m models.phi3_vocab                      # prints the folder
    mmphi chat --set tokenizer.build=null --set tokenizer.name_or_path=FOLDER ...

The tests run the chat template, label masking, streaming text, structured
output and tool calls against it (``tests/test_phi3_vocab.py``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tarfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
ARCHIVE = f"llama_cpp_python-{VERSION}.tar.gz"
ARCHIVE_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER = "vendor/llama.cpp/models/ggml-vocab-phi-3.gguf"
# the vocabulary, the reference strings, and their token ids (one line per string)
FILES = {
    "ggml-vocab-phi-3.gguf": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326",
    "ggml-vocab-phi-3.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-phi-3.gguf.out": "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
}
GGUF = "ggml-vocab-phi-3.gguf"
# the ids of Phi-3's special tokens (its tokenizer_config.json)
PHI3_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001,
            "<|system|>": 32006, "<|end|>": 32007, "<|user|>": 32010}


class VocabError(RuntimeError):
    """The vocabulary could not be fetched or does not match its checksum."""


def default_dir() -> Path:
    return Path(os.environ.get("MMPHI_PHI3_VOCAB") or Path(__file__).resolve().parent.parent / ".cache" / "phi3-vocab")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def present(folder: Path | None = None) -> Path | None:
    """The vocabulary file if it and its reference files are there and intact."""
    folder = Path(folder or default_dir())
    if all((folder / name).is_file() and _sha256(folder / name) == digest for name, digest in FILES.items()):
        return folder / GGUF
    return None


def _archive_url(index: str) -> str:
    """The source archive's address, from the package index's simple page (PEP 503)."""
    import re
    import urllib.parse
    import urllib.request

    page = f"{index.rstrip('/')}/{PACKAGE}/"
    local = page + "index.html" if page.startswith("file:") else page  # a folder index, as pip reads one
    with urllib.request.urlopen(local, timeout=60) as r:
        html = r.read().decode("utf-8", errors="replace")
    for href in re.findall(r'href="([^"]+)"', html):
        if urllib.parse.urlsplit(href).path.endswith("/" + ARCHIVE):
            return urllib.parse.urljoin(page, href.split("#")[0])
    raise VocabError(f"{page} lists no {ARCHIVE}")


def fetch(folder: Path | None = None, quiet: bool = False) -> Path:
    """The vocabulary file, downloaded (the pinned source archive, from the
    package index: ``PIP_INDEX_URL`` or PyPI) the first time."""
    import io
    import urllib.error
    import urllib.request

    folder = Path(folder or default_dir())
    found = present(folder)
    if found:
        return found
    index = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    if not quiet:
        print(f"fetching Phi-3's vocabulary from {PACKAGE} {VERSION}'s source archive ({index}, about 75 MB)",
              file=sys.stderr)
    try:
        url = _archive_url(index)
        with urllib.request.urlopen(url, timeout=120) as r:
            data = r.read()
    except (OSError, urllib.error.URLError) as e:
        raise VocabError(f"could not download {ARCHIVE} from {index}: {e}") from None
    if hashlib.sha256(data).hexdigest() != ARCHIVE_SHA256:
        raise VocabError(f"{url} does not match {ARCHIVE}'s SHA-256")
    folder.mkdir(parents=True, exist_ok=True)
    prefix = MEMBER[:-len(GGUF)]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for name in FILES:
            member = next((m for m in tar.getmembers() if m.name.endswith(prefix + name)), None)
            if member is None:
                raise VocabError(f"{ARCHIVE} holds no {prefix}{name}")
            content = tar.extractfile(member).read()
            if hashlib.sha256(content).hexdigest() != FILES[name]:
                raise VocabError(f"{name} in {ARCHIVE} does not match its SHA-256")
            part = folder / f"{name}.part"
            part.write_bytes(content)
            part.replace(folder / name)
    return folder / GGUF


def reference_cases(gguf: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test strings and the token ids Phi-3's tokenizer gives them."""
    texts = gguf.with_name(GGUF + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = gguf.with_name(GGUF + ".out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]


def tokenizer_folder(gguf: Path | None = None) -> Path:
    """A Hugging Face tokenizer folder of Phi-3's tokenizer (in the weights
    cache; built once from the vocabulary file), with Phi-3-mini's chat template."""
    from .tokenizer import PHI3_CHAT_TEMPLATE
    from .weights import materialize

    gguf = Path(gguf or fetch())

    def build(folder: Path) -> None:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf.chat_template = PHI3_CHAT_TEMPLATE
        hf.save_pretrained(str(folder))

    return materialize("phi3-vocab-tokenizer", {"gguf_sha256": FILES[GGUF], "template": "phi3"}, build)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.phi3_vocab", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=None, help="where to keep the vocabulary (default: .cache/phi3-vocab)")
    p.add_argument("--fetch-only", action="store_true", help="download the vocabulary file; build no tokenizer")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        gguf = fetch(a.dir, quiet=a.quiet)
    except VocabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(gguf if a.fetch_only else tokenizer_folder(gguf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
