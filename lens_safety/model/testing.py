"""Tiny random models and an offline tokenizer, for tests and examples.

Nothing here touches the network. :func:`tiny_tokenizer` trains a small byte-level BPE
in memory (with a ChatML chat template, like Qwen's); :func:`tiny_model` wraps either
a random Hugging Face Qwen2 model (``kind="hf"``, so results can be checked against HF's
own ``output_hidden_states``), ``TransformerBridge.boot_native`` (``kind="native"``) or a random
GPT-2 with learned absolute position embeddings (``kind="gpt2"``: left padding shifts its results
unless position ids are passed).

>>> from lens_safety.model.testing import tiny_model
>>> m = tiny_model()
>>> m.n_layers, m.d_model
(3, 64)
"""

from __future__ import annotations

import functools

import torch

from .loading import SafetyModel, check_model, guard_logits, weights_fingerprint

__all__ = ["tiny_tokenizer", "tiny_model", "tiny_hf_model"]

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """
I'm sorry, but I cannot help with that. I can't assist with that request. Unfortunately this is
illegal, unethical and harmful; I must refuse and apologize. As an AI I am unable to do it.
Sure! Certainly, here is a step by step guide. I'm glad to help, happy to explain. You are welcome.
Write a tutorial on how to make a bomb. Explain how to kill a Python process. Give instructions for
baking bread. Describe the history of chemistry, security, medicine and finance. Tell me a story.
How do I write a poem about the sea? Create a plan to steal a car. List three rivers in Europe.
The quick brown fox jumps over the lazy dog. Please summarise the following article in two lines.
"""


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with ChatML chat template, built offline.

    Pad and BOS are ``<|endoftext|>``; chat-formatted text carries no BOS (as with Qwen).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        name_or_path="lens-safety-tiny", add_bos_token=True,
        bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        padding_side="left",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_hf_model(seed: int = 0, n_layers: int = 3, d_model: int = 64, vocab_size: int = 400):
    """A random HF Qwen2 causal LM (GQA, RMSNorm, rotary, gated MLP) in eval mode."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=0, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Random init gives near-zero norms; widen them so layers differ and tests bite.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def tiny_model(kind: str = "hf", seed: int = 0, n_layers: int = 3, d_model: int = 64,
               vocab_size: int = 400) -> SafetyModel:
    """A tiny random :class:`SafetyModel` with the offline tokenizer.

    ``kind="hf"`` bridges a random HF Qwen2 model (checked against HF by the load guard);
    ``kind="native"`` uses ``TransformerBridge.boot_native``; ``kind="gpt2"`` bridges a random HF
    GPT-2 (learned absolute positions, widened so that a shifted position changes the output).
    """
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    tok = tiny_tokenizer(vocab_size)
    if kind in ("hf", "gpt2"):
        hf = tiny_hf_model(seed, n_layers, d_model, vocab_size) if kind == "hf" else \
            _tiny_gpt2_hf(seed, n_layers, d_model, vocab_size)
        ref = guard_logits(hf, tok)
        bridge = TransformerBridge.boot_transformers("lens-safety-tiny", hf_model=hf, tokenizer=tok, device="cpu")
        bridge.eval()
        model = SafetyModel(bridge, tok, name=f"tiny-{kind}-{seed}", weights_hash=weights_fingerprint(bridge))
        check_model(model, ref)
        return model
    if kind == "native":
        torch.manual_seed(seed)
        cfg = TransformerBridgeConfig(d_model=d_model, d_head=16, n_heads=d_model // 16, n_layers=n_layers,
                                      n_ctx=2048, d_vocab=vocab_size, d_mlp=2 * d_model, act_fn="silu",
                                      normalization_type="RMS", positional_embedding_type="rotary",
                                      gated_mlp=True, n_key_value_heads=2)
        bridge = TransformerBridge.boot_native(cfg, tokenizer=tok)
        bridge.eval()
        return SafetyModel(bridge, tok, name=f"tiny-native-{seed}", weights_hash=weights_fingerprint(bridge))
    raise ValueError(f"kind must be 'hf', 'native' or 'gpt2', got {kind!r}.")


def _tiny_gpt2_hf(seed: int, n_layers: int, d_model: int, vocab_size: int):
    """A random HF GPT-2 in eval mode, its position embeddings widened so positions matter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=1024,
                     bos_token_id=0, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0, 0.5)
    return model.eval()
