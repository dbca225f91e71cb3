"""One exception type per domain, so the CLI can print a single line and exit non-zero.

Every message should name the problem and the fix.
"""


class MlxElmError(Exception):
    """Base class for errors a user can cause (bad input, missing files, bad options)."""


class ModelLoadError(MlxElmError):
    """A model reference could not be resolved or its files do not match its config."""


class TokenizerError(MlxElmError):
    """No usable tokenizer was found for a model."""


class GenerationError(MlxElmError):
    """Invalid sampling options or a prompt the model cannot take."""


class ConversionError(MlxElmError):
    """A checkpoint could not be converted (unsafe, malformed, or mismatched)."""


class UnsafeCheckpointError(ConversionError):
    """A pickle asked for a global outside the allow-list; nothing from it was executed."""


class KVCacheError(MlxElmError):
    """Invalid KV-cache policy options."""


class TrainingError(MlxElmError):
    """Invalid training data, options, or checkpoints."""


class DiffusionError(MlxElmError):
    """Invalid schedule, sampler or denoiser options."""


class NgramError(MlxElmError):
    """Invalid n-gram model or construction options."""


class SpeculativeError(GenerationError):
    """A draft that cannot serve the target model (another vocabulary, bad K, no prompt to look up)."""


class SpeechError(MlxElmError):
    """Invalid text, prompt audio, speech model, corpus or speech-training options."""


class MoEError(MlxElmError):
    """Invalid mixture-of-experts options, models or benchmark settings."""


class VideoError(MlxElmError):
    """An unreadable, empty or over-budget video, a bad transcript, or invalid video-model options."""
