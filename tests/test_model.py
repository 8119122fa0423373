"""The model is OpenAI's GPT-2: same numbers as transformers' GPT2LMHeadModel, loads and exports its
checkpoints, tokenizes like tiktoken's gpt2, and samples with a KV cache that changes nothing."""

import json
import os
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import ENV, TINY_SHAPE, run_script, tiny_checkpoint
from export_hf import export_hf
from export_hf import main as export_main
from machinery.cli import UserError
from machinery.tokenizer import gpt2_tokenizer
from sample import main as sample_main
from train_gpt2 import GPT, GPTConfig, load_model

SMALL = dict(n_layer=2, n_head=4, n_embd=64)
PROMPT = "Hello, I'm a language model,"
PROMPT_IDS = [15496, 11, 314, 1101, 257, 3303, 2746, 11]


def randomize_(model, seed=0):
    """Random values in every parameter, LayerNorms and biases included: the default init leaves
    biases at 0 and LayerNorm gains at 1, which would hide a mis-mapped or mis-transposed tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_((1.0 if ".ln_" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def random_hf_model(seed=0, **shape):
    """A random GPT2LMHeadModel with the plain (eager) attention as reference."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**shape, attn_implementation="eager"))
    return randomize_(model, seed).eval()


def random_gpt(seed=0, **config):
    torch.manual_seed(seed)
    return randomize_(GPT(GPTConfig(**config)), seed).eval()


def assert_same_as_hf(model, hf_model, idx):
    """Same logits within 1e-4 and the same loss. transformers shifts `labels` inside the model; our
    targets are already the next tokens, so ours sees idx[:, :-1] with targets idx[:, 1:]."""
    with torch.no_grad():
        hf_out = hf_model(idx, labels=idx)
        logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
        full_logits, _ = model(idx)
    assert full_logits.shape == hf_out.logits.shape
    torch.testing.assert_close(full_logits, hf_out.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, hf_out.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, hf_out.logits[:, :-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [dict(SMALL, n_positions=128), {}], ids=["small", "124M"])
def test_from_pretrained_matches_transformers(tmp_path, shape):
    hf_model = random_hf_model(**shape)
    hf_model.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    sizes = {k: v for k, v in shape.items() if k != "n_positions"}
    assert model.config == GPTConfig(block_size=shape.get("n_positions", 1024), **sizes)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    assert_same_as_hf(model, hf_model, idx)


def test_from_pretrained_reads_openai_pytorch_model_bin(tmp_path):
    """OpenAI's original upload: pytorch_model.bin with keys lacking 'transformer.' and with the
    causal-mask buffers stored as tensors."""
    hf_model = random_hf_model(**SMALL, n_positions=128)
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()
             if k != "lm_head.weight"}  # fmt: skip
    for i in range(SMALL["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf_model.config.to_json_file(tmp_path / "config.json")
    model = load_model(str(tmp_path))
    assert_same_as_hf(model, hf_model, torch.randint(0, 50257, (2, 12)))


@pytest.mark.parametrize("vocab_size", [50257, 50304])
def test_export_round_trip(tmp_path, vocab_size):
    model = random_gpt(vocab_size=vocab_size, block_size=64, **SMALL)
    out_dir = tmp_path / "hf"
    export_hf(model, str(out_dir))
    tensors = load_file(out_dir / "model.safetensors")
    assert tensors["transformer.wte.weight"].shape == (50257, 64)  # padded rows trimmed
    assert json.loads((out_dir / "config.json").read_text())["vocab_size"] == 50257
    hf_model = GPT2LMHeadModel.from_pretrained(out_dir, attn_implementation="eager").eval()
    assert hf_model.lm_head.weight.data_ptr() == hf_model.transformer.wte.weight.data_ptr()  # tied
    idx = torch.randint(0, 50257, (2, 20))
    assert_same_as_hf(model, hf_model, idx)
    # ... and back into our GPT, which now has exactly the 50257 real rows
    reloaded = GPT.from_pretrained(str(out_dir))
    torch.testing.assert_close(reloaded(idx)[0], model(idx)[0], atol=1e-5, rtol=0)
    # the tokenizer files make the directory usable by transformers' tools on their own
    assert AutoTokenizer.from_pretrained(out_dir).encode(PROMPT) == PROMPT_IDS
    assert not [p for p in os.listdir(tmp_path) if p != "hf"]  # no temporary directory left behind


def test_export_script_and_its_force(tmp_path):
    model = random_gpt(vocab_size=50304, block_size=32, **SMALL)
    init = ["--init", tiny_checkpoint(str(tmp_path / "model_00010.pt"), model=model)]
    result = run_script("export_hf.py", *init, "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    idx = torch.randint(0, 50257, (1, 10))
    exported = load_model(str(tmp_path / "hf"))
    torch.testing.assert_close(exported(idx)[0], model(idx)[0], atol=1e-5, rtol=0)
    # (without --force, over an export or other files: test_faults.py's export_*_without_force)
    (tmp_path / "notes").mkdir()
    export_main([*init, "--out", str(tmp_path / "notes")])  # into the empty folder
    # --force replaces an export (and nothing else: test_faults.py's export_over_its_own_log_dir)
    export_main([*init, "--out", str(tmp_path / "hf"), "--force"])
    assert "model.safetensors" in os.listdir(tmp_path / "notes")
    assert sorted(os.listdir(tmp_path)) == ["hf", "model_00010.pt", "notes"]  # no build folder


def test_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no init time
        gpt2 = GPT(GPTConfig())
    assert sum(p.numel() for p in gpt2.parameters()) == 124_439_808  # lm_head is wte: counted once


def test_tokenizer():
    enc = gpt2_tokenizer()
    assert enc.encode_ordinary(PROMPT) == PROMPT_IDS
    for text in [PROMPT, "naïve café, 東京, emoji 🤖\n\ttabs  and   spaces", ""]:
        assert enc.decode(enc.encode_ordinary(text)) == text
    # <|endoftext|> = 50256 joins documents; as plain text the same characters are ordinary tokens.
    ids = enc.encode("one<|endoftext|>two", allowed_special={"<|endoftext|>"})
    assert ids.count(50256) == 1 and enc.decode(ids) == "one<|endoftext|>two"
    assert 50256 not in enc.encode_ordinary("one<|endoftext|>two")
    assert enc.n_vocab == 50257


def test_kv_cache_greedy_matches_recomputing():
    # float64 so that rounding differences between the two paths cannot flip a near-tie; a small
    # vocabulary keeps recomputing cheap; large position embeddings make the output depend on the
    # position, so the sequence keeps changing and a wrong position in the cached path would show.
    model = random_gpt(vocab_size=1000, block_size=100, **SMALL).double()
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(4))
    prompt = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prompt, 88, temperature=0)  # up to exactly block_size
    assert cached.shape == (3, 100)
    recomputed = prompt  # the plain way: the whole sequence at every step, its most likely next
    with torch.no_grad():
        for _ in range(88):
            next_token = model(recomputed)[0][:, -1].argmax(dim=-1, keepdim=True)
            recomputed = torch.cat([recomputed, next_token], dim=1)
    assert torch.equal(cached, recomputed)
    assert all(len(set(row[12:].tolist())) > 20 for row in cached)  # no fixed point: a real check
    with pytest.raises(UserError, match="context window"):
        model.generate(prompt, 89, temperature=0)


def test_sampling_reproducible_among_the_top_k_and_never_padded():
    model = random_gpt(**TINY_SHAPE)
    # Make the padded rows win by far: the final LayerNorm outputs all ones, and the padded rows of
    # the (tied) embedding are large and positive. Only slicing the logits keeps them unsampled.
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[50257:] = 10.0
    unsliced = model.lm_head(torch.ones(64))
    assert unsliced.argmax() >= 50257
    prompt = torch.randint(0, 50257, (2, 5))
    logits, loss = model(prompt, targets=prompt)
    assert logits.shape == (2, 5, 50257) and torch.isfinite(loss)

    def sample(seed, **kwargs):
        return model.generate(prompt, 40, generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert sample(7).max() < 50257 and sample(8, top_k=50).max() < 50257
    assert torch.equal(sample(9, top_k=1), model.generate(prompt, 40, temperature=0))
    # one new token for 300 copies of a prompt, at a temperature that flattens the distribution:
    # each of the 3 most likely real tokens, and none other
    top3 = set(torch.topk(logits[0, -1], 3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    drawn = model.generate(prompt[:1].repeat(300, 1), 1, temperature=100.0, top_k=3, generator=gen)
    assert set(drawn[:, -1].tolist()) == top3


def test_weights_that_do_not_load_are_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="gpt2-medium"):
        GPT.from_pretrained("gpt3")  # an unknown size name
    hf, empty = tmp_path / "hf", tmp_path / "empty"
    random_hf_model(**SMALL, n_positions=128).save_pretrained(hf)
    config = json.loads((hf / "config.json").read_text())
    model = random_gpt(block_size=32, **SMALL)
    state = {"model": model.state_dict(), "config": dict(asdict(model.config), n_embd=128)}
    torch.save(state, tmp_path / "wrong_shape.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "wrong_shape.pt").read_bytes()[:1000])
    empty.mkdir()
    for path, new_config, message in [  # new_config: config.json is written so first
        (empty, None, "not a Hugging Face GPT-2 checkpoint"),
        (empty, {"model_type": "llama"}, "model_type is 'llama'"),
        (hf, dict(config, n_positions=64), r"wpe.weight is \(128, 64\) there and \(64, 64\) here"),
        (hf, dict(config, n_layer=3), "transformer.h.2.attn.c_attn.bias is absent there"),
        (hf, dict(config, tie_word_embeddings=False), "variant"),
        (tmp_path / "wrong_shape.pt", None, "does not fit"),
        (tmp_path / "truncated.pt", None, "is damaged on disk"),
    ]:
        if new_config:
            (path / "config.json").write_text(json.dumps(new_config))
        with pytest.raises(UserError, match=message):
            load_model(str(path))


def test_no_network_says_how_to_get_the_weights(tmp_path):
    # huggingface_hub reads these when it is imported: a fresh process, with an empty cache.
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    result = run_script("sample.py", "--init", "gpt2", env=env)  # GPT.from_pretrained('gpt2')
    # exit status 1 and one line on stderr, no traceback
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and "pass its path" in result.stderr
    assert "hf download openai-community/gpt2" in result.stderr


def test_sample_script(tmp_path, capsys):
    model = random_gpt(vocab_size=50304, block_size=32, n_layer=2, n_head=2, n_embd=32)
    checkpoint = tiny_checkpoint(str(tmp_path / "model_00010.pt"), model=model)
    args = ["--init", checkpoint, *"--num_samples 3 --max_new_tokens 8 --device cpu".split()]
    script = run_script("sample.py", *args, "--seed", "1")
    assert script.returncode == 0, script.stderr
    assert script.stdout.count(PROMPT) == 3 and "sample 3/3" in script.stdout
    sample_main(args + ["--seed", "1"])
    assert capsys.readouterr().out == script.stdout  # the seed fixes the samples
    sample_main(args + ["--seed", "2"])
    assert capsys.readouterr().out != script.stdout
