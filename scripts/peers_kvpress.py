"""The kvpress side of scripts/peers.py; runs in its own virtual environment (kvpress is no kvc
dependency) and imports nothing from kvc.

Loads the model from its GGUF file, prefills the context with each press, and records per layer what
the press kept (a bool [H, T] per layer; for ThinK the kept key channels [H, D]) and the
continuation's negative log-likelihood with the compressed cache.

    python scripts/peers_kvpress.py IDS.pt GGUF OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

import kvpress
from kvpress import (AdaKVPress, ExpectedAttentionPress, KeyDiffPress, KnormPress, PyramidKVPress,
                     SnapKVPress, StreamingLLMPress, ThinKPress, TOVAPress)


def presses(ratio: float) -> dict:
    """The presses compared, by kvc method name, at kvpress's compression ratio (1 - budget)."""
    return {
        "streamingllm": StreamingLLMPress(ratio, n_sink=4),
        "snapkv": SnapKVPress(ratio, window_size=64, kernel_size=5),
        "pyramidkv": PyramidKVPress(ratio, window_size=64, kernel_size=5, beta=20),
        "knorm": KnormPress(ratio),
        "keydiff": KeyDiffPress(ratio),
        "tova": TOVAPress(ratio),
        "expected_attention": ExpectedAttentionPress(ratio, n_future_positions=512, n_sink=4,
                                                     use_covariance=True, use_vnorm=True, epsilon=0.0),
        "adakv": AdaKVPress(SnapKVPress(ratio, window_size=64, kernel_size=5), alpha_safeguard=0.2),
        "think": ThinKPress(key_channel_compression_ratio=ratio, window_size=32),
    }


def recorded(press, kept: dict) -> None:
    """Wrap ``press.compress`` to record, per layer, the kept tokens (or ThinK's kept channels)."""
    compress = press.compress

    def wrapper(module, hidden_states, keys, values, attentions, kwargs):
        before = keys.clone()
        out_k, out_v = compress(module, hidden_states, keys, values, attentions, kwargs)
        if isinstance(press, ThinKPress):  # pruned channels are zeroed in every token
            kept[module.layer_idx] = (out_k != 0).any(2)[0]
        elif isinstance(press, AdaKVPress):  # head-wise: masked, not removed
            mask = torch.ones(before.shape[:3], dtype=torch.bool)
            if module.masked_key_indices is not None:
                mask[module.masked_key_indices] = False
            kept[module.layer_idx] = mask[0]
        else:  # the kept rows, found among the rows before
            same = (out_k[:, :, :, None, :] == before[:, :, None, :, :]).all(-1)
            kept[module.layer_idx] = same.any(2)[0]
        return out_k, out_v

    press.compress = wrapper


def main(ids_path: str, gguf: str, out: str) -> None:
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    data = torch.load(ids_path)
    context, continuation, budgets = data["context"], data["continuation"], data["budgets"]
    path = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    T = context.shape[1]
    results = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
               "transformers": __import__("transformers").__version__, "runs": {}}
    for budget in budgets:
        for name, press in presses(1 - budget).items():
            kept: dict[int, torch.Tensor] = {}
            recorded(press, kept)
            cache = DynamicCache()
            with torch.inference_mode():
                with press(model):
                    model(input_ids=context, past_key_values=cache, logits_to_keep=1)
                # token by token, as kvpress decodes: PyramidKV leaves layers of unequal lengths,
                # which one mask over several new tokens cannot describe
                logits = torch.stack([model(input_ids=continuation[:, i:i + 1], past_key_values=cache,
                                            position_ids=torch.tensor([[T + i]])).logits[0, -1]
                                      for i in range(continuation.shape[1] - 1)])
            logp = logits.float().log_softmax(-1)
            nll = -logp.gather(-1, continuation[0, 1:, None]).squeeze(-1)
            results["runs"][f"{name}@{budget}"] = {
                "kept": torch.stack([kept[i] for i in sorted(kept)]), "nll": nll}
            print(f"kvpress {name} budget {budget}: ppl {nll.mean().exp():.4f}", flush=True)
    torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
