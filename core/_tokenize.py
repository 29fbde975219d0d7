"""Prompt/response tokenisation into shifted (input_ids, labels, response_mask)."""

from __future__ import annotations

from typing import Any

import torch


def tokenize_prompt_and_output(
    prompt_strs: list[str],
    output_strs: list[str],
    tokenizer: Any,
) -> dict[str, torch.Tensor]:
    r"""Tokenise prompts and outputs separately, concatenate, right-pad, and shift by one.

    For example ``i`` with prompt tokens ``p`` and output tokens ``o``, the full sequence is
    ``s = p ++ o ++ pad*``, padded to ``L = max_i |p_i| + |o_i|`` with the tokenizer's pad id
    (its eos id if it has none). Then

    .. math::  \mathrm{input\_ids} = s_{0:L-1}, \quad \mathrm{labels} = s_{1:L}, \quad
               \mathrm{response\_mask}_j = [\,|p| \le j + 1 < |p| + |o|\,]

    i.e. the mask is true exactly where the label is an output token.

    Args:
        prompt_strs: ``batch`` prompt strings.
        output_strs: ``batch`` output strings.
        tokenizer: a Hugging Face tokenizer; no special tokens are added.

    Returns:
        ``input_ids`` (batch, L-1) long, ``labels`` (batch, L-1) long, ``response_mask`` (batch, L-1) bool.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(
            f"tokenize_prompt_and_output: {len(prompt_strs)} prompts but {len(output_strs)} outputs"
        )
    if not prompt_strs:
        raise ValueError("tokenize_prompt_and_output: empty batch")
    prompt_ids = tokenizer(list(prompt_strs), add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(list(output_strs), add_special_tokens=False)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenize_prompt_and_output: tokenizer has neither a pad nor an eos token id")
    lengths = [len(p) + len(o) for p, o in zip(prompt_ids, output_ids)]
    width = max(lengths)
    full = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        full[i, : len(p) + len(o)] = torch.tensor(list(p) + list(o), dtype=torch.long)
        mask[i, len(p) : len(p) + len(o)] = True
    return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": mask[:, 1:]}
