"""`lilliput watermark detect`: score a text under a watermark key, either scheme (the detectors are
lilliput.data.watermark, the green list, and lilliput.data.gumbel_watermark, the distortion-free one)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from lilliput.core.checkpoint import LoadConfig
from lilliput.core.options import flag, nested
from lilliput.data.gumbel_watermark import GumbelConfig
from lilliput.data.watermark import WatermarkConfig
from lilliput.jobs.text_file import read_text

SCHEMES = ("green-list", "gumbel")
"""`generate --watermark-scheme` / `watermark detect --scheme`: Kirchenbauer et al.'s green list (biases
the logits) and the distortion-free Gumbel-max sampling (Aaronson; needs a temperature > 0)."""


def watermark_processor(scheme: str, key: str):
    """The generation-time processor of a scheme named on the command line."""
    if scheme == "gumbel":
        from lilliput.data.gumbel_watermark import GumbelWatermark

        return GumbelWatermark(key)
    from lilliput.data.watermark import Watermark

    return Watermark(key)


def watermark_detector(scheme: str, key: str):
    """The detector of a scheme with its default settings (`detect(ids)` / `detect_text(text, tokenizer)`)."""
    if scheme == "gumbel":
        from lilliput.data.gumbel_watermark import GumbelDetector

        return GumbelDetector(key)
    from lilliput.data.watermark import Detector

    return Detector(key)


@dataclass(frozen=True)
class DetectJob:
    file: str = field(metadata=flag(positional=True))
    """Text file, or - for stdin."""
    key: str
    """The secret key the text was generated with."""
    load: LoadConfig = field(default=LoadConfig(), metadata=nested())
    """The model whose tokenizer the text was generated with."""
    scheme: str = field(default=SCHEMES[0], metadata=flag(choices=SCHEMES))
    """The watermark the text was generated with."""
    config: WatermarkConfig = field(default=WatermarkConfig(), metadata=nested(skip=("delta",)))
    """The detector's settings (delta only matters when generating; context width and minimum tokens serve
    both schemes)."""
    gumbel: GumbelConfig = field(default=GumbelConfig(), metadata=nested(only=("fpr",)))
    """The Gumbel detector's own setting: the false-positive rate its exact p-value is held to."""
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print one JSON object."""

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        own = ("gamma", "z_threshold", "ignore_repeated") if self.scheme == "gumbel" else ()
        given = [n for n in own if getattr(self.config, n) != getattr(WatermarkConfig(), n)]
        if self.scheme == "green-list" and self.gumbel.fpr != GumbelConfig().fpr:
            given.append("fpr")
        if given:
            other = "green-list" if self.scheme == "gumbel" else "gumbel"
            raise ValueError(f"--{given[0].replace('_', '-')} is a {other} setting: drop it or pass --scheme {other}")


def run_detect(job: DetectJob) -> None:
    text = sys.stdin.read() if job.file == "-" else read_text(job.file)
    _, tok = job.load.load()  # the tokenizer only matters, but it comes with its model
    if job.scheme == "gumbel":
        from lilliput.data.gumbel_watermark import GumbelDetector

        cfg = GumbelConfig(context_width=job.config.context_width, fpr=job.gumbel.fpr, min_tokens=job.config.min_tokens)
        result = GumbelDetector(job.key, cfg).detect_text(text, tok)
    else:
        from lilliput.data.watermark import Detector

        result = Detector(job.key, job.config).detect_text(text, tok)
    if job.json:
        print(json.dumps(result.to_json()))
    elif job.scheme == "gumbel":
        print(f"{result.verdict}: p {result.p_value:.3e} (exact; threshold {result.fpr:.0e}), score "
              f"{result.score:.1f} over {result.tokens_scored} tokens (mean {result.mean_score:.2f}, 1 without the "
              f"watermark; {result.tokens - result.tokens_scored} not scored)")
    else:
        print(f"{result.verdict}: z {result.z:.2f} (threshold {result.z_threshold}, false-positive rate "
              f"{result.fpr:.1e}), p {result.p_value:.3e}, {result.green}/{result.tokens_scored} green tokens "
              f"({result.green_fraction:.1%}, {result.tokens - result.tokens_scored} not scored)")
