"""Hugging Face's GPT-2 format, both ways: OpenAI's weights from the hub or a GPT-2 directory, read
as a config and tensors under our module names (train_gpt2.py keeps the step that matters to the
lecture, the Conv1D transpose), and the tensors and config files export_hf.py writes."""

import json
import os
from dataclasses import asdict

import torch

from machinery.checkpoints import latest_checkpoint
from machinery.cli import UserError
from machinery.tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE

# OpenAI's checkpoint uses Conv1D layers (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), whose
# weights are stored (in, out), transposed from nn.Linear.
CONV1D_WEIGHTS = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
# GPTConfig's fields under the names Hugging Face's GPT2Config gives them.
HF_CONFIG_NAMES = {"block_size": "n_positions", "vocab_size": "vocab_size", "n_layer": "n_layer",
                   "n_head": "n_head", "n_embd": "n_embd"}  # fmt: skip
# The GPT2Config settings under which Hugging Face's GPT-2 is OpenAI's network (first value: the
# default). gelu_new and gelu_pytorch_tanh are both the tanh approximation of GELU.
OPENAI_GPT2_SETTINGS = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "tie_word_embeddings": (True,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
}


def read_gpt2(name_or_path, hub_names):
    """(config, tensors, source) of a hub name of `hub_names` (downloaded once, then cached) or a
    Hugging Face directory: GPTConfig's fields as a dict; the tensors under our module names, Conv1D
    weights still transposed, without the attention-mask buffers and lm_head (tied to wte); the
    config's path, for errors."""
    directory = name_or_path
    if not os.path.isdir(name_or_path) and name_or_path not in hub_names:
        raise UserError(
            f"'{name_or_path}' is neither a directory nor one of {', '.join(hub_names)}: "
            "pass an OpenAI size name or a Hugging Face GPT-2 directory"
        )
    if not os.path.isdir(name_or_path):
        try:
            from huggingface_hub import snapshot_download

            directory = snapshot_download(
                repo_id=f"openai-community/{name_or_path}",
                allow_patterns=["config.json", "model.safetensors"],
            )
        # no network, hub down, no huggingface_hub: all end the same way for the user
        except Exception as e:
            raise UserError(
                f"could not download '{name_or_path}' from the Hugging Face hub "
                f"({type(e).__name__}); on a machine with network run `hf download "
                f"openai-community/{name_or_path} config.json model.safetensors --local-dir "
                f"{name_or_path}`, copy that directory here and pass its path instead of "
                f"'{name_or_path}'"
            ) from None
    source = f"{directory}/config.json"
    if (newest := latest_checkpoint(directory)) and not os.path.exists(source):  # a --log_dir
        raise UserError(
            f"{directory} is the folder of a training run, not a Hugging "
            f"Face model: pass one of its checkpoints, such as {newest}"
        )
    try:
        with open(os.path.join(directory, "config.json")) as f:
            hf_config = json.load(f)
        if hf_config.get("model_type") != "gpt2":
            raise ValueError(f"model_type is {hf_config.get('model_type')!r}")
        if os.path.exists(weights := os.path.join(directory, "model.safetensors")):
            from safetensors.torch import load_file

            hf_state = load_file(weights)
        else:
            weights = os.path.join(directory, "pytorch_model.bin")
            hf_state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # the message's first line only: torch's for a pickle goes on for lines
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"{directory} is not a Hugging Face GPT-2 checkpoint ({type(e).__name__}: "
            f"{reason}): it needs a config.json with model_type gpt2 and a model.safetensors, "
            f"or a pytorch_model.bin of plain tensors (one that holds other Python objects "
            f"is refused, since loading it could run code: convert it to safetensors)"
        ) from None
    # GPT2Config can also describe variants (another activation, an untied output head, other
    # attention scaling); loading one into our GPT would silently give a different model.
    variant = {key: hf_config[key] for key, allowed in OPENAI_GPT2_SETTINGS.items()
               if hf_config.get(key, allowed[0]) not in allowed}  # fmt: skip
    if variant:
        raise UserError(
            f"{directory} is a GPT-2 variant that this model does not implement ({variant}); "
            "only OpenAI's architecture loads"
        )
    if missing := [name for name in HF_CONFIG_NAMES.values() if name not in hf_config]:
        raise UserError(f"{source} lacks {', '.join(missing)}: it is not a complete GPT-2 config")
    config = {field: hf_config[hf_name] for field, hf_name in HF_CONFIG_NAMES.items()}
    tensors = {}
    for key, tensor in hf_state.items():
        key = key.removeprefix("transformer.")  # which some files omit
        if not key.endswith((".attn.bias", ".attn.masked_bias")) and key != "lm_head.weight":
            tensors["transformer." + key] = tensor
    return config, tensors, source


def to_hf_checkpoint(model):
    """read_gpt2 reversed: the tensors of a GPT2LMHeadModel, the vocabulary cut back to the
    tokenizer's 50257 tokens (padded rows are never real ones), and its two JSON files."""
    n_tokens, tensors = model.n_real_tokens, {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # wte's tensor; transformers ties them again on load (tie_word_embeddings)
        tensor = tensor.detach().cpu()
        if name == "transformer.wte.weight":
            tensor = tensor[:n_tokens]
        tensors[name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).contiguous()
    config = dict(asdict(model.config), vocab_size=n_tokens)
    hf_config = {hf_name: config[field] for field, hf_name in HF_CONFIG_NAMES.items()}
    hf_config.update({name: allowed[0] for name, allowed in OPENAI_GPT2_SETTINGS.items()})
    # n_ctx: the older name of n_positions, still read by some converters. This project trains
    # without dropout; transformers would otherwise default to OpenAI's 0.1.
    hf_config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2",
                     n_ctx=config["block_size"], embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
                     bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN)  # fmt: skip
    eot = "<|endoftext|>"  # GPT-2's one special token is its bos, eos and unk
    tokenizer_config = dict(tokenizer_class="GPT2Tokenizer", model_max_length=config["block_size"],
                            bos_token=eot, eos_token=eot, unk_token=eot)  # fmt: skip
    return tensors, {"config.json": hf_config, "tokenizer_config.json": tokenizer_config}


def padded_vocabulary(state, vocab_size):
    """`state` with its token embedding cut to GPT-2's 50257 tokens and padded with zero rows to
    vocab_size, as a run from scratch pads it (a padded row, never an input or target, stays 0)."""
    key = "transformer.wte.weight"
    if key not in state:
        return state  # load_weights says what is missing
    real = state[key][:GPT2_VOCAB_SIZE]
    padded = real.new_zeros(vocab_size, real.size(1))
    padded[: len(real)] = real
    return {**state, key: padded}
