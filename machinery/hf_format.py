"""Hugging Face's GPT-2 format, both ways: fetching OpenAI's weights from the hub, reading a GPT-2
directory (config.json with model.safetensors or pytorch_model.bin), and writing one for
export_hf.py.

Not in train_gpt2.py because the tutorial needs only what it yields, a config and tensors under our
module names; the step that matters to the lecture (Conv1D weights transposed) stays there. This
file holds the rest: file formats, the hub, config names and the checks that a directory is OpenAI's
network, and the padding of GPT-2's 50257-row embedding to the run's --vocab_size.
"""

import json
import os
from dataclasses import asdict

import torch

from machinery.checkpoints import latest_checkpoint
from machinery.cli import UserError
from machinery.tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE

# OpenAI's checkpoint uses Conv1D layers, whose weights are stored (in, out), transposed from
# nn.Linear.
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
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
    """(config, tensors, source) of OpenAI's GPT-2: a hub name of `hub_names`, downloaded once and
    cached, or a local Hugging Face directory. config: GPTConfig's fields as a dict; tensors: keyed
    by our module names, in Hugging Face's layout (Conv1D weights still transposed); source: the
    config's path, for errors."""
    if os.path.isdir(name_or_path):
        directory = name_or_path
    elif name_or_path in hub_names:
        directory = download_gpt2(name_or_path)
    else:
        raise UserError(
            f"'{name_or_path}' is neither a directory nor one of {', '.join(hub_names)}: "
            "pass an OpenAI size name or a Hugging Face GPT-2 directory"
        )
    hf_config, tensors = read_hf_checkpoint(directory)
    try:
        config = {field: hf_config[hf_name] for field, hf_name in HF_CONFIG_NAMES.items()}
    except KeyError as e:
        raise UserError(
            f"{directory}/config.json lacks {e}: it is not a complete GPT-2 config"
        ) from None
    return config, tensors, f"{directory}/config.json"


def download_gpt2(name):
    """Fetch OpenAI's weights from the Hugging Face hub (cached after the first time); return the
    directory."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id=f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors"]
        )
    # no network, hub down, no huggingface_hub: all end the same way for the user
    except Exception as e:
        raise UserError(
            f"could not download '{name}' from the Hugging Face hub "
            f"({type(e).__name__}); on a machine with network run `hf download "
            f"openai-community/{name} config.json model.safetensors --local-dir "
            f"{name}`, copy that directory here and pass its path instead of '{name}'"
        ) from None


def read_hf_checkpoint(directory):
    """The config dict and the tensors of a Hugging Face GPT-2 directory, keyed as our GPT names
    them: with the 'transformer.' prefix (which some files omit), without the attention-mask buffers
    and the lm_head (tied to wte)."""
    config_path = os.path.join(directory, "config.json")
    safetensors_path = os.path.join(directory, "model.safetensors")
    bin_path = os.path.join(directory, "pytorch_model.bin")
    # a --log_dir, not its file
    if (newest := latest_checkpoint(directory)) and not os.path.exists(config_path):
        raise UserError(
            f"{directory} is the folder of a training run, not a Hugging "
            f"Face model: pass one of its checkpoints, such as {newest}"
        )
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
        if hf_config.get("model_type") != "gpt2":
            raise ValueError(f"model_type is {hf_config.get('model_type')!r}")
        if os.path.exists(safetensors_path):
            from safetensors.torch import load_file

            hf_state = load_file(safetensors_path)
        else:
            hf_state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as e:  # the message's first line only: torch's for a pickle goes on for lines
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"{directory} is not a Hugging Face GPT-2 checkpoint ({type(e).__name__}: "
            f"{reason}): it needs a config.json with model_type gpt2 and a model.safetensors, "
            f"or a pytorch_model.bin of plain tensors (one that holds other Python objects "
            f"is refused, since loading it could run code: convert it to safetensors)"
        ) from None
    # GPT2Config can also describe variants of the network (another activation, an untied output
    # head, other attention scaling); loading one into our GPT would silently give a different
    # model.
    variant = {key: hf_config[key] for key, allowed in OPENAI_GPT2_SETTINGS.items()
               if hf_config.get(key, allowed[0]) not in allowed}  # fmt: skip
    if variant:
        raise UserError(
            f"{directory} is a GPT-2 variant that this model does not implement ({variant}); "
            "only OpenAI's architecture loads"
        )
    state = {}
    for key, tensor in hf_state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers, and the head that is tied to wte
        state["transformer." + key] = tensor
    return hf_config, state


def to_hf_checkpoint(model):
    """The tensors and config.json of `model` as a Hugging Face GPT2LMHeadModel (export_hf.py writes
    them): the reverse of read_gpt2, with the vocabulary cut back to the tokenizer's 50257
    tokens."""
    n_tokens = model.n_real_tokens  # the padded rows of the embedding are never real tokens
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            # the same tensor as wte; transformers ties them again on load (tie_word_embeddings)
            continue
        tensor = tensor.detach().cpu()
        if name == "transformer.wte.weight":
            tensor = tensor[:n_tokens]
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        tensors[name] = tensor.contiguous()
    config = dict(asdict(model.config), vocab_size=n_tokens)
    hf_config = {hf_name: config[field] for field, hf_name in HF_CONFIG_NAMES.items()}
    hf_config.update({name: allowed[0] for name, allowed in OPENAI_GPT2_SETTINGS.items()})
    # n_ctx: the older name of n_positions, still read by some converters. This project trains
    # without dropout; transformers would otherwise default to OpenAI's 0.1.
    hf_config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2",
                     n_ctx=config["block_size"], embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
                     bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN)  # fmt: skip
    return tensors, hf_config


def padded_vocabulary(state, vocab_size):
    """`state` with its token embedding cut to GPT-2's 50257 tokens and padded with zero rows to
    vocab_size, as a run from scratch pads it. A padded row is never an input or a target, so it
    stays zero."""
    key = "transformer.wte.weight"
    if key not in state:
        return state  # load_weights says what is missing
    real = state[key][:GPT2_VOCAB_SIZE]
    padded = real.new_zeros(vocab_size, real.size(1))
    padded[: len(real)] = real
    return {**state, key: padded}
