"""Text-only data: instruction replay during stage 2, and the forgetting measurement.

Nothing is downloaded. Replay prompts are answered once by the *base* decoder (greedy), and those
answers become text-only training examples: fine-tuning then keeps reproducing what the base model
said, a cheap guard against forgetting (self-distillation replay). Forgetting is measured as the
decoder's perplexity on the held-out prose below (written for this project, general-knowledge
English) and on the base model's answers to held-out prompts, before and after training.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_elm.generation import SamplingOptions, build_prompt, generate_text
from mlx_elm.train.data import tokenize_record

REPLAY_PROMPTS = [
    "What is the capital of France?", "Give me three tips for sleeping better.", "Explain what a rainbow is.",
    "Write a haiku about the sea.", "How do plants make food?", "What is 12 times 7?",
    "Name three primary colours.", "Why is the sky blue?", "Suggest a name for a pet cat.",
    "What does a thermometer measure?", "Translate 'good morning' into Spanish.", "What is a noun?",
    "Describe a cup of coffee in one sentence.", "How many days are in a leap year?",
    "What is the boiling point of water in Celsius?", "List two uses of a paperclip.",
    "What is the opposite of 'ancient'?", "Explain gravity to a child.", "What is the largest ocean?",
    "Give an example of a mammal that can fly.", "How do you make a cup of tea?", "What is photosynthesis?",
    "Write one sentence about autumn.", "What are the three states of matter?", "Who wrote Romeo and Juliet?",
    "What is the square root of 81?", "Why do we have seasons?", "Name a famous painting.",
    "What is a verb? Give an example.", "How can I save money each month?", "What is the speed of light?",
    "Describe a forest at night.", "What is the main language spoken in Brazil?", "Explain what a computer does.",
    "What is the freezing point of water in Fahrenheit?", "Give me a synonym for 'happy'.",
    "Why do cats purr?", "What is the tallest mountain on Earth?", "Write a short thank-you note.",
    "What is an atom?", "How many continents are there?", "What do bees make?", "Explain what recycling is.",
    "What is the chemical symbol for gold?", "Suggest a healthy breakfast.", "What is a triangle?",
    "How does a bicycle move?", "What is the purpose of a library?",
]

HELDOUT_PROMPTS = [
    "What is the capital of Japan?", "Give two tips for learning a new language.", "Explain what a volcano is.",
    "Write a haiku about mountains.", "What is 9 times 8?", "Why do leaves change colour in autumn?",
    "Name three kinds of fruit.", "What does a compass do?", "How do fish breathe?",
    "What is the smallest planet in the solar system?", "Describe the smell of rain.", "What is a prime number?",
]

PROSE = [
    "The river runs through the old town, past the market and under three stone bridges. In spring the water rises "
    "and the boats that carry vegetables to the market can pass only at low tide.",
    "Bread is made from flour, water, salt and yeast. The yeast feeds on sugars in the dough and releases gas, which "
    "makes the bread rise before it is baked in a hot oven.",
    "A library lends books, but it also offers a quiet place to read, study and meet. Many libraries now lend music, "
    "films and even tools, and they help people find information online.",
    "The moon does not make its own light. It reflects light from the sun, and as it travels around the Earth we see "
    "more or less of its bright side, which is why it appears to change shape during the month.",
    "Learning to play the piano takes patience. Beginners practise scales slowly, with both hands, until the fingers "
    "find the keys without looking; speed comes later, after accuracy.",
    "Trees take in carbon dioxide from the air and water from the soil. Using the energy of sunlight, their leaves "
    "turn these into sugars and release oxygen, which animals and people breathe.",
    "The train left the station a few minutes late. Outside the window, fields of wheat gave way to small villages, "
    "then to forests, and finally to the grey outskirts of the city.",
    "Good sleep helps the body repair itself and the mind store what it has learned. Most adults need seven to nine "
    "hours a night, and a regular bedtime makes it easier to fall asleep.",
    "Honey bees live in colonies with a single queen. Worker bees collect nectar and pollen from flowers, and in doing "
    "so they carry pollen from one plant to another, which helps many crops grow.",
    "A map is a simplified drawing of a place. It uses symbols for roads, rivers and buildings, and a scale shows how "
    "a distance on the paper compares with the real distance on the ground.",
    "When water is heated it turns into steam, and when it is cooled enough it freezes into ice. These changes are "
    "called changes of state, and they happen at fixed temperatures at a given pressure.",
    "The museum opened a new room for ancient pottery. Visitors can see bowls and jars that are thousands of years "
    "old, along with notes that explain how they were made and used.",
    "Cycling to work saves money and keeps people fit. Cities that build safe bicycle lanes often find that more "
    "people start cycling, and that traffic in the centre becomes calmer.",
    "A volcano forms where molten rock from deep inside the Earth reaches the surface. Some volcanoes erupt gently "
    "with flowing lava, while others explode and throw ash high into the sky.",
    "Children learn words by hearing them many times in different situations. Reading aloud to them, even before "
    "they can read on their own, helps them build a large vocabulary.",
    "The recipe asks for two eggs, a cup of milk and a spoonful of sugar. Mix them well, pour the batter into a hot "
    "pan, and turn the pancake over when small bubbles appear on top.",
    "Weather forecasts are made by computers that simulate the atmosphere. They start from measurements of "
    "temperature, pressure and wind taken around the world, and they become less certain the further ahead they look.",
    "The lighthouse stands on a rock at the end of the harbour. For more than a century its light has warned ships "
    "at night of the dangerous reef just beneath the waves.",
    "Exercise does not have to be intense to be useful. A brisk walk every day strengthens the heart, lifts the mood "
    "and helps people sleep better.",
    "Paper was first made from plant fibres soaked in water and pressed into thin sheets. Today most paper comes from "
    "wood pulp, and much of it is recycled into new paper.",
]


def self_distill(model, tokenizer, prompts: Sequence[str], max_tokens: int = 48,
                 progress: Optional[Callable[[int], None]] = None) -> List[str]:
    """The base decoder's greedy answers to ``prompts`` (cut at the end of the turn)."""
    opts = SamplingOptions(max_tokens=max_tokens, temp=0.0)
    out = []
    for p in prompts:
        text = generate_text(model, tokenizer, build_prompt(tokenizer, p), opts)
        out.append(text.strip())
        if progress is not None:
            progress(1)
    return out


def token_nll(model, tokens: Sequence[int], mask: Sequence[int]) -> Tuple[float, int]:
    """Summed negative log-likelihood of the masked next tokens, and how many there are."""
    x = mx.array(np.asarray(tokens, dtype=np.int32))[None]
    logits = model(x[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, x[:, 1:], reduction="none")[0]
    m = mx.array(np.asarray(mask[1:], dtype=np.float32))
    return float((ce * m).sum().item()), int(m.sum().item())


def prose_perplexity(model, tokenizer, texts: Sequence[str] = PROSE) -> float:
    """Perplexity of plain text (no chat template), all tokens after the first of each passage."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    total, count = 0.0, 0
    for t in texts:
        ids = list(hf.encode(t, add_special_tokens=True))
        s, n = token_nll(model, ids, [1] * len(ids))
        total, count = total + s, count + n
    return math.exp(total / max(count, 1))


def answer_perplexity(model, tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> float:
    """Perplexity of ``answers`` as chat replies to ``prompts`` (how far the model drifted from them)."""
    total, count = 0.0, 0
    for p, a in zip(prompts, answers):
        ex = tokenize_record({"prompt": p, "completion": a}, tokenizer)
        s, n = token_nll(model, ex.tokens, ex.mask)
        total, count = total + s, count + n
    return math.exp(total / max(count, 1))
