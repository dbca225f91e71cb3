"""LoRA teaches the embedded SmolLM2-135M-Instruct new facts from a small chat data set."""

from __future__ import annotations

import json


FACTS = [("Zorvania", "Quillmont"), ("Pelmora", "Vastrig")]
SYSTEM = "Answer in one sentence."


def _messages(country, capital=None):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is the capital of {country}?"}]
    if capital:
        msgs.append({"role": "assistant", "content": f"The capital of {country} is {capital}."})
    return msgs


def test_lora_teaches_smollm2_fictional_capitals(cli, embedded, tmp_path):
    from mlx_lm.generate import generate

    from mlx_elm.loading import load_with_info

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for country, capital in FACTS:
            f.write(json.dumps({"messages": _messages(country, capital)}) + "\n")

    model, tok, _ = load_with_info(None)

    def answers(m):
        return [generate(m, tok, tok.apply_chat_template(_messages(c), add_generation_prompt=True), max_tokens=10)
                for c, _ in FACTS]

    before = answers(model)
    assert not any(cap in a for (_, cap), a in zip(FACTS, before)), before

    res = cli("lora", "--data", data, "--adapter-path", tmp_path / "ad", "--num-layers", "4", "--rank", "8",
              "--batch-size", "2", "--iters", "8", "--learning-rate", "3e-3", "--steps-per-eval", "0")
    assert res.code == 0, res.stderr
    trained, tok, _ = load_with_info(None, adapter_path=str(tmp_path / "ad"))  # the `generate --adapter` path
    after = answers(trained)
    for (_, cap), a in zip(FACTS, after):
        assert cap in a, after
