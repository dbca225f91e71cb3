"""FlashSpeech-style text-to-speech: eSpeak NG phonemes and corpus, a small consistency model on
mels with a prosody refiner, Griffin-Lim vocoding, and the judges that score it.

``synthesize(text, prompt=None, steps=2, alpha=0.2, seed=0)`` speaks with the shipped model.
"""

from mlx_elm.speech.pipeline import SpeechResult, Synthesizer, synthesize

__all__ = ["SpeechResult", "Synthesizer", "synthesize"]
